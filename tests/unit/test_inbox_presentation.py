"""How the inbox shows a request and reads the reviewer's form (approvals.inbox.presentation)."""

from __future__ import annotations

from approvals.inbox.presentation import (
    context_items,
    duration_text,
    field_errors,
    form_fields,
    parse_form,
    show_value,
)

SCHEMA = {
    "type": "object",
    "required": ["reply", "amount"],
    "properties": {
        "tone": {"enum": ["warm", "formal"]},
        "amount": {"type": "number", "title": "Refund (EUR)"},
        "reply": {"type": "string"},
        "notify": {"type": "boolean"},
        "count": {"type": "integer"},
        "tags": {"type": "array"},
        "code": {"type": "string", "maxLength": 20},
    },
}


def test_values_are_shown_as_text_long_text_or_collapsible_json():
    assert show_value("a", "short").kind == "text"
    assert show_value("a", "x" * 500).kind == "long"
    assert show_value("a", "two\nlines").kind == "long"
    assert show_value("a", None).kind == "empty"
    assert show_value("a", 3).text == "3"
    small = show_value("a", {"k": 1})
    assert (small.kind, small.summary, small.open) == ("json", "1 field", True)
    assert small.text == '{\n  "k": 1\n}'
    big = show_value("a", list(range(30)))
    assert (big.summary, big.open) == ("30 items", False)


def test_context_is_listed_by_name():
    assert [item.label for item in context_items({"b": 1, "a": 2})] == ["a", "b"]


def test_fields_follow_required_order_then_the_rest_with_fitting_widgets():
    fields = form_fields(SCHEMA, {"reply": "Dear Ann", "amount": 12.5, "tone": "warm"})
    assert [(f.name, f.widget) for f in fields] == [
        ("reply", "textarea"),
        ("amount", "number"),
        ("code", "text"),
        ("count", "integer"),
        ("notify", "checkbox"),
        ("tags", "json"),
        ("tone", "select"),
    ]
    by_name = {f.name: f for f in fields}
    assert by_name["amount"].label == "Refund (EUR)" and by_name["amount"].value == "12.5"
    assert by_name["reply"].required and not by_name["tone"].required
    assert by_name["tone"].choices == [('"warm"', "warm"), ('"formal"', "formal")]
    assert by_name["tone"].value == '"warm"'


def test_posted_fields_come_back_typed():
    post = {
        "field__reply": "Dear Ann,\r\nrefunded.",
        "field__amount": "12",
        "field__count": "3",
        "field__notify": "on",
        "field__tags": '["a", "b"]',
        "field__tone": '"formal"',
        "field__code": "",
    }
    data, errors = parse_form(SCHEMA, post)
    assert errors == {}
    assert data == {
        "reply": "Dear Ann,\nrefunded.",
        "amount": 12,
        "count": 3,
        "notify": True,
        "tags": ["a", "b"],
        "tone": "formal",
        "code": "",
    }
    unchecked, _ = parse_form(SCHEMA, {"field__reply": "x", "field__amount": "1.5"})
    assert unchecked["notify"] is False and unchecked["amount"] == 1.5


def test_unreadable_fields_are_named():
    _, errors = parse_form(
        SCHEMA,
        {"field__amount": "", "field__count": "2.5", "field__tags": "[oops", "field__reply": "x"},
    )
    assert errors["amount"] == "is required"
    assert errors["count"] == "must be a whole number"
    assert errors["tags"].startswith("is not valid JSON")


def test_service_faults_land_on_their_field():
    by_field, general = field_errors(
        [("amount", "is too big"), ("tags[1]", "is not a string"), ("$", "must be an object")]
    )
    assert by_field == {"amount": "is too big", "tags": "[1]: is not a string"}
    assert general == ["must be an object"]


def test_durations_read_like_the_live_page():
    assert duration_text(3) == "a few seconds"
    assert duration_text(30) == "30 s"
    assert duration_text(600) == "10 min"
    assert duration_text(3 * 3600 + 20 * 60) == "3 h 20 min"
    assert duration_text(2 * 86400 + 4 * 3600) == "2 d 4 h"
