"""The sandboxed expression language of workflow definitions (DESIGN §5).

This module owns the one language that step templates (`"prompt": "Label {{ input.ticket }}"`),
`when` conditions (`steps.classify.output.text == 'refund'`) and a definition's `output` are
written in: Jinja2's immutable sandbox, with native values where a string is exactly one
`{{ expr }}`. It is pure (no Django, no ORM) so that the definition validator and the engine can
use it anywhere.

What templates see is the render context:
`{"input": <run input>, "steps": {id: {"output": ..., "status": ...}}, "item": ..., "index": ...}`
and nothing else: no globals (`range`, `cycler`, `joiner`, `namespace`...), no attribute access
to Python internals, no includes, imports or macros.

Decisions worth knowing (see also docs/ once written):
- `obj.key` on a mapping reads the key first, so `input.items` is the run input's `items` field,
  not the `dict.items` method (Jinja's default prefers the attribute, a classic trap).
- Unsafe attribute access (`input.__class__`) raises instead of being silently undefined, so a
  probing template fails loudly.
- In string templates, `None` and undefined render as "" and lists/dicts render as JSON, not as
  Python reprs (`['a']`), because the text usually goes into a prompt or a URL.
- The `random` filter is removed: a template must render the same way every time it is rendered
  (map items are rendered as they become ready, possibly long after the map started).
- `*` and `**` are bounded so that a template cannot allocate gigabytes in the scheduler.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.parser import Parser
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# The names a template may read, in the order error messages list them.
NAMES = ("input", "steps", "item", "index")
# What `steps.<id>` holds.
STEP_FIELDS = ("output", "status")

# Bounds on operators that can allocate without limit (see _Environment.call_binop).
MAX_SEQUENCE_PRODUCT = 1_000_000
MAX_POWER_BITS = 100_000

_FORBIDDEN_TAGS: dict[type[nodes.Node], str] = {
    nodes.Extends: "extends",
    nodes.Include: "include",
    nodes.Import: "import",
    nodes.FromImport: "from ... import",
    nodes.Macro: "macro",
    nodes.CallBlock: "call",
}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TemplateError(Exception):
    """A template that does not parse, reads an unknown name or fails to render.

    `message` is for people; `path` locates the failing string inside a rendered structure
    (`"filters[0]"`, "" for the value itself) so that callers can name the exact field.
    """

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass(frozen=True)
class TemplateInfo:
    """What a template reads: the step ids it references and whether it uses item/index."""

    step_refs: frozenset[str] = frozenset()
    uses_item: bool = False


def path_join(path: str, key: str | int) -> str:
    """Extend a path in the `steps[3].args.filters[0]` format used by every error message."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not _IDENTIFIER.match(key):
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


def has_template_syntax(value: str) -> bool:
    return "{{" in value or "{%" in value


@functools.lru_cache(maxsize=4096)
def check(template: str) -> TemplateInfo:
    """Parse a template and report what it reads; raise TemplateError if it is invalid."""
    if not has_template_syntax(template):
        return TemplateInfo()
    return _analyse(_compile(template).ast)


@functools.lru_cache(maxsize=4096)
def check_expression(expr: str) -> TemplateInfo:
    """Like `check`, for a bare expression such as a `when` condition."""
    return _analyse(_compile_expression(expr).ast)


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """Render every template string inside `value` (dicts and lists are walked).

    A string that is exactly one `{{ expr }}` becomes the native (JSON) value of `expr`; other
    strings with template syntax render to strings; everything else is returned as it is.
    """
    return _render(value, context, "")


def evaluate(expr: str, context: Mapping[str, Any]) -> Any:
    """Evaluate a bare expression (a `when` condition); undefined becomes None.

    The value is not converted to JSON: the caller only takes its truthiness.
    """
    result = _run(_compile_expression(expr).native, context)
    return None if isinstance(result, Undefined) else result


# --- the environment -------------------------------------------------------------------------


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Definitions address JSON data; `input.items` must be the field, not dict.items.
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        # The default returns an undefined that renders as "", which would hide a probe.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            _check_repetition(left, right)
            _check_repetition(right, left)
        elif operator == "**":
            _check_power(left, right)
        return super().call_binop(context, operator, left, right)


def _check_repetition(sequence: Any, times: Any) -> None:
    repeats = isinstance(sequence, (str, list, tuple)) and isinstance(times, int)
    if repeats and len(sequence) * times > MAX_SEQUENCE_PRODUCT:
        raise SecurityError("the result of '*' would be too large")


