"""The benchmark scripts' interleaved timing: every variant once per repeat, in an order
that rotates each repeat, with each run's wall and CPU time."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from interleave import rotated, time_interleaved  # noqa: E402


def test_rotated_puts_each_name_first_in_turn():
    names = ["a", "b", "c"]
    assert [rotated(names, r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_time_interleaved_runs_each_variant_per_repeat_in_rotating_order():
    calls_made = []
    calls = {k: (lambda k=k: calls_made.append(k) or k.upper()) for k in "xyz"}
    outputs = {}
    wall, cpu = time_interleaved(calls, 3, outputs=outputs)
    assert calls_made == list("xyz" "yzx" "zxy")
    assert outputs == {"x": "X", "y": "Y", "z": "Z"}
    for k in "xyz":
        assert len(wall[k]) == len(cpu[k]) == 3
        assert all(w >= 0 for w in wall[k]) and all(c >= 0 for c in cpu[k])


def test_time_interleaved_uses_the_given_measure():
    seen = []

    def measure(fn):
        seen.append(fn)
        return fn(), 42.0, None

    wall, cpu = time_interleaved({"only": lambda: 7}, 2, measure=measure)
    assert wall == {"only": [42.0, 42.0]} and len(seen) == 2 and len(cpu["only"]) == 2
