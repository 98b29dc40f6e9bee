"""Load on the Python sandbox: thousands of mixed tool calls issued at once.

    python bench/bench_sandbox_load.py [--calls 2000] [--workers 4] [--timeout 0.5]

One `run_batch` with every call (a rollout issues a whole batch's calls the same way): fast
prints, slow calls (sleep or real work), calls that time out (busy loops and hangs) and calls
that crash (segfault, hard exit, exception, memory bomb). Checks every status against its
kind, that no snippet process outlives the batch and that the pool still answers, and exits
non-zero if any of these fails. Prints throughput, latency percentiles from submission
(queueing included), the sandbox's own per-call latency and the host memory used (peak RSS of
this process and its workers, sampled every 50 ms: reported, not checked).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from autotraj.tools.python_sandbox import PythonSandbox

# kind -> (share, snippets, expected status)
KINDS = {
    "fast": (0.5, ["print(1)", "print(sum(range(1000)))", "print(np.arange(5).sum())"], "ok"),
    "slow": (
        0.2,
        ["import time; time.sleep(0.2); print('s')", "print(sympy.factorint(2**64 + 1))"],
        "ok",
    ),
    "timeout": (0.15, ["while True: pass", "import time; time.sleep(60)"], "timeout"),
    "crash": (
        0.15,
        [
            "import ctypes; ctypes.string_at(0)",
            "import os; os._exit(3)",
            "raise RuntimeError('boom')",
            "x = bytearray(8 * 1024**3)",
        ],
        "error",
    ),
}


def make_calls(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    kinds = list(KINDS)
    weights = [KINDS[k][0] for k in kinds]
    picked = rng.choices(kinds, weights, k=n)
    return [(kind, rng.choice(KINDS[kind][1])) for kind in picked]


def tree_rss_mb(root: int) -> float:
    """RSS of `root` and its descendants, from /proc (MiB)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            statm = Path(f"/proc/{entry}/statm").read_text().split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    calls = make_calls(args.calls, args.seed)
    peak = {"rss": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["rss"] = max(peak["rss"], tree_rss_mb(os.getpid()))
            time.sleep(0.05)

    with PythonSandbox(workers=args.workers, timeout_s=args.timeout) as sandbox:
        idle_rss = tree_rss_mb(os.getpid())
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        done_at: list[float] = [0.0] * len(calls)
        start = time.perf_counter()
        futures = [sandbox.submit(code) for _, code in calls]
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _, i=i: done_at.__setitem__(i, time.perf_counter()))
        results = [future.result() for future in futures]
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        after = sandbox.run("print('alive')")
    time.sleep(0.2)
    leftovers = snippet_processes()

    wrong = Counter(
        f"{kind}->{r.status}"
        for (kind, _), r in zip(calls, results, strict=True)
        if r.status != KINDS[kind][2]
    )
    latencies = [t - start for t in done_at]
    own = [r.latency_s for r in results]
    by_kind = Counter(kind for kind, _ in calls)
    print(f"calls: {len(calls)} ({dict(by_kind)}), workers {args.workers}, timeout {args.timeout}s")
    print(f"wall {wall:.1f} s, throughput {len(calls) / wall:.1f} calls/s")
    p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
    print(f"from submission: p50 {p50:.2f} s, p99 {p99:.2f} s, max {max(latencies):.2f} s")
    p50, p99 = 1e3 * statistics.median(own), 1e3 * percentile(own, 0.99)
    print(f"sandbox's own latency per call: p50 {p50:.0f} ms, p99 {p99:.0f} ms")
    print(f"RSS of this process + workers: idle {idle_rss:.0f} MiB, peak {peak['rss']:.0f} MiB")
    print(f"wrong statuses: {dict(wrong) or 'none'}; pool after: {after.output!r}")
    print(f"snippet processes left: {len(leftovers)}")
    failed = bool(wrong) or after.output != "alive" or leftovers
    print("FAILED" if failed else "all checks passed")
    return 1 if failed else 0


def snippet_processes() -> list[int]:
    """Live processes running as a snippet uid (>= UID_BASE; used when the host runs as root)."""
    from autotraj.tools.sandbox_worker import UID_BASE

    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid >= UID_BASE:
                    found.append(int(entry))
            except OSError:
                continue
    return found


if __name__ == "__main__":
    sys.exit(main())
