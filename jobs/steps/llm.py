"""The `llm` step kind: one chat completion from the provider the step names.

Providers:

- `simulated`: no network. Deterministic text (a hash of model, system and prompt picks it),
  a latency drawn per attempt from a configurable distribution, an optional failure rate, and
  streamed deltas. For demos, tests and benchmarks; its text says it is simulated.
- `openai`: any OpenAI-compatible `/chat/completions` endpoint, streamed over SSE.

Both return `{"text", "provider", "model", "usage", "finish_reason", ...}` so that templates
(`steps.x.output.text`) and token accounting (`output.usage.total_tokens`) do not care which
provider ran. Settings are read at call time, never at import.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from typing import Any

import httpx
from django.conf import settings

from jobs.steps import agent_turn
from jobs.steps.registry import StepContext, StepFailure

SIMULATED_MODEL = "sim-1"

# How much of a provider's error body goes into a step's error message: enough to recognise
# the error, not so much that an HTML error page floods the run's log.
_ERROR_BODY_CHARS = 300


PROVIDERS = ("simulated", "openai")


def handle(ctx: StepContext) -> dict[str, Any]:
    if "messages" in ctx.input:  # a turn of an agent (jobs.steps.agent_turn)
        return run_turn(ctx)
    provider = provider_of(ctx)
    if provider == "simulated":
        return run_simulated(ctx)
    if provider == "openai":
        return run_openai(ctx)
    raise StepFailure(f"unknown llm provider {provider!r}", code="config", retryable=False)


def provider_of(ctx: StepContext) -> str:
    """The provider the step names, else the deployment's default; fails without one."""
    provider = ctx.input.get("provider") or settings.SWITCHYARD_LLM_DEFAULT_PROVIDER
    if not provider:
        raise StepFailure(
            "no llm provider: the step names none and SWITCHYARD_LLM_DEFAULT_PROVIDER is not set",
            code="config",
            retryable=False,
        )
    if provider not in PROVIDERS:
        raise StepFailure(f"unknown llm provider {provider!r}", code="config", retryable=False)
    return provider


def estimate_tokens(text: str) -> int:
    """Approximate token count: 1.3 tokens per whitespace-separated word, rounded up.

    Close enough to BPE tokenisers on English prose for quotas and benchmarks; used for the
    simulated provider and when an OpenAI-compatible server does not report usage.
    """
    return math.ceil(len(text.split()) * 1.3)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _prompt_tokens(ctx: StepContext) -> int:
    return estimate_tokens(ctx.input.get("system") or "") + estimate_tokens(ctx.input["prompt"])


# --- simulated --------------------------------------------------------------------------------

_OPENERS = (
    "Here is a short answer.",
    "Thanks for the details.",
    "Understood.",
    "Good question.",
    "Happy to help with this.",
)
_SENTENCES = (
    "The request looks routine and can be handled with the standard process.",
    "The key points are clear, and nothing in the input calls for escalation.",
    "In short, the main issue is identified and a next step is proposed.",
    "Based on the information given, the simplest explanation is the most likely one.",
    "With more context the answer could be made more specific.",
    "A few details in the input are worth confirming before acting on them.",
    "No unusual risk stands out in what was provided.",
    "A brief follow-up with the requester would settle the remaining questions.",
    "The suggested next step is to reply with a summary and the relevant links.",
    "Nothing here contradicts the earlier steps of the workflow.",
)
# The simulated provider streams its latency in this many slices (when not paced by
# tokens_per_second), so that live views show text arriving rather than all at once.
_SLICES = 8
# With tokens_per_second, deltas are coalesced to at most one per this many seconds: a fast
# simulated model must not flood the channel layer with one message per word.
_MIN_DELTA_INTERVAL_S = 0.05


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def simulated_text(model: str, system: str, prompt: str) -> str:
    """A plausible, deterministic reply: the same (model, system, prompt) gives the same text."""
    digest = _digest(model, system, prompt)
    opener = _OPENERS[digest[0] % len(_OPENERS)]
    count = 2 + digest[1] % 3
    sentences = [_SENTENCES[digest[2 + i] % len(_SENTENCES)] for i in range(count)]
    words = prompt.split()
    topic = " ".join(words[:8]) + (" …" if len(words) > 8 else "")
    return f'[simulated {model}] {opener} Regarding "{topic}": ' + " ".join(sentences)


def _pick_text(model: str, system: str, prompt: str, config: dict[str, Any]) -> str:
    if "response" in config:
        return config["response"]
    if config.get("choices"):
        choices = config["choices"]
        return choices[int.from_bytes(_digest(prompt)[:8], "big") % len(choices)]
    return simulated_text(model, system, prompt)


