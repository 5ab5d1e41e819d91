"""The workflow engine: pure graph transitions of one run (docs/architecture.md, section 6).

Given a run's definition, its input and the states of its steps, `advance` says what happens
next: which steps become ready (with their rendered input), which are skipped, which maps fan
out or complete, which steps fail while becoming ready, and whether the run is finished. It does
no I/O and keeps no state: the services apply its `Plan` to the database in one transaction,
and calling `advance` again on the result yields an empty plan.

Step keys are `(step id, map index)`: `(id, None)` for a top-level step (a map or an agent
included), `(map id, i)` for the i-th item of an expanded map and `(agent id, i)` for the i-th
child of an agent (its turns and tool calls, numbered in order: `jobs.steps.agent`).

The engine only moves steps out of `pending` (and maps out of `running`); steps that are active
(ready, queued, running, retry_wait, waiting) belong to the scheduler and the workers, and the
engine touches them only to cancel them when the run fails or their map fails. An agent's own
row is the exception: it waits (`waiting`, on no worker) while its children run, and the
engine moves its loop on from their checkpoints.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from jobs import templating
from jobs.definitions import Definition, StepDef
from jobs.formats import json_type
from jobs.statuses import STEP_ACTIVE, STEP_FINAL, RunStatus, StepStatus
from jobs.steps import agent, registry
from jobs.templating import TemplateError

StepKey = tuple[str, int | None]


@dataclass(frozen=True)
class StepState:
    status: str
    output: Any = None
    error: str | None = None


@dataclass(frozen=True)
class ReadyStep:
    key: StepKey
    kind: str
    queue: str
    # The step's config with its template fields rendered (native values); other fields copied.
    input: dict[str, Any]


@dataclass
class Plan:
    ready: list[ReadyStep] = field(default_factory=list)
    skipped: list[StepKey] = field(default_factory=list)
    # (map id, items): the caller creates pending rows (id, i) for each item and sets the map's
    # row to running; items listed in `ready` then become ready.
    expanded: list[tuple[str, list[Any]]] = field(default_factory=list)
    # Maps that finished: their key and the list of item outputs, in index order.
    completed: list[tuple[StepKey, Any]] = field(default_factory=list)
    # Steps that fail while becoming ready (a template that does not render, `over` that is not
    # a list, a `when` that errors) and maps whose item failed; with the error message.
    failed: list[tuple[StepKey, str]] = field(default_factory=list)
    # When the run fails: every step that is not finished; when a map fails: its open items.
    cancelled: list[StepKey] = field(default_factory=list)
    # Agents that start: their row goes to `waiting` (its children are in `spawned`).
    waiting: list[StepKey] = field(default_factory=list)
    # Children of agents that have no row yet: the caller creates each row and makes it ready
    # with its input, kind and queue (a turn on the llm queue, a tool call on its kind's).
    spawned: list[ReadyStep] = field(default_factory=list)
    # The agents' progress for the run's log: (agent key, event type, data).
    events: list[tuple[StepKey, str, dict[str, Any]]] = field(default_factory=list)
    # Reported on every call once the run is finished (callers apply it idempotently).
    run_status: str | None = None
    run_output: Any = None
    run_error: str | None = None

    def is_empty(self) -> bool:
        """True when the plan changes no step (the run's status is not a change of a step)."""
        return not (
            self.ready
            or self.skipped
            or self.expanded
            or self.completed
            or self.failed
            or self.cancelled
            or self.waiting
            or self.spawned
        )


def initial_states(definition: Definition) -> dict[StepKey, StepState]:
    """The states of a new run: every top-level step pending."""
    return {(step.id, None): StepState(StepStatus.PENDING) for step in definition.steps}


def advance(definition: Definition, run_input: Any, states: Mapping[StepKey, StepState]) -> Plan:
    """What happens next in a run, given the states of its steps (see the module docstring).

    `states` has an entry for every top-level step and for every item of an expanded map.
    """
    return _Advance(definition, run_input, states).run()


def apply(states: Mapping[StepKey, StepState], plan: Plan) -> dict[StepKey, StepState]:
    """The states after a plan, as the services would write them (for tests and simulations)."""
    result = dict(states)
    for key in plan.skipped:
        result[key] = StepState(StepStatus.SKIPPED)
    for map_id, items in plan.expanded:
        result[(map_id, None)] = StepState(StepStatus.RUNNING)
        for index in range(len(items)):
            result[(map_id, index)] = StepState(StepStatus.PENDING)
    for key in plan.waiting:
        result[key] = StepState(StepStatus.WAITING)
    for ready in [*plan.spawned, *plan.ready]:
        result[ready.key] = StepState(StepStatus.READY)
    for key, output in plan.completed:
        result[key] = StepState(StepStatus.SUCCEEDED, output=output)
    for key, error in plan.failed:
        result[key] = StepState(StepStatus.FAILED, error=error)
    for key in plan.cancelled:
        result[key] = replace(
            result.get(key, StepState(StepStatus.PENDING)), status=StepStatus.CANCELLED
        )
    return result


class _Advance:
    """One call of `advance`: works on a copy of the states until nothing changes."""

    def __init__(self, definition: Definition, run_input: Any, states: Mapping[StepKey, StepState]):
        self.definition = definition
        self.run_input = run_input
        self.original = states
        self.states: dict[StepKey, StepState] = dict(states)
        self.plan = Plan()
        self.position = {step.id: index for index, step in enumerate(definition.steps)}
        self.item_count: dict[str, int] = {}
        for step_id, index in states:
            if index is not None:
                self.item_count[step_id] = max(self.item_count.get(step_id, 0), index + 1)
        # `over` of running maps, rendered at most once per call.
        self.items_cache: dict[str, list[Any]] = {}
        # Set when this call fails a step that is not optional: the run fails.
        self.required_step_failed = False

    def run(self) -> Plan:
        failure = self.run_failure()
        if failure is None:
            while self.one_pass() and not self.required_step_failed:
                pass
            failure = self.run_failure()
        if failure is not None:
            self.fail_run(failure)
        elif all(self.status((step.id, None)) in STEP_FINAL for step in self.definition.steps):
            self.finish_run()
        return self.plan

    # -- states

    def status(self, key: StepKey) -> str:
        state = self.states.get(key)
        return state.status if state is not None else StepStatus.PENDING

    def put(self, key: StepKey, state: StepState) -> None:
        self.states[key] = state

    def is_done(self, step: StepDef) -> bool:
        """Whether the steps that depend on `step` may start."""
        status = self.status((step.id, None))
        if status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED):
            return True
        return status in (StepStatus.FAILED, StepStatus.CANCELLED) and step.optional

    def context(self, step_ids: frozenset[str] | None = None) -> dict[str, Any]:
        """The render context; `steps` holds the given steps (all when None)."""
        if step_ids is None:
            step_ids = frozenset(step.id for step in self.definition.steps)
        steps = {}
        for step_id in step_ids:
            state = self.states.get((step_id, None), StepState(StepStatus.PENDING))
            output = state.output if state.status == StepStatus.SUCCEEDED else None
            steps[step_id] = {"output": output, "status": state.status}
        return {"input": self.run_input, "steps": steps}

    # -- the fixpoint

    def one_pass(self) -> bool:
        """Move every step that can move; True if anything changed.

        Steps are visited in topological order, so a change cascades forward within a pass; the
        caller repeats passes for what cascades backwards (an item that fails, then its map).
        """
        changed = False
        for step in self.definition.steps:
            key = (step.id, None)
            status = self.status(key)
            if status == StepStatus.PENDING and all(
                self.is_done(self.definition.step(dependency)) for dependency in step.depends_on
            ):
                self.start(step)
                changed = True
            elif status == StepStatus.RUNNING and step.is_map:
                changed = self.progress_map(step) or changed
            elif status == StepStatus.WAITING and step.kind == agent.KIND:
                changed = self.progress_agent(step) or changed
            if self.required_step_failed:
                return True
        return changed

    def start(self, step: StepDef) -> None:
        key = (step.id, None)
        context = self.context(step.depends_on)
        if step.when is not None:
            try:
                go = templating.evaluate(step.when, context)
            except TemplateError as exc:
                self.fail(key, f"when of step '{step.id}' could not be evaluated: {exc.message}")
                return
            if not go:
                self.plan.skipped.append(key)
                self.put(key, StepState(StepStatus.SKIPPED))
                return
        if step.is_map:
            self.expand(step, context)
            return
        if step.kind == agent.KIND:
            self.plan.waiting.append(key)
            self.put(key, StepState(StepStatus.WAITING))
            self.progress_agent(step)
            return
        try:
            ready = _ready_step(step, key, context)
        except _StepError as exc:
            self.fail(key, exc.message)
            return
        self.plan.ready.append(ready)
        self.put(key, StepState(StepStatus.READY))

    # -- maps

    def render_over(self, step: StepDef, context: dict[str, Any]) -> list[Any]:
        if step.id not in self.items_cache:
            over = step.config["over"]
            try:
                items = templating.render(over, context)
            except TemplateError as exc:
                raise _StepError(
                    f"over of step '{step.id}' could not be rendered: {exc.message}"
                ) from None
            if not isinstance(items, list):
                raise _StepError(f"over of step '{step.id}' must be a list, got {json_type(items)}")
            self.items_cache[step.id] = items
        return self.items_cache[step.id]

    def expand(self, step: StepDef, context: dict[str, Any]) -> None:
        key = (step.id, None)
        try:
            items = self.render_over(step, context)
        except _StepError as exc:
            self.fail(key, exc.message)
            return
        if not items:
            self.complete(key, [])
            return
        # The first items are rendered before the map is expanded so that a map never appears
        # both expanded and failed in one plan.
        first = min(len(items), step.max_parallel or len(items))
        ready = []
        for index in range(first):
            try:
                ready.append(self.ready_item(step, index, items, context))
            except _StepError as exc:
                self.fail(key, f"item {index} failed: {exc.message}")
                return
        self.plan.expanded.append((step.id, items))
        self.item_count[step.id] = len(items)
        self.put(key, StepState(StepStatus.RUNNING))
        for index in range(len(items)):
            self.put((step.id, index), StepState(StepStatus.PENDING))
        for item in ready:
            self.plan.ready.append(item)
            self.put(item.key, StepState(StepStatus.READY))

    def ready_item(
        self, step: StepDef, index: int, items: list[Any], context: dict[str, Any]
    ) -> ReadyStep:
        assert step.item is not None
        item_context = {**context, "item": items[index], "index": index}
        return _ready_step(step.item, (step.id, index), item_context)

    def progress_map(self, step: StepDef) -> bool:
        """Fan-in, failure or more items for a running map; True if anything changed."""
        key = (step.id, None)
        count = self.item_count.get(step.id, 0)
        item_keys = [(step.id, index) for index in range(count)]
        for index, item_key in enumerate(item_keys):
            state = self.states.get(item_key, StepState(StepStatus.PENDING))
            if state.status in (StepStatus.FAILED, StepStatus.CANCELLED):
                reason = state.error if state.status == StepStatus.FAILED else "it was cancelled"
                self.fail(key, f"item {index} failed: {reason}")
                self.cancel_open(item_keys)
                return True
        statuses = [self.status(item_key) for item_key in item_keys]
        if all(status in (StepStatus.SUCCEEDED, StepStatus.SKIPPED) for status in statuses):
            outputs = [
                self.states[item_key].output if status == StepStatus.SUCCEEDED else None
                for item_key, status in zip(item_keys, statuses, strict=True)
            ]
            self.complete(key, outputs)
            return True
        free = (step.max_parallel or count) - sum(status in STEP_ACTIVE for status in statuses)
        waiting = [index for index, status in enumerate(statuses) if status == StepStatus.PENDING]
        if free <= 0 or not waiting:
            return False
        context = self.context(step.depends_on)
        try:
            # Items are rendered as they become ready; `over` renders to the same list as at
            # expansion because the steps it reads are finished and their outputs are final.
            items = self.render_over(step, context)
            if len(items) != count:
                raise _StepError(
                    f"over of step '{step.id}' now renders {len(items)} items instead of {count}"
                )
            # Render the whole batch before changing anything, so that an item that cannot be
            # rendered fails the map without other items being made ready in the same plan.
            batch = []
            for index in waiting[:free]:
                try:
                    batch.append(self.ready_item(step, index, items, context))
                except _StepError as exc:
                    raise _StepError(f"item {index} failed: {exc.message}") from None
        except _StepError as exc:
            self.fail(key, exc.message)
            self.cancel_open(item_keys)
            return True
        for ready in batch:
            self.plan.ready.append(ready)
            self.put(ready.key, StepState(StepStatus.READY))
        return True

    # -- agents

    def progress_agent(self, step: StepDef) -> bool:
        """The next move of a waiting agent's loop (`agent.progress`); True if anything
        changed. Its prompt and system are rendered again each time, like a map's `over`:
        the steps they read are finished."""
        key = (step.id, None)
        count = self.item_count.get(step.id, 0)
        # A rejected call's index has no row: only the children that exist are cancelled.
        children_keys = [(step.id, i) for i in range(count) if (step.id, i) in self.states]
        children = {
            index: agent.State(state.status, state.output, state.error)
            for index in range(count)
            if (state := self.states.get((step.id, index))) is not None
        }
        try:
            rendered = _ready_step(step, key, self.context(step.depends_on)).input
        except _StepError as exc:
            self.fail(key, exc.message)
            self.cancel_open(children_keys)
            return True
        move = agent.progress(
            step.config,
            system=rendered.get("system") or "",
            prompt=rendered["prompt"],
            children=children,
            timeout_s=step.timeout_s,
            agent_id=step.id,
        )
        for event_type, data in move.events:
            self.plan.events.append((key, event_type, data))
        if move.error is not None:
            self.fail(key, move.error)
            self.cancel_open(children_keys)
            return True
        if move.finished:
            self.complete(key, move.output)
            return True
        for child in move.children:
            child_key = (step.id, child.index)
            queue = registry.kind(child.kind).queue
            ready = ReadyStep(key=child_key, kind=child.kind, queue=queue, input=child.input)
            (self.plan.spawned if child_key not in self.states else self.plan.ready).append(ready)
            self.put(child_key, StepState(StepStatus.READY))
            self.item_count[step.id] = max(self.item_count.get(step.id, 0), child.index + 1)
        return bool(move.children)

    # -- outcomes

    def complete(self, key: StepKey, output: Any) -> None:
        self.plan.completed.append((key, output))
        self.put(key, StepState(StepStatus.SUCCEEDED, output=output))

    def fail(self, key: StepKey, error: str) -> None:
        self.plan.failed.append((key, error))
        self.put(key, StepState(StepStatus.FAILED, error=error))
        step_id, index = key
        if index is None and not self.definition.step(step_id).optional:
            self.required_step_failed = True

    def cancel_open(self, keys: list[StepKey]) -> None:
        for key in keys:
            if self.status(key) not in STEP_FINAL:
                self.plan.cancelled.append(key)
                self.put(
                    key,
                    replace(
                        self.states.get(key, StepState(StepStatus.PENDING)),
                        status=StepStatus.CANCELLED,
                    ),
                )

    def run_failure(self) -> str | None:
        """The run's error if a step that is not optional failed (or was cancelled)."""
        cancelled = None
        for step in self.definition.steps:
            if step.optional:
                continue
            state = self.states.get((step.id, None))
            if state is None:
                continue
            if state.status == StepStatus.FAILED:
                return f"step '{step.id}' failed: {state.error}"
            if state.status == StepStatus.CANCELLED and cancelled is None:
                cancelled = f"step '{step.id}' was cancelled"
        return cancelled

    def fail_run(self, error: str) -> None:
        """Cancel every step that is not finished.

        What this call made ready or expanded is taken back (those steps were pending in the
        states given, so they are cancelled instead), so that no key is in two lists.
        """
        self.plan.ready = []
        self.plan.expanded = []
        self.plan.waiting = []
        self.plan.spawned = []
        for key in sorted(self.original, key=self.sort_key):
            if self.status(key) not in STEP_FINAL:
                self.plan.cancelled.append(key)
                self.put(key, replace(self.original[key], status=StepStatus.CANCELLED))
        self.plan.run_status = RunStatus.FAILED
        self.plan.run_error = error

    def finish_run(self) -> None:
        try:
            output = templating.render(self.definition.output, self.context())
        except TemplateError as exc:
            where = _subpath("output", exc.path)
            self.plan.run_status = RunStatus.FAILED
            self.plan.run_error = f"{where} could not be rendered: {exc.message}"
            return
        self.plan.run_status = RunStatus.SUCCEEDED
        self.plan.run_output = output

    def sort_key(self, key: StepKey) -> tuple[int, int]:
        step_id, index = key
        return (self.position.get(step_id, len(self.position)), -1 if index is None else index)


