"""Compare evaluated models item by item: accuracy with bootstrap intervals, paired differences.

The ablation (ablate.py) evaluates several models on the same items; this module turns their
`results.jsonl` rows (eval_summary.EvalResult) into one row per (model, benchmark):

- accuracy and its 95% percentile-bootstrap interval (items resampled with replacement);
- the paired difference of accuracy against a reference model on the same items, with its 95%
  paired-bootstrap interval (the same resampled items for both models), and whether that
  interval excludes 0;
- mean model tokens, tool calls per trajectory, format-valid rate, and two flaw rates from
  flaws.py: the share of trajectories with a hedging phrase in the model's text, and the share
  with a repeated identical tool call.

"all" pools the benchmarks (every item once). Seeds: `bootstrap_seed` fixes the resampling, so a
table is reproducible from the same results.

Pure: no files, no models. Not here: running or evaluating models (ablate.py, evaluate.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

import numpy as np

from autotraj.eval_summary import EvalResult
from autotraj.flaws import hedges, prose, repeated_calls

ALL = "all"


@dataclass(frozen=True)
class Row:
    """One model on one benchmark (or "all")."""

    model: str
    benchmark: str
    n: int
    accuracy: float
    low: float  # 95% bootstrap interval of the accuracy
    high: float
    diff: float | None  # accuracy minus the reference model's on the same items
    diff_low: float | None  # 95% paired-bootstrap interval of `diff`
    diff_high: float | None
    mean_tokens: float
    tool_calls: float
    format_valid: float
    hedging: float  # share of trajectories whose model text holds a hedging phrase
    repeated_calls: float  # share of trajectories with a repeated identical tool call

    @property
    def significant(self) -> bool | None:
        """Whether the paired interval excludes 0 (None for the reference itself)."""
        if self.diff_low is None or self.diff_high is None:
            return None
        return self.diff_low > 0 or self.diff_high < 0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "significant": self.significant}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        """A row as `to_dict` wrote it (comparison.json); `significant` is derived again."""
        return cls(**{k: v for k, v in d.items() if k != "significant"})


HEADER = (
    "model",
    "benchmark",
    "n",
    "accuracy % [95% CI]",
    "vs reference, points [95% CI]",
    "tokens",
    "tool calls",
    "format valid %",
    "hedging %",
    "repeated calls %",
)


def row_cells(r: Row) -> list[str]:
    """The row's cells under HEADER, as the Markdown table and the HTML report show them."""
    versus = "reference"
    if r.diff is not None:
        mark = " *" if r.significant else ""
        versus = f"{100 * r.diff:+.1f} [{100 * r.diff_low:+.1f}, {100 * r.diff_high:+.1f}]{mark}"
    return [
        r.model,
        r.benchmark,
        str(r.n),
        f"{100 * r.accuracy:.1f} [{100 * r.low:.1f}, {100 * r.high:.1f}]",
        versus,
        f"{r.mean_tokens:.0f}",
        f"{r.tool_calls:.2f}",
        f"{100 * r.format_valid:.0f}",
        f"{100 * r.hedging:.0f}",
        f"{100 * r.repeated_calls:.0f}",
    ]


def sft_note(curve: dict[str, Any]) -> str:
    """One SFT variant's size, length and convergence (an entry of ablation/sft.json)."""
    return (
        f"{curve['records']} records, {curve['steps']} steps ({curve['epochs']:.1f} epochs), "
        f"final loss {curve['final_loss']:.3f}, "
        f"{'plateaued' if curve['converged'] else 'still falling'}"
    )


def bootstrap_interval(
    values: Sequence[float], samples: int, rng: np.random.Generator
) -> tuple[float, float]:
    """The 95% percentile interval of the mean of `values` over `samples` resamples.

    >>> bootstrap_interval([1.0] * 10, 100, np.random.default_rng(0))
    (1.0, 1.0)
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("bootstrap_interval: no values")
    idx = rng.integers(0, data.size, size=(samples, data.size))
    means = data[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_difference(
    a: Sequence[float], b: Sequence[float], samples: int, rng: np.random.Generator
) -> tuple[float, float, float]:
    """mean(a) - mean(b) over paired items and its 95% paired-bootstrap interval.

    >>> d, lo, hi = paired_difference([1, 1, 1, 0], [0, 0, 1, 0], 2000, np.random.default_rng(0))
    >>> d, lo <= d <= hi
    (0.5, True)
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired_difference: {x.size} and {y.size} items")
    idx = rng.integers(0, x.size, size=(samples, x.size))
    diffs = x[idx].mean(axis=1) - y[idx].mean(axis=1)
    return (
        float(x.mean() - y.mean()),
        float(np.percentile(diffs, 2.5)),
        float(np.percentile(diffs, 97.5)),
    )


def _hedged(result: EvalResult) -> bool:
    return bool(hedges(prose(result.trajectory.model_text)))


def compare(
    results: Mapping[str, Sequence[EvalResult]],
    reference: Mapping[str, str],
    samples: int = 2000,
    seed: int = 0,
) -> list[Row]:
    """Rows for every model (in `results` order) and benchmark, then "all".

    `reference[model]` names the model each one is compared with (a model compared with itself,
    or absent from `reference`, gets no difference). Every model must have results for the same
    item ids (the paired comparison needs them); a mismatch raises, naming the models.
    """
    ids = {m: {r.id for r in rows} for m, rows in results.items()}
    first = next(iter(results), None)
    for model, model_ids in ids.items():
        if first is not None and model_ids != ids[first]:
            raise ValueError(
                f"compare: {model} and {first} were evaluated on different items "
                f"({len(model_ids ^ ids[first])} differ)"
            )
    benchmarks = list(dict.fromkeys(r.benchmark for rows in results.values() for r in rows))
    rows: list[Row] = []
    for model, model_results in results.items():
        by_id = {r.id: r for r in model_results}
        ref_name = reference.get(model)
        ref = {r.id: r for r in results[ref_name]} if ref_name and ref_name != model else None
        for bench in [*benchmarks, ALL]:
            rng = np.random.default_rng(seed)
            items = sorted(i for i, r in by_id.items() if bench in (ALL, r.benchmark))
            mine = [by_id[i] for i in items]
            correct = [float(r.correct) for r in mine]
            low, high = bootstrap_interval(correct, samples, rng)
            diff = diff_low = diff_high = None
            if ref is not None:
                diff, diff_low, diff_high = paired_difference(
                    correct, [float(ref[i].correct) for i in items], samples, rng
                )
            rows.append(
                Row(
                    model=model,
                    benchmark=bench,
                    n=len(mine),
                    accuracy=fmean(correct),
                    low=low,
                    high=high,
                    diff=diff,
                    diff_low=diff_low,
                    diff_high=diff_high,
                    mean_tokens=fmean(r.tokens for r in mine),
                    tool_calls=fmean(r.tool_calls for r in mine),
                    format_valid=fmean(r.format_valid for r in mine),
                    hedging=fmean(_hedged(r) for r in mine),
                    repeated_calls=fmean(bool(repeated_calls(r.trajectory)) for r in mine),
                )
            )
    return rows


def render_markdown(rows: Sequence[Row], notes: Mapping[str, str] | None = None) -> str:
    """The rows as a Markdown table (percentages), one line per (model, benchmark).

    `notes[model]` adds a last column (e.g. the SFT variant's steps and whether it converged).
    """
    header = "| " + " | ".join(HEADER) + " |"
    if notes:
        header += " notes |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        line = "| " + " | ".join(row_cells(r)) + " |"
        if notes:
            line += f" {notes.get(r.model, '')} |"
        lines.append(line)
    return "\n".join(lines)