def _check_power(base: Any, exponent: Any) -> None:
    integers = isinstance(base, int) and isinstance(exponent, int) and exponent > 0
    if integers and abs(base) > 1 and base.bit_length() * exponent > MAX_POWER_BITS:
        raise SecurityError("the result of '**' would be too large")


def _finalize(value: Any) -> Any:
    """How a value inside a string template becomes text."""
    if value is None or isinstance(value, Undefined):
        return ""
    if isinstance(value, (dict, list, tuple, types.GeneratorType)):
        return json.dumps(_to_json(value), ensure_ascii=False)
    return value


_env = _Environment(undefined=ChainableUndefined, finalize=_finalize, autoescape=False)
_env.globals.clear()
del _env.filters["random"]


# --- compilation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Compiled:
    ast: nodes.Template
    # A template that assigns the value of a single `{{ expr }}` to `result`, or None when the
    # source is not exactly one expression (then `text` renders it as a string).
    native: Template | None
    text: Template | None


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> _Compiled:
    try:
        ast = _env.parse(source)
        _refuse_forbidden_tags(ast)
        expr = _single_expression(ast)
        if expr is not None:
            return _Compiled(ast=ast, native=_native_template(expr), text=None)
        return _Compiled(ast=ast, native=None, text=_env.from_string(ast))
    except TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(exc, source)) from None


@functools.lru_cache(maxsize=4096)
def _compile_expression(source: str) -> _Compiled:
    if has_template_syntax(source):
        raise TemplateError("a condition is a bare expression: remove the {{ }} or {% %}")
    try:
        parser = Parser(_env, source, state="variable")
        expr = parser.parse_expression()
        if not parser.stream.eos:
            raise TemplateSyntaxError(
                f"unexpected {parser.stream.current.value!r} after the expression",
                parser.stream.current.lineno,
            )
        ast = nodes.Template([nodes.Output([expr])], lineno=1)
        ast.set_environment(_env)
        _refuse_forbidden_tags(ast)
        return _Compiled(ast=ast, native=_native_template(expr), text=None)
    except TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(exc, source)) from None


def _single_expression(ast: nodes.Template) -> nodes.Expr | None:
    """The expression of a template that is exactly one `{{ expr }}` (whitespace around)."""
    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    parts = [
        node
        for node in ast.body[0].nodes
        if not (isinstance(node, nodes.TemplateData) and not node.data.strip())
    ]
    if len(parts) == 1 and not isinstance(parts[0], nodes.TemplateData):
        return parts[0]
    return None


def _native_template(expr: nodes.Expr) -> Template:
    # The same construction as Environment.compile_expression, from an already parsed node.
    body = [nodes.Assign(nodes.Name("result", "store"), expr, lineno=1)]
    return _env.from_string(nodes.Template(body, lineno=1))


def _refuse_forbidden_tags(ast: nodes.Template) -> None:
    for node_type, tag in _FORBIDDEN_TAGS.items():
        if next(ast.find_all(node_type), None) is not None:
            raise TemplateError(f"the {{% {tag} %}} tag is not available in workflow templates")


def _syntax_message(exc: TemplateSyntaxError, source: str) -> str:
    if "\n" in source.strip() and exc.lineno:
        return f"{exc.message} (line {exc.lineno})"
    return str(exc.message)


# --- analysis --------------------------------------------------------------------------------


def _analyse(ast: nodes.Template) -> TemplateInfo:
    undeclared = set(meta.find_undeclared_variables(ast))
    # `self` (the template reference) is declared by Jinja itself; templates have no use for it.
    if _reads_name(ast, "self") and not _binds_name(ast, "self"):
        undeclared.add("self")
    unknown = sorted(undeclared - set(NAMES))
    if unknown:
        raise TemplateError(_unknown_names_message(unknown))
    return TemplateInfo(
        step_refs=_step_refs(ast) if "steps" in undeclared else frozenset(),
        uses_item=bool(undeclared & {"item", "index"}),
    )


def _unknown_names_message(unknown: list[str]) -> str:
    quoted = ", ".join(f"'{name}'" for name in unknown)
    label = "unknown name" if len(unknown) == 1 else "unknown names"
    message = f"{label} {quoted}; templates see {', '.join(NAMES)}"
    close = difflib.get_close_matches(unknown[0], NAMES, n=1)
    if close:
        message += f" (did you mean '{close[0]}'?)"
    return message


