"""Interleaved timing for the benchmark scripts. Every variant runs once per repeat, in an
order that rotates each repeat, so no variant is always first, last or after the same one
(on a shared machine whose speed drifts between minutes, only such same-run figures compare),
and each run's wall time and CPU time (``time.process_time``: every thread of this process)
is kept for the caller's medians."""

from __future__ import annotations

import time
from typing import Callable


def rotated(names: list, r: int) -> list:
    """``names`` in the order of repeat ``r``: rotated by ``r`` places."""
    k = r % len(names)
    return names[k:] + names[:k]


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, *,
                     measure: Callable | None = None, outputs: dict | None = None):
    """Run each of ``calls`` (name -> zero-argument callable) ``repeats`` times,
    interleaved; returns ``(wall, cpu)``, each name -> list of seconds. ``measure(fn)``
    (e.g. the report's, which collects garbage first and returns ``(result, seconds, mb)``)
    replaces the plain wall-clock timing; the CPU time is the call's own either way.
    ``outputs`` (a dict) receives each variant's last result."""
    names = list(calls)
    wall: dict[str, list] = {k: [] for k in names}
    cpu: dict[str, list] = {k: [] for k in names}
    for r in range(repeats):
        for k in rotated(names, r):
            box = {}

            def timed(fn=calls[k]):
                c0 = time.process_time()
                try:
                    return fn()
                finally:
                    box["cpu"] = time.process_time() - c0

            if measure is None:
                t0 = time.perf_counter()
                out = timed()
                seconds = time.perf_counter() - t0
            else:
                out, seconds = measure(timed)[:2]
            wall[k].append(seconds)
            cpu[k].append(box["cpu"])
            if outputs is not None:
                outputs[k] = out
    return wall, cpu
