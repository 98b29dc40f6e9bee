"""Batched rollout engine vs one trajectory at a time, same queries, model and tools.

The authors' release advanced one query at a time; autotraj advances every active trajectory
together. Both sides here run the real embedded model (greedy) and the real Python sandbox over
the same GSM8K training questions, in one process, and the script prints trajectories/minute and
the ratio.

    python bench/bench_rollout.py [--n 16] [--max-new-tokens 256]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from autotraj.models.loading import GeneratorConfig, load_generator
from autotraj.querysets import load_queries
from autotraj.rollout import RolloutConfig, rollout
from autotraj.tools.toolbox import ToolsConfig, close_tools, open_tools

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "train" / "gsm8k_train.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=16, help="concurrent trajectories")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--queries", default=str(DATA))
    args = parser.parse_args()
    queries = load_queries(args.queries, limit=args.n)
    items = [(q.id, q) for q in queries]
    generator = load_generator(GeneratorConfig(batch_size=args.n))
    tools = open_tools(ToolsConfig())
    cfg = RolloutConfig(
        temperature=0.0,
        demonstrations=2,  # the embedded model follows the tag protocol only with examples
        max_new_tokens=args.max_new_tokens,
        max_response_tokens=args.max_new_tokens,
    )
    rollout(generator, tools, generator.tokenizer, items[:2], cfg)  # warm-up
    rows = []
    for label, batches in (("batched", [items]), ("one at a time", [[it] for it in items])):
        start = time.perf_counter()
        trajectories = [
            t
            for batch in batches
            for t in rollout(generator, tools, generator.tokenizer, batch, cfg)
        ]
        seconds = time.perf_counter() - start
        tokens = sum(len(s.token_ids) for t in trajectories for s in t.segments if s.trainable)
        calls = sum(len(t.tool_calls) for t in trajectories)
        rows.append((label, seconds, 60 * len(trajectories) / seconds, tokens / seconds, calls))
    close_tools(tools)
    print(
        f"{args.n} trajectories, greedy, <= {args.max_new_tokens} new tokens, model {generator.name}"
    )
    print(f"{'engine':<14} {'seconds':>8} {'traj/min':>9} {'gen tok/s':>10} {'tool calls':>10}")
    for label, seconds, per_min, tok_s, calls in rows:
        print(f"{label:<14} {seconds:8.1f} {per_min:9.1f} {tok_s:10.1f} {calls:10d}")
    print(f"ratio batched / one at a time: {rows[0][2] / rows[1][2]:.2f}x trajectories per minute")


if __name__ == "__main__":
    main()
