r"""Grade every benchmark gold answer against itself and against another item's gold.

For each file of ../shared/data/benchmarks/*.jsonl, every gold is wrapped as
`<answer>\boxed{gold}</answer>` and graded with the default checker:
- self-match: against its own query (must be 100%);
- cross-match: against the next item whose gold is genuinely different (must be 0%). For math,
  "different" means a different canonical string (case, spaces, `$`, `\text{}`, `\left`/`\right`,
  `\dfrac`, thin spaces removed); a pair the grader still calls equal is listed as a coincidence
  to review (e.g. "0.5" against "\frac12" would be a legitimate one). For QA, "different" means no
  normalized token in common between the two alias lists (then EM = F1 = 0 by definition, so any
  "correct" is a grader bug); items sharing tokens are skipped over.

    python bench/grade_gold.py [--data ../shared/data/benchmarks]

The release checker's rates are printed beside ours for comparison.

Structured golds (matrices, tuples and intervals, unions, sets, lists, complex numbers) of the
math files get three cross-item checks (`structure_report`), which catch a normalization that
breaks both sides of a comparison alike (a self-match cannot see it):
- distinct: every two golds of the same structure with different canonical strings must not
  grade equal (pairs checked by hand and found equal are listed in LEGITIMATE_PAIRS);
- respelled: each gold must equal itself written with other spacing (`(1,2)` / `(1, 2)`,
  `\\` / `\\ ` between matrix rows), so the exact-string shortcut cannot hide a parse failure;
- perturbed: each gold must not equal itself with its last number changed by one.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from autotraj.grading import grade_trajectory, math_equal, normalize_answer
from autotraj.records import Query

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"

_CANON_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\text\{|\\mbox\{|[\s${}]")


@dataclass(frozen=True)
class GoldReport:
    name: str
    items: int
    self_ok: int
    self_failures: tuple[str, ...]  # ids of items whose gold did not match itself
    cross_pairs: int
    cross_correct: tuple[tuple[str, str], ...]  # (id, other id) pairs graded correct
    release_self_ok: int
    release_cross_correct: int
    seconds: float


def load_queries(path: Path) -> list[Query]:
    queries = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "answers" in row:
            queries.append(Query(row["id"], row["question"], tuple(row["answers"]), "qa"))
        else:
            queries.append(Query(row["id"], row["question"], (row["answer"],), "math"))
    return queries


def _canonical(gold: str) -> str:
    return _CANON_DROP.sub("", gold.replace("\\dfrac", "\\frac")).lower().rstrip(".")


def _different(a: Query, b: Query) -> bool:
    if a.kind == "math":
        return _canonical(a.answers[0]) != _canonical(b.answers[0])
    tokens_a = {t for g in a.answers for t in normalize_answer(g).split()}
    tokens_b = {t for g in b.answers for t in normalize_answer(g).split()}
    return not tokens_a & tokens_b


def _other(queries: list[Query], i: int) -> Query | None:
    for k in range(1, len(queries)):
        other = queries[(i + k) % len(queries)]
        if _different(queries[i], other):
            return other
    return None


def wrap(gold: str) -> str:
    return f"<think>done</think>\n<answer>\\boxed{{{gold}}}</answer>"


def gold_report(path: Path) -> GoldReport:
    queries = load_queries(path)
    start = time.perf_counter()
    self_fail, cross_hits, pairs, rel_self, rel_cross = [], [], 0, 0, 0
    for i, q in enumerate(queries):
        text = wrap(q.answers[0])
        if not grade_trajectory(text, q).correct:
            self_fail.append(q.id)
        rel_self += grade_trajectory(text, q, checker="release").correct
        other = _other(queries, i)
        if other is None:
            continue
        pairs += 1
        other_text = wrap(other.answers[0])
        if grade_trajectory(other_text, q).correct:
            cross_hits.append((q.id, other.id))
        rel_cross += grade_trajectory(other_text, q, checker="release").correct
    return GoldReport(
        name=path.stem,
        items=len(queries),
        self_ok=len(queries) - len(self_fail),
        self_failures=tuple(self_fail),
        cross_pairs=pairs,
        cross_correct=tuple(cross_hits),
        release_self_ok=rel_self,
        release_cross_correct=rel_cross,
        seconds=time.perf_counter() - start,
    )


# ---------------------------------------------------------------------------------------------
# Cross-item checks on structured golds

MATH_FILES = ("math500", "gsm8k_test", "aime24", "aime25", "amc23")
# Distinct gold strings the grader calls equal, checked by hand: the same value.
LEGITIMATE_PAIRS = frozenset(
    {
        ("math500-25", "math500-456"),  # "1,-2" and "-2,1": the same two solutions
    }
)
_IMAGINARY = re.compile(r"(?<![\\A-Za-z])i(?![A-Za-z])")
_SEPARATOR = re.compile(r"\s*(\\\\|&|,)\s*")
_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)", re.DOTALL)


def structure_of(gold: str) -> str | None:
    """The structure of a math gold worth cross-checking, or None for a plain value."""
    s = gold.replace("\\left", "").replace("\\right", "").replace("{,}", "").strip()
    s = re.sub(r",\\!\s*", "", s)  # 10,\!080 is one number
    if "\\begin" in s:
        return "matrix"
    if "\\cup" in s or "\\infty" in s:
        return "union/unbounded interval"
    if s.startswith("\\{"):
        return "set"
    if re.match(r"^[\[(].*,.*[\])]$", s):
        return "tuple/interval"
    if _IMAGINARY.search(s):
        return "complex"
    if "," in s and not re.match(r"^\d{1,3}(,\d{3})+$", s):
        return "list"
    return None


def respell(gold: str) -> str:
    r"""The gold with other spacing around `,`, `&` and `\\`: the same answer, another string."""
    tight = _SEPARATOR.sub(r"\1", gold)
    return tight if tight != gold else _SEPARATOR.sub(r"\1 ", gold)


def perturb(gold: str) -> str:
    """The gold with its last number increased by one: another answer."""
    return _LAST_NUMBER.sub(lambda m: str(int(m.group(1)) + 1), gold, count=1)


@dataclass(frozen=True)
class StructureReport:
    golds: dict[str, int]  # structure -> distinct golds
    pairs: int
    equal_pairs: tuple[tuple[str, str], ...]  # distinct golds graded equal (either direction)
    respell_failures: tuple[str, ...]  # ids not equal to their respelled self
    perturb_hits: tuple[str, ...]  # ids equal to their perturbed self


def _structured(data: Path) -> dict[str, list[tuple[str, str]]]:
    groups: dict[str, dict[str, tuple[str, str]]] = {}
    for name in MATH_FILES:
        for q in load_queries(data / f"{name}.jsonl"):
            kind = structure_of(q.answers[0])
            if kind is not None:
                groups.setdefault(kind, {}).setdefault(
                    _canonical(q.answers[0]), (q.id, q.answers[0])
                )
    return {kind: list(golds.values()) for kind, golds in groups.items()}


def structure_report(data: Path = DATA) -> StructureReport:
    """The three cross-item checks (module docstring) over the structured math golds."""
    groups = _structured(data)
    equal, respelled, perturbed, pairs = [], [], [], 0
    for items in groups.values():
        for i, (id_a, a) in enumerate(items):
            if not math_equal(respell(a), a):
                respelled.append(id_a)
            if math_equal(perturb(a), a):
                perturbed.append(id_a)
            for id_b, b in items[i + 1 :]:
                pairs += 1
                if math_equal(a, b) or math_equal(b, a):
                    equal.append((id_a, id_b))
    return StructureReport(
        golds={kind: len(items) for kind, items in groups.items()},
        pairs=pairs,
        equal_pairs=tuple(equal),
        respell_failures=tuple(respelled),
        perturb_hits=tuple(perturbed),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    header = (
        f"{'file':<12} {'items':>5} {'self':>8} {'cross':>8} {'pairs':>5} "
        f"{'rel.self':>8} {'rel.cross':>9} {'s':>6}"
    )
    print(header)
    for path in sorted(args.data.glob("*.jsonl")):
        r = gold_report(path)
        print(
            f"{r.name:<12} {r.items:>5} {r.self_ok / r.items:>8.2%} "
            f"{len(r.cross_correct) / max(r.cross_pairs, 1):>8.2%} {r.cross_pairs:>5} "
            f"{r.release_self_ok / r.items:>8.2%} "
            f"{r.release_cross_correct / max(r.cross_pairs, 1):>9.2%} {r.seconds:>6.1f}"
        )
        for item in r.self_failures:
            print(f"  self-match FAILED: {item}")
        for a, b in r.cross_correct:
            print(f"  cross-match coincidence: {a} vs {b}")
    start = time.perf_counter()
    s = structure_report(args.data)
    print(
        f"structured math golds {s.golds}: {s.pairs} distinct pairs, "
        f"{time.perf_counter() - start:.1f} s"
    )
    for a, b in s.equal_pairs:
        print(
            f"  distinct golds graded equal: {a} vs {b}"
            + (" (legitimate)" if (a, b) in LEGITIMATE_PAIRS else "")
        )
    for item in s.respell_failures:
        print(f"  not equal to itself respelled: {item}")
    for item in s.perturb_hits:
        print(f"  equal to itself with a number changed: {item}")


if __name__ == "__main__":
    main()
