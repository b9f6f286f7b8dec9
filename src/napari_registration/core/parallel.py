"""Run a few independent pieces of work at once on the machine's cores.

OpenCV (detection, matching) and scipy.ndimage (warping) release the GIL inside their
C code, so plain Python threads run them in parallel. Each call starts its own short-lived
threads (the caller's thread runs one piece itself) instead of sharing a pool: a
registration running inside another pool's worker (``register_stack``, napari's
``thread_worker``) can then never wait on a pool its own caller is blocking.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Sequence

MAX_WORKERS = 8


def n_workers(threads: int = 0) -> int:
    """How many pieces to run at once: ``threads`` if positive, else the cores this
    process may use (at most :data:`MAX_WORKERS`)."""
    if threads and int(threads) > 0:
        return int(threads)
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(int(n), MAX_WORKERS))


def run_all(tasks: Sequence[Callable[[], object]]) -> list:
    """Call every zero-argument callable, at the same time, and return their results in
    order. The first exception (in task order) is re-raised after all have finished."""
    tasks = list(tasks)
    if len(tasks) <= 1:
        return [t() for t in tasks]
    results: list = [None] * len(tasks)
    errors: list = [None] * len(tasks)

    def run(i):
        try:
            results[i] = tasks[i]()
        except BaseException as err:  # re-raised in the caller's thread below
            errors[i] = err

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"napari-registration-{i}")
               for i in range(1, len(tasks))]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    for err in errors:
        if err is not None:
            raise err
    return results


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into at most ``parts`` contiguous, nearly equal ``(start, stop)``."""
    parts = max(1, min(int(parts), int(n)))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def spare_cores() -> bool:
    """Whether splitting one call's work over threads can pay: more than one core, and by
    the 1-minute load average one of them free. Callers give the same results either way;
    on the 2-core machine under load 3-6 such threads lengthened retina_affine's wall time
    by 7-12 % (the GIL hand-overs wait for a core), while with a free core the pieces run
    side by side (docs/benchmarks.md, "2D affine intensity speed, round 5")."""
    n = n_workers()
    if n < 2:
        return False
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return True
    return load < n - 0.5


def map_parts(fn: Callable[[object], object], items: Sequence, workers: int) -> list:
    """``[fn(item) for item in items]``, the items cut into at most ``workers`` contiguous
    runs that go through :func:`run_all` at once; the results in the items' order."""
    items = list(items)
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    done = run_all([lambda a=a, b=b: [fn(item) for item in items[a:b]]
                    for a, b in split(len(items), workers)])
    return [r for part in done for r in part]
