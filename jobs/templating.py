"""The sandboxed expression language of workflow definitions (docs/workflows.md).

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
- Rendering is bounded, so that a template cannot hang the scheduler or a worker or take its
  memory: one `render` or `evaluate` call may loop `MAX_LOOP_ITERATIONS` times in all, produce
  `MAX_RENDER_SIZE` characters in all (text output, and the values that operators, filters and
  methods build), and take `MAX_RENDER_SECONDS`. Operators and filters whose result can dwarf
  their operands (`*`, `**`, `+`, `%`, `~`, `center`, `join`, `replace`, `batch`, str methods
  such as `ljust` or `format`...) are checked before they allocate. Recursive loops are
  refused. Past a bound the render fails with a TemplateError that says which one.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import re
import string
import time
import types
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import TemplateError as JinjaTemplateError
from jinja2.parser import Parser
from jinja2.runtime import Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer

# The names a template may read, in the order error messages list them.
NAMES = ("input", "steps", "item", "index")
# What a schedule's input reads (rendered at each fire), and an event trigger's `when`.
SCHEDULE_NAMES = ("fire", "schedule")
EVENT_NAMES = ("event",)
# What `steps.<id>` holds.
STEP_FIELDS = ("output", "status")

# Bounds on operators that can allocate without limit (see _Environment.call_binop).
MAX_SEQUENCE_PRODUCT = 1_000_000
MAX_POWER_BITS = 100_000
# Bounds on one render (see the module docstring and _Budget).
MAX_LOOP_ITERATIONS = 100_000
MAX_RENDER_SIZE = 10_000_000
MAX_RENDER_SECONDS = 5.0

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
def check(template: str, names: tuple[str, ...] = NAMES) -> TemplateInfo:
    """Parse a template and report what it reads; raise TemplateError if it is invalid.

    `names`: what the template may read, where it is rendered with another context than a
    step's (a schedule's input reads `fire` and `schedule`, an event trigger's `event`).
    """
    if not has_template_syntax(template):
        return TemplateInfo()
    try:
        return _analyse(_compile(template).ast, names)
    except RecursionError:
        raise TemplateError(TOO_DEEP) from None


@functools.lru_cache(maxsize=4096)
def check_expression(expr: str, names: tuple[str, ...] = NAMES) -> TemplateInfo:
    """Like `check`, for a bare expression such as a `when` condition."""
    try:
        return _analyse(_compile_expression(expr).ast, names)
    except RecursionError:
        raise TemplateError(TOO_DEEP) from None


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """Render every template string inside `value` (dicts and lists are walked).

    A string that is exactly one `{{ expr }}` becomes the native (JSON) value of `expr`; other
    strings with template syntax render to strings; everything else is returned as it is.
    """
    with _bounded():
        return _render(value, context, "")


def evaluate(expr: str, context: Mapping[str, Any]) -> Any:
    """Evaluate a bare expression (a `when` condition); undefined becomes None.

    The value is not converted to JSON: the caller only takes its truthiness.
    """
    with _bounded():
        result = _run(_compile_expression(expr).native, context)
    return None if isinstance(result, Undefined) else result


# --- bounds ----------------------------------------------------------------------------------


@dataclass
class _Budget:
    """What one render may still spend: loop iterations, characters produced, time."""

    deadline: float
    iterations: int = 0
    produced: int = 0


_budget: ContextVar[_Budget | None] = ContextVar("switchyard_template_budget", default=None)


@contextmanager
def _bounded() -> Iterator[_Budget]:
    """A budget for the render that starts here (renders nested in it share the outer one)."""
    current = _budget.get()
    if current is not None:
        yield current
        return
    budget = _Budget(deadline=time.monotonic() + MAX_RENDER_SECONDS)
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def _spend(*, iterations: int = 0, size: int = 0) -> None:
    budget = _budget.get()
    if budget is None:  # a template run outside render/evaluate (not done by this module)
        return
    budget.iterations += iterations
    budget.produced += size
    if budget.iterations > MAX_LOOP_ITERATIONS:
        raise SecurityError(f"the template loops more than {MAX_LOOP_ITERATIONS:,} times")
    if budget.produced > MAX_RENDER_SIZE:
        raise SecurityError(f"the template produces more than {MAX_RENDER_SIZE:,} characters")
    if time.monotonic() > budget.deadline:
        raise SecurityError(f"the template takes longer than {MAX_RENDER_SECONDS:g} s to render")


def _size(value: Any, limit: int = MAX_RENDER_SIZE) -> int:
    """About how many characters `value` stands for as JSON, counting a value shared in
    several places once per place; stops counting a little past `limit`."""
    total = 0
    pending = [value]
    while pending and total <= limit:
        item = pending.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, Mapping):
            total += 2 + 2 * len(item)
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            total += 2 + len(item)
            pending.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 1
        else:
            total += 8
    return total


def _check_size(size: int, what: str) -> None:
    if size > MAX_RENDER_SIZE:
        raise SecurityError(f"{what} would be longer than {MAX_RENDER_SIZE:,} characters")


def _counted(items: Iterable[Any]) -> Iterator[Any]:
    """`items`, each one spent from the budget as it is taken (lazy filters, loops)."""
    for item in items:
        _spend(iterations=1, size=_size(item))
        yield item


_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(template: str) -> None:
    """`'%9999999d' % x` allocates its width before anything could measure the result."""
    for width, precision in _PERCENT_SPEC.findall(template):
        for number in (width, precision):
            if number == "*":
                raise SecurityError("'*' widths are not available in % formatting")
            if number and int(number) > MAX_RENDER_SIZE:
                raise SecurityError(f"a % format width over {MAX_RENDER_SIZE:,}")


def _check_format(template: str) -> None:
    """The same for `'{:>9999999}'.format(x)` (nested `{}` in a spec are refused)."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:
        return  # str.format will raise the same error
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:
            raise SecurityError("nested {} in a format spec are not available")
        if any(int(n) > MAX_RENDER_SIZE for n in re.findall(r"\d+", spec)):
            raise SecurityError(f"a format width over {MAX_RENDER_SIZE:,}")


