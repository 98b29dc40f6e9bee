"""The training sets, as the build stage writes them: `SftRecord` (build/sft.jsonl) and
`PreferencePair` (build/preferences.jsonl), both holding chat `Message`s and the trajectories
behind them. The SFT, RM and RL trainers and the audit read them with the same `from_dict`.

Not here: building the sets (build.py) or rendering them into token ids (render.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from autotraj.records.core import Trajectory
from autotraj.records.fields import RecordError, literal, require
from autotraj.records.verdicts import RepairLabel

Role = Literal["system", "user", "assistant"]
# HQ candidates and accepted repairs form the SFT set; "AC-LQ" and "AW" (candidates as they
# were sampled) appear only in the ablation's baseline sets (`BuildConfig.extra_sets`).
SftSource = Literal["HQ", "repair:AC-LQ", "repair:AW", "AC-LQ", "AW"]


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "message") -> Message:
        role = literal(require(data, "role", str, where), Role, "role", where)
        return cls(role=role, content=require(data, "content", str, where))


def _messages(
    data: dict[str, Any], key: str, roles: tuple[str, ...], where: str
) -> tuple[Message, ...]:
    raw = require(data, key, list, where)
    messages = tuple(Message.from_dict(m, f"{where} {key}[{i}]") for i, m in enumerate(raw))
    if tuple(m.role for m in messages) != roles:
        raise RecordError(f"{where}: field '{key}' must hold roles {list(roles)}")
    return messages


@dataclass(frozen=True)
class SftRecord:
    """One SFT example: [system, user, assistant] and the trajectory behind the assistant turn.

    Train on `render.render_trajectory(tokenizer, record.question, record.trajectory)`, which
    keeps the generated token ids and masks tool results; `messages` is the same conversation
    as text, for tools that read chat records.
    """

    id: str
    query_id: str
    source: SftSource
    messages: tuple[Message, ...]
    trajectory: Trajectory

    @property
    def question(self) -> str:
        return self.messages[1].content

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "query_id": self.query_id,
            "source": self.source,
            "messages": [m.to_dict() for m in self.messages],
            "trajectory": self.trajectory.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SftRecord:
        where = f"sft record {data.get('id', '?') if isinstance(data, dict) else '?'}"
        messages = _messages(data, "messages", ("system", "user", "assistant"), where)
        trajectory = Trajectory.from_dict(require(data, "trajectory", dict, where))
        if messages[-1].content != trajectory.text:
            raise RecordError(f"{where}: the assistant message is not the trajectory's text")
        return cls(
            id=require(data, "id", str, where),
            query_id=require(data, "query_id", str, where),
            source=literal(require(data, "source", str, where), SftSource, "source", where),
            messages=messages,
            trajectory=trajectory,
        )


@dataclass(frozen=True)
class PreferencePair:
    """chosen = an accepted repair, rejected = its original, for the same prompt."""

    id: str
    query_id: str
    prompt: tuple[Message, ...]  # [system, user]
    chosen_trajectory: Trajectory
    rejected_trajectory: Trajectory
    label: RepairLabel  # the original's partition label
    chosen_score: float
    rejected_score: float

    @property
    def question(self) -> str:
        return self.prompt[1].content

    @property
    def chosen(self) -> str:
        return self.chosen_trajectory.text

    @property
    def rejected(self) -> str:
        return self.rejected_trajectory.text

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "query_id": self.query_id,
            "prompt": [m.to_dict() for m in self.prompt],
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_trajectory": self.chosen_trajectory.to_dict(),
            "rejected_trajectory": self.rejected_trajectory.to_dict(),
            "label": self.label,
            "chosen_score": self.chosen_score,
            "rejected_score": self.rejected_score,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreferencePair:
        where = f"preference pair {data.get('id', '?') if isinstance(data, dict) else '?'}"
        pair = cls(
            id=require(data, "id", str, where),
            query_id=require(data, "query_id", str, where),
            prompt=_messages(data, "prompt", ("system", "user"), where),
            chosen_trajectory=Trajectory.from_dict(require(data, "chosen_trajectory", dict, where)),
            rejected_trajectory=Trajectory.from_dict(
                require(data, "rejected_trajectory", dict, where)
            ),
            label=literal(require(data, "label", str, where), RepairLabel, "label", where),
            chosen_score=float(require(data, "chosen_score", (int, float), where)),
            rejected_score=float(require(data, "rejected_score", (int, float), where)),
        )
        for side in ("chosen", "rejected"):
            if require(data, side, str, where) != getattr(pair, side):
                raise RecordError(f"{where}: field '{side}' is not the {side} trajectory's text")
        return pair
