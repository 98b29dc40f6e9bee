"""The verdicts on trajectories, as the score and repair stages write them: `QualityScore` and
`ScoreRow` (score/scores.jsonl), `RepairAttempt` and `Repair` (repair/repairs.jsonl and
repair/hard_cases.jsonl).

One schema per file: the stage that writes a row builds it from these classes (`to_dict`), and
every reader (build, show, the report) parses it with the same `from_dict`.

Not here: computing a score (quality.py) or a repair (repair.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from autotraj.records.core import Trajectory
from autotraj.records.fields import RecordError, literal, optional, require

Label = Literal["HQ", "AC-LQ", "AW"]  # the partition labels (quality.py)
LABELS: tuple[Label, ...] = get_args(Label)
RepairLabel = Literal["AC-LQ", "AW"]  # the partition labels that go to repair
# a deterministic edit, the repairer model's rewrite, or its continuation of a prefix of the original
RepairHow = Literal["first_pass", "model", "continue"]


@dataclass(frozen=True)
class QualityScore:
    """The score of one trajectory, its components (every dimension, in `DIMENSIONS` order) and
    its partition label."""

    trajectory_id: str
    query_id: str
    score: float
    components: tuple[tuple[str, float], ...]
    correct: bool
    label: Label
    flaws: tuple[str, ...] = ()  # flaws.flaws of the trajectory (why it cannot be HQ)

    def component(self, name: str) -> float:
        return dict(self.components)[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "trajectory_id": self.trajectory_id,
            "query_id": self.query_id,
            "score": self.score,
            "components": dict(self.components),
            "correct": self.correct,
            "label": self.label,
            "flaws": list(self.flaws),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityScore:
        where = f"quality score {data.get('trajectory_id', '?') if isinstance(data, dict) else '?'}"
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object")
        missing = [
            k
            for k in ("trajectory_id", "query_id", "score", "components", "correct", "label")
            if k not in data
        ]
        if missing:
            raise RecordError(f"{where}: missing field(s) {missing}")
        components = data["components"]
        if not isinstance(components, dict) or not all(
            isinstance(v, (int, float)) for v in components.values()
        ):
            raise RecordError(f"{where}: field 'components' must map names to numbers")
        if data["label"] not in get_args(Label):
            raise RecordError(f"{where}: field 'label' must be one of {get_args(Label)}")
        if not isinstance(data["correct"], bool):
            raise RecordError(f"{where}: field 'correct' must be a bool")
        found = data.get("flaws", [])
        if not isinstance(found, list) or not all(isinstance(f, str) for f in found):
            raise RecordError(f"{where}: field 'flaws' must be a list of strings")
        return cls(
            trajectory_id=str(data["trajectory_id"]),
            query_id=str(data["query_id"]),
            score=float(data["score"]),
            components=tuple((str(k), float(v)) for k, v in components.items()),
            correct=data["correct"],
            label=data["label"],
            flaws=tuple(found),
        )


@dataclass(frozen=True)
class ScoreRow:
    """One row of score/scores.jsonl, as the score stage writes it: the quality score, the
    answer's grade (`em`, `f1`, `extracted`: the answer the checker read) and the length `words`
    (L) with its group's reference `length_ref` (L*)."""

    quality: QualityScore
    em: float
    f1: float
    extracted: str | None
    words: int
    length_ref: int

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.quality.to_dict(),
            "em": self.em,
            "f1": self.f1,
            "extracted": self.extracted,
            "words": self.words,
            "length_ref": self.length_ref,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreRow:
        where = f"score {data.get('trajectory_id', '?') if isinstance(data, dict) else '?'}"
        return cls(
            quality=QualityScore.from_dict(data),
            em=float(require(data, "em", (int, float), where)),
            f1=float(require(data, "f1", (int, float), where)),
            extracted=optional(data, "extracted", str, where),
            words=require(data, "words", int, where),
            length_ref=require(data, "length_ref", int, where),
        )


