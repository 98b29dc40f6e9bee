"""Benchmark the local BM25 search tool on wiki_mini (2785 passages, 4300 real queries).

Measures: index build time; single-query latency (p50/p99) through `run_batch([q])`; throughput of
one `run_batch` over all queries vs one query at a time; how often BM25's top-1 is the passage the
dense e5 retriever returned (`doc_id`), and whether that passage is in BM25's top-5.
With PyStemmer importable it also measures an index built with the English stemmer.

    .venv/bin/python bench/bench_search.py [--data ../shared/data/corpus] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from autotraj.tools.search import Bm25Search, build_index

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(index_dir: Path, queries: list[str], gold: list[str], threads: int) -> dict[str, float]:
    t0 = time.perf_counter()
    tool = Bm25Search(index_dir, top_k=1, n_threads=threads)
    load_s = time.perf_counter() - t0
    tool.run_batch(queries[:20])  # warm the page cache and numpy
    single = []
    t0 = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        tool.run_batch([q])
        single.append(time.perf_counter() - t)
    one_at_a_time_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    calls = tool.run_batch(queries)
    batched_s = time.perf_counter() - t0
    assert len(calls) == len(queries)
    top5 = tool.retrieve(queries, k=5)
    tool.close()
    n = len(queries)
    return {
        "load_s": load_s,
        "p50_ms": 1000 * statistics.median(single),
        "p99_ms": 1000 * percentile(single, 99),
        "one_qps": n / one_at_a_time_s,
        "batch_qps": n / batched_s,
        "top1": sum(bool(r) and r[0].id == g for r, g in zip(top5, gold, strict=True)) / n,
        "top5": sum(g in {p.id for p in r} for r, g in zip(top5, gold, strict=True)) / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder with wiki_mini*.jsonl")
    parser.add_argument("--threads", type=int, default=0, help="bm25s threads per batch")
    args = parser.parse_args()
    corpus = args.data / "wiki_mini.jsonl"
    rows = [json.loads(line) for line in (args.data / "wiki_mini_queries.jsonl").open()]
    queries, gold = [r["query"] for r in rows], [str(r["doc_id"]) for r in rows]

    variants: list[str | None] = [None]
    try:
        import Stemmer  # noqa: F401  (optional: PyStemmer)

        variants.append("english")
    except ImportError:
        print("PyStemmer not installed: measuring the unstemmed index only")

    print(f"# bench_search: {platform.processor() or platform.machine()}, {len(queries)} queries")
    header = (
        "| stemmer | passages | build s | load s | p50 ms | p99 ms | 1-by-1 q/s | batch q/s "
        "| batch/1-by-1 | top-1 = dense | dense in top-5 |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for stemmer in variants:
            out = Path(tmp) / f"idx-{stemmer}"
            stats = build_index(corpus, out, stemmer=stemmer)
            m = measure(out, queries, gold, args.threads)
            print(
                f"| {stemmer or 'none'} | {stats['count']} | {stats['seconds']:.2f} | {m['load_s']:.3f} "
                f"| {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['one_qps']:.0f} | {m['batch_qps']:.0f} "
                f"| {m['batch_qps'] / m['one_qps']:.2f} | {m['top1']:.1%} | {m['top5']:.1%} |"
            )


if __name__ == "__main__":
    main()
