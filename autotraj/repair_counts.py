"""What the repair stage reports: its manifest's counts and its per-chunk metrics.

Pure functions of `records.Repair` rows (and the originals): `summarize` (manifest.json's counts:
per label to repair and accepted, hard cases and why, first-pass acceptances, how much of the
originals the accepted repairs keep, model attempts, infrastructure errors), `chunk_metrics`
(one metrics.jsonl line per chunk), `kept_measures` (edits.calls_kept, edits.similarity,
edits.from_original, averaged) and `reason_kind` (a rejection reason without its numbers).

Not here: repairing or judging (repair.py), reading the files (run_dir.py, io.py).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, get_args

from autotraj.edits import calls_kept, from_original, similarity
from autotraj.records import Repair, RepairLabel, Trajectory

REPAIR_LABELS: tuple[RepairLabel, ...] = get_args(RepairLabel)


def chunk_metrics(results: Sequence[Repair], seconds: float) -> dict[str, float]:
    attempts = [a for r in results for a in (*r.rejected, r.final)]
    values: dict[str, float] = {
        "repair/speed/repairs_per_min": 60 * len(results) / max(seconds, 1e-9),
        "repair/speed/seconds": seconds,
        "repair/attempts/model": sum(a.how == "model" for a in attempts),
        "repair/attempts/first_pass": sum(a.how == "first_pass" for a in attempts),
        "repair/attempts/continue": sum(a.how == "continue" for a in attempts),
        "repair/attempts/infra_error": sum(a.reason.startswith("infra error") for a in attempts),
        "repair/accept/first_pass": sum(
            r.accepted and r.final.how == "first_pass" for r in results
        ),
    }
    for label in REPAIR_LABELS:
        mine = [r for r in results if r.label == label]
        if mine:
            values[f"repair/accept/{label}_rate"] = sum(r.accepted for r in mine) / len(mine)
    return values


def summarize(
    accepted: Sequence[Repair],
    rejected: Sequence[Repair],
    targets: Sequence[tuple[RepairLabel, Trajectory]],
) -> dict[str, Any]:
    """The manifest's counts from the rows of repairs.jsonl (`accepted`) and hard_cases.jsonl
    (`rejected`) as read back from disk (so they are right after any number of resumes), and
    every (label, original) that was to be repaired."""
    attempts = [a for r in (*accepted, *rejected) for a in (*r.rejected, r.final)]
    to_repair = Counter(label for label, _ in targets)
    accepted_by = Counter(r.label for r in accepted)
    reasons = Counter(reason_kind(r.final.reason) for r in rejected)
    originals = {original.id: original for _, original in targets}
    return {
        "to_repair": {label: to_repair[label] for label in REPAIR_LABELS},
        "accepted": {label: accepted_by[label] for label in REPAIR_LABELS},
        "hard_cases": len(rejected),
        "hard_case_reasons": dict(sorted(reasons.items())),
        "first_pass_accepted": sum(r.final.how == "first_pass" for r in accepted),
        "kept": {
            label: kept_measures(
                [
                    (originals[r.original_id], r.final.trajectory)
                    for r in accepted
                    if r.label == label
                ]
            )
            for label in REPAIR_LABELS
        },
        "accepted_by": {
            how: {
                label: sum(r.final.how == how for r in accepted if r.label == label)
                for label in REPAIR_LABELS
            }
            for how in ("first_pass", "model", "continue")
        },
        "model_attempts": sum(a.how == "model" for a in attempts),
        "continue_attempts": sum(a.how == "continue" for a in attempts),
        "infra_errors": sum(a.reason.startswith("infra error") for a in attempts),
    }


def kept_measures(pairs: Sequence[tuple[Trajectory, Trajectory]]) -> dict[str, float | None]:
    """How much of its original an accepted repair keeps, averaged over (original, repair):
    the share of the original's tool calls it makes too (over originals that made any), the
    word-sequence similarity of what the two models wrote, and the share of the repair's words
    that the original wrote (edits.py)."""
    shares = [k for o, r in pairs if (k := calls_kept(o.tool_calls, r.tool_calls)) is not None]
    similarities = [similarity(o.model_text, r.model_text) for o, r in pairs]
    kept_words = [from_original(o.model_text, r.model_text) for o, r in pairs]
    return {
        "repairs": len(pairs),
        "calls_kept": sum(shares) / len(shares) if shares else None,
        "originals_with_calls": len(shares),
        "similarity": sum(similarities) / len(similarities) if similarities else None,
        "from_original": sum(kept_words) / len(kept_words) if kept_words else None,
    }


def reason_kind(reason: str) -> str:
    """A rejection reason without its numbers, for counting: 'S <= original', 'S <= 0.86' ..."""
    if reason.startswith("infra error"):
        return "infra error"
    if reason.startswith("flaw: "):
        return "flaw: " + reason.removeprefix("flaw: ").split(":")[0]
    return re.sub(r"original [0-9.]+", "original", re.sub(r"^S [0-9.]+", "S", reason))
