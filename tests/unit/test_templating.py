"""The sandboxed template language (jobs.templating): checking, rendering, the sandbox."""

from __future__ import annotations

import pytest

from jobs.templating import (
    TemplateError,
    TemplateInfo,
    check,
    check_expression,
    evaluate,
    path_join,
    render,
)

CONTEXT = {
    "input": {"ticket": "Where is my refund?", "n": 3, "items": [1, 2], "tags": ["a", "b"]},
    "steps": {
        "classify": {"output": {"text": "refund", "score": 0.9}, "status": "succeeded"},
        "search": {
            "output": {"documents": [{"text": "doc one"}, {"text": "doc two"}]},
            "status": "succeeded",
        },
        "skipped_one": {"output": None, "status": "skipped"},
    },
}


# --- rendering: native values ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ input.n }}", 3),
        ("{{ input.n * 2.5 }}", 7.5),
        ("{{ input.tags }}", ["a", "b"]),
        ("{{ steps.classify.output }}", {"text": "refund", "score": 0.9}),
        ("{{ steps.classify.output.text == 'refund' }}", True),
        ("{{ none }}", None),
        ("{{ {'a': [1, input.n]} }}", {"a": [1, 3]}),
        ("{{ input.ticket }}", "Where is my refund?"),
    ],
)
def test_a_single_expression_renders_to_its_native_value(template, expected):
    assert render(template, CONTEXT) == expected


def test_whitespace_around_a_single_expression_keeps_the_native_value():
    assert render("  {{ input.tags }}\n", CONTEXT) == ["a", "b"]


def test_tuples_become_lists():
    assert render("{{ (1, (2, 3)) }}", CONTEXT) == [1, [2, 3]]


def test_a_filter_generator_becomes_a_list():
    template = "{{ steps.search.output.documents | map(attribute='text') }}"
    assert render(template, CONTEXT) == ["doc one", "doc two"]


def test_undefined_is_none():
    assert render("{{ input.missing }}", CONTEXT) is None
    assert render("{{ steps.nowhere.output.text }}", CONTEXT) is None


def test_undefined_chains_through_a_skipped_steps_null_output():
    assert render("{{ steps.skipped_one.output.text }}", CONTEXT) is None


def test_undefined_inside_a_structure_is_none():
    assert render("{{ [input.missing, 1] }}", CONTEXT) == [None, 1]
    assert render("{{ {'x': input.missing} }}", CONTEXT) == {"x": None}


def test_a_dotted_name_reads_the_key_before_the_dict_method():
    # Jinja's default would return the bound method dict.items here.
    assert render("{{ input.items }}", CONTEXT) == [1, 2]


def test_a_value_that_is_not_json_is_refused():
    with pytest.raises(TemplateError, match="dict_keys, which is not JSON"):
        render("{{ input.keys() }}", CONTEXT)


def test_a_non_finite_number_is_refused():
    with pytest.raises(TemplateError, match="not a JSON number"):
        render("{{ 1e308 * 10 }}", CONTEXT)


def test_tojson_works():
    assert render("{{ input.tags | tojson }}", CONTEXT) == '["a", "b"]'
    assert render("tags={{ input.tags | tojson }}", CONTEXT) == 'tags=["a", "b"]'


# --- rendering: strings and structures -------------------------------------------------------


def test_a_string_with_text_around_renders_to_a_string():
    assert render("Label: {{ input.ticket }}", CONTEXT) == "Label: Where is my refund?"


def test_two_expressions_render_to_a_string():
    assert render("{{ input.n }}{{ input.n }}", CONTEXT) == "33"


def test_in_a_string_undefined_and_none_render_as_empty():
    assert render("[{{ input.missing }}][{{ steps.skipped_one.output }}]", CONTEXT) == "[][]"


def test_in_a_string_lists_and_dicts_render_as_json():
    assert render("t={{ input.tags }}", CONTEXT) == 't=["a", "b"]'
    assert render("c={{ steps.classify.output }}", CONTEXT) == (
        'c={"text": "refund", "score": 0.9}'
    )


def test_control_structures_render_to_a_string():
    template = (
        "{% for d in steps.search.output.documents %}{{ loop.index }}.{{ d.text }} {% endfor %}"
    )
    assert render(template, CONTEXT) == "1.doc one 2.doc two "


def test_a_set_block_renders_to_a_string():
    assert render("{% set x = input.n + 1 %}{{ x }}", CONTEXT) == "4"


