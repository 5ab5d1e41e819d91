"""The `approval` step kind in the definition language, the engine, and its pure helpers."""

from __future__ import annotations

import pytest

from approvals.kind import decision_output, form_data_faults, merged_form_data
from jobs.definitions import DefinitionError, parse_definition
from jobs.engine import StepState, advance, initial_states
from jobs.statuses import StepStatus
from jobs.steps import registry

REFUND_FORM = {
    "schema": {
        "type": "object",
        "required": ["amount", "reply"],
        "properties": {
            "amount": {"type": "number", "minimum": 0, "maximum": 500},
            "reply": {"type": "string", "minLength": 5},
            "notify": {"type": "boolean"},
        },
        "additionalProperties": False,
    },
    "values": {
        "amount": "{{ steps.quote.output.amount }}",
        "reply": "Dear {{ input.customer }}, your refund is on its way.",
    },
}


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_kinds", dict(registry._BUILTIN_KINDS))
    monkeypatch.setattr(registry, "_tools", {})
    registry.register_tool("echo")(lambda ctx, **args: args)


def quote_step() -> dict:
    return {"id": "quote", "kind": "tool", "tool": "echo", "args": {"amount": 120}}


def approval(**fields) -> dict:
    return {"id": "review", "kind": "approval", "prompt": "Refund?", **fields}


def workflow(*steps) -> dict:
    return {"name": "refunds", "steps": list(steps)}


def faults_of(document) -> list[str]:
    with pytest.raises(DefinitionError) as caught:
        parse_definition(document)
    return [str(fault) for fault in caught.value.faults]


# --- the definition --------------------------------------------------------------------------


def test_a_full_approval_step_parses_and_reads_its_templates_dependencies():
    definition = parse_definition(
        workflow(
            quote_step(),
            approval(
                prompt="Refund {{ steps.quote.output.amount }} to {{ input.customer }}?",
                context={"ticket": "{{ input.ticket }}", "quote": "{{ steps.quote.output }}"},
                form=REFUND_FORM,
                reviewers="finance",
                required_approvals=2,
                timeout_s=3600,
                on_timeout="approve",
                escalate_after_s=600,
                escalate_to="leads",
                on_reject="continue",
            ),
        )
    )
    step = definition.step("review")
    assert step.kind == "approval" and step.queue == registry.QUEUE_CONTROL
    assert step.depends_on == {"quote"}  # read by its templates, without `after`
    assert step.timeout_s == 3600  # the decision deadline
    assert step.config["reviewers"] == "finance" and step.config["required_approvals"] == 2


def test_the_kind_declares_its_timeout_as_a_decision_deadline():
    spec = registry.kind("approval")
    assert spec.timeout_is_deadline and spec.handler is None
    assert not registry.kind("llm").timeout_is_deadline


def test_unknown_fields_are_refused_with_a_suggestion():
    assert faults_of(workflow(approval(reviewer="finance"))) == [
        "steps[0].reviewer: unknown field (did you mean 'reviewers'?)"
    ]


def test_on_timeout_names_one_of_three_outcomes_and_needs_a_deadline():
    assert faults_of(workflow(approval(timeout_s=60, on_timeout="ignore"))) == [
        'steps[0].on_timeout: "ignore" is not one of: "reject", "approve", "fail"'
    ]
    assert faults_of(workflow(approval(on_timeout="approve"))) == [
        "steps[0].on_timeout: needs timeout_s (the decision deadline, in seconds)"
    ]


def test_escalation_needs_both_fields_and_must_come_before_the_deadline():
    assert faults_of(workflow(approval(escalate_to="leads"))) == [
        "steps[0].escalate_to: needs escalate_after_s (when to escalate)"
    ]
    assert faults_of(workflow(approval(escalate_after_s=60))) == [
        "steps[0].escalate_after_s: needs escalate_to (the group to escalate to)"
    ]
    assert faults_of(
        workflow(approval(timeout_s=60, escalate_after_s=60, escalate_to="leads"))
    ) == ["steps[0].escalate_after_s: must be less than timeout_s (60), or it never fires"]
    assert faults_of(workflow(approval(escalate_after_s=60, escalate_to="reviewer"))) == [
        "steps[0].escalate_to: is the same group as reviewers; escalate to another one"
    ]


def test_viewers_cannot_be_the_deciding_group():
    assert faults_of(workflow(approval(reviewers="viewer"))) == [
        "steps[0].reviewers: 'viewer' members can read requests but never decide them"
    ]


def test_required_approvals_is_at_least_one():
    assert faults_of(workflow(approval(required_approvals=0))) == [
        "steps[0].required_approvals: 0 is less than the minimum of 1"
    ]


