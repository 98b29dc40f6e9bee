"""The records every stage shares: a query, and a trajectory with its segments, tool calls and
provenance (what synthesize, repair, rl and eval generate).

Not here: the verdicts on a trajectory (records/verdicts.py) or the training sets
(records/training.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from autotraj.records.fields import RecordError, literal, numbers, optional, require

TaskKind = Literal["math", "qa"]
ToolName = Literal["python", "search"]
# ok: the tool ran; error: the tool ran and reported an error (shown to the model);
# timeout: killed at its wall-clock limit; rejected: not executed (e.g. over the tool-call limit).
ToolStatus = Literal["ok", "error", "timeout", "rejected"]
# answer: closed an <answer> block; eos: end of turn without an answer; length: token budget;
# tool_limit: asked for a tool call beyond the limit; tool_errors: too many failed calls in a
# row (RolloutConfig.max_consecutive_invalid_calls); infra_error: a tool backend or generator
# failed (not the model's fault: never scored, retried on resume).
FinishReason = Literal["answer", "eos", "length", "tool_limit", "tool_errors", "infra_error"]


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
        answers = require(data, "answers", list, where)
        if not all(isinstance(a, str) for a in answers):
            raise RecordError(f"{where}: field 'answers' must be a list of strings")
        return cls(
            id=str(require(data, "id", (str, int), where)),
            question=require(data, "question", str, where),
            answers=tuple(answers),
            kind=literal(data.get("kind", "math"), TaskKind, "kind", where),
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
            tool=literal(require(data, "tool", str, where), ToolName, "tool", where),
            input=require(data, "input", str, where),
            output=require(data, "output", str, where),
            status=literal(require(data, "status", str, where), ToolStatus, "status", where),
            latency_s=float(optional(data, "latency_s", (int, float), where) or 0.0),
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
            text=require(data, "text", str, where),
            trainable=require(data, "trainable", bool, where),
            token_ids=numbers(data, "token_ids", int, where) or (),
            logprobs=numbers(data, "logprobs", float, where),
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
            model=require(data, "model", str, where),
            backend=require(data, "backend", str, where),
            temperature=float(require(data, "temperature", (int, float), where)),
            top_p=float(require(data, "top_p", (int, float), where)),
            max_new_tokens=require(data, "max_new_tokens", int, where),
            seed=optional(data, "seed", int, where),
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

    def text_only(self) -> Trajectory:
        """This trajectory without its token ids and sampler log-probs (prompt and segments):
        what a text-only backend would have stored. A model with another tokenizer than the
        generator's can train on it (the renderer encodes each segment's text with its own)."""
        segments = tuple(dataclasses.replace(s, token_ids=(), logprobs=None) for s in self.segments)
        return dataclasses.replace(self, segments=segments, prompt_ids=())

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
        segments = require(data, "segments", list, where)
        calls = require(data, "tool_calls", list, where)
        return cls(
            id=require(data, "id", str, where),
            query_id=str(require(data, "query_id", (str, int), where)),
            segments=tuple(
                Segment.from_dict(s, f"{where} segment {i}") for i, s in enumerate(segments)
            ),
            tool_calls=tuple(
                ToolCall.from_dict(c, f"{where} tool call {i}") for i, c in enumerate(calls)
            ),
            finish_reason=literal(
                require(data, "finish_reason", str, where), FinishReason, "finish_reason", where
            ),
            provenance=Provenance.from_dict(
                require(data, "provenance", dict, where), f"{where} provenance"
            ),
            prompt_ids=numbers(data, "prompt_ids", int, where) or (),
            parent_id=optional(data, "parent_id", str, where),
            error=str(data.get("error", "")),
            # In file order (to_dict keeps the tuple's order), so a round trip is exact.
            extra=tuple(
                (str(k), str(v)) for k, v in (optional(data, "extra", dict, where) or {}).items()
            ),
        )