def test_strings_without_template_syntax_are_untouched():
    assert render("plain { text } #", CONTEXT) == "plain { text } #"
    assert render("{# only a comment #}", CONTEXT) == "{# only a comment #}"


def test_non_strings_are_untouched():
    assert render(5, CONTEXT) == 5
    assert render(None, CONTEXT) is None
    assert render(True, CONTEXT) is True


def test_render_walks_dicts_and_lists():
    value = {"q": "{{ input.ticket }}", "filters": [{"n": "{{ input.n }}"}, "x"], "k": 1}
    assert render(value, CONTEXT) == {
        "q": "Where is my refund?",
        "filters": [{"n": 3}, "x"],
        "k": 1,
    }


def test_render_does_not_alias_the_context():
    result = render("{{ input.tags }}", CONTEXT)
    result.append("c")
    assert CONTEXT["input"]["tags"] == ["a", "b"]


def test_item_and_index_are_visible_when_given():
    context = {**CONTEXT, "item": {"text": "hello"}, "index": 2}
    assert render("{{ index }}: {{ item.text }}", context) == "2: hello"


# --- rendering errors ------------------------------------------------------------------------


def test_a_runtime_error_is_a_template_error():
    with pytest.raises(TemplateError, match="ZeroDivisionError: division by zero"):
        render("{{ 1 / 0 }}", CONTEXT)


def test_a_type_error_is_a_template_error():
    with pytest.raises(TemplateError, match="TypeError"):
        render("{{ input.n + 'x' }}", CONTEXT)


def test_a_render_error_inside_a_structure_names_its_path():
    with pytest.raises(TemplateError) as caught:
        render({"filters": ["ok", {"n": "{{ 1 / 0 }}"}]}, CONTEXT)
    assert caught.value.path == "filters[1].n"
    assert str(caught.value) == "filters[1].n: ZeroDivisionError: division by zero"


def test_a_syntax_error_at_render_is_a_template_error():
    with pytest.raises(TemplateError, match="unexpected '}'"):
        render("{{ input.n }", CONTEXT)


# --- the sandbox -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template",
    [
        "{{ input.__class__ }}",
        "{{ input.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ input['__class__'] }}",
        "{{ input | attr('__class__') }}",
        "{{ '{0.__class__}'.format(input) }}",
        "x {{ input.__class__ }} y",
        "{{ input.tags.__len__() }}",
    ],
)
def test_access_to_python_internals_fails(template):
    with pytest.raises(TemplateError, match="unsafe"):
        render(template, CONTEXT)


@pytest.mark.parametrize(
    "template",
    [
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ lipsum.__globals__ }}",
        "{{ range.__self__ }}",
    ],
)
def test_jinja_globals_are_not_available(template):
    with pytest.raises(TemplateError, match="unknown name"):
        check(template)
    # Rendered without the check, the name is undefined: it fails or yields nothing.
    try:
        assert render(template, CONTEXT) is None
    except TemplateError:
        pass


def test_the_run_input_cannot_be_modified():
    with pytest.raises(TemplateError, match="unsafe"):
        render("{{ input.tags.append('x') }}", CONTEXT)
    assert CONTEXT["input"]["tags"] == ["a", "b"]


def test_huge_repetitions_are_refused():
    with pytest.raises(TemplateError, match="too large"):
        render("{{ 'a' * 100000000 }}", CONTEXT)
    assert render("{{ 'ab' * 3 }}", CONTEXT) == "ababab"


def test_huge_powers_are_refused():
    with pytest.raises(TemplateError, match="too large"):
        render("{{ 10 ** 1000000 }}", CONTEXT)
    assert render("{{ 2 ** 10 }}", CONTEXT) == 1024


@pytest.mark.parametrize(
    ("template", "tag"),
    [
        ("{% include 'other' %}", "include"),
        ("{% extends 'base' %}", "extends"),
        ("{% import 'm' as m %}", "import"),
        ("{% from 'm' import f %}", "from ... import"),
        ("{% macro f() %}x{% endmacro %}{{ f() }}", "macro"),
    ],
)
def test_includes_imports_and_macros_are_refused(template, tag):
    with pytest.raises(TemplateError, match=f"the {{% {tag} %}} tag is not available"):
        check(template)


def test_the_random_filter_is_not_available():
    # A template must render the same way every time (map items render late).
    with pytest.raises(TemplateError, match="random"):
        check("{{ input.tags | random }}")


# --- check -----------------------------------------------------------------------------------