def draw_latency_ms(rng: random.Random, config: dict[str, Any]) -> float:
    """One latency sample in milliseconds from the step's `simulated` configuration, ≥ 0."""
    latency = float(config.get("latency_ms", 200))
    jitter = float(config.get("jitter_ms", 0))
    distribution = config.get("distribution", "uniform")
    if jitter <= 0 or (latency <= 0 and distribution == "lognormal"):
        sample = latency
    elif distribution == "normal":
        sample = rng.gauss(latency, jitter)
    elif distribution == "lognormal":
        # Parameterised so that `latency_ms` is the median and the spread scales with it.
        sample = rng.lognormvariate(math.log(latency), jitter / latency)
    else:
        sample = rng.uniform(latency - jitter, latency + jitter)
    return max(0.0, sample)


def _attempt_rng(ctx: StepContext) -> random.Random:
    # Seeded by step and attempt: a benchmark or chaos run replays the same latencies and
    # failures, while each attempt (and each run) still gets its own draw. String seeds are
    # hashed with SHA-512, so this does not depend on PYTHONHASHSEED.
    return random.Random(f"{ctx.idempotency_key}#{ctx.attempt}")


def _split_for_streaming(text: str) -> list[str]:
    # Words with their leading whitespace; joined back they give the text exactly.
    return re.findall(r"\s*\S+|\s+", text)


def _sleep_within_deadline(ctx: StepContext, seconds: float) -> None:
    if seconds > ctx.seconds_left():
        raise StepFailure(
            f"simulated latency of {seconds * 1000:.0f} ms would pass the step's deadline",
            code="timeout",
        )
    time.sleep(seconds)


