"""The workflow definition language (docs/workflows.md): parsing and validation.

A definition arrives as JSON or YAML text (or an already decoded dict) and leaves as an
immutable `Definition` whose steps are in a topological order, with every dependency explicit
(`after` plus every step its templates read). Anything wrong is reported at once, as a list of
`Fault`s that each name the path of the fault (`steps[3].after[0]: unknown step 'serch'`), so
that an upload is refused with every problem and not one at a time, and nothing that can be
checked here fails at run time.

Validation has two layers. The shape (types, required fields, unknown fields) is checked with
JSON Schema: the document's own schema below plus each kind's `config_schema` from the registry.
The meaning (references, templates, cycles, registered tools) is checked afterwards, and only
for the parts whose shape is sound, so that one typo does not produce a cascade of faults.

Pure Python: no Django, no ORM.
"""

from __future__ import annotations

import copy
import difflib
import heapq
import json
import math
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from jobs import templating
from jobs.formats import json_type
from jobs.steps import registry
from jobs.templating import TemplateError, TemplateInfo, path_join

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,99}$"
ID_PATTERN = r"^[a-z_][a-z0-9_]{0,63}$"
MAX_STEPS = 500
# Deeper documents are refused before anything walks them: the validators (and Python's json
# and yaml) recurse, and a document nested thousands of levels deep would exhaust the stack.
MAX_NESTING = 64
DEFAULT_MAX_PARALLEL = 10
MAP_KIND = "map"
AGENT_KIND = "agent"

# Fields every step may carry, whatever its kind.
COMMON_FIELDS = ("id", "kind", "after", "when", "retry", "timeout_s", "optional")
# Fields a map's inner step must not carry: it takes the map's id, and the map decides when it
# runs and whether its failure is tolerated.
INNER_STEP_REFUSED = {
    "id": "the step of a map takes the map's id; remove 'id'",
    "after": "put 'after' on the map itself",
    "when": "put 'when' on the map itself",
    "optional": "put 'optional' on the map itself",
}

_RETRY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "max_attempts": {"type": "integer", "minimum": 1, "maximum": 100},
        "backoff_s": {"type": "number", "minimum": 0, "maximum": 86400},
        "max_backoff_s": {"type": "number", "minimum": 0, "maximum": 86400},
        "non_retryable": {"type": "array", "items": {"type": "string"}},
    },
}

_COMMON_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string", "pattern": ID_PATTERN},
    "kind": {"type": "string"},
    "after": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
    "when": {"type": "string", "minLength": 1},
    "retry": _RETRY_SCHEMA,
    "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 604800},
    "optional": {"type": "boolean"},
}

# Unknown fields are reported by the kind's own schema (additionalProperties: false), which
# sees every field that is not a common one, so this schema leaves them alone.
_STEP_SCHEMA = {"type": "object", "required": ["id", "kind"], "properties": _COMMON_PROPERTIES}
_INNER_STEP_SCHEMA = {
    "type": "object",
    "required": ["kind"],
    "properties": {k: v for k, v in _COMMON_PROPERTIES.items() if k not in INNER_STEP_REFUSED},
}

EVENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$"
MAX_TRIGGERS = 20
_TRIGGER_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["event"],
    "properties": {
        "event": {"type": "string", "pattern": EVENT_NAME_PATTERN},
        # An expression over `event` (`event.data.total > 100`), as a step's `when`.
        "when": {"type": "string", "minLength": 1},
        # The run's input, templated over `event`; by default the event's data.
        "input": {},
    },
}

_DOCUMENT_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "steps"],
    "properties": {
        "name": {"type": "string", "pattern": NAME_PATTERN},
        "description": {"type": "string"},
        "input_schema": {"type": "object"},
        # Each step is checked on its own (collect_steps), so that one malformed step does
        # not stop the checks of the others.
        "steps": {"type": "array", "minItems": 1, "maxItems": MAX_STEPS},
        "output": {},
        # Events that start the workflow (POST /api/v1/events/, docs/schedules.md).
        "triggers": {"type": "array", "maxItems": MAX_TRIGGERS, "items": _TRIGGER_SCHEMA},
    },
}