def test_check_collects_step_references():
    info = check("{{ steps.classify.output.text }} {{ steps['search'].output }}")
    assert info == TemplateInfo(step_refs=frozenset({"classify", "search"}), uses_item=False)


def test_check_collects_step_references_in_control_structures():
    template = "{% for d in steps.search.output.documents %}{{ d }}{% endfor %}"
    assert check(template).step_refs == frozenset({"search"})


def test_check_reports_item_and_index():
    assert check("{{ item.text }}").uses_item is True
    assert check("{{ index }}").uses_item is True
    assert check("{{ input.x }}").uses_item is False


def test_loop_variables_are_not_uses_of_index():
    template = "{% for x in input.items %}{{ loop.index }}{% endfor %}"
    assert check(template) == TemplateInfo()


def test_a_plain_string_reads_nothing():
    assert check("just text") == TemplateInfo()


def test_check_refuses_unknown_names():
    with pytest.raises(TemplateError) as caught:
        check("{{ foo }}")
    assert caught.value.message == "unknown name 'foo'; templates see input, steps, item, index"


def test_check_suggests_a_close_name():
    with pytest.raises(TemplateError, match=r"unknown name 'inptu'.*\(did you mean 'input'\?\)"):
        check("{{ inptu.ticket }}")


def test_check_lists_every_unknown_name():
    with pytest.raises(TemplateError, match="unknown names 'a', 'b'"):
        check("{{ a }}{{ b }}")


def test_names_bound_by_the_template_are_known():
    assert check("{% set x = 1 %}{% for y in input.l %}{{ x }}{{ y }}{% endfor %}") == (
        TemplateInfo()
    )


def test_self_is_an_unknown_name():
    with pytest.raises(TemplateError, match="unknown name 'self'"):
        check("{{ self }}")


def test_steps_must_be_followed_by_a_literal_id():
    with pytest.raises(TemplateError, match=r"use steps.<id> with a literal step id"):
        check("{{ steps[input.which].output }}")
    with pytest.raises(TemplateError, match=r"use steps.<id>"):
        check("{{ steps }}")


def test_a_step_has_only_output_and_status():
    assert check("{{ steps.a.status }}").step_refs == frozenset({"a"})
    with pytest.raises(TemplateError) as caught:
        check("{{ steps.a.outptu.text }}")
    assert caught.value.message == "steps.a has output and status; there is no 'outptu'"


def test_check_reports_syntax_errors_with_jinjas_message():
    with pytest.raises(TemplateError) as caught:
        check("{{ input.ticket }")
    assert caught.value.message == "unexpected '}'"


def test_a_syntax_error_in_a_multiline_template_names_the_line():
    with pytest.raises(TemplateError, match=r"\(line 2\)"):
        check("line one\n{{ input. }}")


# --- expressions -----------------------------------------------------------------------------


def test_check_expression_collects_references():
    info = check_expression("steps.classify.output.text == 'refund' and input.n > 1")
    assert info == TemplateInfo(step_refs=frozenset({"classify"}), uses_item=False)


def test_check_expression_refuses_braces():
    with pytest.raises(TemplateError, match="bare expression"):
        check_expression("{{ input.n > 1 }}")


def test_check_expression_refuses_trailing_text():
    with pytest.raises(TemplateError, match="unexpected 'b' after the expression"):
        check_expression("a b")


def test_check_expression_refuses_unknown_names():
    with pytest.raises(TemplateError, match="unknown name 'x'"):
        check_expression("x == 1")


def test_evaluate_returns_the_native_value():
    assert evaluate("steps.classify.output.text == 'refund'", CONTEXT) is True
    assert evaluate("input.n + 1", CONTEXT) == 4
    assert evaluate("input.tags", CONTEXT) == ["a", "b"]


def test_evaluate_returns_none_for_undefined():
    assert evaluate("steps.skipped_one.output.text", CONTEXT) is None


def test_evaluate_raises_template_errors():
    with pytest.raises(TemplateError, match="division by zero"):
        evaluate("1 / 0", CONTEXT)
    with pytest.raises(TemplateError, match="unsafe"):
        evaluate("input.__class__", CONTEXT)


# --- paths -----------------------------------------------------------------------------------


def test_path_join_formats_paths_like_the_error_messages():
    assert path_join("", "args") == "args"
    assert path_join("steps[1]", "args") == "steps[1].args"
    assert path_join("steps[1].args.filters", 0) == "steps[1].args.filters[0]"
    assert path_join("args", "user-id") == 'args["user-id"]'
