"""Check the demo's claim on a finished run: after SFT and RL the policy is more accurate than the
base model and writes shorter trajectories.

    .venv/bin/python scripts/check_demo.py runs/cpu

Reads `<run_dir>/eval/{base,rl}/summary.json` (average accuracy, mean model tokens), prints the
comparison table and exits 1 when either claim fails (CI runs it after the demo).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autotraj.eval_summary import render_table
from autotraj.evaluate import load_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    summaries = {m: load_summary(args.run_dir / "eval" / m) for m in ("base", "sft", "rl")}
    print(render_table(list(summaries.values())))
    base, rl = summaries["base"]["average"], summaries["rl"]["average"]
    problems = []
    if not rl["accuracy"] > base["accuracy"]:
        problems.append(
            f"RL accuracy {rl['accuracy']:.3f} is not above base {base['accuracy']:.3f}"
        )
    if not rl["mean_tokens"] < base["mean_tokens"]:
        problems.append(
            f"RL mean tokens {rl['mean_tokens']:.1f} are not below base {base['mean_tokens']:.1f}"
        )
    for problem in problems:
        print(f"check_demo: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
