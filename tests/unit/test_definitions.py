"""The workflow definition language (jobs.definitions): parsing, every rule, its faults."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.definitions import (
    DEFAULT_MAX_PARALLEL,
    Definition,
    DefinitionError,
    Fault,
    RetryPolicy,
    parse_definition,
    validate_input,
)
from jobs.steps import registry
from jobs.steps.registry import KindSpec


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """The built-in kinds (`approval` among them), and exactly the tools echo, http and crm.lookup.

    Other modules register kinds and tools when they are imported; the messages tested here
    list the registry's contents, so each test sees a fixed registry.
    """
    monkeypatch.setattr(registry, "_kinds", dict(registry._BUILTIN_KINDS))
    monkeypatch.setattr(registry, "_tools", {})
    for name in ("echo", "http", "crm.lookup"):
        registry.register_tool(name)(lambda ctx, **args: args)


# The support-triage example: classify a ticket, search the documents, look up the account,
# have a refund reviewed, summarise each document found, and draft the reply.
SUPPORT_TRIAGE_EXAMPLE = """
{
  "name": "support-triage",
  "input_schema": {"type": "object", "required": ["ticket"],
                   "properties": {"ticket": {"type": "string"}}},
  "steps": [
    {"id": "classify", "kind": "llm", "prompt": "Label this ticket: {{ input.ticket }}",
     "retry": {"max_attempts": 4, "backoff_s": 1, "max_backoff_s": 60}, "timeout_s": 30},
    {"id": "search", "kind": "retrieval", "query": "{{ input.ticket }}", "top_k": 5},
    {"id": "account", "kind": "tool", "tool": "crm.lookup", "args": {"email": "{{ input.email }}"}},
    {"id": "review", "kind": "approval", "after": ["classify"],
     "when": "steps.classify.output.text == 'refund'",
     "prompt": "Refund requested: {{ input.ticket }}", "timeout_s": 86400, "on_timeout": "reject"},
    {"id": "per_doc", "kind": "map", "over": "{{ steps.search.output.documents }}",
     "step": {"kind": "llm", "prompt": "Summarise: {{ item.text }}"}, "max_parallel": 4},
    {"id": "draft", "kind": "llm", "after": ["per_doc", "account", "review"],
     "prompt": "Reply using {{ steps.per_doc.output }} ..."}
  ],
  "output": "{{ steps.draft.output.text }}"
}
"""


def workflow(*steps, **top):
    """A minimal valid document with the given steps."""
    document = {"name": "wf", "steps": list(steps)}
    document.update(top)
    return document


def llm(step_id, prompt="Hello", **fields):
    return {"id": step_id, "kind": "llm", "prompt": prompt, **fields}


def faults_of(document) -> list[str]:
    with pytest.raises(DefinitionError) as caught:
        parse_definition(document)
    return [str(fault) for fault in caught.value.faults]


def single_fault(document) -> str:
    faults = faults_of(document)
    assert len(faults) == 1, faults
    return faults[0]


# --- the support-triage example and the result ----------------------------------------------


def test_the_support_triage_example_parses():
    definition = parse_definition(SUPPORT_TRIAGE_EXAMPLE)
    assert isinstance(definition, Definition)
    assert definition.name == "support-triage"
    assert [step.id for step in definition.steps] == [
        "classify",
        "search",
        "account",
        "review",
        "per_doc",
        "draft",
    ]
    assert definition.output == "{{ steps.draft.output.text }}"
    assert definition.input_schema == {
        "type": "object",
        "required": ["ticket"],
        "properties": {"ticket": {"type": "string"}},
    }
    assert definition.document == json.loads(SUPPORT_TRIAGE_EXAMPLE)


def test_the_support_triage_example_steps_carry_their_kind_queue_and_config():
    definition = parse_definition(SUPPORT_TRIAGE_EXAMPLE)
    classify = definition.step("classify")
    assert classify.kind == "llm"
    assert classify.queue == "steps.llm"
    assert classify.config == {"prompt": "Label this ticket: {{ input.ticket }}"}
    assert classify.retry == RetryPolicy(max_attempts=4, backoff_s=1.0, max_backoff_s=60.0)
    assert classify.timeout_s == 30.0
    account = definition.step("account")
    assert account.queue == "steps.tool"
    assert account.config == {"tool": "crm.lookup", "args": {"email": "{{ input.email }}"}}
    review = definition.step("review")
    assert review.when == "steps.classify.output.text == 'refund'"
    assert review.config == {
        "prompt": "Refund requested: {{ input.ticket }}",
        "on_timeout": "reject",
    }
    assert review.after == ("classify",)


def test_a_map_step_holds_its_inner_step():
    per_doc = parse_definition(SUPPORT_TRIAGE_EXAMPLE).step("per_doc")
    assert per_doc.kind == "map"
    assert per_doc.config == {"over": "{{ steps.search.output.documents }}", "max_parallel": 4}
    assert per_doc.max_parallel == 4
    assert per_doc.item is not None
    assert per_doc.item.id == "per_doc"
    assert per_doc.item.kind == "llm"
    assert per_doc.item.queue == "steps.llm"
    assert per_doc.item.config == {"prompt": "Summarise: {{ item.text }}"}
    assert per_doc.item.after == ()
    assert per_doc.item.when is None


def test_max_parallel_defaults_to_10():
    document = workflow(
        {"id": "m", "kind": "map", "over": "{{ [1, 2] }}", "step": {"kind": "llm", "prompt": "x"}}
    )
    assert parse_definition(document).step("m").max_parallel == DEFAULT_MAX_PARALLEL == 10


def test_a_template_reference_is_an_implicit_dependency():
    definition = parse_definition(SUPPORT_TRIAGE_EXAMPLE)
    assert definition.step("per_doc").depends_on == frozenset({"search"})
    assert definition.step("per_doc").after == ()
    assert definition.step("draft").depends_on == frozenset({"per_doc", "account", "review"})


def test_when_and_inner_step_templates_are_dependencies():
    document = workflow(
        llm("a"),
        llm("b"),
        llm("c"),
        {
            "id": "m",
            "kind": "map",
            "over": "{{ steps.a.output }}",
            "when": "steps.b.output",
            "step": {"kind": "llm", "prompt": "{{ steps.c.output }} {{ item }}"},
        },
    )
    assert parse_definition(document).step("m").depends_on == frozenset({"a", "b", "c"})


def test_dependents_are_the_reverse_edges():
    definition = parse_definition(SUPPORT_TRIAGE_EXAMPLE)
    assert definition.dependents("search") == frozenset({"per_doc"})
    assert definition.dependents("draft") == frozenset()
    assert definition.dependents("classify") == frozenset({"review"})


def test_steps_are_in_a_topological_order_stable_with_the_declared_order():
    document = workflow(
        llm("d", "{{ steps.c.output }}"),
        llm("a"),
        llm("c", after=["b"]),
        llm("b"),
        llm("e"),
    )
    assert [step.id for step in parse_definition(document).steps] == ["a", "b", "c", "d", "e"]


def test_defaults_of_a_step():
    step = parse_definition(workflow(llm("a"))).step("a")
    assert step.after == ()
    assert step.depends_on == frozenset()
    assert step.when is None
    assert step.retry == RetryPolicy()
    assert step.timeout_s is None
    assert step.optional is False
    assert step.item is None
    assert step.max_parallel is None


def test_description_defaults_to_empty_and_output_to_none():
    definition = parse_definition(workflow(llm("a")))
    assert definition.description == ""
    assert definition.output is None
    assert definition.input_schema is None


def test_parsing_does_not_keep_a_reference_to_the_callers_document():
    document = workflow(llm("a"))
    definition = parse_definition(document)
    document["steps"][0]["prompt"] = "changed"
    assert definition.step("a").config["prompt"] == "Hello"


def test_yaml_is_accepted():
    text = """
