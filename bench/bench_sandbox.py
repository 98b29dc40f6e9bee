"""Latency and throughput of the Python sandbox pool vs a fresh interpreter per call.

    python bench/bench_sandbox.py [--calls 300] [--workers N]

Prints a table: p50/p99 latency of `print(1)` run one call at a time, and calls/s with the
pool's concurrency (one run_batch; the baseline runs the same number of subprocesses in a thread
pool of the same size). The baseline spawns `python -I -c CODE` with the sandbox's rlimits and
a new session; it does not import the prelude (that row is measured separately: ~0.5 s a call).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from autotraj.tools.python_sandbox import PythonSandbox

CODE = "print(1)"
PRELUDE = "import math, numpy as np, sympy\n"


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (10, 11))
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    os.setsid()


def fresh_call(code: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        timeout=5.0,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1"},
        preexec_fn=_limits,
        check=True,
    )
    return time.perf_counter() - start


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p99 * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    start = time.perf_counter()
    sandbox = PythonSandbox(workers=args.workers)
    startup_s = time.perf_counter() - start
    with sandbox:
        for _ in range(20):  # warm up
            sandbox.run(CODE)
        pool_lat = [sandbox.run(CODE).latency_s for _ in range(args.calls)]
        start = time.perf_counter()
        calls = sandbox.run_batch([CODE] * args.calls)
        pool_tput = args.calls / (time.perf_counter() - start)
        assert all(c.status == "ok" and c.output == "1" for c in calls)
        prelude_p50 = percentiles([sandbox.run(PRELUDE + CODE).latency_s for _ in range(50)])[0]

    fresh_lat = [fresh_call(CODE) for _ in range(args.calls)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as ex:
        list(ex.map(fresh_call, [CODE] * args.calls))
    fresh_tput = args.calls / (time.perf_counter() - start)
    fresh_prelude_p50 = percentiles([fresh_call(PRELUDE + CODE) for _ in range(10)])[0]

    pool_p50, pool_p99 = percentiles(pool_lat)
    fresh_p50, fresh_p99 = percentiles(fresh_lat)
    print(f"isolation: {sandbox.isolation}; workers={args.workers}; calls={args.calls}")
    print(f"pool startup: {startup_s:.2f} s")
    print(f"{'method':<34}{'p50 ms':>9}{'p99 ms':>9}{'calls/s':>10}")
    print(
        f"{'pool (fork per call, isolated)':<34}{pool_p50:>9.1f}{pool_p99:>9.1f}{pool_tput:>10.0f}"
    )
    print(
        f"{'fresh python -I -c + rlimits':<34}{fresh_p50:>9.1f}{fresh_p99:>9.1f}{fresh_tput:>10.0f}"
    )
    print(
        f"{'ratio fresh / pool':<34}{fresh_p50 / pool_p50:>9.1f}{fresh_p99 / pool_p99:>9.1f}"
        f"{pool_tput / fresh_tput:>10.1f}"
    )
    print(
        f"with the prelude imported: pool {prelude_p50:.1f} ms, fresh {fresh_prelude_p50:.0f} ms (p50)"
    )


if __name__ == "__main__":
    main()
