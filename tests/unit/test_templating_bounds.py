"""Rendering is bounded (jobs/templating.py): loops, output, allocations and time.

Each bound fails the render with a TemplateError that names it, before the process spends
the time or the memory; templates within the bounds render as before.
"""

from __future__ import annotations

import time

import pytest

from jobs import templating
from jobs.templating import TemplateError, check, evaluate, render

CONTEXT = {"input": {"text": "abc", "items": [1, 2, 3], "n": 3}, "steps": {}}


def rendered_error(template: str) -> str:
    started = time.monotonic()
    with pytest.raises(TemplateError) as caught:
        render(template, CONTEXT)
    assert time.monotonic() - started < 5, "the bound was hit only after seconds of work"
    return caught.value.message


def test_nested_loops_stop_at_the_iteration_bound():
    message = rendered_error(
        "{% for a in [0] * 1000 %}{% for b in [0] * 1000 %}{% endfor %}{% endfor %}done"
    )
    assert message == "the template loops more than 100,000 times"


def test_loops_within_the_bound_render_as_before():
    assert render("{% for x in input.items %}{{ loop.index }}:{{ x }}{% if not loop.last %},"
                  "{% endif %}{% endfor %}", CONTEXT) == "1:1,2:2,3:3"  # fmt: skip
    assert render("{% for x in [] %}x{% else %}none{% endfor %}", CONTEXT) == "none"


def test_output_stops_at_the_size_bound_even_for_literal_text():
    message = rendered_error("{% for a in [0] * 90000 %}" + "x" * 200 + "{% endfor %}")
    assert message == "the template produces more than 10,000,000 characters"


def test_a_value_built_by_doubling_stops_at_the_size_bound():
    doubling = "{% set a = 'x' * 1000000 %}" + "{% set a = a ~ a %}" * 8 + "{{ a | length }}"
    assert "10,000,000 characters" in rendered_error(doubling)
    assert "10,000,000 characters" in rendered_error(
        "{% set a = ['x' * 1000000] %}" + "{% set a = a + a %}" * 8 + "{{ a | length }}"
    )


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'a' | center(100000000) }}",
        "{{ 'a'.ljust(100000000) }}",
        "{{ 'a'.zfill(100000000) }}",
        "{{ '{:>100000000}'.format(1) }}",
        "{{ '%100000000d' % 1 }}",
        "{{ '%100000000d' | format(1) }}",
        "{{ (['a' * 1000000] * 100) | join }}",
        "{{ ('a' * 1000000) | replace('', 'bbbbbbbbbbbbbbbbbbbb') }}",
        "{{ ('a\\n' * 500000) | indent(100) }}",
        "{{ [1] | batch(100000000, 'x') | list }}",
        "{{ [1, 2] | slice(100000000) | list }}",
        "{{ ('ab' * 500000) | list | map('center', 100) | list }}",
        "{{ ([[1]] * 100000) | sum(start=[]) }}",
        "{{ (10 ** 50000) * (10 ** 50000) }}",
    ],
)
def test_operators_filters_and_methods_that_would_allocate_too_much_are_refused(template):
    message = rendered_error(template)
    assert (
        "10,000,000" in message
        or "too large" in message
        or "100,000" in message
        or ("sum" in message)
    ), message


def test_recursive_loops_are_refused_when_checked():
    with pytest.raises(TemplateError, match="recursive loops are not available"):
        check("{% for x in input.items recursive %}{{ loop(x) }}{% endfor %}")


def test_a_template_nested_too_deeply_is_a_template_error():
    with pytest.raises(TemplateError, match="nested too deeply"):
        check("{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}")
    with pytest.raises(TemplateError, match="nested too deeply"):
        evaluate("-" * 20000 + "1", CONTEXT)


def test_the_time_bound_is_checked_as_the_template_runs(monkeypatch):
    monkeypatch.setattr(templating, "MAX_RENDER_SECONDS", 0.0)
    with pytest.raises(TemplateError, match="takes longer than 0 s to render"):
        render("{% for x in input.items %}{{ x }}{% endfor %}", CONTEXT)


def test_one_budget_covers_every_string_of_a_rendered_structure():
    many = {f"k{i}": "{% for a in [0] * 30000 %}{% endfor %}" for i in range(4)}
    with pytest.raises(TemplateError, match="loops more than 100,000 times"):
        render(many, CONTEXT)
    assert render(dict(list(many.items())[:3]), CONTEXT) == {"k0": "", "k1": "", "k2": ""}
