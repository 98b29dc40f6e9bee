"""Agreement of the grader with peers' grader tests and official scripts, per source.

Reads tests/data/grader_cases.jsonl (docs/grading.md describes it) and grades every row with this
tree's grader and with the grader of `--baseline` (loaded from git, as in bench_grading.py):
- math rows: `math_equal(pred, gold)` against the peer's expected verdict; rows where the
  peers contradict each other are counted apart and not in the agreement;
- QA rows: EM and F1 under the row's official rule against the script's own values (the
  baseline had one rule, SQuAD's, for every benchmark);
- release rows: the release checkers' verdict against the authors' code (the baseline had one
  reading of it, `checker="release"`, for both of their checkers).

    python bench/grader_agreement.py [--baseline ac00f82] [--show-disagreements]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from types import ModuleType

from bench_grading import BASELINE, baseline_grader

from autotraj import grading
from autotraj.records import Query

CASES = Path(__file__).resolve().parents[1] / "tests" / "data" / "grader_cases.jsonl"


def agrees(module: ModuleType, case: dict, baseline: bool) -> bool:
    """Whether `module` grades one row of the table as its source does."""
    if case["kind"] == "math":
        return module.math_equal(case["pred"], case["gold"]) is case["equal"]
    if case["kind"] == "qa":
        em = float(module.exact_match(case["pred"], case["golds"]))
        f1 = (
            module.token_f1(case["pred"], case["golds"])
            if baseline
            else module.qa_f1(case["pred"], case["golds"], case["rule"])
        )
        return em == case["em"] and abs(f1 - case["f1"]) < 1e-6
    kind = "qa" if case["task"] == "qa" else "math"
    query = Query(id="r", question="?", answers=tuple(case["golds"]), kind=kind)
    checker = "release" if baseline else case["checker"]
    return module.grade_trajectory(case["text"], query, checker).correct is case["correct"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old grader")
    parser.add_argument("--show-disagreements", action="store_true")
    args = parser.parse_args()
    cases = [json.loads(line) for line in CASES.read_text(encoding="utf-8").splitlines()]
    old = baseline_grader(args.baseline)
    table: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for case in cases:
        row = table[(case["kind"], case["source"])]
        if case.get("contradiction"):
            row[3] += 1
            continue
        row[0] += 1
        row[1] += agrees(old, case, baseline=True)
        now = agrees(grading, case, baseline=False)
        row[2] += now
        if args.show_disagreements and not now:
            print(f"disagrees: {case['id']} {case}")
    print(f"| kind | source | cases | git {args.baseline} | this tree | left out |")
    print("|---|---|---:|---:|---:|---:|")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for (kind, source), (n, before, after, out) in sorted(table.items()):
        print(f"| {kind} | {source} | {n} | {before / n:.1%} | {after / n:.1%} | {out} |")
        for i, value in enumerate((n, before, after, out)):
            totals[kind][i] += value
    for kind, (n, before, after, out) in totals.items():
        print(f"| {kind} | **all** | {n} | {before / n:.1%} | {after / n:.1%} | {out} |")


if __name__ == "__main__":
    main()