def test_the_form_schema_must_be_a_valid_object_schema_without_templates():
    bad_type = {"schema": {"type": "object", "properties": {"n": {"type": "integr"}}}}
    assert faults_of(workflow(approval(form=bad_type)))[0].startswith(
        "steps[0].form.schema.properties.n.type: not a valid JSON Schema:"
    )
    assert faults_of(workflow(approval(form={"schema": {"type": "string"}}))) == [
        "steps[0].form.schema: must describe an object with properties (the fields a reviewer "
        'may edit): {"type": "object", "properties": {...}}'
    ]
    templated = {
        "schema": {"type": "object", "properties": {"n": {"enum": "{{ steps.quote.output }}"}}}
    }
    assert "templates are not rendered in the schema" in " ".join(
        faults_of(workflow(quote_step(), approval(form=templated)))
    )


def test_prefilled_values_must_be_fields_of_the_form():
    form = {"schema": REFUND_FORM["schema"], "values": {"amout": 1}}
    assert faults_of(workflow(approval(form=form))) == [
        "steps[0].form.values.amout: not a field of form.schema (fields: amount, notify, reply)"
    ]


def test_the_prompt_is_a_checked_template():
    assert faults_of(workflow(approval(prompt="Refund {{ steps.qoute.output }}?"))) == [
        "steps[0].prompt: template references unknown step 'qoute'"
    ]


def test_an_approval_can_be_the_step_of_a_map():
    definition = parse_definition(
        workflow(
            {
                "id": "each",
                "kind": "map",
                "over": "{{ input.emails }}",
                "step": {"kind": "approval", "prompt": "Send {{ item }}?", "timeout_s": 60},
            }
        )
    )
    assert definition.step("each").item.kind == "approval"


# --- the engine ------------------------------------------------------------------------------


def test_the_engine_renders_prompt_context_and_prefilled_values_but_not_the_schema():
    definition = parse_definition(
        workflow(
            quote_step(),
            approval(
                prompt="Refund {{ steps.quote.output.amount }}?",
                context={"quote": "{{ steps.quote.output }}", "note": "as is"},
                form=REFUND_FORM,
            ),
        )
    )
    states = dict(initial_states(definition))
    states[("quote", None)] = StepState(StepStatus.SUCCEEDED, output={"amount": 120})
    plan = advance(definition, {"customer": "Ann"}, states)
    (ready,) = plan.ready
    assert ready.key == ("review", None)
    assert ready.input["prompt"] == "Refund 120?"
    assert ready.input["context"] == {"quote": {"amount": 120}, "note": "as is"}
    assert ready.input["form"]["values"] == {
        "amount": 120,  # a native number, not "120"
        "reply": "Dear Ann, your refund is on its way.",
    }
    assert ready.input["form"]["schema"] == REFUND_FORM["schema"]


def test_a_rejection_with_on_reject_continue_branches_with_when():
    definition = parse_definition(
        workflow(
            approval(on_reject="continue"),
            {
                "id": "send",
                "kind": "tool",
                "tool": "echo",
                "when": "steps.review.output.approved",
                "args": {"reply": "{{ steps.review.output.data.reply }}"},
            },
            {
                "id": "apologise",
                "kind": "tool",
                "tool": "echo",
                "when": "not steps.review.output.approved",
                "args": {"why": "{{ steps.review.output.comment }}"},
            },
        )
    )
    states = dict(initial_states(definition))
    output = decision_output(
        approved=False, decision="reject", comment="too generous", reviewers=["bob"], data={}
    )
    states[("review", None)] = StepState(StepStatus.SUCCEEDED, output=output)
    plan = advance(definition, {}, states)
    assert plan.skipped == [("send", None)]
    assert [(r.key, r.input["args"]) for r in plan.ready] == [
        (("apologise", None), {"why": "too generous"})
    ]


# --- decisions: data and output --------------------------------------------------------------


def test_form_data_faults_name_each_field():
    schema = REFUND_FORM["schema"]
    assert form_data_faults(schema, {"amount": 120, "reply": "Dear Ann"}) == []
    assert form_data_faults(schema, {"amount": 900, "reply": "Hi"}) == [
        ("amount", "900 is greater than the maximum of 500"),
        ("reply", "'Hi' is too short"),
    ]
    assert form_data_faults(schema, {"reply": "Dear Ann", "extra": 1}) == [
        ("amount", "is required"),
        ("extra", "is not a field of this form"),
    ]


def test_data_without_a_form_is_refused_but_nothing_is_fine():
    assert form_data_faults(None, None) == []
    assert form_data_faults(None, {}) == []
    assert form_data_faults(None, {"x": 1}) == [
        ("$", "this request has no form: there is no data to send")
    ]


def test_edits_apply_over_the_prefilled_values_in_order():
    assert merged_form_data({"a": 1, "b": 2}, [{"b": 3}, None, {"b": 4, "c": 5}]) == {
        "a": 1,
        "b": 4,
        "c": 5,
    }


def test_the_output_has_the_documented_fields():
    assert decision_output(
        approved=True, decision="approve", comment="ok", reviewers=["ann"], data={"a": 1}
    ) == {
        "approved": True,
        "decision": "approve",
        "comment": "ok",
        "reviewers": ["ann"],
        "data": {"a": 1},
        "timed_out": False,
    }
