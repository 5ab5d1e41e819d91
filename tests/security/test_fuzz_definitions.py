"""Hostile definitions and templates (docs/security.md): hypothesis throws arbitrary JSON-like
documents, near-valid workflows (random ids and kinds, cycles, self-references) and templates
that probe for Python internals, the filesystem and unbounded work at the definition language
(jobs/definitions.py), the template sandbox (jobs/templating.py) and the pure engine
(jobs/engine.py). What must hold:

- parsing either accepts or raises DefinitionError whose every fault names a path;
- checking and rendering a template either succeed or raise TemplateError, within a second or
  two, never open a file or start a process (an audit hook watches), and never hand back a
  Python object's repr;
- the engine drives every accepted definition to a final run status, whatever the steps do.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.definitions import MAX_NESTING, DefinitionError, parse_definition
from jobs.engine import StepState, advance, apply, initial_states
from jobs.statuses import STEP_ACTIVE, StepStatus
from jobs.templating import TemplateError, check, check_expression, evaluate, render

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# One render of a hostile template may take this long at most (the bounds stop it earlier).
RENDER_TIME_S = 3.0

# --- watching for the filesystem and processes -------------------------------------------------

_WATCHED = ("open", "os.", "subprocess.", "socket.", "shutil.", "pty.", "ctypes.")
_seen: list[str] | None = None


# Python's own files (a module that Jinja imports on its first error) are not the template's.
_INTERPRETER = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})


def _audit(event: str, args: tuple) -> None:
    if _seen is None or not event.startswith(_WATCHED):
        return
    path = args[0] if args else None
    if isinstance(path, str) and path.startswith(_INTERPRETER):
        return
    _seen.append(f"{event} {args!r}"[:200])


sys.addaudithook(_audit)  # cannot be removed; it records only inside `no_system_access`


@contextmanager
def no_system_access():
    global _seen
    _seen = []
    try:
        yield
    finally:
        seen, _seen = _seen, None
        assert not seen, f"a template reached the system: {seen}"


# --- templates ------------------------------------------------------------------------------------

PROBES = [
    "input.__class__",
    "input.__class__.__mro__[1].__subclasses__()",
    "''.__class__.__mro__",
    "().__class__.__bases__[0].__subclasses__()",
    "cycler.__init__.__globals__",
    "joiner.__init__.__globals__.os",
    "namespace.__init__.__globals__",
    "lipsum.__globals__['os'].popen('id').read()",
    "lipsum()",
    "self",
    "self.__init__.__globals__",
    "config",
    "config.items()",
    "request.application.__globals__",
    "url_for.__globals__",
    "range(10**9)",
    "range(10) | list",
    "'a' * 10**9",
    "'a' * 1000000 * 1000",
    "10 ** 10 ** 10",
    "input | attr('__class__')",
    "input.items.__self__",
    "'{0.__class__.__init__.__globals__}'.format(input)",
    "'%s' % input.__class__",
    "input.text.__len__()",
    "steps.__class__",
    "item.__class__",
    "[].__class__.__base__.__subclasses__()[40]('/etc/passwd').read()",
    "open('/etc/passwd').read()",
    "__import__('os').system('id')",
    "'a' | center(10 ** 8)",
    "'a'.ljust(10 ** 8)",
    "'{:>100000000}'.format(1)",
    "'%100000000d' % 1",
    "(['x' * 1000000] * 1000) | join",
    "[1] | batch(10 ** 9, 'x') | list",
    "(" * 400 + "1" + ")" * 400,
    "-" * 5000 + "1",
    "input.text ~ input.text",
    "input.items | map('upper') | list",
    "input.items | sum",
    "input.missing.deeper.still",
    "1 / 0",
    "input.text | int",
]
STATEMENTS = [
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}",
    "{% from 'os' import system %}",
    "{% extends '/etc/passwd' %}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{% call lipsum() %}x{% endcall %}",
    "{% for a in [0] * 1000 %}{% for b in [0] * 1000 %}{% for c in [0] * 1000 %}"
    "{% endfor %}{% endfor %}{% endfor %}",
    "{% for x in input.items recursive %}{{ loop(input.items) }}{% endfor %}",
    "{% set a = 'x' * 1000000 %}" + "{% set a = a ~ a %}" * 12 + "{{ a | length }}",
    "{% for x in [0] * 100000 %}{{ 'y' * 1000 }}{% endfor %}",
    "{% set s = self %}{{ s.__dict__ }}",
    "{% filter upper %}{% for a in [0] * 99999 %}abc{% endfor %}{% endfilter %}",
    "{% set x %}{% for a in [0] * 99999 %}{{ 'z' * 500 }}{% endfor %}{% endset %}{{ x|length }}",
    "{% raw %}{{ input.__class__ }}{% endraw %}",
    "{# {{ input.__class__ }} #}",
    "{% autoescape false %}{{ input }}{% endautoescape %}",
]
JINJA_ALPHABET = "{}%#()[]'\".|_ ~*+-/<>=!,:abcdefghijklmnopqrstuvwxyz0123456789\n"


@st.composite
def templates(draw) -> str:
    parts = draw(
        st.lists(
            st.one_of(
                st.sampled_from(PROBES).map(lambda probe: "{{ " + probe + " }}"),
                st.sampled_from(STATEMENTS),
                st.text(alphabet=JINJA_ALPHABET, max_size=40),
                st.sampled_from(["{{ input.text }}", "{{ steps.a.output }}", "{{ item }}"]),
            ),
            min_size=1,
            max_size=4,
        )
    )
    return "".join(parts)


CONTEXT = {
    "input": {"text": "hello", "items": [1, 2, 3], "nested": {"a": [{"b": None}]}},
    "steps": {"a": {"output": {"text": "out"}, "status": "succeeded"}},
    "item": {"x": 1},
    "index": 0,
}
PYTHON_REPRS = ("<class", "<built-in", "<function", "<module", "<bound method", "root:x:0:0")


def _timed(call, *args):
    started = time.monotonic()
    try:
        return call(*args), None
    except TemplateError as exc:
        assert exc.message, "a TemplateError must say what is wrong"
        return None, exc
    finally:
        elapsed = time.monotonic() - started
        assert elapsed < RENDER_TIME_S, f"{call.__name__} took {elapsed:.1f} s on {args[0]!r}"


@FUZZ
@given(template=templates())
def test_a_hostile_template_is_refused_or_rendered_harmlessly_and_in_bounded_time(template):
    with no_system_access():
        _, refused = _timed(check, template)
        result, failed = _timed(render, template, CONTEXT)
    if failed is None:
        text = json.dumps(result)  # plain JSON data, nothing else
        assert not any(marker in text for marker in PYTHON_REPRS), (template, text[:300])
        assert len(text) <= 10_000_100
    if refused is None and failed is not None:
        # Accepted at upload, failed at run time: only ever for a fault of the data or a
        # bound, never an escape.
        assert "unsafe" in failed.message or failed.message


@FUZZ
@given(probe=st.sampled_from(PROBES), junk=st.text(alphabet=JINJA_ALPHABET, max_size=20))
def test_a_hostile_condition_is_refused_or_evaluated_harmlessly(probe, junk):
    expression = probe + junk
    with no_system_access():
        _timed(check_expression, expression)
        value, _ = _timed(evaluate, expression, CONTEXT)
    assert not any(marker in repr(value)[:500] for marker in PYTHON_REPRS[:5]) or isinstance(
        value, str
    )


@pytest.mark.parametrize("probe", PROBES + STATEMENTS)
def test_no_probe_reaches_python_internals(probe):
    """Each probe on its own: refused at upload or at render, or rendered as plain data."""
    template = probe if probe.startswith("{%") or probe.startswith("{#") else "{{ " + probe + " }}"
    with no_system_access():
        _, refused = _timed(check, template)
        result, failed = _timed(render, template, CONTEXT)
    escaped = failed is None and any(m in json.dumps(result) for m in PYTHON_REPRS)
    assert not escaped, (probe, result)
    literal = probe.startswith(("{% raw", "{#"))  # text about a probe, not a probe
    if any(attempt in probe for attempt in MUST_FAIL) and not literal:
        assert refused is not None or failed is not None, f"{probe} rendered {result!r}"


# What reaches for an existing internal, a global or a tag that workflow templates do not have:
# refused when the definition is checked, or failing when rendered.
MUST_FAIL = (
    "__class__", "__globals__", "__init__", "__mro__", "__import__", "__dict__", "open(",
    "lipsum", "cycler", "joiner", "namespace", "config", "request", "url_for", "range(",
    "{% include", "{% import", "{% from", "{% extends", "{% macro", "{% call", "recursive",
    "10**9", "10 ** 8", "10 ** 9", "100000000",
)  # fmt: skip


# --- definitions ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


def _assert_faults_name_paths(exc: DefinitionError) -> None:
    assert exc.faults, "a DefinitionError lists its faults"
    for fault in exc.faults:
        assert isinstance(fault.path, str) and fault.path, fault
        assert fault.message, fault


def _parse(document: Any):
    try:
        return parse_definition(document)
    except DefinitionError as exc:
        _assert_faults_name_paths(exc)
        return None


@FUZZ
@given(document=json_values)
def test_any_json_document_is_accepted_or_refused_with_paths(document):
    _parse(document)
    _parse(json.dumps(document))


@FUZZ
@given(text=st.text(max_size=200))
def test_any_text_is_accepted_or_refused_with_paths(text):
    _parse(text)


IDS = ["a", "b", "c", "d", "map_1", "A", "1x", "a-b", "", "x" * 70, "__init__", "steps"]
KINDS = ["llm", "tool", "map", "approval", "workflow", "python", "", "LLM"]


@st.composite
def near_valid(draw) -> dict[str, Any]:
    steps = []
    for _ in range(draw(st.integers(1, 6))):
        step_id = draw(st.sampled_from(IDS))
        kind = draw(st.sampled_from(KINDS))
        text = draw(
            st.one_of(
                st.sampled_from(["hi", "{{ input.text }}", f"{{{{ steps.{step_id}.output }}}}"]),
                st.sampled_from(IDS).map(lambda ref: f"read {{{{ steps.{ref}.output.text }}}}"),
                templates(),
            )
        )
        step: dict[str, Any] = {"id": step_id, "kind": kind}
        if kind in ("llm", "LLM"):
            step["prompt"] = text
        elif kind == "tool":
            step.update(tool=draw(st.sampled_from(["echo", "nope"])), args={"v": text})
        elif kind == "map":
            step["over"] = draw(st.sampled_from(["{{ input.items }}", "{{ input.text }}", text]))
            step["step"] = {"kind": "tool", "tool": "echo", "args": {"i": "{{ item }}"}}
        after = draw(st.lists(st.sampled_from(IDS), max_size=3))  # cycles, self, unknown
        if after:
            step["after"] = after
        if draw(st.booleans()):
            step["when"] = draw(
                st.sampled_from(["true", "false", "input.n > 1", "input.__class__"])
            )
        if draw(st.integers(0, 4)) == 0:
            step[draw(st.sampled_from(["retry", "timeout_s", "optional", "junk"]))] = draw(
                json_values
            )
        steps.append(step)
    document: dict[str, Any] = {
        "name": draw(st.sampled_from(["ok", "Bad Name", ""])),
        "steps": steps,
    }
    if draw(st.booleans()):
        document["output"] = {"last": draw(st.sampled_from(["{{ steps.a.output }}", "x"]))}
    return document


RUN_INPUT = {"text": "hello", "items": [1, 2, 3], "n": 2}


def _drive(definition, data) -> str:
    """Play a run with random step outcomes; the engine must reach a final status."""
    states = initial_states(definition)
    for _ in range(500):
        started = time.monotonic()
        plan = advance(definition, RUN_INPUT, states)
        assert time.monotonic() - started < RENDER_TIME_S * 2, "one advance took too long"
        states = apply(states, plan)
        if plan.run_status is not None:
            return plan.run_status
        active = sorted(
            (
                key
                for key, state in states.items()
                if state.status in STEP_ACTIVE
                and not (key[1] is None and definition.step(key[0]).is_map)
            ),
            key=str,
        )
        assert active, "the run is neither finished nor doing anything"
        for key in data.draw(st.lists(st.sampled_from(active), min_size=1, unique=True)):
            outcome = data.draw(st.integers(0, 5))
            if states[key].status == StepStatus.READY and outcome == 0:
                states[key] = StepState(StepStatus.RUNNING)
            elif outcome == 1:
                states[key] = StepState(StepStatus.FAILED, error="broke")
            else:
                states[key] = StepState(StepStatus.SUCCEEDED, output={"text": f"{key}"})
    raise AssertionError("the engine did not finish the run in 500 rounds")


@FUZZ
@given(document=near_valid(), data=st.data())
def test_near_valid_definitions_are_refused_with_paths_or_run_to_the_end(document, data):
    with no_system_access():
        definition = _parse(document)
        if definition is not None:
            assert _drive(definition, data) in ("succeeded", "failed")


# --- documents built to exhaust the stack or the memory ------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": [value]}
    return value


@pytest.mark.parametrize(
    "document",
    [
        "[" * 100_000 + "]" * 100_000,
        '{"name": "deep", "steps": ' + "[" * 5000 + "]" * 5000 + "}",
        {"name": "deep", "steps": [{"id": "a", "kind": "tool", "tool": "echo",
                                    "args": _nested(2000)}]},
        "a: " + "[" * 5000 + "]" * 5000,
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n",
    ],
    ids=["deep json text", "deep steps", "deep dict", "deep yaml", "yaml aliases"],
)  # fmt: skip
def test_deep_or_self_multiplying_documents_are_refused_at_once(document):
    started = time.monotonic()
    with pytest.raises(DefinitionError) as caught:
        parse_definition(document)
    # Before: RecursionError (a 500) for the deep ones, a minute of CPU for the aliases.
    assert time.monotonic() - started < 5
    _assert_faults_name_paths(caught.value)
    message = str(caught.value)
    assert f"nested more than {MAX_NESTING} levels deep" in message or "aliases" in message


def test_the_api_refuses_deep_bodies_and_yaml_aliases_with_a_400(owner):
    deep = "[" * 50_000 + "]" * 50_000
    for path in ("/api/v1/workflows/", "/api/v1/runs/", "/api/v1/documents/"):
        response = owner.api.post(path, deep, content_type="application/json")
        assert response.status_code == 400, (path, response.content[:200])
        assert "nested more than 64 levels" in response.json()["error"]["message"]
    bomb = yaml.safe_dump({"name": "x"}) + "a: &a [1, 1]\nb: [*a, *a]\n"
    response = owner.api.post("/api/v1/workflows/", bomb, content_type="application/yaml")
    assert response.status_code == 400 and "aliases" in response.json()["error"]["message"]
    deep_template = "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"
    template = {"name": "t", "steps": [{"id": "a", "kind": "llm", "prompt": deep_template}]}
    response = owner.api.post("/api/v1/workflows/", template, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["details"][0]["path"] == "steps[0].prompt"
