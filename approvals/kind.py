"""The `approval` step kind: its configuration, the rules JSON Schema cannot state, its output.

An approval step asks people for a decision and waits for it (docs/approvals.md). It has no
handler: the worker's claim hands it to `approvals.services.step_request_approval`, which
parks the step in `waiting` until a reviewer decides, the deadline passes or the run ends.

Fields (besides the common ones; `timeout_s` is the decision deadline here, not an attempt's
timeout):

- `prompt` (template): what the reviewer is asked;
- `context` (object of templates): values from `input` and earlier steps the decision needs;
- `form`: `{"schema": <JSON Schema of an object>, "values": {<field>: <template>}}`: fields a
  reviewer may edit, pre-filled from earlier outputs; the edited values become `data`;
- `reviewers`: the tenant role `reviewer` (default) or a named group of its members;
- `required_approvals` (1): distinct reviewers who must approve; any rejection rejects;
- `on_timeout` (`reject` when `timeout_s` is set): `reject`, `approve` or `fail`;
- `escalate_after_s` + `escalate_to`: after that long, the second group may decide too;
- `on_reject`: `fail` (default: the run fails with the reviewer's comment as the error) or
  `continue` (the step succeeds with `approved: false`, for `when` conditions to branch on).

Pure Python (no Django): the definition validator imports it through the registry.
"""

from __future__ import annotations

import re
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry

GROUP_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
DEFAULT_REVIEWERS = "reviewer"
MAX_REQUIRED_APPROVALS = 20
ON_TIMEOUT = ("reject", "approve", "fail")
ON_REJECT = ("fail", "continue")
# Roles that may never decide: a group named like them would be a trap.
NON_DECIDING_ROLES = ("viewer",)

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "minLength": 1},
        "context": {"type": "object"},
        "form": {
            "type": "object",
            "additionalProperties": False,
            "required": ["schema"],
            "properties": {
                "schema": {"type": "object"},
                "values": {"type": "object"},
            },
        },
        "reviewers": {"type": "string", "pattern": GROUP_PATTERN},
        "required_approvals": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_REQUIRED_APPROVALS,
        },
        "on_timeout": {"enum": list(ON_TIMEOUT)},
        "escalate_after_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 604800},
        "escalate_to": {"type": "string", "pattern": GROUP_PATTERN},
        "on_reject": {"enum": list(ON_REJECT)},
    },
}

# Rendered when the step becomes ready. `form` is walked whole, but its `schema` may hold no
# template (checked below), so only `form.values` changes.
TEMPLATE_FIELDS = ("prompt", "context", "form")

_TEMPLATE = re.compile(r"\{\{|\{%")


def check(step: dict[str, Any]) -> list[tuple[str, str]]:
    """Faults of an approval step that its JSON Schema cannot express.

    `step` is the whole step as written (common fields included); each fault is
    (path relative to the step, message). Called by the definition validator only when the
    step's shape is sound.
    """
    faults: list[tuple[str, str]] = []
    form = step.get("form")
    if isinstance(form, dict) and isinstance(form.get("schema"), dict):
        faults.extend(_check_form(form))
    timeout = step.get("timeout_s")
    if "on_timeout" in step and timeout is None:
        faults.append(("on_timeout", "needs timeout_s (the decision deadline, in seconds)"))
    has_after, has_to = "escalate_after_s" in step, "escalate_to" in step
    if has_after and not has_to:
        faults.append(("escalate_after_s", "needs escalate_to (the group to escalate to)"))
    if has_to and not has_after:
        faults.append(("escalate_to", "needs escalate_after_s (when to escalate)"))
    after = step.get("escalate_after_s")
    numbers = isinstance(timeout, (int, float)) and isinstance(after, (int, float))
    if has_after and numbers and after >= timeout:
        faults.append(
            ("escalate_after_s", f"must be less than timeout_s ({timeout:g}), or it never fires")
        )
    for name in ("reviewers", "escalate_to"):
        value = step.get(name)
        if value in NON_DECIDING_ROLES:
            faults.append((name, f"'{value}' members can read requests but never decide them"))
    if has_to and step.get("escalate_to") == step.get("reviewers", DEFAULT_REVIEWERS):
        faults.append(("escalate_to", "is the same group as reviewers; escalate to another one"))
    return faults


