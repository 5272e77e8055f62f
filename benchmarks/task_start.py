"""What a task pays to start: a fresh interpreter vs a fork of a preloaded worker.

A task body imports the pipeline's stage modules and the libraries under them
(``pipeline.preload.MODULES``). Under Airflow's stock LocalExecutor each task is forked from
a worker that imported none of them, so each task imports them again; under
``plugins/pipeline_executor.PreloadingLocalExecutor`` the worker imported them once and the
task, forked from it, finds them in ``sys.modules``.

Measured in one run, interleaved, ``--repeats`` times each:

* **cold**: a fresh ``python -c 'import …'`` of those modules (what each task paid), wall s;
* **warm**: in a process that preloaded them, ``os.fork()``, the same imports in the child,
  and the child's exit, wall s (what each task pays now);
* the preloaded worker's RSS (the memory the preload costs per worker).

Reported: medians, ``ratio_warm_vs_cold`` (target ≤ 0.1) and the seconds saved by a task
that imports all of them (an upper bound: each task imports only what its stage needs).

    python -m benchmarks.task_start [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

from benchmarks._targets import finish, target


def cold_seconds(modules: tuple[str, ...]) -> float:
    code = f"import importlib\nfor m in {modules!r}: importlib.import_module(m)"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    return time.perf_counter() - t0


def warm_seconds(modules: tuple[str, ...]) -> float:
    import importlib

    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the task
        try:
            for m in modules:
                importlib.import_module(m)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from pipeline.preload import MODULES, preload

    cold = [cold_seconds(MODULES)]  # one before the preload: this process is still bare
    preload_s, failed = preload()
    assert not failed, failed
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    warm = []
    for _ in range(args.repeats):
        warm.append(warm_seconds(MODULES))
        if len(cold) < args.repeats:
            cold.append(cold_seconds(MODULES))
    c, w = statistics.median(cold), statistics.median(warm)
    result = {
        "bench": "task_start",
        "modules": len(MODULES),
        "cold_s_median": round(c, 3),
        "warm_s_median": round(w, 4),
        "ratio_warm_vs_cold": round(w / c, 4),
        # an upper bound per task: a real task imports only part of MODULES
        "saved_s_per_task_importing_all": round(c - w, 3),
        "preload_s": round(preload_s, 2),
        "preloaded_worker_rss_mb": round(rss_mb),
    }
    print(finish(result, [target("ratio_warm_vs_cold", result["ratio_warm_vs_cold"], "<=", 0.1)]))


if __name__ == "__main__":
    main()
