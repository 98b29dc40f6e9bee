"""The measured CPU GRPO run of docs/rl.md: write arithmetic queries, print the per-step curves.

    .venv/bin/python bench/bench_grpo.py queries runs/rl-cpu/arith.jsonl --n 64
    .venv/bin/python -m autotraj.cli rl --config configs/cpu.yaml MEASURED_RUN (below, written out)
    .venv/bin/python bench/bench_grpo.py table runs/rl-cpu

The step-time comparison with TRL's GRPOTrainer lives in bench/bench_rl_vs_trl.py.

The questions are word problems of the kind the two built-in demonstrations show (products and
differences that a one-line `print(...)` answers), with seeded random numbers, so a 135M model
that copies the demonstrated tool use can get some right and RL has a signal to follow.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# The measured run: `configs/cpu.yaml`'s rl section with these overrides (until 2026-12-03 the
# file configs/rl_cpu.yaml, equal field by field; docs/rl.md "Commands").
MEASURED_RUN = (
    "run_dir=runs/rl-cpu",
    "queries=runs/rl-cpu/arith.jsonl",
    "steps=20",
    "save_every=10",
    "keep_checkpoints=2",
    "reward.rm_weight=0",
    "rollout.demonstrations=2",
    "rollout.max_new_tokens=64",
    "rollout.max_response_tokens=128",
    "tools.search.backend=none",
    "tools.search.index_dir=",
    "tools.python.workers=2",
    "rollout.system_prompt=Solve the problem. Think inside <think> </think>. Run Python inside "
    "<code> </code> and print the value; the result comes back inside <result> </result>. "
    "End with <answer>\\boxed{final answer}</answer>.",
)

TEMPLATES = (
    ("A crate holds {a} bottles. How many bottles are in {b} crates?", lambda a, b, c: a * b),
    (
        "Sam has {a} dollars and spends {b} dollars. How many dollars are left?",
        lambda a, b, c: a - b,
    ),
    (
        "A farm has {a} cows and buys {b} more, then sells {c}. How many cows now?",
        lambda a, b, c: a + b - c,
    ),
    ("What is {a} times {b}?", lambda a, b, c: a * b),
)


def write_queries(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text, answer = TEMPLATES[i % len(TEMPLATES)]
        a, b = rng.randint(12, 99), rng.randint(2, 11)
        c = rng.randint(1, b)
        question = text.format(a=a, b=b, c=c)
        rows.append({"id": f"arith-{i}", "question": question, "answer": str(answer(a, b, c))})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def print_table(run_dir: Path) -> None:
    cols = (
        ("rl/reward/mean", "reward"),
        ("rl/accuracy", "acc"),
        ("rl/format_rate", "format"),
        ("rl/tools/calls_per_trajectory", "calls"),
        ("rl/response_length", "resp_tok"),
        ("rl/entropy", "entropy"),
        ("rl/clip_fraction", "clip"),
        ("rl/time/step_s", "step_s"),
    )
    rows = [
        json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()
    ]
    sys.stdout.write("| step | " + " | ".join(name for _, name in cols) + " |\n")
    sys.stdout.write("|---" * (len(cols) + 1) + "|\n")
    for row in rows:
        cells = [f"{row.get(key, float('nan')):.3f}" for key, _ in cols]
        sys.stdout.write(f"| {row['step']} | " + " | ".join(cells) + " |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queries", help="write seeded arithmetic word problems as JSONL")
    q.add_argument("path", type=Path)
    q.add_argument("--n", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("table", help="print the per-step curves of an RL run as a Markdown table")
    t.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    if args.command == "queries":
        write_queries(args.path, args.n, args.seed)
    else:
        print_table(args.run_dir)


if __name__ == "__main__":
    main()
