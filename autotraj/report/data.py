"""What the HTML report reads from a run directory, typed, with errors that name the file.

- `read_evals`: every `eval/<name>/summary.json` (the keys the results table shows) and the model
  lengths of its `results.jsonl` trajectories (`model_length`: what the model wrote, tool results
  excluded, in tokens when the segments have token ids, and in whitespace words).
- `read_curves`: (step, value) series of chosen keys of a stage's `metrics.jsonl`.
- `read_json`: a JSON object file; `stage_states`: which stages have finished, started, not run.

A malformed file raises `DataError` naming the file (and the line, for JSONL). Not here: what
the page shows (report/page.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotraj.io import DataError, read_jsonl
from autotraj.quality import QualityConfig, length_tokens, length_words
from autotraj.records import Trajectory, require

STAGES = ("synthesize", "score", "repair", "build", "sft", "rm", "rl")
EVAL_ORDER = ("base", "sft", "rl")  # then any other eval name, alphabetically
_MODEL_TEXT = QualityConfig(exclude_tool_results=True)
Length = tuple[int | None, int]  # (model tokens, or None without token ids; model words)


@dataclass(frozen=True)
class Metrics:
    """The summary.json metrics the results table shows."""

    n: int | None
    accuracy: float
    mean_tokens: float
    tool_calls: float  # per trajectory


@dataclass(frozen=True)
class EvalRun:
    """One `eval/<name>/` folder: its summary and the lengths of its trajectories."""

    name: str
    model: str
    benchmarks: dict[str, Metrics]
    average: Metrics
    lengths: tuple[Length, ...]  # empty when results.jsonl is absent


def model_length(t: Trajectory) -> Length:
    return length_tokens(t, _MODEL_TEXT), length_words(t, _MODEL_TEXT)


# ---------------------------------------------------------------------------------------------
# Reading


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e.reason})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _metrics(data: Any, path: Path, where: str) -> Metrics:
    if not isinstance(data, dict):
        raise DataError(f"{path}: {where} must be an object")
    values = {}
    for key in ("accuracy", "mean_tokens", "tool_calls_per_trajectory"):
        value = data.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DataError(f"{path}: {where}: '{key}' must be a number, got {value!r}")
        values[key] = float(value)
    n = data.get("n")
    return Metrics(
        n=n if isinstance(n, int) else None,
        accuracy=values["accuracy"],
        mean_tokens=values["mean_tokens"],
        tool_calls=values["tool_calls_per_trajectory"],
    )


def read_eval(folder: Path) -> EvalRun:
    path = folder / "summary.json"
    summary = read_json(path)
    benchmarks = summary.get("benchmarks")
    if not isinstance(benchmarks, dict):
        raise DataError(f"{path}: 'benchmarks' must be an object")
    lengths: list[Length] = []
    results = folder / "results.jsonl"
    if results.is_file():
        for lineno, row in read_jsonl(results):
            try:
                lengths.append(
                    model_length(Trajectory.from_dict(require(row, "trajectory", dict, "result")))
                )
            except (ValueError, TypeError, KeyError) as e:
                raise DataError(f"{results}:{lineno}: {e}") from e
    return EvalRun(
        name=str(summary.get("name") or folder.name),
        model=str(summary.get("model", "?")),
        benchmarks={str(b): _metrics(m, path, f"benchmarks.{b}") for b, m in benchmarks.items()},
        average=_metrics(summary.get("average"), path, "average"),
        lengths=tuple(lengths),
    )


def read_evals(run_dir: Path) -> list[EvalRun]:
    """Every `eval/<name>/summary.json`: base, sft, rl first, then the others by name."""
    folders = sorted(p.parent for p in (run_dir / "eval").glob("*/summary.json"))
    runs = [read_eval(f) for f in folders]
    rank = {name: i for i, name in enumerate(EVAL_ORDER)}
    return sorted(runs, key=lambda r: (rank.get(r.name, len(rank)), r.name))


def read_curves(path: Path, keys: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) per metric key of a metrics.jsonl, by step (a repeated step: the last row);
    NaN and infinite values (a diverged loss) are left out: no point at that step."""
    curves: dict[str, dict[int, float]] = {k: {} for k in keys}
    for lineno, row in read_jsonl(path):
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise DataError(f"{path}:{lineno}: 'step' must be an integer, got {step!r}")
        for key in keys:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                curves[key].pop(step, None)
                if math.isfinite(value):
                    curves[key][step] = float(value)
    return {k: sorted(v.items()) for k, v in curves.items() if v}


def stage_states(run_dir: Path) -> list[tuple[str, str]]:
    """(stage, "done" | "partial" | "missing"): done once its manifest.json is written."""
    states = []
    for stage in STAGES:
        folder = run_dir / stage
        done, started = (folder / "manifest.json").is_file(), folder.is_dir()
        states.append((stage, "done" if done else "partial" if started else "missing"))
    evals = sorted(p.parent.name for p in (run_dir / "eval").glob("*/summary.json"))
    states += [(f"eval {name}", "done") for name in evals] or [("eval", "missing")]
    return states
