"""Stage 2: grade and score every synthesized candidate, and label it HQ / AC-LQ / AW.

Reads `<run_dir>/synthesize/queries.jsonl` and `trajectories.jsonl`, grades each trajectory
against its query (grading.grade_trajectory, METHOD.md section 4), scores the candidates of each
query together (quality.score_group: L* = the group's shortest, METHOD.md section 5) and writes,
under `<run_dir>/score/`:

- `scores.jsonl`: one row per trajectory, in the order of trajectories.jsonl, with every
  component, so a reader sees why a trajectory was judged low quality:
  `records.ScoreRow`: `QualityScore.to_dict()` (trajectory_id, query_id, score, components,
  correct, label, flaws) plus `em`, `f1`, `extracted` (the answer the checker read), `words` (L)
  and `length_ref` (L*).
- `manifest.json` (counts per label, accuracy, input hashes) and `config.resolved.yaml`.

Pure and fast (no model, no tools): the output is written atomically in one go. Re-running with
the same config and the same inputs is a no-op; changed inputs are refused (run_dir.py's rule).

Not here: repairing low-quality trajectories (repair.py) or building training sets.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from autotraj.config import to_dict
from autotraj.grading import Checker, grade_trajectory
from autotraj.io import (
    DataError,
    check_same_config,
    write_jsonl_atomic,
    write_manifest,
)
from autotraj.quality import (
    QualityConfig,
    group_length_refs,
    length_words,
    score_group,
)
from autotraj.records import LABELS, Query, ScoreRow, Trajectory
from autotraj.run_dir import (
    check_same_inputs,
    finished_counts,
    load_synthesized,
    record_path,
    require_records,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreConfig:
    run_dir: str = "runs/default"
    # default: balanced \boxed{} + math equivalence; release: the authors' checker (grading.py)
    checker: Checker = "default"
    quality: QualityConfig = field(default_factory=QualityConfig)  # release weights/thresholds


def stage_dir(run_dir: str | Path) -> Path:
    return record_path(run_dir, "scores").parent


def score_rows(
    queries: dict[str, Query], trajectories: list[Trajectory], cfg: ScoreConfig
) -> list[ScoreRow]:
    """One row per trajectory (file order kept): score, components, grade and label."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        if t.finish_reason == "infra_error":
            raise DataError(f"trajectory {t.id}: infrastructure failure ({t.error}); not scorable")
        groups.setdefault(t.query_id, []).append(t)
    rows: dict[str, ScoreRow] = {}
    for query_id, group in tqdm(groups.items(), desc="score", unit="query"):
        grades = [grade_trajectory(t.text, queries[query_id], cfg.checker) for t in group]
        scores = score_group(group, [g.correct for g in grades], cfg.quality)
        words_ref, _ = group_length_refs(group, cfg.quality)
        for t, grade, score in zip(group, grades, scores, strict=True):
            rows[t.id] = ScoreRow(
                quality=score,
                em=grade.em,
                f1=grade.f1,
                extracted=grade.extracted,
                words=length_words(t, cfg.quality),
                length_ref=words_ref,
            )
    if len(rows) != len(trajectories):
        raise DataError("trajectories.jsonl holds duplicate trajectory ids")
    return [rows[t.id] for t in trajectories]


def summarize(rows: list[ScoreRow]) -> dict[str, Any]:
    scores = [row.quality for row in rows]
    labels = Counter(s.label for s in scores)
    correct = sum(s.correct for s in scores)
    return {
        "trajectories": len(rows),
        "queries": len({s.query_id for s in scores}),
        **{label: labels[label] for label in LABELS},
        "correct": correct,
        "accuracy": correct / len(rows) if rows else 0.0,
        "mean_score": sum(s.score for s in scores) / len(rows) if rows else 0.0,
    }


def run_score(cfg: ScoreConfig) -> dict[str, Any]:
    """Grade, score and label every synthesized trajectory; return the counts."""
    out_dir = stage_dir(cfg.run_dir)
    inputs = require_records(cfg.run_dir, ("queries", "trajectories"))
    check_same_config(out_dir, yaml.safe_dump(to_dict(cfg), sort_keys=True))
    check_same_inputs(out_dir, inputs)
    if (done := finished_counts(out_dir, [out_dir / "scores.jsonl"])) is not None:
        return done
    queries, trajectories = load_synthesized(inputs)
    rows = score_rows(queries, trajectories, cfg)
    write_jsonl_atomic(out_dir / "scores.jsonl", (row.to_dict() for row in rows))
    counts = summarize(rows)
    write_manifest(out_dir, stage="score", config=to_dict(cfg), inputs=inputs, counts=counts)
    log.info(
        "scored %d trajectories: %s",
        counts["trajectories"],
        ", ".join(f"{k} {counts[k]}" for k in LABELS),
    )
    return counts
