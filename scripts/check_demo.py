"""Check a finished demo run: the method did what it says (scripts/check_demo.py runs/cpu).

    .venv/bin/python scripts/check_demo.py runs/cpu

Prints the run's comparison table and one line per check of `autotraj.audit.audit_run` (clean
training data, repairs that are verified edits of their originals, a reward model above chance
and above random heads on held-out pairs, a policy that RL changed, an RL update that followed
the reward) and exits 1 when any fails. CI runs it after the
demo. It asserts no research outcome (that RL beats SFT, say): that could legitimately be null
and is measured, with intervals, by `autotraj ablate` (docs/ablation.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autotraj.audit import audit_run
from autotraj.eval_summary import render_table
from autotraj.evaluate import load_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    summaries = [load_summary(args.run_dir / "eval" / m) for m in ("base", "sft", "rl")]
    print(render_table(summaries))
    checks = audit_run(args.run_dir)
    for check in checks:
        print(f"check_demo: {'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