_PATTERN_HINTS = {
    NAME_PATTERN: "use lowercase letters, digits, '_', '.' and '-', starting with a letter or a "
    "digit, at most 100 characters",
    EVENT_NAME_PATTERN: "use letters, digits, '_', '.', ':' and '-', starting with a letter or a "
    "digit, at most 200 characters",
    ID_PATTERN: "use lowercase letters, digits and '_', starting with a letter or '_', at most "
    "64 characters (an id is written steps.<id> in templates)",
}

_JSON_TYPES = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "null": "null",
}


@dataclass(frozen=True)
class Fault:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class DefinitionError(Exception):
    """A definition that cannot be accepted; `faults` lists every problem found."""

    def __init__(self, faults: list[Fault]):
        self.faults = list(faults)
        count = len(self.faults)
        lines = "\n".join(f"  {fault}" for fault in self.faults)
        super().__init__(f"invalid definition ({count} fault{'s' if count != 1 else ''}):\n{lines}")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    non_retryable: tuple[str, ...] = ()

    def delay_before_retry(self, failed_attempt: int, rand: float) -> float:
        """Seconds to wait after the `failed_attempt`-th failure (1-based), "equal jitter".

        The exponential delay d = min(max_backoff_s, backoff_s * 2**(n-1)) is spread over
        [d/2, d) by `rand` in [0, 1), so that steps failing together do not retry together.
        """
        exponent = min(max(failed_attempt, 1) - 1, 64)  # 2**64 s is past any cap; no overflow
        delay = min(self.max_backoff_s, self.backoff_s * 2**exponent)
        return delay / 2 + rand * delay / 2

    def allows_retry(self, failed_attempt: int, code: str) -> bool:
        """Whether a step that failed its `failed_attempt`-th attempt with `code` is retried."""
        return failed_attempt < self.max_attempts and code not in self.non_retryable


@dataclass(frozen=True)
class StepDef:
    id: str
    kind: str
    queue: str
    after: tuple[str, ...]
    # `after` plus every step referenced by the step's templates (its `when`, its template
    # fields and, for a map, its `over` and its inner step's templates).
    depends_on: frozenset[str]
    when: str | None
    # The kind-specific fields exactly as written (for a map: `over` and `max_parallel`).
    config: dict[str, Any] = field(hash=False)
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = None
    optional: bool = False
    # A map's inner step: same id as the map, its own kind, config, retry and timeout.
    item: StepDef | None = None
    max_parallel: int | None = None

    @property
    def is_map(self) -> bool:
        return self.item is not None


@dataclass(frozen=True)
class TriggerDef:
    """An event that starts the workflow: its name, a condition on it, the run's input."""

    event: str
    when: str | None
    input: Any = field(hash=False)  # None: the event's data


@dataclass(frozen=True)
class Definition:
    name: str
    description: str
    input_schema: dict[str, Any] | None = field(hash=False)
    # In a topological order, stable with respect to the declared order.
    steps: tuple[StepDef, ...]
    output: Any = field(hash=False)
    document: dict[str, Any] = field(hash=False, repr=False)
    triggers: tuple[TriggerDef, ...] = ()
    _by_id: dict[str, StepDef] = field(init=False, repr=False, compare=False, hash=False)
    _dependents: dict[str, frozenset[str]] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        by_id = {step.id: step for step in self.steps}
        dependents: dict[str, set[str]] = {step.id: set() for step in self.steps}
        for step in self.steps:
            for dependency in step.depends_on:
                dependents[dependency].add(step.id)
        object.__setattr__(self, "_by_id", by_id)
        object.__setattr__(
            self, "_dependents", {key: frozenset(value) for key, value in dependents.items()}
        )

    def step(self, step_id: str) -> StepDef:
        return self._by_id[step_id]

    def dependents(self, step_id: str) -> frozenset[str]:
        """The steps that depend directly on `step_id` (the reverse of `depends_on`)."""
        return self._dependents[step_id]


