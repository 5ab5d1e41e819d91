"""The simulated LLM provider: deterministic text, latency distributions, failures, streaming."""

from __future__ import annotations

import math
import random
import statistics
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs.steps import llm
from jobs.steps.registry import StepContext, StepFailure


def make_ctx(
    step_input: dict,
    *,
    seconds: float = 5,
    key: str = "run-1:classify",
    attempt: int = 1,
    deltas: list[str] | None = None,
) -> StepContext:
    return StepContext(
        run_id="run-1",
        tenant_id=1,
        step_id="classify",
        map_index=None,
        kind="llm",
        attempt=attempt,
        input=step_input,
        idempotency_key=key,
        deadline=timezone.now() + timedelta(seconds=seconds),
        emit_delta=(deltas.append if deltas is not None else (lambda text: None)),
    )


FAST = {"latency_ms": 0}


def test_the_same_prompt_gives_the_same_text_which_says_it_is_simulated():
    step = {
        "provider": "simulated",
        "prompt": "Label this ticket: refund please",
        "simulated": FAST,
    }

    first = llm.handle(make_ctx(step, key="run-1:a"))
    second = llm.handle(make_ctx(step, key="run-2:b", attempt=3))

    assert first["text"] == second["text"]
    assert first["text"].startswith("[simulated sim-1] ")
    assert "Label this ticket: refund please" in first["text"]
    assert first["provider"] == "simulated"
    assert first["simulated"] is True
    assert first["model"] == "sim-1"
    assert first["finish_reason"] == "stop"


def test_the_text_depends_on_model_system_and_prompt():
    base = {"provider": "simulated", "prompt": "Summarise the incident", "simulated": FAST}
    texts = {
        llm.handle(make_ctx(base))["text"],
        llm.handle(make_ctx({**base, "model": "sim-2"}))["text"],
        llm.handle(make_ctx({**base, "prompt": "Summarise the outage"}))["text"],
    }
    many_systems = {
        llm.handle(make_ctx({**base, "system": f"You are agent {n}."}))["text"] for n in range(10)
    }

    assert len(texts) == 3
    assert len(many_systems) > 1
    assert llm.handle(make_ctx({**base, "model": "sim-2"}))["text"].startswith("[simulated sim-2]")


def test_a_configured_response_is_used_verbatim():
    step = {
        "prompt": "anything",
        "provider": "simulated",
        "simulated": {**FAST, "response": "refund"},
    }

    result = llm.handle(make_ctx(step))

    assert result["text"] == "refund"
    assert result["simulated"] is True


def test_choices_are_picked_by_prompt_deterministically():
    choices = ["refund", "bug", "question"]

    def label(prompt: str) -> str:
        step = {
            "provider": "simulated",
            "prompt": prompt,
            "simulated": {**FAST, "choices": choices},
        }
        return llm.handle(make_ctx(step))["text"]

    picked = {prompt: label(prompt) for prompt in (f"ticket {n}" for n in range(30))}

    assert set(picked.values()) == set(choices)
    assert all(label(prompt) == text for prompt, text in picked.items())


def test_usage_is_estimated_from_words():
    step = {
        "provider": "simulated",
        "system": "Be brief.",
        "prompt": "one two three four five six seven",
        "simulated": {**FAST, "response": "alpha beta gamma"},
    }

    usage = llm.handle(make_ctx(step))["usage"]

    assert usage == {
        "prompt_tokens": math.ceil(2 * 1.3) + math.ceil(7 * 1.3),
        "completion_tokens": math.ceil(3 * 1.3),
        "total_tokens": 3 + 10 + 4,
    }


def test_text_streams_in_several_deltas_that_add_up_to_the_text():
    deltas: list[str] = []
    step = {"provider": "simulated", "prompt": "Draft a reply", "simulated": {"latency_ms": 80}}

    result = llm.handle(make_ctx(step, deltas=deltas))

    assert "".join(deltas) == result["text"]
    assert 5 <= len(deltas) <= 10


def test_the_attempt_takes_the_configured_latency():
    step = {"provider": "simulated", "prompt": "hi", "simulated": {"latency_ms": 150}}

    started = time.monotonic()
    result = llm.handle(make_ctx(step))
    elapsed_ms = (time.monotonic() - started) * 1000

    assert 150 <= result["latency_ms"] <= elapsed_ms + 1
    assert elapsed_ms < 400


