"""The `tool` step kind and the built-in tools, `echo` and `http`.

A tool is a Python callable registered with `registry.register_tool(name)`; a step calls it as
`func(ctx, **args)` and its return value, which must be JSON, becomes the step's output.
Importing this module registers the built-ins.

`http` treats the HTTP status as data, not as the step's fate: a 4xx comes back as a normal
result (`{"status": 404, ...}`) for the workflow to branch on (`when: "steps.x.output.status ==
404"`), because a 4xx usually says something about the request that retrying will not change.
Failures that another attempt may cure fail the attempt, retryably: timeouts (`timeout`),
connection errors (`http_error`) and 5xx answers (`http_5xx`). Redirects are not followed (a
redirect could point at a private address the guard never saw); the 3xx and its `location`
header are returned instead.
"""

from __future__ import annotations

import inspect
import json
import time
from typing import Any

import httpx
from django.conf import settings

from jobs.steps import netguard
from jobs.steps.registry import StepContext, StepFailure, register_tool, tool

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Response headers worth handing to the workflow; the rest is noise in a checkpoint.
HTTP_RESULT_HEADERS = ("content-type", "content-length", "location", "retry-after")
_ERROR_BODY_CHARS = 300


def handle(ctx: StepContext) -> Any:
    name = ctx.input["tool"]
    try:
        func = tool(name)
    except KeyError:
        raise StepFailure(f"unknown tool {name!r}", code="unknown_tool", retryable=False) from None
    args = ctx.input.get("args") or {}
    # Bind first so that wrong arguments are told apart from a TypeError inside the tool.
    try:
        inspect.signature(func).bind(ctx, **args)
    except TypeError as exc:
        raise StepFailure(
            f"bad arguments for tool {name!r}: {exc}", code="bad_args", retryable=False
        ) from None
    result = func(ctx, **args)
    try:
        # allow_nan=False: PostgreSQL's jsonb refuses NaN and Infinity, so they would only fail
        # later, when the checkpoint is written.
        json.dumps(result, allow_nan=False)
    except TypeError as exc:  # "Object of type datetime is not JSON serializable"
        raise StepFailure(
            f"tool {name!r} returned a value that is not JSON: {exc}",
            code="bad_result",
            retryable=False,
        ) from None
    except ValueError:
        raise StepFailure(
            f"tool {name!r} returned NaN or Infinity, which JSON cannot hold",
            code="bad_result",
            retryable=False,
        ) from None
    return result


def _bad_args(message: str) -> StepFailure:
    return StepFailure(message, code="bad_args", retryable=False)


ECHO_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "delay_ms": {"type": "number", "minimum": 0, "description": "wait this long first"}
    },
    "additionalProperties": True,
}

HTTP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["url"],
    "additionalProperties": False,
    "properties": {
        "url": {"type": "string", "minLength": 1, "description": "an http(s) URL"},
        "method": {"enum": [*HTTP_METHODS, *(m.lower() for m in HTTP_METHODS)]},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
        "json": {"description": "the request's JSON body"},
        "params": {"type": "object", "description": "query string parameters"},
        "timeout_s": {"type": "number", "exclusiveMinimum": 0},
    },
}


@register_tool(
    "echo",
    description="Return the arguments as given (after delay_ms milliseconds, if given).",
    schema=ECHO_SCHEMA,
)
def echo(ctx: StepContext, **args: Any) -> dict[str, Any]:
    """Return the arguments as given, after `delay_ms` if given (for wiring, demos, tests)."""
    delay_ms = args.get("delay_ms")
    if delay_ms is not None:
        if isinstance(delay_ms, bool) or not isinstance(delay_ms, int | float) or delay_ms < 0:
            raise _bad_args(f"echo: delay_ms must be a number ≥ 0, not {delay_ms!r}")
        if delay_ms / 1000 > ctx.seconds_left():
            raise StepFailure(
                f"echo: delay of {delay_ms} ms would pass the step's deadline", code="timeout"
            )
        time.sleep(delay_ms / 1000)
    return {"args": args}


