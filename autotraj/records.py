"""Typed records that stages exchange through JSONL files.

Every record is a frozen dataclass with `to_dict()` and `from_dict()`; `from_dict` checks the
fields and raises `RecordError` naming the record and the field, so a bad line in a user's file
fails loudly at the boundary instead of deep inside a stage. Sequences are tuples so a record
can be hashed and never mutated after it is built.

Not here: reading or writing files (io.py), grading (grading.py), scoring (quality.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

TaskKind = Literal["math", "qa"]
ToolName = Literal["python", "search"]
# ok: the tool ran; error: the tool ran and reported an error (shown to the model);
# timeout: killed at its wall-clock limit; rejected: not executed (e.g. over the tool-call limit).
ToolStatus = Literal["ok", "error", "timeout", "rejected"]
# answer: closed an <answer> block; eos: end of turn without an answer; length: token budget;
# tool_limit: asked for a tool call beyond the limit; infra_error: a tool backend or generator
# failed (not the model's fault: never scored, retried on resume).
FinishReason = Literal["answer", "eos", "length", "tool_limit", "infra_error"]


class RecordError(ValueError):
    """A record (or a field of one) is malformed."""


def _require(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, got {type(data).__name__}")
    if key not in data:
        raise RecordError(f"{where}: missing field '{key}'")
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise RecordError(
            f"{where}: field '{key}' must be {_kind_name(kind)}, got {type(value).__name__}"
        )
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _optional(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """An optional field: None when absent or null, else checked like `_require`."""
    if isinstance(data, dict) and data.get(key) is None:
        return None
    return _require(data, key, kind, where)


def _numbers(data: dict[str, Any], key: str, kind: type, where: str) -> tuple[Any, ...] | None:
    """An optional list of ints (kind=int) or of numbers (kind=float), as a tuple."""
    values = _optional(data, key, list, where)
    if values is None:
        return None
    kinds = (int, float) if kind is float else (int,)
    if not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
        raise RecordError(f"{where}: field '{key}' must be a list of {kind.__name__}s")
    return tuple(values) if kind is int else tuple(float(v) for v in values)


def _literal(value: Any, literal: Any, key: str, where: str) -> Any:
    allowed = get_args(literal)
    if value not in allowed:
        raise RecordError(f"{where}: field '{key}' must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True)
class Query:
    """One training or evaluation question with its accepted answers (aliases for QA)."""

    id: str
    question: str
    answers: tuple[str, ...]
    kind: TaskKind
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "answers": list(self.answers),
            "kind": self.kind,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Query:
        where = f"query {data.get('id', '?') if isinstance(data, dict) else '?'}"
        answers = _require(data, "answers", list, where)
        if not all(isinstance(a, str) for a in answers):
            raise RecordError(f"{where}: field 'answers' must be a list of strings")
        return cls(
            id=str(_require(data, "id", (str, int), where)),
            question=_require(data, "question", str, where),
            answers=tuple(answers),
            kind=_literal(data.get("kind", "math"), TaskKind, "kind", where),
            source=str(data.get("source", "")),
        )


@dataclass(frozen=True)
class ToolCall:
    """One executed (or rejected) tool call and what the environment answered."""

    tool: ToolName
    input: str
    output: str
    status: ToolStatus
    latency_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "tool call") -> ToolCall:
        return cls(
            tool=_literal(_require(data, "tool", str, where), ToolName, "tool", where),
            input=_require(data, "input", str, where),
            output=_require(data, "output", str, where),
            status=_literal(_require(data, "status", str, where), ToolStatus, "status", where),
            latency_s=float(_optional(data, "latency_s", (int, float), where) or 0.0),
        )


@dataclass(frozen=True)
class Segment:
    """A contiguous piece of the assistant turn: model text (trainable) or a tool result (not).

    `token_ids` are the ids exactly as generated or appended (token-in, token-out); they may be
    empty when the backend returns text only (an HTTP endpoint), and the renderer then tokenizes
    this segment's text on its own.
    """

    text: str
    trainable: bool
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": self.text,
            "trainable": self.trainable,
            "token_ids": list(self.token_ids),
        }
        if self.logprobs is not None:
            out["logprobs"] = list(self.logprobs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "segment") -> Segment:
        return cls(
            text=_require(data, "text", str, where),
            trainable=_require(data, "trainable", bool, where),
            token_ids=_numbers(data, "token_ids", int, where) or (),
            logprobs=_numbers(data, "logprobs", float, where),
        )


@dataclass(frozen=True)
class Provenance:
    """Which generator produced a trajectory, and how (enough to reproduce the sampling)."""

    model: str
    backend: str
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None = None
    role: str = "policy"  # policy | teacher | repairer

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "provenance") -> Provenance:
        return cls(
            model=_require(data, "model", str, where),
            backend=_require(data, "backend", str, where),
            temperature=float(_require(data, "temperature", (int, float), where)),
            top_p=float(_require(data, "top_p", (int, float), where)),
            max_new_tokens=_require(data, "max_new_tokens", int, where),
            seed=_optional(data, "seed", int, where),
            role=str(data.get("role", "policy")),
        )


@dataclass(frozen=True)
class Trajectory:
    """One assistant reply to (system prompt, question): segments, tool calls and how it ended.

    `prompt_ids` are the chat-template ids of the prompt the generator saw (empty for text-only
    backends). `parent_id` links a repair to the trajectory it repairs.
    """

    id: str
    query_id: str
    segments: tuple[Segment, ...]
    tool_calls: tuple[ToolCall, ...]
    finish_reason: FinishReason
    provenance: Provenance
    prompt_ids: tuple[int, ...] = ()
    parent_id: str | None = None
    error: str = ""  # the infrastructure error message when finish_reason == "infra_error"
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def text(self) -> str:
        """The whole assistant turn as one string (model text and tool results)."""
        return "".join(s.text for s in self.segments)

    @property
    def model_text(self) -> str:
        """Only what the model wrote (tool results left out)."""
        return "".join(s.text for s in self.segments if s.trainable)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "query_id": self.query_id,
            "segments": [s.to_dict() for s in self.segments],
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "finish_reason": self.finish_reason,
            "provenance": self.provenance.to_dict(),
            "prompt_ids": list(self.prompt_ids),
            "parent_id": self.parent_id,
            "error": self.error,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        where = f"trajectory {data.get('id', '?') if isinstance(data, dict) else '?'}"
        segments = _require(data, "segments", list, where)
        calls = _require(data, "tool_calls", list, where)
        return cls(
            id=_require(data, "id", str, where),
            query_id=str(_require(data, "query_id", (str, int), where)),
            segments=tuple(
                Segment.from_dict(s, f"{where} segment {i}") for i, s in enumerate(segments)
            ),
            tool_calls=tuple(
                ToolCall.from_dict(c, f"{where} tool call {i}") for i, c in enumerate(calls)
            ),
            finish_reason=_literal(
                _require(data, "finish_reason", str, where), FinishReason, "finish_reason", where
            ),
            provenance=Provenance.from_dict(
                _require(data, "provenance", dict, where), f"{where} provenance"
            ),
            prompt_ids=_numbers(data, "prompt_ids", int, where) or (),
            parent_id=_optional(data, "parent_id", str, where),
            error=str(data.get("error", "")),
            # In file order (to_dict keeps the tuple's order), so a round trip is exact.
            extra=tuple(
                (str(k), str(v)) for k, v in (_optional(data, "extra", dict, where) or {}).items()
            ),
        )


RepairLabel = Literal["AC-LQ", "AW"]  # the partition labels that go to repair (quality.py)
# a deterministic edit, the repairer model's rewrite, or its continuation of a prefix of the original
RepairHow = Literal["first_pass", "model", "continue"]


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
        components = _require(data, "components", dict, where)
        if not all(isinstance(v, (int, float)) for v in components.values()):
            raise RecordError(f"{where}: field 'components' must map names to numbers")
        score = _optional(data, "repair_score", (int, float), where)
        reference = _optional(data, "original_score_same_ref", (int, float), where)
        return cls(
            attempt=_require(data, "attempt", int, where),
            how=_literal(_require(data, "how", str, where), RepairHow, "how", where),
            trajectory=Trajectory.from_dict(_require(data, "trajectory", dict, where)),
            correct=_require(data, "correct", bool, where),
            extracted=_optional(data, "extracted", str, where),
            score=None if score is None else float(score),
            reference_score=None if reference is None else float(reference),
            length_ref=_require(data, "length_ref", int, where),
            components=tuple((str(k), float(v)) for k, v in components.items()),
            reason=_require(data, "reason", str, where),
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
        earlier = _require(data, "rejected_attempts", list, where)
        return cls(
            original_id=_require(data, "original_id", str, where),
            query_id=str(_require(data, "query_id", (str, int), where)),
            label=_literal(_require(data, "label", str, where), RepairLabel, "label", where),
            original_score=float(_require(data, "original_score", (int, float), where)),
            final=RepairAttempt.from_dict(data, where),
            rejected=tuple(
                RepairAttempt.from_dict(a, f"{where} rejected attempt {i}")
                for i, a in enumerate(earlier)
            ),
        )
