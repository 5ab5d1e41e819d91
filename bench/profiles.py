"""Summaries of py-spy's raw (collapsed) profiles: where the project's own code spends time.

`summarise(path)` lists the frames of the project (jobs/, tenants/, orchestrator/) by inclusive
share of the samples, with file:line of the hottest line of each, and the leaf frames (any
code) by self share: enough to say "what and where" without opening a flame graph.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
PROJECT = ("jobs/", "tenants/", "orchestrator/", "dashboard/")


def _short(path: str) -> str:
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarise(path: Path, top: int = 15) -> dict:
    inclusive: Counter[str] = Counter()
    hottest_line: dict[str, Counter[str]] = {}
    leaves: Counter[str] = Counter()
    total = 0
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        seen: set[str] = set()
        frames = stack.split(";")
        for frame in frames:
            match = _FRAME.match(frame)
            if not match:
                continue
            where = _short(match["file"])
            key = f"{match['func']} ({where})"
            if key not in seen:
                seen.add(key)
                inclusive[key] += n
                hottest_line.setdefault(key, Counter())[f"{where}:{match['line']}"] += n
        match = _FRAME.match(frames[-1])
        leaves[f"{match['func']} ({_short(match['file'])})" if match else frames[-1]] += n
    own = [
        {
            "frame": key,
            "share": round(n / total, 3),
            "hottest": hottest_line[key].most_common(1)[0][0],
        }
        for key, n in inclusive.most_common()
        if any(part in key for part in PROJECT)
    ][:top]
    self_time = [{"frame": key, "share": round(n / total, 3)} for key, n in leaves.most_common(top)]
    return {"samples": total, "project_inclusive": own, "self": self_time}
