"""One decode step's attention per layer with a shared prefix held once or kept in every row.

The fast step (models/decode_step.py, `_attention`) can hold a prefix every row shares once:
each row's query heads attend to it in one product for all rows and to the row's own columns
separately, under one softmax. That saves reading the prefix in every row but costs a few
operations per layer; `decoding._MIN_HELD` is the prefix length from which it pays. This times
`_attention` itself, in the shapes of the embedded SmolLM2-135M (3 key/value heads of 3 query
heads, head dim 64), for prefix lengths up to a rollout's system prompt and worked examples
(459 tokens), both ways, on random numbers (the time does not depend on them):

    .venv/bin/python bench/bench_held_attention.py --rows 64 --own 300

Results: docs/models.md ("Generation speed on CPU").
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from autotraj.models import decode_step
from autotraj.models.cpu_bf16 import cpu_dtype


def _timed(fn, repeats: int) -> float:
    """Median milliseconds of `repeats` calls after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--own", type=int, default=300, help="each row's own columns")
    parser.add_argument("--lengths", default="16,24,32,48,64,128,256,459")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    dtype = cpu_dtype(getattr(torch, args.dtype), "cpu", "bench_held_attention")
    kv_heads, groups, dim = 3, 3, 64
    scale = dim**-0.5
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    q = randn(args.rows, kv_heads, groups, dim)
    room = 128  # the own columns are the written part of a buffer, as in decoding
    keys, values = (
        randn(args.rows, kv_heads, args.own + room, dim),
        randn(args.rows, kv_heads, args.own + room, dim),
    )
    own_k, own_v = keys[:, :, : args.own], values[:, :, : args.own]
    own_mask = torch.zeros(args.rows, 1, 1, args.own)
    print(f"dtype {dtype}, {torch.get_num_threads()} threads, rows {args.rows}, own {args.own}")
    results = []
    for length in (int(x) for x in args.lengths.split(",")):
        held = (randn(1, kv_heads, length, dim), randn(1, kv_heads, length, dim))
        every_k, every_v = (
            torch.cat([p.expand(args.rows, -1, -1, -1), x], dim=2)
            for p, x in zip(held, (own_k, own_v), strict=True)
        )
        every_mask = torch.zeros(args.rows, 1, 1, length + args.own)
        a = decode_step._attention(q, own_k, own_v, own_mask, scale, held)
        b = decode_step._attention(q, every_k, every_v, every_mask, scale)
        error = (a.float() - b.float()).abs().max().item()
        in_rows = _timed(
            lambda k=every_k, v=every_v, m=every_mask: decode_step._attention(q, k, v, m, scale),
            args.repeats,
        )
        once = _timed(
            lambda held=held: decode_step._attention(q, own_k, own_v, own_mask, scale, held),
            args.repeats,
        )
        row = {
            "prefix": length,
            "in_every_row_ms": round(in_rows, 3),
            "held_once_ms": round(once, 3),
            "held_over_in_rows": round(once / in_rows, 2),
            "max_abs_difference": error,
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'prefix':>6} {'in rows ms':>10} {'held ms':>8} {'held/rows':>9}")
    for r in results:
        print(
            f"{r['prefix']:>6} {r['in_every_row_ms']:>10.3f} {r['held_once_ms']:>8.3f} "
            f"{r['held_over_in_rows']:>9.2f}"
        )


if __name__ == "__main__":
    main()
