"""Coalescing of a step's token deltas (jobs.events.DeltaCoalescer): at most ~20 messages a
second per step, no text lost, no delay added to a provider that already paces its deltas."""

from __future__ import annotations

import itertools
import time

import pytest

from jobs import events


@pytest.fixture
def published(monkeypatch):
    sent: list[tuple[float, str]] = []

    def publish_delta(run_public_id, step_id, map_index, text, *, attempt=None):
        sent.append((time.monotonic(), text))

    monkeypatch.setattr(events, "publish_delta", publish_delta)
    return sent


def test_a_fast_stream_is_coalesced_to_twenty_messages_a_second_without_losing_text(published):
    coalescer = events.DeltaCoalescer("run", "draft", None, attempt=1)
    pieces = [f"word{n} " for n in range(200)]
    started = time.monotonic()
    for piece in pieces:  # ~200 pieces a second
        coalescer.emit(piece)
        time.sleep(0.005)
    coalescer.close()
    elapsed = time.monotonic() - started

    assert "".join(text for _, text in published) == "".join(pieces)
    assert len(published) <= elapsed / events.DELTA_INTERVAL_S + 2, (len(published), elapsed)
    # Apart from the flush at the end, messages are at least the interval apart.
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(published)]
    assert min(gaps[:-1]) >= events.DELTA_INTERVAL_S * 0.9


def test_a_piece_after_a_pause_goes_out_at_once_and_a_trailing_piece_does_not_wait(published):
    coalescer = events.DeltaCoalescer("run", "draft", 3)
    coalescer.emit("Hello")
    assert [text for _, text in published] == ["Hello"]  # nothing to coalesce with: sent now
    coalescer.emit(", world")
    assert len(published) == 1  # within the interval: buffered...
    time.sleep(events.DELTA_INTERVAL_S * 3)
    # ...and sent by the timer when the interval is over, not at the next piece or the end.
    assert [text for _, text in published] == ["Hello", ", world"]
    coalescer.close()
    coalescer.emit("late")  # after the attempt: dropped, never raises
    time.sleep(events.DELTA_INTERVAL_S * 2)
    assert [text for _, text in published] == ["Hello", ", world"]


def test_emit_never_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("channel layer down")

    monkeypatch.setattr(events, "publish_delta", broken)
    coalescer = events.DeltaCoalescer("run", "draft", None)
    coalescer.emit("text")  # a handler's emit_delta must not fail the step
    coalescer.close()
