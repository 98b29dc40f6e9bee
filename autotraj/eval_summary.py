r"""Evaluation results and their summary: one graded record per item, metrics, a comparison table.

- `EvalResult`: one (benchmark, question, seed) rollout, graded; a row of `results.jsonl`.
- `grade_result(trajectory, query, ...)`: grade a trajectory and measure it (pure except for
  tokenizing text-only segments).
- `benchmark_metrics(results)`: the `Metrics` of one benchmark and seed; `mean_metrics(parts, n)`:
  their unweighted mean (over seeds, or over benchmarks for the average).
- `summarize_results(results, benchmarks, seeds)`: the `benchmarks` and `average` sections of
  summary.json.
- `render_table(summaries)`: several models' summaries as a plain-text table.

Definitions. Lengths count what the model wrote, tool results excluded: `tokens` are the model's
tokens (the generated ids; text-only segments are tokenized on their own), `words` the whitespace
words of `Trajectory.model_text`; `total_tokens` adds the tool-result tokens. `accuracy` is the
fraction of correct answers (grading.py: math equivalence for math; for QA the benchmark's
official rule, `grading.qa_rule`: EM or F1 >= 0.5 under SQuAD's or HotpotQA's F1, EM alone for
the built-in multi-hop task). `em` / `f1` are that rule's metrics of the extracted answer (QA
only; None for math). The tool
error rate is the fraction of tool calls whose status is not "ok" (errors, timeouts, rejected),
pooled over the benchmark's trajectories (0.0 when none made a call). `format_valid` is the
release's format rule with a balanced `\boxed{}` (rewards.format_valid).

summary.json schema (what `evaluate.run_eval` writes; the HTML report reads it):

    name        str: label of the evaluated model ("base", "sft", "rl", ...)
    model       str: generator.model (an "embedded:" name, a local path or a Hub name)
    generator   dict: the resolved GeneratorConfig
    seeds       list[int]: rollout seeds; every metric is the mean over them
    decoding    dict: temperature, top_p, max_new_tokens, max_response_tokens, max_tool_calls,
                demonstrations, checker
    benchmarks  dict: benchmark name -> metrics (below) + "per_seed": {str(seed): metrics}
    average     metrics: unweighted mean over benchmarks (em/f1 over QA benchmarks only; n is the
                total number of questions; file_sha256 null) + "per_seed"
    sources     dict: benchmark name -> {path, split, kind, limit, sample_seed, file_sha256,
                queries_sha256, qa_rules}; queries_sha256 fingerprints the evaluated questions
                and gold answers (it identifies a Hub dataset's content, which has no file to
                hash); qa_rules lists the QA rule(s) its answers were graded with
    search_index dict | null: meta.json of the BM25 index used (corpus path and sha256)
    git_sha, versions: from the stage's manifest.json
    metrics     n (questions per seed), accuracy, em, f1 (QA, else null), mean_tokens,
                mean_total_tokens, mean_words, tool_calls_per_trajectory, tool_error_rate,
                format_valid_rate (fractions in [0, 1]), file_sha256 (null unless a local file)

Not here: running the rollouts, loading benchmarks or writing files (evaluate.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from autotraj.grading import Checker, grade_trajectory
from autotraj.records import FinishReason, Query, Segment, TaskKind, Trajectory
from autotraj.render import Tokenizer
from autotraj.rewards import format_valid


@dataclass(frozen=True)
class EvalResult:
    """One graded evaluation rollout (a row of results.jsonl)."""

    id: str  # "<benchmark>/<query id>/s<seed>"
    benchmark: str
    query_id: str
    seed: int
    question: str
    gold: tuple[str, ...]
    kind: TaskKind
    extracted: str | None
    correct: bool
    em: float | None  # QA only
    f1: float | None  # QA only
    tokens: int  # model tokens, tool results excluded
    total_tokens: int  # tool-result tokens included
    words: int  # whitespace words of the model's text
    tool_calls: int
    tool_errors: int
    tool_timeouts: int
    tool_rejected: int
    format_valid: bool
    finish_reason: FinishReason
    trajectory: Trajectory

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["gold"] = list(self.gold)
        out["trajectory"] = self.trajectory.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        values = {f.name: data[f.name] for f in dataclasses.fields(cls)}
        values["gold"] = tuple(values["gold"])
        values["trajectory"] = Trajectory.from_dict(values["trajectory"])
        return cls(**values)


def _tokens(segments: Sequence[Segment], tokenizer: Tokenizer) -> int:
    return sum(
        len(s.token_ids) if s.token_ids else len(tokenizer.encode(s.text, add_special_tokens=False))
        for s in segments
    )


def grade_result(
    trajectory: Trajectory,
    query: Query,
    benchmark: str,
    seed: int,
    tokenizer: Tokenizer,
    checker: Checker = "default",
) -> EvalResult:
    """Grade and measure one evaluation trajectory (see the module docstring for definitions)."""
    text = trajectory.text
    grade = grade_trajectory(text, query, checker)
    model_segments = [s for s in trajectory.segments if s.trainable]
    tokens = _tokens(model_segments, tokenizer)
    statuses = [c.status for c in trajectory.tool_calls]
    qa = query.kind == "qa"
    return EvalResult(
        id=trajectory.id,
        benchmark=benchmark,
        query_id=query.id,
        seed=seed,
        question=query.question,
        gold=query.answers,
        kind=query.kind,
        extracted=grade.extracted,
        correct=grade.correct,
        em=grade.em if qa else None,
        f1=grade.f1 if qa else None,
        tokens=tokens,
        total_tokens=tokens
        + _tokens([s for s in trajectory.segments if not s.trainable], tokenizer),
        words=len(trajectory.model_text.split()),
        tool_calls=len(statuses),
        tool_errors=statuses.count("error"),
        tool_timeouts=statuses.count("timeout"),
        tool_rejected=statuses.count("rejected"),
        format_valid=format_valid(text) == 1.0,
        finish_reason=trajectory.finish_reason,
        trajectory=trajectory,
    )


@dataclass(frozen=True)
class Metrics:
    """Metrics of one benchmark (and seed), or their mean; fractions in [0, 1]."""

    n: int
    accuracy: float
    em: float | None
    f1: float | None
    mean_tokens: float
    mean_total_tokens: float
    mean_words: float
    tool_calls_per_trajectory: float
    tool_error_rate: float
    format_valid_rate: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_MEANED = tuple(f.name for f in dataclasses.fields(Metrics) if f.name not in ("n", "em", "f1"))


def benchmark_metrics(results: Sequence[EvalResult]) -> Metrics:
    """Metrics of the results of one benchmark and one seed.

    >>> r = EvalResult("b/q/s0", "b", "q", 0, "?", ("1",), "math", "1", True, None, None, 10, 14,
    ...                4, 1, 1, 0, 0, True, "answer", None)
    >>> m = benchmark_metrics([r, dataclasses.replace(r, correct=False, tokens=20, tool_calls=0,
    ...                        tool_errors=0)])
    >>> m.accuracy, m.mean_tokens, m.tool_calls_per_trajectory, m.tool_error_rate
    (0.5, 15.0, 0.5, 1.0)
    """
    if not results:
        raise ValueError("benchmark_metrics: no results")
    qa = [r for r in results if r.kind == "qa"]
    calls = sum(r.tool_calls for r in results)
    failed = sum(r.tool_errors + r.tool_timeouts + r.tool_rejected for r in results)
    return Metrics(
        n=len(results),
        accuracy=fmean(r.correct for r in results),
        em=fmean(r.em or 0.0 for r in qa) if qa else None,
        f1=fmean(r.f1 or 0.0 for r in qa) if qa else None,
        mean_tokens=fmean(r.tokens for r in results),
        mean_total_tokens=fmean(r.total_tokens for r in results),
        mean_words=fmean(r.words for r in results),
        tool_calls_per_trajectory=calls / len(results),
        tool_error_rate=failed / calls if calls else 0.0,
        format_valid_rate=fmean(r.format_valid for r in results),
    )


def mean_metrics(parts: Sequence[Metrics], n: int) -> Metrics:
    """The unweighted mean of `parts` (em/f1 over the parts that have them), with count `n`."""
    if not parts:
        raise ValueError("mean_metrics: nothing to average")
    em = [p.em for p in parts if p.em is not None]
    f1 = [p.f1 for p in parts if p.f1 is not None]
    return Metrics(
        n=n,
        em=fmean(em) if em else None,
        f1=fmean(f1) if f1 else None,
        **{name: fmean(getattr(p, name) for p in parts) for name in _MEANED},
    )


def summarize_results(
    results: Sequence[EvalResult], benchmarks: Sequence[str], seeds: Sequence[int]
) -> dict[str, Any]:
    """{"benchmarks": {name: metrics + per_seed}, "average": metrics + per_seed}.

    A benchmark's metrics are the mean over seeds of its per-seed metrics; the average is the
    unweighted mean over benchmarks, per seed and overall. Every (benchmark, seed) needs results.
    """
    per: dict[tuple[str, int], list[EvalResult]] = {(b, s): [] for b in benchmarks for s in seeds}
    for r in results:
        per[(r.benchmark, r.seed)].append(r)
    empty = [key for key, rows in per.items() if not rows]
    if empty:
        raise ValueError(f"summarize_results: no results for (benchmark, seed) {empty[0]}")
    table = {key: benchmark_metrics(rows) for key, rows in per.items()}
    out: dict[str, Any] = {"benchmarks": {}}
    for b in benchmarks:
        by_seed = [table[(b, s)] for s in seeds]
        out["benchmarks"][b] = {
            **mean_metrics(by_seed, by_seed[0].n).to_dict(),
            "per_seed": {str(s): m.to_dict() for s, m in zip(seeds, by_seed, strict=True)},
        }
    total = sum(table[(b, seeds[0])].n for b in benchmarks)
    seed_averages = {s: mean_metrics([table[(b, s)] for b in benchmarks], total) for s in seeds}
    out["average"] = {
        **mean_metrics(list(seed_averages.values()), total).to_dict(),
        "per_seed": {str(s): m.to_dict() for s, m in seed_averages.items()},
    }
    return out


def render_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Several models' summary.json contents as a plain-text table, one row per model.

    Columns: accuracy (%) per benchmark (in first-seen order; "-" where a model lacks it), the
    average accuracy, mean model tokens and tool calls per trajectory (averaged over benchmarks).

    >>> s = {"name": "base", "benchmarks": {"gsm8k": {"accuracy": 0.125}},
    ...      "average": {"accuracy": 0.125, "mean_tokens": 240.0, "tool_calls_per_trajectory": 0.5}}
    >>> print(render_table([s]))
    model  gsm8k  average  tokens  tool calls
    base   12.5   12.5     240     0.50
    """
    names: list[str] = []
    for s in summaries:
        names.extend(b for b in s["benchmarks"] if b not in names)
    header = ["model", *names, "average", "tokens", "tool calls"]
    rows = [header]
    for s in summaries:
        bench = s["benchmarks"]
        avg = s["average"]
        rows.append(
            [
                str(s["name"]),
                *(f"{100 * bench[b]['accuracy']:.1f}" if b in bench else "-" for b in names),
                f"{100 * avg['accuracy']:.1f}",
                f"{avg['mean_tokens']:.0f}",
                f"{avg['tool_calls_per_trajectory']:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
