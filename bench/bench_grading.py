r"""Grading throughput on real benchmark answers: this grader against an older one from git.

The answers are the benchmarks' own golds (../shared/data/benchmarks): every math gold (MATH-500,
GSM8K, AIME 24/25, AMC 23; 1,919 items) is graded against its own query twice, once with the
next item's gold as the prediction (a wrong answer: a full parse and compare) and once with
itself respelled (other spacing around `,`, `&`, `\\`: the same answer, another string, so the
exact-string shortcut does not apply); every QA gold (HotpotQA, 2Wiki, MuSiQue, Bamboogle; 725
items) likewise against the next item's gold and itself. Both implementations grade the same
pairs in this one process, alternating, `repeats` times each after one untimed run each (best
run kept), in CPU seconds of this process (`time.process_time`); the memo of parsed answers is
emptied before every run, so each run parses every gold once and every prediction fresh.

The baseline is `autotraj/grading.py` as of `--baseline` (default: the commit before issue 14),
loaded from git into a throwaway module. The verdicts that differ between the two are counted.

    python bench/bench_grading.py [--baseline ac00f82] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

from autotraj import grading
from autotraj.records import Query

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "benchmarks"
MATH = ("math500", "gsm8k_test", "aime24", "aime25", "amc23")
QA = ("hotpotqa", "2wiki", "musique", "bamboogle")
BASELINE = "ac00f82"  # main before issue 14 (the grader with the `\\ ` and yes/no defects)


def baseline_grader(rev: str) -> ModuleType:
    """`autotraj/grading.py` at git revision `rev`, as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:autotraj/grading.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    spec = importlib.util.spec_from_loader(f"grading_{rev}", loader=None)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    exec(compile(source, f"{rev}:autotraj/grading.py", "exec"), module.__dict__)
    return module


def _load(name: str, source: str) -> list[Query]:
    queries = []
    for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "answers" in row:
            queries.append(Query(row["id"], "?", tuple(row["answers"]), "qa", source))
        else:
            queries.append(Query(row["id"], "?", (row["answer"],), "math", source))
    return queries


def pairs(names: tuple[str, ...]) -> list[tuple[str, Query]]:
    """(prediction, query): the next item's gold, and the item's own gold respelled."""
    sys.path.insert(0, str(ROOT / "bench"))
    from grade_gold import respell

    out = []
    for name in names:
        queries = _load(name, name)
        for i, q in enumerate(queries):
            out.append((queries[(i + 1) % len(queries)].answers[0], q))
            out.append((respell(q.answers[0]), q))
    return out


def timed(module: ModuleType, work: list[tuple[str, Query]]) -> tuple[float, list[bool]]:
    """CPU seconds of one run with an empty memo of parsed answers, and its verdicts."""
    module._parse_cached.cache_clear()
    start = time.process_time()
    verdicts = [module.grade_answer(pred, q).correct for pred, q in work]
    return time.process_time() - start, verdicts


def compare(
    old: ModuleType, new: ModuleType, work: list[tuple[str, Query]], repeats: int
) -> tuple[float, float, int]:
    """Best CPU seconds of each grader and the count of differing verdicts.

    The runs alternate (old, new, old, new, ...) after one untimed run of each, so sympy's own
    caches are equally warm for both."""
    timed(old, work), timed(new, work)
    best_old = best_new = float("inf")
    for _ in range(repeats):
        seconds, verdicts_old = timed(old, work)
        best_old = min(best_old, seconds)
        seconds, verdicts_new = timed(new, work)
        best_new = min(best_new, seconds)
    changed = sum(a != b for a, b in zip(verdicts_old, verdicts_new, strict=True))
    return best_old, best_new, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the old grader")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    old = baseline_grader(args.baseline)
    print(f"{'answers':<8} {'n':>5} {'grader':<16} {'CPU s':>7} {'answers/s':>10} {'changed':>8}")
    for label, names in (("math", MATH), ("qa", QA)):
        work = pairs(names)
        seconds_old, seconds_new, changed = compare(old, grading, work, args.repeats)
        for name, seconds in ((f"git {args.baseline}", seconds_old), ("this tree", seconds_new)):
            print(
                f"{label:<8} {len(work):>5} {name:<16} {seconds:>7.2f} "
                f"{len(work) / seconds:>10,.0f} {changed if name == 'this tree' else '':>8}"
            )


if __name__ == "__main__":
    main()
