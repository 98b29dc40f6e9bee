"""The one acceptance rule for every candidate repair (METHOD.md section 6): graded, scored
against its original (AC-LQ) or the threshold (AW), and rejected for any flaw (flaws.py).

Not here: how candidates are made (repair.py, edits.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from autotraj.flaws import flaws
from autotraj.grading import grade_trajectory
from autotraj.quality import length_words, score_one
from autotraj.records import (
    RepairAttempt,
    RepairHow,
    RepairLabel,
    Trajectory,
)

if TYPE_CHECKING:
    from autotraj.repair import RepairConfig, Target


def rejection_reason(
    label: RepairLabel,
    correct: bool,
    score: float,
    original_score: float | None,
    threshold: float,
    found: Sequence[str] = (),
) -> str:
    """Why a repair is rejected, or "" if it is accepted (METHOD.md section 6). `found`: the
    repair's flaws (flaws.flaws); any one rejects it.

    >>> rejection_reason("AW", True, 0.85, None, 0.8)
    ''
    >>> rejection_reason("AC-LQ", True, 0.88, 0.9, 0.86)
    'S 0.880 <= original 0.900'
    >>> rejection_reason("AW", True, 0.95, None, 0.8, ["hedging: 'maybe'"])
    "flaw: hedging: 'maybe'"
    """
    if found:
        return f"flaw: {'; '.join(found)}"
    if not correct:
        return "wrong answer"
    if score <= threshold:
        return f"S {score:.3f} <= {threshold:.2f}"
    if label == "AC-LQ" and original_score is not None and score <= original_score:
        return f"S {score:.3f} <= original {original_score:.3f}"
    return ""


def unscored(
    target: Target, trajectory: Trajectory, attempt: int, how: RepairHow, reason: str
) -> RepairAttempt:
    """A candidate rejected before grading (infrastructure failure, tool output changed)."""
    return RepairAttempt(attempt, how, trajectory, False, None, None, None, 0, (), reason)


def judge(
    target: Target, repair: Trajectory, attempt: int, how: RepairHow, cfg: RepairConfig
) -> RepairAttempt:
    """Grade and score one candidate repair of `target` and decide whether it is accepted."""
    if repair.finish_reason == "infra_error":
        return unscored(target, repair, attempt, how, f"infra error: {repair.error}")
    grade = grade_trajectory(repair.text, target.query, cfg.checker)
    q = cfg.quality
    original_s: float | None = None
    if target.label == "AC-LQ":  # L* = the shorter of the two, for both
        length_ref = min(length_words(target.original, q), length_words(repair, q))
        original_s = score_one(target.original, q, length_ref, correct=True).score
        threshold = cfg.accept_ac_lq
    else:  # AW: L* = itself
        length_ref, threshold = length_words(repair, q), cfg.accept_aw
    scored = score_one(repair, q, length_ref, correct=grade.correct)
    found = flaws(repair, q.hedging_words)
    reason = rejection_reason(
        target.label, grade.correct, scored.score, original_s, threshold, found
    )
    return RepairAttempt(
        attempt=attempt,
        how=how,
        trajectory=repair,
        correct=grade.correct,
        extracted=grade.extracted,
        score=scored.score,
        reference_score=original_s,
        length_ref=length_ref,
        components=scored.components,
        reason=reason,
    )