@dataclass(frozen=True)
class RepairAttempt:
    """One candidate repair of a low-quality trajectory and the verdict on it (repair.py).

    `attempt` 0 is the deterministic first pass, 1..k the repairer model's attempts. `score` is
    the repair's S against `length_ref`; `reference_score` is the original's S against the same
    reference (AC-LQ only: the repair must beat it). Both are None, and `components` empty, when
    the attempt could not be scored (an infrastructure failure). `reason` is "" iff accepted.
    """

    attempt: int
    how: RepairHow
    trajectory: Trajectory
    correct: bool
    extracted: str | None
    score: float | None
    reference_score: float | None
    length_ref: int
    components: tuple[tuple[str, float], ...]
    reason: str

    @property
    def accepted(self) -> bool:
        return not self.reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "how": self.how,
            "accepted": self.accepted,
            "reason": self.reason,
            "correct": self.correct,
            "extracted": self.extracted,
            "repair_score": self.score,
            "original_score_same_ref": self.reference_score,
            "length_ref": self.length_ref,
            "components": dict(self.components),
            "trajectory": self.trajectory.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "repair attempt") -> RepairAttempt:
        components = require(data, "components", dict, where)
        if not all(isinstance(v, (int, float)) for v in components.values()):
            raise RecordError(f"{where}: field 'components' must map names to numbers")
        score = optional(data, "repair_score", (int, float), where)
        reference = optional(data, "original_score_same_ref", (int, float), where)
        return cls(
            attempt=require(data, "attempt", int, where),
            how=literal(require(data, "how", str, where), RepairHow, "how", where),
            trajectory=Trajectory.from_dict(require(data, "trajectory", dict, where)),
            correct=require(data, "correct", bool, where),
            extracted=optional(data, "extracted", str, where),
            score=None if score is None else float(score),
            reference_score=None if reference is None else float(reference),
            length_ref=require(data, "length_ref", int, where),
            components=tuple((str(k), float(v)) for k, v in components.items()),
            reason=require(data, "reason", str, where),
        )


@dataclass(frozen=True)
class Repair:
    """The outcome of repairing one AC-LQ or AW trajectory: one row of repairs.jsonl (accepted)
    or hard_cases.jsonl (not accepted).

    `final` is the accepted attempt, or the last rejected one for a hard case; `rejected` holds
    the earlier rejected attempts. `original_score` is the original's S from the score stage
    (its group's length reference). The row flattens `final` next to the original's fields.
    """

    original_id: str
    query_id: str
    label: RepairLabel
    original_score: float
    final: RepairAttempt
    rejected: tuple[RepairAttempt, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.final.accepted

    @property
    def trajectory(self) -> Trajectory:
        """The final attempt's trajectory: the accepted repair, or the last rejected one."""
        return self.final.trajectory

    @property
    def how(self) -> RepairHow:
        return self.final.how

    @property
    def reason(self) -> str:
        """Why the final attempt was rejected ("" for an accepted repair)."""
        return self.final.reason

    @property
    def repair_score(self) -> float | None:
        """The final attempt's S (None when it could not be scored)."""
        return self.final.score

    def to_dict(self) -> dict[str, Any]:
        return {
            "original_id": self.original_id,
            "query_id": self.query_id,
            "label": self.label,
            "original_score": self.original_score,
            **self.final.to_dict(),
            "rejected_attempts": [a.to_dict() for a in self.rejected],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Repair:
        where = f"repair of {data.get('original_id', '?') if isinstance(data, dict) else '?'}"
        earlier = require(data, "rejected_attempts", list, where)
        return cls(
            original_id=require(data, "original_id", str, where),
            query_id=str(require(data, "query_id", (str, int), where)),
            label=literal(require(data, "label", str, where), RepairLabel, "label", where),
            original_score=float(require(data, "original_score", (int, float), where)),
            final=RepairAttempt.from_dict(data, where),
            rejected=tuple(
                RepairAttempt.from_dict(a, f"{where} rejected attempt {i}")
                for i, a in enumerate(earlier)
            ),
        )