def _check_form(form: dict[str, Any]) -> list[tuple[str, str]]:
    schema = form["schema"]
    if _has_template(schema):
        # Said first: a template where the schema wants a list would also be an invalid schema.
        return [
            (
                "form.schema",
                "templates are not rendered in the schema; pre-fill fields in form.values",
            )
        ]
    faults: list[tuple[str, str]] = []
    meta = Draft202012Validator(Draft202012Validator.META_SCHEMA)
    for error in meta.iter_errors(schema):
        where = ".".join(str(part) for part in ("form", "schema", *error.absolute_path))
        faults.append((where, f"not a valid JSON Schema: {error.message}"))
    if faults:
        return faults
    if _has_remote_ref(schema):
        faults.append(("form.schema", "only references inside the schema (#...) work"))
    properties = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(properties, dict) or not properties:
        faults.append(
            (
                "form.schema",
                "must describe an object with properties (the fields a reviewer may edit): "
                '{"type": "object", "properties": {...}}',
            )
        )
        return faults
    values = form.get("values")
    if isinstance(values, dict):
        known = sorted(properties)
        for key in values:
            if key not in properties:
                faults.append(
                    (
                        f"form.values.{key}",
                        f"not a field of form.schema (fields: {', '.join(known)})",
                    )
                )
    return faults


def _has_template(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_TEMPLATE.search(value))
    if isinstance(value, dict):
        return any(_has_template(key) or _has_template(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_template(item) for item in value)
    return False


def _has_remote_ref(value: Any) -> bool:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            return True
        return any(_has_remote_ref(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_remote_ref(item) for item in value)
    return False


# --- at run time -----------------------------------------------------------------------------


def form_data_faults(schema: dict[str, Any] | None, data: Any) -> list[tuple[str, str]]:
    """(field path, message) for each way `data` breaks the form's schema; [] when it fits.

    Paths name the field as a reviewer knows it (`reply`, `items[2].qty`; `$` for the whole).
    """
    if schema is None:
        if data in (None, {}):
            return []
        return [("$", "this request has no form: there is no data to send")]
    if not isinstance(data, dict):
        return [("$", "data must be an object of the form's fields")]
    validator = Draft202012Validator(
        schema, format_checker=Draft202012Validator.FORMAT_CHECKER, registry=Registry()
    )
    faults = []
    for error in sorted(validator.iter_errors(data), key=lambda e: (len(e.path), list(e.path))):
        path = _path(error.absolute_path)
        if error.validator == "required":
            missing = [name for name in error.validator_value if name not in error.instance]
            faults.extend((_path([*error.absolute_path, name]), "is required") for name in missing)
        elif error.validator == "additionalProperties":
            allowed = set(error.schema.get("properties", {}))
            faults.extend(
                (_path([*error.absolute_path, key]), "is not a field of this form")
                for key in error.instance
                if key not in allowed
            )
        else:
            faults.append((path, error.message))
    return list(dict.fromkeys(faults))


def _path(parts: Any) -> str:
    path = ""
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else (f"{path}.{part}" if path else part)
    return path or "$"


def merged_form_data(values: dict[str, Any], edits: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The form after the reviewers' edits: pre-filled values, each edit applied in order."""
    data = dict(values or {})
    for edit in edits:
        data.update(edit or {})
    return data


def decision_output(
    *,
    approved: bool,
    decision: str,
    comment: str,
    reviewers: list[str],
    data: Any,
    timed_out: bool = False,
) -> dict[str, Any]:
    """The step's output, what downstream `when` conditions and templates read."""
    return {
        "approved": approved,
        "decision": decision,
        "comment": comment,
        "reviewers": reviewers,
        "data": data,
        "timed_out": timed_out,
    }