def _reads_name(ast: nodes.Template, name: str) -> bool:
    return any(node.name == name and node.ctx == "load" for node in ast.find_all(nodes.Name))


def _binds_name(ast: nodes.Template, name: str) -> bool:
    return any(node.name == name and node.ctx != "load" for node in ast.find_all(nodes.Name))


def _constant_key(node: nodes.Node) -> str | None:
    """`X` in `parent.X` or `parent['X']`; None for anything computed."""
    if isinstance(node, nodes.Getattr):
        return node.attr
    constant = isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const)
    if constant and isinstance(node.arg.value, str):
        return node.arg.value
    return None


def _is_steps(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Name) and node.name == "steps" and node.ctx == "load"


def _step_refs(ast: nodes.Template) -> frozenset[str]:
    """The ids X of every `steps.X` (or `steps['X']`).

    `steps` must always be followed by a constant id: the engine derives a step's dependencies
    from its templates, which is impossible for `steps[some_expression]` or a bare `steps`.
    """
    refs: set[str] = set()
    used: set[int] = set()
    accesses = list(ast.find_all((nodes.Getattr, nodes.Getitem)))
    step_nodes: set[int] = set()
    for node in accesses:
        if _is_steps(node.node):
            step_id = _constant_key(node)
            if step_id is not None:
                refs.add(step_id)
                used.add(id(node.node))
                step_nodes.add(id(node))
    for node in accesses:
        if id(node.node) in step_nodes:
            field = _constant_key(node)
            if field is not None and field not in STEP_FIELDS:
                step_id = _constant_key(node.node)
                raise TemplateError(
                    f"steps.{step_id} has {' and '.join(STEP_FIELDS)}; there is no '{field}'"
                )
    for node in ast.find_all(nodes.Name):
        if _is_steps(node) and id(node) not in used:
            raise TemplateError("use steps.<id> with a literal step id, e.g. steps.search.output")
    return frozenset(refs)


# --- rendering -------------------------------------------------------------------------------


def _render(value: Any, context: Mapping[str, Any], path: str) -> Any:
    if isinstance(value, str):
        if not has_template_syntax(value):
            return value
        try:
            return _render_string(value, context)
        except TemplateError as exc:
            raise TemplateError(exc.message, path) from None
    if isinstance(value, Mapping):
        return {key: _render(item, context, path_join(path, key)) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_render(item, context, path_join(path, i)) for i, item in enumerate(value)]
    return value


def _render_string(source: str, context: Mapping[str, Any]) -> Any:
    compiled = _compile(source)
    if compiled.native is not None:
        return _to_json(_run(compiled.native, context))
    assert compiled.text is not None
    try:
        return compiled.text.render(dict(context))
    except TemplateError:
        raise
    except Exception as exc:  # noqa: BLE001 - see _run
        raise TemplateError(_render_message(exc)) from None


def _run(template: Template, context: Mapping[str, Any]) -> Any:
    try:
        return template.make_module(dict(context)).result  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001
        # A template is user code: whatever it raises (TypeError, ZeroDivisionError, the
        # sandbox's SecurityError, RecursionError...) is a fault of the template, not ours.
        raise TemplateError(_render_message(exc)) from None


def _render_message(exc: Exception) -> str:
    if isinstance(exc, (JinjaTemplateError, TemplateError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _to_json(value: Any, where: str = "") -> Any:
    """Turn a native result into plain JSON data (undefined → None, tuples → lists).

    `where` locates a nested value for the error message ("[2].qty").
    """
    if value is None or isinstance(value, Undefined):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TemplateError(f"{_value_at(where)} is {value}, which is not a JSON number")
        return value
    if isinstance(value, str):
        return str(value)  # drops Markup and other str subclasses
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TemplateError(
                    f"{_value_at(where)} has the key {key!r}; JSON object keys are strings"
                )
            result[key] = _to_json(item, path_join(where, key))
        return result
    if isinstance(value, (list, tuple, range, types.GeneratorType)):
        return [_to_json(item, path_join(where, i)) for i, item in enumerate(value)]
    raise TemplateError(
        f"{_value_at(where)} is a {type(value).__name__}, which is not JSON"
        " (a filter such as | list or | string may help)"
    )


def _value_at(where: str) -> str:
    return f"the value at {where}" if where else "the value"