def parse_definition(document: dict[str, Any] | str | bytes) -> Definition:
    """Parse and validate a definition; raise DefinitionError listing every fault."""
    if isinstance(document, (str, bytes)):
        document = _load_text(document)
    too_deep = nesting_fault(document)
    if too_deep is not None:
        raise DefinitionError([too_deep])
    faults = list(_non_json_values(document, []))
    if faults:
        raise DefinitionError(faults)
    return _Validator(copy.deepcopy(document)).run()


def validate_input(definition: Definition, value: Any) -> list[Fault]:
    """Check a run's input against the definition's `input_schema`.

    Every fault is returned, the most relevant first (shallow before deep), with paths such as
    `input.ticket` or `input.items[2].qty`. Without a schema, the input must be an object.
    """
    schema = definition.input_schema
    if schema is None:
        if isinstance(value, dict):
            return []
        return [Fault("input", f"expected an object, got {json_type(value)}")]
    validator = Draft202012Validator(
        schema, format_checker=Draft202012Validator.FORMAT_CHECKER, registry=Registry()
    )
    try:
        errors = list(validator.iter_errors(value))
    except Unresolvable as exc:
        return [Fault("input_schema", f"unresolvable reference: {exc}")]
    errors.sort(key=_error_order)
    faults = [
        Fault(_format_path(["input", *error.absolute_path]), error.message) for error in errors
    ]
    return list(dict.fromkeys(faults))


# --- loading ---------------------------------------------------------------------------------


def nesting_fault(document: Any, limit: int = MAX_NESTING) -> Fault | None:
    """A fault at the first place where `document` is nested deeper than `limit`, or None.

    Iterative, so that it is safe on any depth."""
    pending: list[tuple[Any, list[str | int]]] = [(document, [])]
    while pending:
        value, path = pending.pop()
        if isinstance(value, dict):
            children = list(value.items())
        elif isinstance(value, list):
            children = list(enumerate(value))
        else:
            continue
        if len(path) >= limit:
            return Fault(_format_path(path), f"nested more than {limit} levels deep")
        pending.extend((child, [*path, key]) for key, child in children)
    return None