def _int_arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _check_text_growth(obj: str, name: str, args: tuple, kwargs: dict) -> None:
    """str methods whose result can be far longer than the string."""
    if name in ("center", "ljust", "rjust", "zfill"):
        width = _int_arg(args, kwargs, 0, "width", 0)
        if isinstance(width, int):
            _check_size(width, f"'{name}'")
    elif name == "expandtabs":
        size = _int_arg(args, kwargs, 0, "tabsize", 8)
        if isinstance(size, int):
            _check_size(len(obj) + obj.count("\t") * size, "'expandtabs'")
    elif name == "replace":
        _check_replace(obj, args[0] if args else "", args[1] if len(args) > 1 else "")
    elif name in ("format", "format_map"):
        _check_format(obj)


def _check_replace(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        count = text.count(old) if old else len(text) + 1
        _check_size(len(text) + count * max(0, len(new) - len(old)), "'replace'")


def _join(separator: str, items: Iterable[Any]) -> tuple[str, list[Any]]:
    listed = list(items)
    _check_size(_size(listed) + len(separator) * len(listed), "'join'")
    return separator, listed


def _filter_value(func: Any, args: tuple) -> tuple[Any, tuple]:
    """The filtered value and the filter's own arguments (after context/environment)."""
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    rest = args[skip:]
    return (rest[0] if rest else None), rest[1:]


def _check_filter(name: str, func: Any, args: tuple, kwargs: dict) -> tuple:
    """Check a filter's arguments before it runs; returns the arguments to call it with."""
    value, own = _filter_value(func, args)
    _check_size(_size(value), f"the value given to '{name}'")
    if name == "center":
        width = _int_arg(own, kwargs, 0, "width", 80)
        if isinstance(width, int):
            _check_size(width + _size(value), "'center'")
    elif name == "indent" and isinstance(value, str):
        width = _int_arg(own, kwargs, 0, "width", 4)
        per_line = width if isinstance(width, int) else len(str(width))
        _check_size(len(value) + (value.count("\n") + 1) * per_line, "'indent'")
    elif name == "format" and isinstance(value, str):
        _check_printf(value)
    elif name == "replace":
        _check_replace(value, *own[:2])
    elif name == "wordwrap" and isinstance(value, str):
        width = _int_arg(own, kwargs, 0, "width", 79)
        wrap = _int_arg(own, kwargs, 2, "wrapstring", None) or "\n"
        lines = len(value) // max(width, 1) + value.count(" ") + 1 if isinstance(width, int) else 1
        _check_size(len(value) + lines * len(str(wrap)), "'wordwrap'")
    elif name in ("batch", "slice"):
        count = own[0] if own else kwargs.get("linecount", kwargs.get("slices", 1))
        fill = _int_arg(own, kwargs, 1, "fill_with", None)
        if isinstance(count, int):
            if count > MAX_LOOP_ITERATIONS:
                raise SecurityError(f"'{name}' into more than {MAX_LOOP_ITERATIONS:,}")
            _check_size(count * _size(fill), f"'{name}'")
    elif name == "join":
        if not isinstance(value, (str, list, tuple)):
            value = list(_counted(value))
        separator = _int_arg(own, kwargs, 0, "d", "")
        _join(str(separator), value if isinstance(value, (list, tuple)) else [value])
        skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        return (*args[:skip], value, *own)
    elif name == "sum":
        start = _int_arg(own, kwargs, 1, "start", 0)
        if not isinstance(start, (int, float)):
            raise SecurityError("'sum' adds numbers (its start must be a number)")
    return args


def _bounded_filter(name: str, func: Any) -> Any:
    @functools.wraps(func)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _spend()
        args = _check_filter(name, func, args, kwargs)
        return _spent(func(*args, **kwargs))

    return bounded


def _spent(result: Any) -> Any:
    """Spend what a filter or call produced; a lazy result is spent as it is consumed."""
    if isinstance(result, (types.GeneratorType, Iterator)) and not isinstance(result, str):
        return _counted(result)
    _spend(size=_size(result))
    return result


def _iterate(iterable: Any) -> Iterator[Any]:
    """What a `{% for %}` loop iterates: every iteration is spent from the budget."""
    if isinstance(iterable, Undefined):
        return iter(())
    for item in iterable:
        _spend(iterations=1)
        yield item


def _emit(value: Any) -> str:
    """One piece of a string template's output, as text, spent from the budget."""
    text = _finalize(value)
    text = "" if text is None else str(text)
    _spend(size=len(text))
    return text


def _concat(*parts: Any) -> str:
    """`a ~ b ~ c`: checked before the parts are turned into text and joined."""
    _check_size(sum(_size(part) for part in parts), "the result of '~'")
    result = "".join(str(_finalize_concat(part)) for part in parts)
    _spend(size=len(result))
    return result


def _finalize_concat(part: Any) -> Any:
    return "" if isinstance(part, Undefined) else part


# --- the environment -------------------------------------------------------------------------


class _Environment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    # Reached only from nodes that `_Bounds` puts in a template (never by a name).
    _iterate = staticmethod(_iterate)
    _emit = staticmethod(_emit)
    _concat = staticmethod(_concat)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _spend()
        # Definitions address JSON data; `input.items` must be the field, not dict.items.
        if isinstance(obj, Mapping) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _spend()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Any:
        # The sandbox hands out its own wrapper of str.format, which `call` cannot recognise.
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if __obj in _BOUND_HELPERS:
            kwargs.pop("_loop_vars", None)
            kwargs.pop("_block_vars", None)
            return __obj(*args)
        _spend()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            _check_text_growth(owner, name, args, kwargs)
            if name == "join" and args:
                _, listed = _join(owner, args[0])
                args = (listed, *args[1:])
        return _spent(super().call(__context, __obj, *args, **kwargs))

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        # The default returns an undefined that renders as "", which would hide a probe.
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _spend()
        if operator == "*":
            _check_repetition(left, right)
            _check_repetition(right, left)
            _check_int_product(left, right)
        elif operator == "**":
            _check_power(left, right)
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check_size(_size(left) + _size(right), "the result of '+'")
        elif operator == "%" and isinstance(left, str):
            _check_printf(left)
        return _spent(super().call_binop(context, operator, left, right))


_BOUND_HELPERS = (_iterate, _emit, _concat)


def _check_repetition(sequence: Any, times: Any) -> None:
    repeats = isinstance(sequence, (str, list, tuple)) and isinstance(times, int)
    if repeats and len(sequence) * times > MAX_SEQUENCE_PRODUCT:
        raise SecurityError("the result of '*' would be too large")
    # A list of a few long strings, repeated: short, but each copy stands for all of them.
    if repeats and times > 0 and _size(sequence) * times > MAX_RENDER_SIZE:
        raise SecurityError("the result of '*' would be too large")


def _check_int_product(left: Any, right: Any) -> None:
    integers = isinstance(left, int) and isinstance(right, int)
    if integers and left.bit_length() + right.bit_length() > MAX_POWER_BITS:
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
_env.filters = {name: _bounded_filter(name, func) for name, func in _env.filters.items()}


# --- compilation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Compiled:
    ast: nodes.Template
    # A template that assigns the value of a single `{{ expr }}` to `result`, or None when the
    # source is not exactly one expression (then `text` renders it as a string).
    native: Template | None
    text: Template | None


TOO_DEEP = "the template is nested too deeply"


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> _Compiled:
    try:
        ast = _env.parse(source)
        _refuse_forbidden_tags(ast)
        expr = _single_expression(ast)
        if expr is not None:
            return _Compiled(ast=ast, native=_native_template(expr), text=None)
        return _Compiled(ast=ast, native=None, text=_env.from_string(_bounded_ast(ast)))
    except TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(exc, source)) from None
    except RecursionError:
        raise TemplateError(TOO_DEEP) from None


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
    except RecursionError:
        raise TemplateError(TOO_DEEP) from None


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
    return _env.from_string(_bounded_ast(nodes.Template(body, lineno=1)))