def run_simulated(ctx: StepContext) -> dict[str, Any]:
    """Simulate one attempt.

    Timing: the attempt takes the drawn latency; with `tokens_per_second` the latency is the
    time to the first token and the text then streams at that rate. An attempt whose planned
    duration does not fit before the deadline fails at once with `timeout` (rather than
    sleeping until the lease ends). A failing attempt (`fail_rate`) waits its latency, then
    raises a retryable `provider_error` before any delta, like a provider returning a 5xx.
    """
    config: dict[str, Any] = ctx.input.get("simulated") or {}
    model = ctx.input.get("model") or SIMULATED_MODEL
    system = ctx.input.get("system") or ""
    prompt = ctx.input["prompt"]
    rng = _attempt_rng(ctx)
    started = time.monotonic()

    latency_s = draw_latency_ms(rng, config) / 1000
    fail_rate = float(config.get("fail_rate", 0))
    fails = fail_rate > 0 and rng.random() < fail_rate
    text = _pick_text(model, system, prompt, config)
    completion_tokens = estimate_tokens(text)
    pieces = _split_for_streaming(text)
    tokens_per_second = config.get("tokens_per_second")

    streaming_s = completion_tokens / tokens_per_second if tokens_per_second and not fails else 0
    if latency_s + streaming_s > ctx.seconds_left():
        raise StepFailure(
            f"simulated latency of {(latency_s + streaming_s) * 1000:.0f} ms would pass the "
            f"step's deadline ({ctx.seconds_left():.1f} s left)",
            code="timeout",
        )

    if fails:
        _sleep_within_deadline(ctx, latency_s)
        raise StepFailure(
            f"simulated provider error (fail_rate={fail_rate:g})",
            code="provider_error",
            retryable=True,
        )

    if tokens_per_second and pieces:
        _sleep_within_deadline(ctx, latency_s)
        per_piece_s = streaming_s / len(pieces)
        group = max(1, math.ceil(_MIN_DELTA_INTERVAL_S / per_piece_s)) if per_piece_s else 1
        for start in range(0, len(pieces), group):
            chunk = pieces[start : start + group]
            _sleep_within_deadline(ctx, per_piece_s * len(chunk))
            ctx.emit_delta("".join(chunk))
    else:
        for index in range(_SLICES):
            _sleep_within_deadline(ctx, latency_s / _SLICES)
            chunk = pieces[index * len(pieces) // _SLICES : (index + 1) * len(pieces) // _SLICES]
            if chunk:
                ctx.emit_delta("".join(chunk))

    return {
        "text": text,
        "provider": "simulated",
        "simulated": True,
        "model": model,
        "usage": _usage(_prompt_tokens(ctx), completion_tokens),
        "finish_reason": "stop",
        "latency_ms": round((time.monotonic() - started) * 1000),
    }


# --- an agent's turn -------------------------------------------------------------------------


def run_turn(ctx: StepContext) -> dict[str, Any]:
    """One turn of an agent: the conversation so far and the agent's tools to the provider,
    its reply checkpointed with its tool calls checked (`jobs.steps.agent_turn`)."""
    until = agent_turn.deadline(ctx)
    specs = agent_turn.tool_specs(ctx.tenant_id, ctx.input.get("tools") or [])
    messages = ctx.input["messages"]
    if provider_of(ctx) == "openai":
        reply = run_openai(ctx, messages=messages, tools=agent_turn.openai_tools(specs))
    else:
        reply = _simulated_turn(ctx, messages)
    return agent_turn.checkpoint(ctx, reply, specs, until)


def _simulated_turn(ctx: StepContext, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The script's reply for this turn, or, past the script, a deterministic final text;
    after the configured latency, with the text streamed as deltas."""
    config: dict[str, Any] = ctx.input.get("simulated") or {}
    model = ctx.input.get("model") or SIMULATED_MODEL
    started = time.monotonic()
    reply = agent_turn.scripted_reply(ctx)
    if reply is None:
        last = next((m["content"] for m in reversed(messages) if m.get("content")), "")
        reply = {"text": simulated_text(model, "", str(last)), "tool_calls": [], "usage": None}
    _sleep_within_deadline(ctx, float(config.get("latency_ms", 50)) / 1000)
    if reply["text"]:
        ctx.emit_delta(reply["text"])
    written = reply["text"] + "".join(call["arguments"] for call in reply["tool_calls"])
    usage = reply.get("usage") or {}
    return {
        "text": reply["text"],
        "tool_calls": reply["tool_calls"],
        "provider": "simulated",
        "simulated": True,
        "model": model,
        "usage": _usage(
            int(usage.get("prompt_tokens", estimate_messages_tokens(messages))),
            int(usage.get("completion_tokens", estimate_tokens(written))),
        ),
        "finish_reason": "tool_calls" if reply["tool_calls"] else "stop",
        "latency_ms": round((time.monotonic() - started) * 1000),
    }


# --- openai -----------------------------------------------------------------------------------

# Statuses worth another attempt, as the official OpenAI SDKs retry them: request timeout,
# conflict (a concurrent request with the same idempotency key), rate limit, server errors.
_RETRYABLE_STATUSES = {408, 409, 429}


def _openai_request_body(
    ctx: StepContext,
    model: str,
    messages: list[dict[str, Any]] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    if messages is None:
        messages = []
        if ctx.input.get("system"):
            messages.append({"role": "system", "content": ctx.input["system"]})
        messages.append({"role": "user", "content": ctx.input["prompt"]})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        body["tools"] = tools
    for optional in ("temperature", "max_tokens"):
        if ctx.input.get(optional) is not None:
            body[optional] = ctx.input[optional]
    return body


def _http_failure(response: httpx.Response) -> StepFailure:
    status = response.status_code
    excerpt = response.text[:_ERROR_BODY_CHARS].strip()
    message = f"openai provider answered HTTP {status}: {excerpt}"
    if status >= 500 or status in _RETRYABLE_STATUSES:
        retry_after = response.headers.get("retry-after")
        if retry_after:
            message += f" (Retry-After: {retry_after})"
        return StepFailure(message, code="provider_error", retryable=True)
    return StepFailure(message, code="provider_rejected", retryable=False)


def run_openai(
    ctx: StepContext,
    *,
    messages: list[dict[str, Any]] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One chat completion; with `messages` and `tools` (an agent's turn) the model may call
    tools: the result's `tool_calls` lists them as `{"id", "name", "arguments"}` (the
    arguments as the JSON text the model wrote)."""
    api_key = settings.SWITCHYARD_OPENAI_API_KEY
    if not api_key:
        raise StepFailure(
            "the openai provider needs an API key: set SWITCHYARD_OPENAI_API_KEY",
            code="config",
            retryable=False,
        )
    base_url = settings.SWITCHYARD_OPENAI_BASE_URL.rstrip("/")
    model = ctx.input.get("model") or settings.SWITCHYARD_OPENAI_MODEL
    timeout_s = min(
        float(settings.SWITCHYARD_OPENAI_TIMEOUT_S),
        ctx.seconds_left(),
    )
    if timeout_s <= 0:
        raise StepFailure("no time left before the step's deadline", code="timeout")

    headers = {
        "Authorization": f"Bearer {api_key}",
        "Accept": "text/event-stream",
        "Idempotency-Key": ctx.idempotency_key,
    }
    body = _openai_request_body(ctx, model, messages, tools)
    # httpx's timeout bounds each read, not the whole stream: `deadline` bounds the total, so
    # that a server trickling bytes cannot hold the attempt past its lease.
    deadline = time.monotonic() + timeout_s
    try:
        with (
            httpx.Client(timeout=timeout_s) as client,
            client.stream(
                "POST", f"{base_url}/chat/completions", json=body, headers=headers
            ) as response,
        ):
            if response.status_code >= 400:
                response.read()
                raise _http_failure(response)
            if response.headers.get("content-type", "").startswith("application/json"):
                # A server that ignores `stream: true` answers with one JSON completion.
                response.read()
                completion = _completion_from_json(response)
                if completion["text"]:
                    ctx.emit_delta(completion["text"])
            else:
                completion = _completion_from_stream(ctx, response, deadline)
    except httpx.TimeoutException as exc:
        raise StepFailure(
            f"openai provider timed out after {timeout_s:.1f} s ({type(exc).__name__})",
            code="timeout",
        ) from exc
    except httpx.TransportError as exc:
        raise StepFailure(
            f"openai provider connection failed: {type(exc).__name__}: {exc}",
            code="provider_error",
        ) from exc

    result: dict[str, Any] = {
        "text": completion["text"],
        "provider": "openai",
        "model": completion["model"] or model,
        "usage": completion["usage"],
        "finish_reason": completion["finish_reason"],
    }
    if tools:
        result["tool_calls"] = completion["tool_calls"]
    if result["usage"] is None:
        prompt_tokens = (
            _prompt_tokens(ctx) if messages is None else estimate_messages_tokens(messages)
        )
        written = completion["text"] + "".join(
            call["arguments"] for call in completion["tool_calls"]
        )
        result["usage"] = _usage(prompt_tokens, estimate_tokens(written))
        result["usage_estimated"] = True
    return result


def estimate_messages_tokens(messages: list[dict[str, Any]]) -> int:
    """`estimate_tokens` of a conversation: each message's text and tool calls."""
    return sum(estimate_tokens(json.dumps(message, ensure_ascii=False)) for message in messages)


def _normalise_usage(usage: Any) -> dict[str, int] | None:
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return None
    return _usage(int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0))


def _completion_from_stream(
    ctx: StepContext, response: httpx.Response, deadline: float
) -> dict[str, Any]:
    parts: list[str] = []
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    model: str | None = None
    # Tool calls arrive in pieces keyed by their index: the id and name first, then the
    # arguments' JSON text in fragments.
    calls: dict[int, dict[str, str]] = {}
    done = False
    for line in response.iter_lines():
        if time.monotonic() > deadline:
            raise StepFailure(
                "openai provider stream did not finish before the step's deadline",
                code="timeout",
            )
        # SSE: only `data:` lines matter here; blank lines, comments (`:`) and `event:` lines
        # are framing.
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(payload)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            raise StepFailure(
                f"openai provider sent a malformed stream chunk: {payload[:_ERROR_BODY_CHARS]}",
                code="provider_error",
            )
        if "error" in chunk:
            error = json.dumps(chunk["error"])[:_ERROR_BODY_CHARS]
            raise StepFailure(
                f"openai provider reported an error mid-stream: {error}", code="provider_error"
            )
        model = chunk.get("model") or model
        usage = _normalise_usage(chunk.get("usage")) or usage
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                parts.append(content)
                ctx.emit_delta(content)
            for piece in delta.get("tool_calls") or []:
                _add_tool_call_piece(calls, piece)
            finish_reason = choice.get("finish_reason") or finish_reason
    if not done and finish_reason is None:
        raise StepFailure(
            "openai provider closed the stream before the completion finished",
            code="provider_error",
        )
    return {
        "text": "".join(parts),
        "model": model,
        "usage": usage,
        "finish_reason": finish_reason,
        "tool_calls": [calls[index] for index in sorted(calls)],
    }


def _add_tool_call_piece(calls: dict[int, dict[str, str]], piece: Any) -> None:
    if not isinstance(piece, dict):
        return
    call = calls.setdefault(int(piece.get("index") or 0), {"id": "", "name": "", "arguments": ""})
    if piece.get("id"):
        call["id"] = str(piece["id"])
    function = piece.get("function") or {}
    if function.get("name"):
        call["name"] += str(function["name"])
    if function.get("arguments"):
        call["arguments"] += str(function["arguments"])


def _completion_from_json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
        choice = data["choices"][0]
        text = choice["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise StepFailure(
            f"openai provider sent an unexpected response: {response.text[:_ERROR_BODY_CHARS]}",
            code="provider_error",
        ) from None
    calls = [
        {
            "id": str(call.get("id") or ""),
            "name": str((call.get("function") or {}).get("name") or ""),
            "arguments": str((call.get("function") or {}).get("arguments") or ""),
        }
        for call in choice["message"].get("tool_calls") or []
        if isinstance(call, dict)
    ]
    return {
        "text": text,
        "model": data.get("model"),
        "usage": _normalise_usage(data.get("usage")),
        "finish_reason": choice.get("finish_reason"),
        "tool_calls": calls,
    }