@register_tool(
    "http",
    description=(
        "Send one HTTP request to a public address and return its status, headers and body "
        "(parsed when it is JSON)."
    ),
    schema=HTTP_SCHEMA,
)
def http(
    ctx: StepContext,
    *,
    url: str,
    method: str = "GET",
    headers: dict[str, Any] | None = None,
    json: Any = None,
    params: dict[str, Any] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """One HTTP request to a public address; see the module docstring for what fails."""
    method = str(method).upper()
    if method not in HTTP_METHODS:
        raise _bad_args(f"http: method must be one of {', '.join(HTTP_METHODS)}, not {method!r}")
    if not isinstance(url, str):
        raise _bad_args(f"http: url must be a string, not {type(url).__name__}")
    if headers is not None and not isinstance(headers, dict):
        raise _bad_args("http: headers must be an object")
    if params is not None and not isinstance(params, dict):
        raise _bad_args("http: params must be an object")
    if timeout_s is not None and (
        isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0
    ):
        raise _bad_args(f"http: timeout_s must be a number > 0, not {timeout_s!r}")

    netguard.check_public_url(url)
    shown = netguard.redact_url(url)  # for messages: no userinfo, no query string

    timeout = ctx.seconds_left() if timeout_s is None else min(timeout_s, ctx.seconds_left())
    if timeout <= 0:
        raise StepFailure("http: no time left before the step's deadline", code="timeout")
    request_headers = {str(key): str(value) for key, value in (headers or {}).items()}
    # The step's idempotency key is stable across attempts: APIs that honour the header (Stripe
    # and its imitators) then apply a retried POST once. A header the step sets wins.
    if not any(key.lower() == "idempotency-key" for key in request_headers):
        request_headers["Idempotency-Key"] = ctx.idempotency_key
    max_bytes = int(settings.SWITCHYARD_HTTP_TOOL_MAX_BYTES)

    # The timeout bounds each network operation; `deadline` bounds the whole body download.
    deadline = time.monotonic() + timeout
    try:
        with (
            netguard.guarded_client(timeout=timeout) as client,
            client.stream(
                method, url, headers=request_headers, json=json, params=params
            ) as response,
        ):
            body, truncated = _read_capped(response, max_bytes, deadline)
    except netguard.ForbiddenURL as exc:  # the address changed since the check (rebinding)
        raise StepFailure(str(exc), code="forbidden_address", retryable=False) from None
    except httpx.TimeoutException as exc:
        raise StepFailure(
            f"http: {method} {shown} timed out after {timeout:.1f} s ({type(exc).__name__})",
            code="timeout",
        ) from exc
    except httpx.InvalidURL as exc:
        raise _bad_args(f"http: invalid URL {shown!r}: {exc}") from None
    except (httpx.TransportError, httpx.DecodingError) as exc:
        raise StepFailure(
            f"http: {method} {shown} failed: {type(exc).__name__}: {exc}",
            code="http_error",
        ) from exc

    text = body.decode(response.encoding or "utf-8", errors="replace")
    if response.status_code >= 500:
        raise StepFailure(
            f"http: {method} {shown} answered HTTP {response.status_code}: "
            f"{text[:_ERROR_BODY_CHARS].strip()}",
            code="http_5xx",
        )
    return {
        "status": response.status_code,
        "headers": {
            name: response.headers[name] for name in HTTP_RESULT_HEADERS if name in response.headers
        },
        "body": _parse_body(response, text, truncated),
        "truncated": truncated,
    }


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float) -> tuple[bytes, bool]:
    """The body, cut at `max_bytes` without downloading the rest; True if it was cut."""
    body = bytearray()
    for chunk in response.iter_bytes():
        if time.monotonic() > deadline:
            raise httpx.ReadTimeout("the body did not arrive before the step's deadline")
        body.extend(chunk)
        if len(body) > max_bytes:
            return bytes(body[:max_bytes]), True
    return bytes(body), False


def _parse_body(response: httpx.Response, text: str, truncated: bool) -> Any:
    content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json = content_type == "application/json" or content_type.endswith("+json")
    if is_json and not truncated and text.strip():
        try:
            return json.loads(text)
        except ValueError:
            pass  # A server that mislabels its body: hand over the text.
    return text