def test_tokens_per_second_paces_the_stream():
    deltas: list[str] = []
    words = " ".join(f"w{n}" for n in range(20))  # 20 words → 26 tokens
    step = {
        "provider": "simulated",
        "prompt": "count",
        "simulated": {"latency_ms": 0, "response": words, "tokens_per_second": 130},
    }

    started = time.monotonic()
    result = llm.handle(make_ctx(step, deltas=deltas))
    elapsed = time.monotonic() - started

    assert "".join(deltas) == words
    assert 0.2 <= elapsed < 0.6  # 26 tokens at 130/s
    assert len(deltas) > 1
    assert result["usage"]["completion_tokens"] == 26


def test_a_latency_past_the_deadline_fails_at_once_with_timeout():
    step = {"provider": "simulated", "prompt": "hi", "simulated": {"latency_ms": 5000}}

    started = time.monotonic()
    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx(step, seconds=1))

    assert failure.value.code == "timeout"
    assert failure.value.retryable is True
    assert time.monotonic() - started < 0.5


def test_fail_rate_one_fails_every_attempt_retryably_without_deltas():
    deltas: list[str] = []
    step = {"provider": "simulated", "prompt": "hi", "simulated": {"latency_ms": 0, "fail_rate": 1}}

    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx(step, deltas=deltas))

    assert failure.value.code == "provider_error"
    assert failure.value.retryable is True
    assert failure.value.message == "simulated provider error (fail_rate=1)"
    assert deltas == []


def outcome(step: dict, key: str, attempt: int) -> str:
    try:
        llm.handle(make_ctx(step, key=key, attempt=attempt))
    except StepFailure as failure:
        return failure.code
    return "ok"


def test_fail_rate_is_the_share_of_failed_attempts_and_replays_identically():
    step = {
        "provider": "simulated",
        "prompt": "hi",
        "simulated": {"latency_ms": 0, "fail_rate": 0.3},
    }

    outcomes = [outcome(step, f"run-{n}:s", 1) for n in range(400)]
    share = outcomes.count("provider_error") / len(outcomes)

    assert 0.22 <= share <= 0.38
    assert [outcome(step, f"run-{n}:s", 1) for n in range(50)] == outcomes[:50]
    # Another attempt of the same step gets its own draw.
    assert [outcome(step, f"run-{n}:s", 2) for n in range(50)] != outcomes[:50]


@pytest.mark.parametrize("distribution", ["uniform", "normal", "lognormal"])
def test_latency_distributions_centre_on_the_configured_latency(distribution):
    rng = random.Random(7)
    config = {"latency_ms": 200, "jitter_ms": 50, "distribution": distribution}

    samples = [llm.draw_latency_ms(rng, config) for _ in range(4000)]

    assert 190 <= statistics.median(samples) <= 210
    if distribution == "uniform":
        assert min(samples) >= 150 and max(samples) <= 250
    if distribution == "normal":
        assert 45 <= statistics.stdev(samples) <= 55
    if distribution == "lognormal":
        assert min(samples) > 0 and max(samples) > 300  # a long right tail


@pytest.mark.parametrize("distribution", ["uniform", "normal", "lognormal"])
def test_latency_is_never_negative(distribution):
    rng = random.Random(1)
    config = {"latency_ms": 10, "jitter_ms": 100, "distribution": distribution}

    samples = [llm.draw_latency_ms(rng, config) for _ in range(1000)]

    assert min(samples) >= 0


def test_latency_defaults_to_200_ms_without_jitter():
    assert llm.draw_latency_ms(random.Random(0), {}) == 200


def test_the_provider_defaults_to_the_setting(settings):
    step = {"prompt": "hi", "simulated": FAST}

    settings.SWITCHYARD_LLM_DEFAULT_PROVIDER = "simulated"
    assert llm.handle(make_ctx(step))["provider"] == "simulated"

    settings.SWITCHYARD_LLM_DEFAULT_PROVIDER = "openai"
    settings.SWITCHYARD_OPENAI_API_KEY = ""
    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx(step))
    assert failure.value.code == "config"


def test_without_a_provider_a_step_fails_naming_the_setting(settings):
    settings.SWITCHYARD_LLM_DEFAULT_PROVIDER = ""
    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx({"prompt": "hi", "simulated": FAST}))
    assert failure.value.code == "config" and not failure.value.retryable
    assert "SWITCHYARD_LLM_DEFAULT_PROVIDER is not set" in str(failure.value)


def test_an_unknown_provider_fails_without_retrying():
    with pytest.raises(StepFailure) as failure:
        llm.handle(make_ctx({"provider": "telepathy", "prompt": "hi"}))

    assert failure.value.code == "config"
    assert failure.value.retryable is False
    assert "telepathy" in failure.value.message