class _StepError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _ready_step(step: StepDef, key: StepKey, context: dict[str, Any]) -> ReadyStep:
    """Render a step's input; raise _StepError naming the step and the field on failure."""
    spec = registry.kinds().get(step.kind)
    if spec is None:
        raise _StepError(f"kind '{step.kind}' of step '{step.id}' is not registered")
    properties = spec.config_schema.get("properties", {})
    rendered: dict[str, Any] = {}
    for name, value in step.config.items():
        if name not in spec.template_fields:
            rendered[name] = copy.deepcopy(value)
            continue
        try:
            result = templating.render(value, context)
        except TemplateError as exc:
            where = _subpath(name, exc.path)
            item = f" item {key[1]}" if key[1] is not None else ""
            raise _StepError(
                f"{where} of step '{step.id}'{item} could not be rendered: {exc.message}"
            ) from None
        # A field declared as text (a prompt, a query) stays text when a template yields a
        # value: "{{ steps.search.output }}" gives the JSON of the output, null gives "".
        if properties.get(name, {}).get("type") == "string" and not isinstance(result, str):
            result = "" if result is None else json.dumps(result, ensure_ascii=False)
        rendered[name] = result
    return ReadyStep(key=key, kind=step.kind, queue=step.queue, input=rendered)


def _subpath(field_name: str, inner: str) -> str:
    """`args` + `filters[0].n` → `args.filters[0].n`; `output` + `[2]` → `output[2]`."""
    if not inner:
        return field_name
    return f"{field_name}{inner}" if inner.startswith("[") else f"{field_name}.{inner}"
