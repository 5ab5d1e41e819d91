"""A workflow's `triggers` block: the events that start it, validated at upload."""

from __future__ import annotations

import pytest

import tests.support.tools  # noqa: F401 - registers the echo tool
from jobs.definitions import DefinitionError, TriggerDef, parse_definition

STEPS = [{"id": "a", "kind": "tool", "tool": "echo", "args": {}}]


def faults_of(triggers) -> list[str]:
    with pytest.raises(DefinitionError) as caught:
        parse_definition({"name": "w", "steps": STEPS, "triggers": triggers})
    return [str(fault) for fault in caught.value.faults]


def test_triggers_are_parsed_with_their_condition_and_input():
    definition = parse_definition(
        {
            "name": "w",
            "steps": STEPS,
            "triggers": [
                {"event": "order.created", "when": "event.data.total > 100"},
                {"event": "order.paid", "input": {"id": "{{ event.data.id }}"}},
            ],
        }
    )
    assert definition.triggers == (
        TriggerDef("order.created", "event.data.total > 100", None),
        TriggerDef("order.paid", None, {"id": "{{ event.data.id }}"}),
    )
    assert parse_definition({"name": "w", "steps": STEPS}).triggers == ()


def test_a_trigger_reads_the_event_only():
    assert faults_of([{"event": "x", "when": "input.total > 1"}]) == [
        "triggers[0].when: template error: unknown name 'input'; templates see event"
    ]
    assert faults_of([{"event": "x", "input": {"a": ["{{ steps.a.output }}"]}}]) == [
        "triggers[0].input.a[0]: template error: unknown name 'steps'; templates see event"
    ]


def test_a_trigger_needs_a_well_formed_event_name_and_no_other_fields():
    faults = faults_of([{"event": "has space", "whenn": "true"}])
    assert any(f.startswith("triggers[0].event: invalid value 'has space'") for f in faults)
    assert any(f.startswith("triggers[0].whenn: unknown field") for f in faults)
    assert faults_of([{"when": "true"}])[0].startswith("triggers[0]")