def _helper_call(name: str, args: list[nodes.Expr], lineno: int | None) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(name), args, [], None, None, lineno=lineno)


class _Bounds(NodeTransformer):
    """Route loops, output and `~` through the budget's helpers (see _Environment).

    Loops iterate `_iterate(...)`, every piece of output (literal text too) goes through
    `_emit`, and `a ~ b` becomes `_concat(a, b)`; what the template means is unchanged.
    Recursive loops are refused: each level would start loops of its own.
    """

    def visit_For(self, node: nodes.For) -> nodes.For:
        if node.recursive:
            raise TemplateError("recursive loops are not available in workflow templates")
        node = self.generic_visit(node)
        node.iter = _helper_call("_iterate", [node.iter], node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        node = self.generic_visit(node)
        node.nodes = [
            _helper_call(
                "_emit",
                [nodes.Const(part.data) if isinstance(part, nodes.TemplateData) else part],
                part.lineno,
            )
            for part in node.nodes
        ]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return _helper_call("_concat", list(node.nodes), node.lineno)


def _bounded_ast(ast: nodes.Template) -> nodes.Template:
    return _Bounds().visit(ast)


def _refuse_forbidden_tags(ast: nodes.Template) -> None:
    for node_type, tag in _FORBIDDEN_TAGS.items():
        if next(ast.find_all(node_type), None) is not None:
            raise TemplateError(f"the {{% {tag} %}} tag is not available in workflow templates")


def _syntax_message(exc: TemplateSyntaxError, source: str) -> str:
    if "\n" in source.strip() and exc.lineno:
        return f"{exc.message} (line {exc.lineno})"
    return str(exc.message)


# --- analysis --------------------------------------------------------------------------------


def _analyse(ast: nodes.Template, names: tuple[str, ...] = NAMES) -> TemplateInfo:
    undeclared = set(meta.find_undeclared_variables(ast))
    # `self` (the template reference) is declared by Jinja itself; templates have no use for it.
    if _reads_name(ast, "self") and not _binds_name(ast, "self"):
        undeclared.add("self")
    unknown = sorted(undeclared - set(names))
    if unknown:
        raise TemplateError(_unknown_names_message(unknown, names))
    return TemplateInfo(
        step_refs=_step_refs(ast) if "steps" in undeclared else frozenset(),
        uses_item=bool(undeclared & {"item", "index"}),
    )


def _unknown_names_message(unknown: list[str], names: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{name}'" for name in unknown)
    label = "unknown name" if len(unknown) == 1 else "unknown names"
    message = f"{label} {quoted}; templates see {', '.join(names)}"
    close = difflib.get_close_matches(unknown[0], names, n=1)
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
