"""One PNG chart per scenario (matplotlib, no display). Each function returns the file's name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

SYNC_COLOUR = "#c0504d"
SWITCHYARD_COLOUR = "#2f6db5"
RAW_COLOUR = "#7f7f7f"
DBOS_COLOUR = "#e08a2c"


def _plain_log_ticks(fig) -> None:
    """Log axes labelled 20, 100, 2000 rather than 2x10^1, 10^2, 2x10^3."""
    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
                axis.set_minor_formatter(FuncFormatter(lambda _v, _pos: ""))


def _save(fig, path: Path) -> str:
    _plain_log_ticks(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _cdf(ax, samples: Sequence[float], label: str, colour: str) -> None:
    ordered = sorted(samples)
    if not ordered:
        return
    ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
    ax.step(ordered, ys, where="post", label=label, color=colour)


def motivating_chart(path: Path, sync: dict, switchyard: dict, *, gateway_ms: float) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = ["synchronous", "Switchyard"]
    received = [
        sync["completed_received"],
        switchyard["completed_received"] + switchyard.get("collected_after_the_stream", 0),
    ]
    lost = [sync["results_lost"], switchyard["results_lost"]]
    other = [
        sync["requests"] - received[0] - sync["results_lost"],
        switchyard["requests"] - received[1] - switchyard["results_lost"],
    ]
    left.bar(names, received, color="#4a9d4a", label="result received")
    left.bar(names, lost, bottom=received, color=SYNC_COLOUR, label="finished, result lost")
    left.bar(
        names,
        other,
        bottom=[a + b for a, b in zip(received, lost, strict=True)],
        color="#bbbbbb",
        label="failed otherwise",
    )
    left.set_ylabel("workflows")
    left.set_title("Outcome of each user's workflow")
    left.legend()
    _cdf(right, sync["all_latencies_ms"], "synchronous: response", SYNC_COLOUR)
    _cdf(right, switchyard["all_latencies_ms"], "Switchyard: end to end", SWITCHYARD_COLOUR)
    right.axvline(gateway_ms, color="black", linestyle="--", label="gateway timeout")
    right.set_xscale("log")
    right.set_xlabel("ms (log)")
    right.set_ylabel("share of users")
    right.set_title("Latency seen by users")
    right.legend(loc="lower right")
    return _save(fig, path)


def submission_chart(
    path: Path,
    open_loop: Sequence[float],
    closed_loop: Sequence[float],
    single: Sequence[float],
    *,
    clients: int,
) -> str:
    from bench.params import TARGETS

    fig, ax = plt.subplots(figsize=(7, 4))
    _cdf(ax, open_loop, f"open loop: {clients} clients x 1/s", SWITCHYARD_COLOUR)
    _cdf(ax, closed_loop, f"closed loop: {clients} clients back to back", SYNC_COLOUR)
    _cdf(ax, single, "1 client", "#4a9d4a")
    ax.axvline(TARGETS.open_loop_p50_ms, color="black", linestyle=":", label="target P50")
    ax.axvline(TARGETS.open_loop_p99_ms, color="black", linestyle="--", label="target P99")
    ax.set_xscale("log")
    ax.set_xlabel("submission latency, ms (log)")
    ax.set_ylabel("share of requests")
    ax.set_title("POST /api/v1/runs/")
    ax.legend(loc="lower right")
    return _save(fig, path)


def bars_chart(
    path: Path,
    title: str,
    labels: Sequence[str],
    values: Sequence[float],
    ylabel: str,
    colours: Sequence[str] | None = None,
    log: bool = False,
) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(labels, values, color=colours or SWITCHYARD_COLOUR)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            f"{value:,.1f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)


def overhead_chart(path: Path, ms_per_step: dict[str, float | None], dispatch: Sequence[float]):
    from bench.params import TARGETS

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"Switchyard": SWITCHYARD_COLOUR, "raw Celery": RAW_COLOUR, "DBOS": DBOS_COLOUR}
    shown = {name: value for name, value in ms_per_step.items() if value is not None}
    bars = left.bar(list(shown), list(shown.values()), color=[colours[n] for n in shown])
    for bar in bars:
        left.annotate(
            f"{bar.get_height():.2f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
        )
    left.set_ylabel("ms per step (chain of 50)")
    left.set_title("Per-step overhead")
    _cdf(right, dispatch, "ready → handler starts", SWITCHYARD_COLOUR)
    right.axvline(TARGETS.idle_dispatch_p50_ms, color="black", linestyle=":", label="target P50")
    right.axvline(TARGETS.idle_dispatch_p99_ms, color="black", linestyle="--", label="target P99")
    right.set_xscale("log")
    right.set_xlabel("ms (log)")
    right.set_title("Idle dispatch latency")
    right.legend(loc="lower right")
    return _save(fig, path)


def noisy_chart(path: Path, phases: dict[str, Sequence[float]]) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"A alone": "#4a9d4a", "flood, fair": SWITCHYARD_COLOUR, "flood, fifo": SYNC_COLOUR}
    for name, waits in phases.items():
        _cdf(ax, [max(w, 0.1) for w in waits], name, colours.get(name, RAW_COLOUR))
    ax.set_xscale("log")
    ax.set_xlabel("tenant A's queue wait (ready → running), ms (log)")
    ax.set_ylabel("share of A's steps")
    ax.set_title("Noisy neighbour: B floods batch steps")
    ax.legend(loc="lower right")
    return _save(fig, path)


def streams_chart(
    path: Path,
    latencies: Sequence[float],
    rss: Sequence[tuple[float, float]],
    *,
    websocket: Sequence[float] = (),
) -> str:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    _cdf(left, [max(x, 0.1) for x in latencies], "SSE: commit → client", SWITCHYARD_COLOUR)
    if websocket:
        _cdf(left, [max(x, 0.1) for x in websocket], "WebSocket: commit → client", "grey")
    left.axvline(250, color="black", linestyle="--", label="target P99 250 ms")
    left.set_xscale("log")
    left.set_xlabel("event delivery latency, ms (log)")
    left.set_ylabel("share of events")
    left.legend(loc="lower right")
    left.set_title("Delivery")
    if rss:
        right.plot([t for t, _ in rss], [m for _, m in rss], color=SWITCHYARD_COLOUR)
    right.set_xlabel("s")
    right.set_ylabel("web process RSS, MiB")
    right.set_title("Memory of the one web process (SSE phase)")
    return _save(fig, path)


def growth_chart(path: Path, backlogs: Sequence[int], series: dict[str, Sequence[float]]) -> str:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in series.items():
        ax.plot(backlogs, values, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ready steps in the backlog (log)")
    ax.set_ylabel("ms (log)")
    ax.set_title("Growth with the backlog")
    ax.legend()
    return _save(fig, path)