class _JsonLikeLoader(yaml.SafeLoader):
    """YAML read the way JSON users expect (YAML 1.2 rather than 1.1 scalars).

    `2024-01-01` stays a string instead of becoming a date, and only true/false are booleans:
    YAML 1.1 also reads `on`, `off`, `yes`, `no`, `y` and `n` as booleans, so a field named
    `on` would become the key True.

    Aliases (`*name`) are refused: JSON has none, and a few lines of nested aliases expand to
    billions of values ("billion laughs") that every later step would walk.
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                "aliases (*name) are not supported: write the value out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


_JsonLikeLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JsonLikeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load_yaml(text: str) -> Any:
    """YAML text as JSON-like data (see _JsonLikeLoader); raises yaml.YAMLError.

    The events are read first (PyYAML's parser is iterative, its composer recursive), so that
    a document nested too deeply is refused before the composer would exhaust the stack.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_JsonLikeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_NESTING:
                raise yaml.YAMLError(f"nested more than {MAX_NESTING} levels deep")
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1
    return yaml.load(text, Loader=_JsonLikeLoader)


def _load_text(text: str | bytes) -> Any:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DefinitionError([Fault("$", f"not UTF-8 text: {exc}")]) from None
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise DefinitionError([Fault("$", f"nested more than {MAX_NESTING} levels deep")]) from None
    except ValueError as json_error:
        try:
            return load_yaml(text)
        except yaml.YAMLError as yaml_error:
            # Text that starts like JSON was meant to be JSON: its error is the useful one.
            if text.lstrip()[:1] in ("{", "["):
                message = f"invalid JSON: {json_error}"
            else:
                message = f"invalid YAML: {_yaml_message(yaml_error)}"
            raise DefinitionError([Fault("$", message)]) from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _yaml_message(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return problem


def _non_json_values(value: Any, path: list[str | int]) -> Iterator[Fault]:
    """Faults for values JSON cannot represent (dates from YAML, NaN, non-string keys...)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                yield Fault(_format_path(path), f"keys must be strings; {key!r} is not")
            else:
                yield from _non_json_values(item, [*path, key])
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _non_json_values(item, [*path, index])
    elif isinstance(value, float) and not math.isfinite(value):
        yield Fault(_format_path(path), f"{value} is not a JSON number")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        yield Fault(_format_path(path), f"a {type(value).__name__} is not a JSON value")


# --- validation ------------------------------------------------------------------------------


@dataclass
class _Draft:
    """A step as validation sees it, before it becomes a StepDef."""

    path: str
    raw: dict[str, Any]
    id: str | None
    spec: registry.KindSpec | None
    # Top-level fields of the step whose shape is wrong: no semantic check looks at them.
    broken: set[str]
    after: list[str] = field(default_factory=list)
    refs: set[str] = field(default_factory=set)
    inner: _Draft | None = None


class _Validator:
    def __init__(self, document: Any):
        self.document = document
        self.faults: list[Fault] = []
        self.kinds = registry.kinds()
        self.tools = registry.tools()
        self.drafts: list[_Draft] = []
        # Every string id, even a malformed one, so that references to it are not reported as
        # unknown on top of the fault about the id itself.
        self.first_index: dict[str, int] = {}

    def fault(self, path: str, message: str) -> None:
        self.faults.append(Fault(path, message))

    def run(self) -> Definition:
        broken = self.check_shape(self.document, _DOCUMENT_SCHEMA, [])
        if not isinstance(self.document, dict):
            raise DefinitionError(self.faults)
        if "input_schema" in self.document and "input_schema" not in broken:
            self.check_input_schema(self.document["input_schema"])
        if "steps" not in broken:
            self.collect_steps(self.document["steps"])
            for draft in self.drafts:
                self.check_step(draft)
        if "output" in self.document:
            self.check_templates(self.document["output"], "output", in_map=False, on=None)
        if "triggers" in self.document and "triggers" not in broken:
            self.check_triggers(self.document["triggers"])
        order = self.order_steps()
        if self.faults:
            faults = sorted(dict.fromkeys(self.faults), key=_document_position)
            raise DefinitionError(faults)
        return self.build(order)

    # -- shape

    def check_shape(
        self,
        instance: Any,
        schema: dict[str, Any],
        path: list[str | int],
        other_fields: tuple[str, ...] = (),
    ) -> set[str]:
        """Validate with JSON Schema and record faults; return the names of the broken fields.

        `other_fields` are valid names that the schema does not list (the common step fields,
        when checking a kind's schema), offered as suggestions for unknown fields.
        """
        broken: set[str] = set()
        for error in sorted(Draft202012Validator(schema).iter_errors(instance), key=_error_order):
            full = [*path, *error.absolute_path]
            self.faults.extend(_faults_from_error(error, full, other_fields))
            relative = list(error.absolute_path)
            if relative:
                broken.add(str(relative[0]))
            elif error.validator == "required":
                broken.update(
                    name for name in error.validator_value if name not in (instance or {})
                )
            else:
                broken.add("*")
        return broken

    def check_input_schema(self, schema: dict[str, Any]) -> None:
        meta = Draft202012Validator(Draft202012Validator.META_SCHEMA)
        errors = sorted(meta.iter_errors(schema), key=_error_order)
        for error in errors:
            path = _format_path(["input_schema", *error.absolute_path])
            self.fault(path, f"not a valid JSON Schema: {error.message}")
        if not errors:
            self.check_schema_references(schema)

    def check_schema_references(self, schema: dict[str, Any]) -> None:
        """Only references inside the schema: no network fetch, no run-time surprise."""
        resolver = Registry().resolver_with_root(DRAFT202012.create_resource(schema))
        for ref, path in _schema_refs(schema, ["input_schema"]):
            if not ref.startswith("#"):
                self.fault(_format_path(path), "only references inside the schema (#...) work")
                continue
            try:
                resolver.lookup(ref)
            except Unresolvable:
                self.fault(_format_path(path), f"reference {ref!r} points to nothing")

    def collect_steps(self, steps: list[Any]) -> None:
        for index, raw in enumerate(steps):
            path = f"steps[{index}]"
            if not isinstance(raw, dict):
                self.fault(path, f"expected a step (an object), got {json_type(raw)}")
                continue
            draft = self.check_step_shape(raw, path, inner=False)
            self.drafts.append(draft)
            if draft.id is None:
                continue
            if draft.id in self.first_index:
                first = self.first_index[draft.id]
                self.fault(f"{path}.id", f"duplicate id '{draft.id}' (first at steps[{first}])")
            else:
                self.first_index[draft.id] = index

    def check_step_shape(self, raw: dict[str, Any], path: str, *, inner: bool) -> _Draft:
        parts: list[str | int] = _path_parts(path)
        broken = self.check_shape(raw, _INNER_STEP_SCHEMA if inner else _STEP_SCHEMA, parts)
        if inner:
            for name, message in INNER_STEP_REFUSED.items():
                if name in raw:
                    self.fault(path_join(path, name), message)
                    broken.add(name)
        step_id = raw.get("id") if isinstance(raw.get("id"), str) else None
        spec = None
        kind_name = raw.get("kind")
        if "kind" not in broken and isinstance(kind_name, str):
            spec = self.kinds.get(kind_name)
            if spec is None:
                self.fault(f"{path}.kind", self.unknown_kind_message(kind_name))
            elif inner and kind_name == MAP_KIND:
                self.fault(f"{path}.kind", "a map cannot contain a map (nested maps are refused)")
                spec = None
        if spec is not None:
            config = {key: value for key, value in raw.items() if key not in COMMON_FIELDS}
            common = tuple(f for f in COMMON_FIELDS if not (inner and f in INNER_STEP_REFUSED))
            broken |= self.check_shape(config, spec.config_schema, parts, common)
        draft = _Draft(path=path, raw=raw, id=step_id, spec=spec, broken=broken)
        if spec is not None and spec.name == MAP_KIND and "step" not in broken:
            draft.inner = self.check_step_shape(raw["step"], f"{path}.step", inner=True)
        return draft

    def unknown_kind_message(self, name: str) -> str:
        known = sorted(self.kinds)
        return f"unknown kind '{name}'{_suggest(name, known)}; known kinds: {', '.join(known)}"

    # -- meaning

    def check_step(self, draft: _Draft) -> None:
        raw = draft.raw
        if "after" in raw and "after" not in draft.broken:
            for index, name in enumerate(raw["after"]):
                path = f"{draft.path}.after[{index}]"
                if name == draft.id:
                    self.fault(path, "a step cannot depend on itself")
                elif name not in self.first_index:
                    self.fault(path, self.unknown_step_message(name))
                else:
                    draft.after.append(name)
        if "when" in raw and "when" not in draft.broken:
            info = self.check_one(raw["when"], f"{draft.path}.when", expression=True)
            if info is not None:
                self.check_info(info, f"{draft.path}.when", draft, in_map=False)
        self.check_retry(draft)
        self.check_config(draft, in_map=False)
        if draft.inner is not None:
            if draft.inner.spec is not None and draft.inner.spec.name == AGENT_KIND:
                # An agent's children are numbered under its own id, as a map's items are.
                self.fault(f"{draft.path}.step.kind", "an agent cannot be the step of a map")
                return
            # The inner step's templates belong to the map: same id, and the steps they read are
            # the map's dependencies.
            draft.inner.id = draft.id
            self.check_config(draft.inner, in_map=True, owner=draft)
            self.check_retry(draft.inner)

    def check_retry(self, draft: _Draft) -> None:
        retry = draft.raw.get("retry")
        if "retry" in draft.broken or not isinstance(retry, dict):
            return
        both = "backoff_s" in retry and "max_backoff_s" in retry
        if both and retry["max_backoff_s"] < retry["backoff_s"]:
            self.fault(
                f"{draft.path}.retry.max_backoff_s",
                f"must be at least backoff_s ({retry['backoff_s']})",
            )

    def check_config(self, draft: _Draft, *, in_map: bool, owner: _Draft | None = None) -> None:
        spec = draft.spec
        if spec is None:
            return
        owner = owner or draft
        for name, value in draft.raw.items():
            if name in COMMON_FIELDS or name in draft.broken:
                continue
            path = path_join(draft.path, name)
            if name in spec.template_fields:
                self.check_templates(value, path, in_map=in_map, on=owner)
            elif isinstance(value, str) and templating.has_template_syntax(value):
                fields = ", ".join(spec.template_fields) or "none"
                self.fault(
                    path,
                    f"templates are not rendered in '{name}' (template fields of "
                    f"{spec.name}: {fields})",
                )
        if spec.name == "tool" and "tool" not in draft.broken:
            self.check_tool(draft)
        kind_check = spec.load_check()
        if kind_check is not None and not draft.broken:
            for subpath, message in kind_check(draft.raw):
                self.fault(f"{draft.path}.{subpath}", message)

    def check_tool(self, draft: _Draft) -> None:
        name = draft.raw.get("tool")
        if not isinstance(name, str) or templating.has_template_syntax(name):
            return
        if name not in self.tools:
            known = sorted(self.tools)
            listed = ", ".join(known) if known else "none"
            self.fault(
                f"{draft.path}.tool",
                f"unknown tool '{name}'{_suggest(name, known)}; registered tools: {listed}",
            )

    def check_templates(self, value: Any, path: str, *, in_map: bool, on: _Draft | None) -> None:
        """Check every template string inside `value` (walked like `templating.render`).

        `on` is the step the templates belong to (None for the definition's `output`); the steps
        they reference are added to its dependencies.
        """
        if isinstance(value, str):
            info = self.check_one(value, path, expression=False)
            if info is not None:
                self.check_info(info, path, on, in_map=in_map)
        elif isinstance(value, dict):
            for key, item in value.items():
                self.check_templates(item, path_join(path, key), in_map=in_map, on=on)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                self.check_templates(item, path_join(path, index), in_map=in_map, on=on)

    def check_triggers(self, triggers: list[dict[str, Any]]) -> None:
        """A trigger's `when` and `input` read the event alone (`event.name`, `event.data`,
        `event.id`): no step has run when it is evaluated."""
        names = templating.EVENT_NAMES
        for index, trigger in enumerate(triggers):
            path = f"triggers[{index}]"
            if "when" in trigger:
                try:
                    templating.check_expression(trigger["when"], names)
                except TemplateError as exc:
                    self.fault(f"{path}.when", f"template error: {exc.message}")
            for where, text in template_strings(trigger.get("input"), f"{path}.input"):
                try:
                    templating.check(text, names)
                except TemplateError as exc:
                    self.fault(where, f"template error: {exc.message}")

    def check_one(self, source: str, path: str, *, expression: bool) -> TemplateInfo | None:
        try:
            if expression:
                return templating.check_expression(source)
            return templating.check(source)
        except TemplateError as exc:
            self.fault(path, f"template error: {exc.message}")
            return None

    def check_info(self, info: TemplateInfo, path: str, draft: _Draft | None, *, in_map: bool):
        """References of one template: known steps, not the step itself, item only in maps."""
        own_id = draft.id if draft is not None else None
        for ref in sorted(info.step_refs):
            if own_id is not None and ref == own_id:
                self.fault(path, "a step cannot reference its own output")
            elif ref not in self.first_index:
                self.fault(path, f"template references {self.unknown_step_message(ref)}")
            elif draft is not None:
                draft.refs.add(ref)
        if info.uses_item and not in_map:
            self.fault(path, "item and index are only defined inside the step of a map")

    def unknown_step_message(self, name: str) -> str:
        return f"unknown step '{name}'{_suggest(name, list(self.first_index))}"

    # -- graph

    def dependencies(self) -> dict[str, set[str]]:
        """Each step's dependencies, over the sound parts of the document (first ids only)."""
        graph: dict[str, set[str]] = {}
        for draft in self.drafts:
            if draft.id is None or draft.id in graph:
                continue
            graph[draft.id] = (set(draft.after) | draft.refs) - {draft.id}
        return graph

    def order_steps(self) -> list[str]:
        """Topological order, stable w.r.t. the declared order; cycles become faults."""
        graph = self.dependencies()
        position = {step_id: index for index, step_id in enumerate(graph)}
        dependents: dict[str, list[str]] = {step_id: [] for step_id in graph}
        waiting = {step_id: len(deps) for step_id, deps in graph.items()}
        for step_id, deps in graph.items():
            for dependency in deps:
                dependents[dependency].append(step_id)
        heap = [(position[step_id], step_id) for step_id, count in waiting.items() if count == 0]
        heapq.heapify(heap)
        order: list[str] = []
        while heap:
            _, step_id = heapq.heappop(heap)
            order.append(step_id)
            for dependent in dependents[step_id]:
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    heapq.heappush(heap, (position[dependent], dependent))
        if len(order) < len(graph):
            self.report_cycles(graph, [s for s in graph if waiting[s] > 0])
        return order

    def report_cycles(self, graph: dict[str, set[str]], stuck: list[str]) -> None:
        """One fault per distinct cycle, at the first of its steps in declared order.

        Stuck steps are on a cycle or downstream of one. Each one not yet on a reported cycle
        gets the shortest cycle through it, if any: every step on a cycle is named once, without
        enumerating the (exponentially many) elementary cycles of a tangled graph.
        """
        on_reported_cycle: set[str] = set()
        reported: set[tuple[str, ...]] = set()
        stuck_set = set(stuck)
        for start in stuck:  # in declared order
            if start in on_reported_cycle:
                continue
            cycle = _shortest_cycle(start, graph, stuck_set)
            if cycle is None:
                continue  # downstream of a cycle, not on one
            on_reported_cycle.update(cycle)
            first = min(range(len(cycle)), key=lambda i: self.first_index[cycle[i]])
            cycle = cycle[first:] + cycle[:first]
            if tuple(cycle) in reported:
                continue
            reported.add(tuple(cycle))
            index = self.first_index[cycle[0]]
            spelled = " → ".join([*cycle, cycle[0]])
            self.fault(f"steps[{index}].after", f"cycle {spelled} (each step waits for the next)")

    # -- result

    def build(self, order: list[str]) -> Definition:
        drafts = {draft.id: draft for draft in self.drafts}
        steps = tuple(self.build_step(drafts[step_id]) for step_id in order)  # type: ignore[index]
        document = self.document
        return Definition(
            name=document["name"],
            description=document.get("description", ""),
            input_schema=document.get("input_schema"),
            steps=steps,
            output=document.get("output"),
            document=document,
            triggers=tuple(
                TriggerDef(event=t["event"], when=t.get("when"), input=t.get("input"))
                for t in document.get("triggers", [])
            ),
        )

    def build_step(self, draft: _Draft) -> StepDef:
        assert draft.id is not None and draft.spec is not None
        raw = draft.raw
        config = {key: value for key, value in raw.items() if key not in COMMON_FIELDS}
        item = None
        max_parallel = None
        if draft.inner is not None:
            config.pop("step")
            item = self.build_step(draft.inner)
            max_parallel = raw.get("max_parallel", DEFAULT_MAX_PARALLEL)
        return StepDef(
            id=draft.id,
            kind=draft.spec.name,
            queue=draft.spec.queue,
            after=tuple(draft.after),
            depends_on=frozenset(draft.after) | frozenset(draft.refs),
            when=raw.get("when"),
            config=config,
            retry=_retry_policy(raw.get("retry", {})),
            timeout_s=float(raw["timeout_s"]) if "timeout_s" in raw else None,
            optional=raw.get("optional", False),
            item=item,
            max_parallel=max_parallel,
        )


def template_strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string inside `value`, with its path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from template_strings(item, path_join(path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from template_strings(item, path_join(path, index))


def _retry_policy(raw: dict[str, Any]) -> RetryPolicy:
    backoff_s = float(raw.get("backoff_s", RetryPolicy.backoff_s))
    # A first delay above the default cap raises the cap rather than being cut by it.
    max_backoff_s = float(raw.get("max_backoff_s", max(RetryPolicy.max_backoff_s, backoff_s)))
    return RetryPolicy(
        max_attempts=raw.get("max_attempts", RetryPolicy.max_attempts),
        backoff_s=backoff_s,
        max_backoff_s=max_backoff_s,
        non_retryable=tuple(raw.get("non_retryable", ())),
    )


def _shortest_cycle(start: str, graph: dict[str, set[str]], within: set[str]) -> list[str] | None:
    """The shortest path start → ... → start along dependencies, without the final start."""
    previous: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for dependency in sorted(graph[node]):
            if dependency == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return list(reversed(path))
            if dependency in within and dependency not in seen:
                seen.add(dependency)
                previous[dependency] = node
                queue.append(dependency)
    return None


# --- helpers ---------------------------------------------------------------------------------


def _format_path(parts: list[str | int] | Any) -> str:
    path = ""
    for part in parts:
        path = path_join(path, part)
    return path or "$"


def _path_parts(path: str) -> list[str | int]:
    """`steps[3].step` → ["steps", 3, "step"] (only the simple paths built here)."""
    parts: list[str | int] = []
    for chunk in path.split("."):
        name, _, rest = chunk.partition("[")
        parts.append(name)
        if rest:
            parts.append(int(rest.rstrip("]")))
    return parts


_SECTIONS = ("$", "name", "description", "input_schema", "steps", "output")


_SECTION_PATTERN = re.compile(r"^(\w+)(?:\[(\d+)\])?")


def _document_position(fault: Fault) -> tuple[int, int]:
    """Sort key that lists faults in document order: by section, then by step (stable sort)."""
    match = _SECTION_PATTERN.match(fault.path)
    if match is None or match.group(1) not in _SECTIONS:
        return (0, -1)  # the root and unknown top-level fields come first
    step = int(match.group(2)) if match.group(2) is not None else -1
    return (_SECTIONS.index(match.group(1)), step)


def _error_order(error: ValidationError) -> tuple[Any, ...]:
    # Shallow faults first, then in document order; "anyOf"-style summaries last.
    parts = tuple((0, part, "") if isinstance(part, int) else (1, 0, part) for part in error.path)
    return (len(error.path), error.validator in ("anyOf", "oneOf"), parts)


def _faults_from_error(
    error: ValidationError, path: list[str | int], other_fields: tuple[str, ...] = ()
) -> list[Fault]:
    """Turn a JSON Schema error into faults a person can act on."""
    instance = error.instance
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        allowed = sorted(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        extra = [
            key
            for key in instance
            if key not in allowed and not any(re.search(pattern, key) for pattern in patterns)
        ]
        candidates = allowed + list(other_fields)
        return [
            Fault(_format_path([*path, key]), f"unknown field{_suggest(key, candidates)}")
            for key in extra
        ]
    if error.validator == "required" and isinstance(instance, dict):
        missing = [name for name in error.validator_value if name not in instance]
        return [Fault(_format_path([*path, name]), "required field is missing") for name in missing]
    where = _format_path(path)
    if error.validator == "type":
        expected = error.validator_value
        names = [expected] if isinstance(expected, str) else list(expected)
        wanted = " or ".join(_JSON_TYPES.get(name, name) for name in names)
        return [Fault(where, f"expected {wanted}, got {json_type(instance)}")]
    if error.validator == "pattern" and error.validator_value in _PATTERN_HINTS:
        hint = _PATTERN_HINTS[error.validator_value]
        return [Fault(where, f"invalid value {instance!r}: {hint}")]
    if error.validator == "minItems" and path == ["steps"]:
        return [Fault(where, "a workflow needs at least one step")]
    if error.validator == "maxItems" and path == ["steps"]:
        return [Fault(where, f"a workflow has at most {MAX_STEPS} steps")]
    if error.validator == "uniqueItems":
        return [Fault(where, "entries must be unique")]
    if error.validator == "enum":
        choices = ", ".join(json.dumps(choice) for choice in error.validator_value)
        return [Fault(where, f"{json.dumps(instance)} is not one of: {choices}")]
    return [Fault(where, error.message)]


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _schema_refs(schema: Any, path: list[str | int]) -> Iterator[tuple[str, list[str | int]]]:
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str):
                yield value, [*path, key]
            else:
                yield from _schema_refs(value, [*path, key])
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from _schema_refs(value, [*path, index])