name: support-triage
steps:
  - id: classify
    kind: llm
    prompt: "Label: {{ input.ticket }}"
  - id: reply
    kind: tool
    tool: echo
    after: [classify]
    args:
      text: "{{ steps.classify.output.text }}"
      on: 2024-01-01
      ok: yes
    optional: true
output: "{{ steps.reply.output }}"
"""
    definition = parse_definition(text)
    assert [step.id for step in definition.steps] == ["classify", "reply"]
    # Dates stay strings, as they would be in JSON.
    # Dates stay strings and `on` stays a key, as they would be in JSON (YAML 1.1 would turn
    # them into a date and the boolean True); `yes` is a string, only true/false are booleans.
    args = definition.step("reply").config["args"]
    assert args == {"text": "{{ steps.classify.output.text }}", "on": "2024-01-01", "ok": "yes"}
    assert definition.step("reply").optional is True


def test_json_text_is_accepted():
    assert parse_definition(json.dumps(workflow(llm("a")))).name == "wf"


def test_invalid_json_is_one_fault_at_the_root_with_its_position():
    assert single_fault('{"name": "x",\n "steps": [}') == (
        "$: invalid JSON: Expecting value: line 2 column 12 (char 25)"
    )


def test_invalid_yaml_is_one_fault_at_the_root_with_its_position():
    fault = single_fault("name: x\nsteps: [\n")
    assert fault.startswith("$: invalid YAML:")
    assert "line 3" in fault


def test_a_document_that_is_not_an_object_is_refused():
    assert single_fault("[1, 2]") == "$: expected an object, got an array"


def test_nan_is_not_json():
    assert single_fault(workflow(llm("a", temperature=float("nan")))) == (
        "steps[0].temperature: nan is not a JSON number"
    )


# --- top-level rules -------------------------------------------------------------------------


def test_name_is_required():
    document = workflow(llm("a"))
    del document["name"]
    assert single_fault(document) == "name: required field is missing"


def test_name_must_match_its_pattern():
    assert single_fault(workflow(llm("a"), name="Support Triage")) == (
        "name: invalid value 'Support Triage': use lowercase letters, digits, '_', '.' and '-', "
        "starting with a letter or a digit, at most 100 characters"
    )


def test_name_must_be_a_string():
    assert single_fault(workflow(llm("a"), name=5)) == "name: expected a string, got a number"


def test_description_must_be_a_string():
    assert single_fault(workflow(llm("a"), description=["x"])) == (
        "description: expected a string, got an array"
    )


def test_steps_are_required():
    assert single_fault({"name": "wf"}) == "steps: required field is missing"


def test_steps_must_not_be_empty():
    assert single_fault(workflow()) == "steps: a workflow needs at least one step"


def test_steps_are_at_most_500():
    steps = [llm(f"s{i}") for i in range(501)]
    assert single_fault(workflow(*steps)) == "steps: a workflow has at most 500 steps"


def test_a_step_must_be_an_object():
    assert single_fault(workflow(llm("a"), "b")) == (
        "steps[1]: expected a step (an object), got a string"
    )


def test_unknown_top_level_fields_are_refused():
    assert single_fault(workflow(llm("a"), ouptut="x")) == (
        "ouptut: unknown field (did you mean 'output'?)"
    )


def test_input_schema_must_be_a_valid_json_schema():
    assert single_fault(workflow(llm("a"), input_schema={"type": "strng"})) == (
        "input_schema.type: not a valid JSON Schema: "
        "'strng' is not valid under any of the given schemas"
    )


def test_input_schema_faults_name_the_nested_path():
    schema = {"type": "object", "properties": {"qty": {"minimum": "zero"}}}
    assert single_fault(workflow(llm("a"), input_schema=schema)) == (
        "input_schema.properties.qty.minimum: not a valid JSON Schema: "
        "'zero' is not of type 'number'"
    )


def test_input_schema_must_be_an_object():
    assert single_fault(workflow(llm("a"), input_schema="object")) == (
        "input_schema: expected an object, got a string"
    )


def test_input_schema_references_must_stay_inside_the_schema():
    schema = {"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}
    assert single_fault(workflow(llm("a"), input_schema=schema)) == (
        'input_schema.properties.a["$ref"]: only references inside the schema (#...) work'
    )


def test_input_schema_references_must_resolve():
    schema = {"properties": {"a": {"$ref": "#/$defs/missing"}}}
    assert single_fault(workflow(llm("a"), input_schema=schema)) == (
        "input_schema.properties.a[\"$ref\"]: reference '#/$defs/missing' points to nothing"
    )


def test_local_references_in_input_schema_are_fine():
    schema = {
        "$defs": {"qty": {"type": "integer"}},
        "properties": {"a": {"$ref": "#/$defs/qty"}},
    }
    assert parse_definition(workflow(llm("a"), input_schema=schema)).input_schema == schema


def test_output_may_be_any_json():
    definition = parse_definition(
        workflow(llm("a"), output={"text": "{{ steps.a.output }}", "n": [1, None, True]})
    )
    assert definition.output == {"text": "{{ steps.a.output }}", "n": [1, None, True]}


def test_output_references_must_be_known_steps():
    assert single_fault(workflow(llm("search"), output={"x": ["{{ steps.serch.output }}"]})) == (
        "output.x[0]: template references unknown step 'serch' (did you mean 'search'?)"
    )


def test_output_templates_must_parse():
    assert single_fault(workflow(llm("a"), output="{{ steps.a.output }")) == (
        "output: template error: unexpected '}'"
    )


def test_output_cannot_use_item():
    assert single_fault(workflow(llm("a"), output="{{ item }}")) == (
        "output: item and index are only defined inside the step of a map"
    )


# --- common step fields ----------------------------------------------------------------------


def test_step_id_is_required():
    assert single_fault(workflow({"kind": "llm", "prompt": "x"})) == (
        "steps[0].id: required field is missing"
    )


def test_step_id_must_match_its_pattern():
    assert single_fault(workflow(llm("Search-1"))) == (
        "steps[0].id: invalid value 'Search-1': use lowercase letters, digits and '_', "
        "starting with a letter or '_', at most 64 characters (an id is written steps.<id> in "
        "templates)"
    )


def test_a_reference_to_a_malformed_id_is_not_reported_twice():
    # The id is wrong; saying the step does not exist as well would mislead.
    assert single_fault(workflow(llm("Bad"), llm("b", after=["Bad"]))).startswith(
        "steps[0].id: invalid value 'Bad'"
    )


def test_duplicate_ids_are_refused():
    assert single_fault(workflow(llm("a"), llm("a"))) == (
        "steps[1].id: duplicate id 'a' (first at steps[0])"
    )


def test_kind_is_required():
    assert single_fault(workflow({"id": "a", "prompt": "x"})) == (
        "steps[0].kind: required field is missing"
    )


def test_unknown_kinds_are_refused_with_the_known_ones():
    assert single_fault(workflow({"id": "a", "kind": "llmm", "prompt": "x"})) == (
        "steps[0].kind: unknown kind 'llmm' (did you mean 'llm'?); "
        "known kinds: agent, approval, llm, map, retrieval, tool, workflow"
    )


def test_a_registered_kind_is_known():
    registry.register_kind(
        KindSpec(
            name="classifier",
            queue="steps.llm",
            handler=None,
            config_schema={"type": "object", "properties": {"labels": {"type": "array"}}},
        )
    )
    step = parse_definition(workflow({"id": "a", "kind": "classifier", "labels": ["x"]})).step("a")
    assert (step.kind, step.queue, step.config) == ("classifier", "steps.llm", {"labels": ["x"]})


def test_after_must_be_an_array_of_strings():
    assert single_fault(workflow(llm("a"), llm("b", after="a"))) == (
        "steps[1].after: expected an array, got a string"
    )
    assert single_fault(workflow(llm("a"), llm("b", after=[1]))) == (
        "steps[1].after[0]: expected a string, got a number"
    )


def test_after_entries_must_be_unique():
    assert single_fault(workflow(llm("a"), llm("b", after=["a", "a"]))) == (
        "steps[1].after: entries must be unique"
    )


def test_after_must_name_known_steps_with_a_suggestion():
    document = workflow(llm("search"), llm("x"), llm("y"), llm("draft", after=["serch"]))
    assert (
        single_fault(document) == "steps[3].after[0]: unknown step 'serch' (did you mean 'search'?)"
    )


def test_after_without_a_close_match_has_no_suggestion():
    assert single_fault(workflow(llm("a"), llm("b", after=["zzz"]))) == (
        "steps[1].after[0]: unknown step 'zzz'"
    )


def test_a_step_cannot_come_after_itself():
    assert single_fault(workflow(llm("a", after=["a"]))) == (
        "steps[0].after[0]: a step cannot depend on itself"
    )


def test_when_must_be_a_string():
    assert single_fault(workflow(llm("a", when=True))) == (
        "steps[0].when: expected a string, got a boolean"
    )


def test_when_is_a_bare_expression():
    assert single_fault(workflow(llm("a", when="{{ input.x }}"))) == (
        "steps[0].when: template error: a condition is a bare expression: remove the {{ }} or {% %}"
    )


def test_when_must_parse():
    assert single_fault(workflow(llm("a", when="input.x =="))) == (
        "steps[0].when: template error: unexpected 'end of template'"
    )


def test_when_cannot_reference_its_own_step():
    assert single_fault(workflow(llm("a"), llm("b", when="steps.b.output"))) == (
        "steps[1].when: a step cannot reference its own output"
    )


def test_when_references_must_be_known():
    assert single_fault(workflow(llm("a", when="steps.nope.output.ok"))) == (
        "steps[0].when: template references unknown step 'nope'"
    )


def test_when_cannot_use_item_outside_a_map():
    assert single_fault(workflow(llm("a", when="item"))) == (
        "steps[0].when: item and index are only defined inside the step of a map"
    )


@pytest.mark.parametrize(
    ("retry", "expected"),
    [
        ({"max_attempts": 0}, "steps[0].retry.max_attempts: 0 is less than the minimum of 1"),
        (
            {"max_attempts": 101},
            "steps[0].retry.max_attempts: 101 is greater than the maximum of 100",
        ),
        ({"max_attempts": 2.5}, "steps[0].retry.max_attempts: expected an integer, got a number"),
        ({"backoff_s": -1}, "steps[0].retry.backoff_s: -1 is less than the minimum of 0"),
        (
            {"max_backoff_s": 86401},
            "steps[0].retry.max_backoff_s: 86401 is greater than the maximum of 86400",
        ),
        (
            {"non_retryable": "timeout"},
            "steps[0].retry.non_retryable: expected an array, got a string",
        ),
        ({"tries": 3}, "steps[0].retry.tries: unknown field"),
        (
            {"backoff_s": 10, "max_backoff_s": 5},
            "steps[0].retry.max_backoff_s: must be at least backoff_s (10)",
        ),
    ],
)
def test_retry_rules(retry, expected):
    assert single_fault(workflow(llm("a", retry=retry))) == expected


def test_retry_is_parsed_into_a_policy():
    retry = {"max_attempts": 5, "backoff_s": 2, "max_backoff_s": 30, "non_retryable": ["bad"]}
    step = parse_definition(workflow(llm("a", retry=retry))).step("a")
    assert step.retry == RetryPolicy(
        max_attempts=5, backoff_s=2.0, max_backoff_s=30.0, non_retryable=("bad",)
    )


def test_a_first_delay_above_the_default_cap_raises_the_cap():
    step = parse_definition(workflow(llm("a", retry={"backoff_s": 120}))).step("a")
    assert step.retry.max_backoff_s == 120.0


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        (0, "steps[0].timeout_s: 0 is less than or equal to the minimum of 0"),
        (604801, "steps[0].timeout_s: 604801 is greater than the maximum of 604800"),
        ("30", "steps[0].timeout_s: expected a number, got a string"),
    ],
)
def test_timeout_rules(timeout, expected):
    assert single_fault(workflow(llm("a", timeout_s=timeout))) == expected


def test_optional_must_be_a_boolean():
    assert single_fault(workflow(llm("a", optional="yes"))) == (
        "steps[0].optional: expected a boolean, got a string"
    )


def test_optional_is_parsed():
    assert parse_definition(workflow(llm("a", optional=True))).step("a").optional is True


# --- kind-specific fields --------------------------------------------------------------------


def test_fields_outside_the_kinds_schema_are_refused_with_a_suggestion():
    assert single_fault(workflow(llm("a", promt="x"))) == (
        "steps[0].promt: unknown field (did you mean 'prompt'?)"
    )


def test_a_misspelt_common_field_is_suggested():
    assert single_fault(workflow(llm("a"), llm("b", afer=["a"]))) == (
        "steps[1].afer: unknown field (did you mean 'after'?)"
    )


def test_required_kind_fields_are_required():
    assert single_fault(workflow({"id": "a", "kind": "llm"})) == (
        "steps[0].prompt: required field is missing"
    )


def test_kind_field_types_are_checked():
    assert single_fault(workflow(llm("a", max_tokens=0))) == (
        "steps[0].max_tokens: 0 is less than the minimum of 1"
    )


def test_enum_faults_list_the_choices():
    assert single_fault(workflow(llm("a", provider="anthropic"))) == (
        'steps[0].provider: "anthropic" is not one of: "simulated", "openai"'
    )


def test_nested_kind_fields_are_checked():
    assert single_fault(workflow(llm("a", simulated={"fail_rate": 2}))) == (
        "steps[0].simulated.fail_rate: 2 is greater than the maximum of 1"
    )


def test_template_syntax_errors_are_refused():
    assert single_fault(workflow(llm("a"), llm("b", "{{ steps.a.output }"))) == (
        "steps[1].prompt: template error: unexpected '}'"
    )


def test_template_unknown_names_are_refused():
    assert single_fault(workflow(llm("a", "{{ foo }}"))) == (
        "steps[0].prompt: template error: unknown name 'foo'; templates see input, steps, item, "
        "index"
    )


def test_template_references_to_unknown_steps_are_refused():
    assert single_fault(workflow(llm("a", "{{ steps.nope.output }}"))) == (
        "steps[0].prompt: template references unknown step 'nope'"
    )


def test_a_template_cannot_reference_its_own_step():
    assert single_fault(workflow(llm("a", "{{ steps.a.output }}"))) == (
        "steps[0].prompt: a step cannot reference its own output"
    )


def test_item_is_refused_outside_a_map():
    assert single_fault(workflow(llm("a", "{{ item.text }}"))) == (
        "steps[0].prompt: item and index are only defined inside the step of a map"
    )


def test_nested_template_faults_name_the_exact_path():
    step = {
        "id": "a",
        "kind": "tool",
        "tool": "echo",
        "args": {"q": "{{ steps.nope.output }}", "filters": [{"x": "{{ oops }"}]},
    }
    assert faults_of(workflow(step)) == [
        "steps[0].args.q: template references unknown step 'nope'",
        "steps[0].args.filters[0].x: template error: unexpected '}'",
    ]


def test_templates_in_a_field_that_is_not_rendered_are_refused():
    assert single_fault(workflow(llm("a", model="{{ input.model }}"))) == (
        "steps[0].model: templates are not rendered in 'model' (template fields of llm: "
        "prompt, system)"
    )


def test_unknown_tools_are_refused_with_the_registered_ones():
    step = {"id": "a", "kind": "tool", "tool": "crm.lookpu"}
    assert single_fault(workflow(step)) == (
        "steps[0].tool: unknown tool 'crm.lookpu' (did you mean 'crm.lookup'?); "
        "registered tools: crm.lookup, echo, http"
    )


def test_tools_are_looked_up_when_parsing():
    step = {"id": "a", "kind": "tool", "tool": "late.tool"}
    with pytest.raises(DefinitionError):
        parse_definition(workflow(step))
    registry.register_tool("late.tool")(lambda ctx, **args: args)
    assert parse_definition(workflow(step)).step("a").config == {"tool": "late.tool"}


def test_a_templated_tool_name_is_refused():
    step = {"id": "a", "kind": "tool", "tool": "{{ input.tool }}"}
    assert single_fault(workflow(step)) == (
        "steps[0].tool: templates are not rendered in 'tool' (template fields of tool: args)"
    )


# --- maps ------------------------------------------------------------------------------------


def a_map(step, **fields):
    return {"id": "m", "kind": "map", "over": "{{ input.items }}", "step": step, **fields}


def test_a_maps_step_is_required():
    assert single_fault(workflow({"id": "m", "kind": "map", "over": "{{ [1] }}"})) == (
        "steps[0].step: required field is missing"
    )


def test_a_maps_step_must_be_an_object():
    assert single_fault(workflow(a_map("llm"))) == "steps[0].step: expected an object, got a string"


def test_a_maps_step_is_validated_as_a_step():
    assert faults_of(workflow(a_map({"kind": "llm", "promt": "x"}))) == [
        "steps[0].step.promt: unknown field (did you mean 'prompt'?)",
        "steps[0].step.prompt: required field is missing",
    ]


def test_a_maps_step_needs_a_kind():
    assert single_fault(workflow(a_map({"prompt": "x"}))) == (
        "steps[0].step.kind: required field is missing"
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("id", "inner", "the step of a map takes the map's id; remove 'id'"),
        ("after", [], "put 'after' on the map itself"),
        ("when", "true", "put 'when' on the map itself"),
        ("optional", True, "put 'optional' on the map itself"),
    ],
)
def test_a_maps_step_cannot_have_id_after_when_or_optional(field, value, message):
    inner = {"kind": "llm", "prompt": "x", field: value}
    assert single_fault(workflow(a_map(inner))) == f"steps[0].step.{field}: {message}"


def test_nested_maps_are_refused():
    inner = {"kind": "map", "over": "{{ item }}", "step": {"kind": "llm", "prompt": "x"}}
    assert single_fault(workflow(a_map(inner))) == (
        "steps[0].step.kind: a map cannot contain a map (nested maps are refused)"
    )


def test_the_inner_step_may_use_item_and_index():
    inner = {"kind": "llm", "prompt": "{{ index }}: {{ item.text }}"}
    item = parse_definition(workflow(a_map(inner))).step("m").item
    assert item.config == {"prompt": "{{ index }}: {{ item.text }}"}


def test_over_cannot_use_item():
    document = workflow(a_map({"kind": "llm", "prompt": "x"}, over="{{ item }}"))
    assert single_fault(document) == (
        "steps[0].over: item and index are only defined inside the step of a map"
    )


def test_over_must_parse():
    document = workflow(a_map({"kind": "llm", "prompt": "x"}, over="{{ input.items"))
    assert single_fault(document).startswith("steps[0].over: template error: unexpected end")


def test_the_inner_steps_templates_are_checked():
    inner = {"kind": "tool", "tool": "echo", "args": {"q": "{{ steps.nope.output }}"}}
    assert single_fault(workflow(a_map(inner))) == (
        "steps[0].step.args.q: template references unknown step 'nope'"
    )


def test_the_inner_step_cannot_reference_its_map():
    inner = {"kind": "llm", "prompt": "{{ steps.m.output }}"}
    assert single_fault(workflow(a_map(inner))) == (
        "steps[0].step.prompt: a step cannot reference its own output"
    )


def test_the_inner_steps_tool_must_be_registered():
    inner = {"kind": "tool", "tool": "nope"}
    assert single_fault(workflow(a_map(inner))) == (
        "steps[0].step.tool: unknown tool 'nope'; registered tools: crm.lookup, echo, http"
    )


def test_max_parallel_must_be_positive():
    document = workflow(a_map({"kind": "llm", "prompt": "x"}, max_parallel=0))
    assert single_fault(document) == "steps[0].max_parallel: 0 is less than the minimum of 1"


def test_the_inner_step_has_its_own_retry_and_timeout():
    inner = {"kind": "llm", "prompt": "x", "retry": {"max_attempts": 7}, "timeout_s": 5}
    item = parse_definition(workflow(a_map(inner))).step("m").item
    assert (item.retry.max_attempts, item.timeout_s) == (7, 5.0)


# --- cycles ----------------------------------------------------------------------------------


def test_a_cycle_is_reported_once_at_its_first_step():
    document = workflow(
        llm("start"),
        llm("a", after=["c"]),
        llm("b", after=["a"]),
        llm("c", after=["b"]),
    )
    assert single_fault(document) == (
        "steps[1].after: cycle a → c → b → a (each step waits for the next)"
    )


def test_a_cycle_through_templates_is_found():
    document = workflow(llm("a", "{{ steps.b.output }}"), llm("b", "{{ steps.a.output }}"))
    assert (
        single_fault(document) == "steps[0].after: cycle a → b → a (each step waits for the next)"
    )


def test_each_distinct_cycle_is_reported():
    document = workflow(
        llm("a", after=["b"]),
        llm("b", after=["a"]),
        llm("c", after=["d"]),
        llm("d", after=["c"]),
        llm("downstream", after=["a", "c"]),
    )
    assert faults_of(document) == [
        "steps[0].after: cycle a → b → a (each step waits for the next)",
        "steps[2].after: cycle c → d → c (each step waits for the next)",
    ]


def test_a_step_downstream_of_a_cycle_is_not_reported():
    document = workflow(llm("a", after=["b"]), llm("b", after=["a"]), llm("c", after=["b"]))
    assert len(faults_of(document)) == 1


# --- all faults at once ----------------------------------------------------------------------


def test_every_fault_is_reported_at_once():
    document = {
        "name": "Bad Name",
        "steps": [
            {"id": "search", "kind": "llmm", "prompt": "x"},
            llm("classify", "{{ input.ticket }"),
            {"id": "lookup", "kind": "tool", "tool": "crm.lookpu"},
            llm("draft", after=["serch"]),
            llm("classify"),
        ],
    }
    assert faults_of(document) == [
        "name: invalid value 'Bad Name': use lowercase letters, digits, '_', '.' and '-', "
        "starting with a letter or a digit, at most 100 characters",
        "steps[0].kind: unknown kind 'llmm' (did you mean 'llm'?); "
        "known kinds: agent, approval, llm, map, retrieval, tool, workflow",
        "steps[1].prompt: template error: unexpected '}'",
        "steps[2].tool: unknown tool 'crm.lookpu' (did you mean 'crm.lookup'?); "
        "registered tools: crm.lookup, echo, http",
        "steps[3].after[0]: unknown step 'serch' (did you mean 'search'?)",
        "steps[4].id: duplicate id 'classify' (first at steps[1])",
    ]


def test_a_broken_field_gets_no_semantic_fault_but_the_others_do():
    # `after` is malformed (its unknown entry is not reported), the prompt is still checked.
    document = workflow(llm("a", "{{ steps.zz.output }}", after=[1, "nope"]))
    assert faults_of(document) == [
        "steps[0].after[0]: expected a string, got a number",
        "steps[0].prompt: template references unknown step 'zz'",
    ]


def test_the_error_lists_every_fault_in_its_message():
    with pytest.raises(DefinitionError) as caught:
        parse_definition(workflow(llm("a"), llm("a"), name="X"))
    message = str(caught.value)
    assert message.startswith("invalid definition (2 faults):")
    assert "steps[1].id: duplicate id 'a' (first at steps[0])" in message


def test_a_fault_reads_as_path_colon_message():
    assert str(Fault("steps[3].after[0]", "unknown step 'serch'")) == (
        "steps[3].after[0]: unknown step 'serch'"
    )


# --- the retry policy ------------------------------------------------------------------------


def test_retry_delays_grow_exponentially_up_to_the_cap():
    policy = RetryPolicy(backoff_s=1.0, max_backoff_s=10.0)
    # rand → 1 gives the full delay, rand = 0 half of it.
    full = [policy.delay_before_retry(n, 0.999999) for n in range(1, 7)]
    assert [round(delay, 3) for delay in full] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay_before_retry(3, 0.0) == 2.0


def test_retry_delays_are_jittered_between_half_and_full():
    policy = RetryPolicy(backoff_s=4.0, max_backoff_s=60.0)
    assert policy.delay_before_retry(1, 0.5) == 3.0


def test_a_huge_attempt_number_does_not_overflow():
    assert RetryPolicy().delay_before_retry(10_000, 0.0) == 30.0


def test_allows_retry_counts_attempts_and_honours_non_retryable_codes():
    policy = RetryPolicy(max_attempts=3, non_retryable=("bad_request",))
    assert policy.allows_retry(1, "timeout") is True
    assert policy.allows_retry(3, "timeout") is False
    assert policy.allows_retry(1, "bad_request") is False


# --- run input -------------------------------------------------------------------------------


INPUT_SCHEMA = {
    "type": "object",
    "required": ["ticket"],
    "properties": {
        "ticket": {"type": "string"},
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"qty": {"type": "integer", "minimum": 1}}},
        },
    },
}


def with_schema(schema):
    return parse_definition(workflow(llm("a"), input_schema=schema))


def test_valid_input_has_no_faults():
    assert validate_input(with_schema(INPUT_SCHEMA), {"ticket": "t", "items": [{"qty": 2}]}) == []


def test_a_missing_property_is_a_fault_at_the_input():
    assert validate_input(with_schema(INPUT_SCHEMA), {}) == [
        Fault("input", "'ticket' is a required property")
    ]


def test_input_faults_name_nested_paths():
    value = {"ticket": 5, "items": [{"qty": 1}, {"qty": 1}, {"qty": 0}]}
    assert validate_input(with_schema(INPUT_SCHEMA), value) == [
        Fault("input.ticket", "5 is not of type 'string'"),
        Fault("input.items[2].qty", "0 is less than the minimum of 1"),
    ]


def test_input_faults_put_the_shallowest_first():
    value = {"items": [{"qty": 0}]}
    assert [str(fault) for fault in validate_input(with_schema(INPUT_SCHEMA), value)] == [
        "input: 'ticket' is a required property",
        "input.items[0].qty: 0 is less than the minimum of 1",
    ]


def test_input_formats_are_checked():
    schema = {"properties": {"email": {"type": "string", "format": "email"}}}
    assert validate_input(with_schema(schema), {"email": "nobody"}) == [
        Fault("input.email", "'nobody' is not a 'email'")
    ]


def test_without_a_schema_the_input_must_be_an_object():
    definition = parse_definition(workflow(llm("a")))
    assert validate_input(definition, {"anything": 1}) == []
    assert validate_input(definition, [1]) == [Fault("input", "expected an object, got an array")]


def test_validate_input_does_not_modify_the_definition():
    definition = with_schema(INPUT_SCHEMA)
    before = copy.deepcopy(definition.input_schema)
    validate_input(definition, {"ticket": 1})
    assert definition.input_schema == before


# --- robustness ------------------------------------------------------------------------------

_FIELD_NAMES = ["id", "kind", "after", "when", "retry", "timeout_s", "optional", "prompt", "over"]
_FIELD_NAMES += ["step", "tool", "args", "max_parallel", "name", "steps", "output", "$ref"]
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 600)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["a", "llm", "map", "echo", "{{ item }}", "{{ steps.a.output }}", "{{ x"]),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(_FIELD_NAMES), children, max_size=4)
    ),
    max_leaves=15,
)


@settings(
    max_examples=150,
    deadline=None,
    # The registry fixture sets the same state for every example.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.lists(st.sampled_from(["steps", 0, 1, "step", "args", "retry", "kind"]), max_size=4),
    value=_JSON,
)
def test_any_malformed_document_gives_faults_and_nothing_else(path, value):
    document = workflow(
        llm("a"),
        {"id": "m", "kind": "map", "over": "{{ [1] }}", "step": {"kind": "tool", "tool": "echo"}},
    )
    node: Any = document
    for part in path[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
    if path and isinstance(node, (dict, list)):
        try:
            node[path[-1]] = value
        except (IndexError, TypeError):
            pass
    for candidate in (document, value):
        try:
            parse_definition(candidate)
        except DefinitionError as error:
            assert error.faults
            assert all(fault.path and fault.message for fault in error.faults)
