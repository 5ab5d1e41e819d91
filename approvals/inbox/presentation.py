"""How the inbox shows an approval: context values, earlier steps, and the editable form.

Pure functions from stored values to what templates render (no queries, no requests):
- `context_items`: each context value as short text, long text (a scrollable box) or JSON
  (pretty-printed, in a collapsible <details>);
- `form_fields` / `parse_form`: the fields of a JSON Schema form as HTML inputs, and the POSTed
  inputs back into typed values, with an error per field that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Text longer than this, or on several lines, goes into a scrollable box.
LONG_TEXT = 240
# JSON of at most this many lines is shown expanded.
OPEN_JSON_LINES = 12
FIELD_PREFIX = "field__"


@dataclass(frozen=True)
class Shown:
    """One value as the page shows it: `kind` is text, long, json or empty."""

    label: str
    kind: str
    text: str
    summary: str = ""
    open: bool = False


def show_value(label: str, value: Any) -> Shown:
    if value is None or value == "" or value == {} or value == []:
        return Shown(label, "empty", "—")
    if isinstance(value, str):
        if len(value) > LONG_TEXT or "\n" in value:
            return Shown(label, "long", value)
        return Shown(label, "text", value)
    if isinstance(value, (dict, list)):
        text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False)
        lines = text.count("\n") + 1
        noun = "field" if isinstance(value, dict) else "item"
        summary = f"{len(value)} {noun}{'s' if len(value) != 1 else ''}"
        return Shown(label, "json", text, summary=summary, open=lines <= OPEN_JSON_LINES)
    return Shown(label, "text", json.dumps(value))


def context_items(context: Any) -> list[Shown]:
    """Each context value, by name (PostgreSQL's jsonb keeps no key order, so alphabetical)."""
    if isinstance(context, dict):
        return [show_value(str(key), context[key]) for key in sorted(context)]
    return [show_value("context", context)] if context not in (None, {}) else []


def duration_text(seconds: float) -> str:
    """`a few seconds`, `12 min`, `3 h 20 min`, `2 d 4 h` (as static/inbox.js writes them)."""
    seconds = max(0, round(seconds))
    if seconds < 45:
        return "a few seconds" if seconds < 10 else f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h" + (f" {rest} min" if rest and hours < 6 else "")
    days, hours = divmod(hours, 24)
    return f"{days} d" + (f" {hours} h" if hours and days < 3 else "")


# --- the form --------------------------------------------------------------------------------


@dataclass
class FormField:
    name: str
    label: str
    widget: str  # text, textarea, number, integer, checkbox, select, json
    value: str = ""
    checked: bool = False
    choices: list[tuple[str, str]] = field(default_factory=list)  # (value, label)
    required: bool = False
    description: str = ""
    error: str = ""

    @property
    def input_name(self) -> str:
        return FIELD_PREFIX + self.name


def _widget(spec: dict[str, Any], value: Any) -> str:
    kind = spec.get("type")
    if "enum" in spec:
        return "select"
    if kind == "boolean":
        return "checkbox"
    if kind == "integer":
        return "integer"
    if kind == "number":
        return "number"
    if kind == "string":
        short = spec.get("maxLength", 10_000) <= 120 or spec.get("format") in (
            "email",
            "uri",
            "date",
            "date-time",
        )
        if short and not (isinstance(value, str) and "\n" in value):
            return "text"
        return "textarea"
    return "json"


def _display(widget: str, value: Any) -> str:
    if value is None:
        return ""
    if widget in ("text", "textarea") and isinstance(value, str):
        return value
    if widget == "select":
        return json.dumps(value)
    if widget in ("number", "integer") and isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, indent=2, ensure_ascii=False)


def form_fields(
    schema: dict[str, Any] | None,
    values: dict[str, Any],
    *,
    errors: dict[str, str] | None = None,
) -> list[FormField]:
    """The form's fields in schema order, showing `values` (pre-filled or as submitted)."""
    if not schema:
        return []
    errors = errors or {}
    required = set(schema.get("required", []))
    properties = schema.get("properties") or {}
    fields = []
    for name in field_order(schema):
        spec = properties[name] if isinstance(properties[name], dict) else {}
        value = values.get(name)
        widget = _widget(spec, value)
        fields.append(
            FormField(
                name=name,
                label=spec.get("title") or name.replace("_", " ").capitalize(),
                widget=widget,
                value=_display(widget, value),
                checked=bool(value) if widget == "checkbox" else False,
                choices=[(json.dumps(c), str(c)) for c in spec.get("enum", [])],
                required=name in required,
                description=spec.get("description", ""),
                error=errors.get(name, ""),
            )
        )
    return fields


def field_order(schema: dict[str, Any]) -> list[str]:
    """The form's fields in display order: the required ones in the order `required` lists
    them, then the others alphabetically (stored schemas keep no key order: jsonb)."""
    properties = schema.get("properties") or {}
    required = [name for name in schema.get("required", []) if name in properties]
    return required + sorted(name for name in properties if name not in required)


def parse_form(schema: dict[str, Any] | None, post: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The POSTed fields as typed values, and an error per field that could not be read.

    An empty optional number is left out (the pre-filled value stays).
    """
    data: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if not schema:
        return data, errors
    required = set(schema.get("required", []))
    for name, spec in (schema.get("properties") or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        widget = _widget(spec, None)
        raw = post.get(FIELD_PREFIX + name)
        if widget == "checkbox":
            data[name] = raw is not None
            continue
        if raw is None:
            continue
        if widget in ("text", "textarea"):
            data[name] = raw.replace("\r\n", "\n")
            continue
        raw = raw.strip()
        if raw == "":
            if name in required:
                errors[name] = "is required"
            continue
        try:
            if widget == "integer":
                data[name] = int(raw)
            elif widget == "number":
                number = float(raw)
                data[name] = int(number) if number.is_integer() and "." not in raw else number
            else:  # select (JSON-encoded choices) and json
                data[name] = json.loads(raw)
        except ValueError as exc:
            errors[name] = {
                "integer": "must be a whole number",
                "number": "must be a number",
            }.get(widget, f"is not valid JSON ({exc})")
    return data, errors


def field_errors(faults: list[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """Service faults (`reply`, `items[2].qty`, `$`) by top-level field, and the others."""
    by_field: dict[str, str] = {}
    general: list[str] = []
    for path, message in faults:
        name = path.split(".")[0].split("[")[0]
        if name in ("", "$"):
            general.append(message)
        else:
            detail = "" if path == name else f"{path[len(name) :].lstrip('.')}: "
            by_field.setdefault(name, f"{detail}{message}")
    return by_field, general
