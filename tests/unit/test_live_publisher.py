"""The live publisher's batching (jobs/events.py `merged`): what one drain of its list sends."""

from __future__ import annotations

from jobs.events import merged


def _events(*seqs: int) -> dict:
    return {"type": "run.events", "events": [{"seq": seq} for seq in seqs]}


def test_the_committed_events_of_one_run_that_arrive_together_go_as_one_message():
    delta = {"type": "run.delta", "delta": {"text": "hi"}}
    batch = [
        ("run.a", _events(3)),
        ("run.b", _events(7)),
        ("run.a.deltas", delta),
        ("run.a", _events(4, 5)),
        ("run.a.deltas", delta),
    ]

    sent = merged(batch)

    assert sent == [
        ("run.a", _events(3, 4, 5), 2),
        ("run.b", _events(7), 1),
        ("run.a.deltas", delta, 1),
        ("run.a.deltas", delta, 1),  # deltas are never joined: each is a piece of text
    ]
    assert sum(count for _, _, count in sent) == len(batch)  # every message accounted for
