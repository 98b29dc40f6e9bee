"""The one rendering: chat messages -> token ids and a trainable mask, for every stage.

A trajectory is the assistant's reply to [system prompt, user question], rendered with the
model's own chat template (METHOD.md section 1). The prompt is never trainable; model-written
segments are; tool-result segments (`<result>...</result>`, tags included) never are; the
end-of-turn token is trainable when the model ended its turn (answer or eos).

Token-in, token-out: segments that carry the ids the generator produced are used as they are,
so re-rendering a trajectory gives exactly the ids the policy saw. Segments from text-only
backends (HTTP endpoints) are tokenized one segment at a time, which keeps every result span
separate from the model's tokens.

Not here: generation (rollout.py) or loss computation (train/).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol

from autotraj.records import Trajectory


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the renderer uses."""

    eos_token_id: int | None

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Any, **kwargs: Any) -> str: ...


@cache
def default_system_prompt() -> str:
    return (
        (resources.files("autotraj") / "prompts" / "system.txt").read_text(encoding="utf-8").strip()
    )


def chat_messages(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The conversation every stage sends: the protocol's system prompt, then the question."""
    system = default_system_prompt() if system_prompt is None else system_prompt
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


@cache
def _demonstrations() -> tuple[tuple[str, str, str], ...]:
    path = resources.files("autotraj") / "prompts" / "demonstrations.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return tuple((r["kind"], r["question"], r["reply"]) for r in rows)


def demonstration_messages(
    question: str, kind: str, count: int, system_prompt: str | None = None
) -> list[dict[str, str]]:
    """The standard conversation preceded by `count` worked examples as earlier chat turns.

    For a teacher that does not follow the tag protocol zero-shot (the embedded SmolLM2-135M,
    CPU-MEASUREMENTS.md section 2a). Only generation prompts use it: trajectories generated this
    way are trained and scored on the standard rendering (their `prompt_ids` stay empty).
    """
    demos = [d for d in _demonstrations() if d[0] == kind][:count]
    if len(demos) < count:
        raise ValueError(
            f"only {len(demos)} built-in demonstrations for kind '{kind}', asked {count}"
        )
    system, user = chat_messages(question, system_prompt)
    turns = [system]
    for _, demo_question, reply in demos:
        turns += [
            {"role": "user", "content": demo_question},
            {"role": "assistant", "content": reply},
        ]
    return [*turns, user]


def render_messages(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]]
) -> tuple[str, tuple[int, ...]]:
    """Any conversation rendered with the generation prompt: (text, token ids)."""
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return text, tuple(tokenizer.encode(text, add_special_tokens=False))


def render_prompt(
    tokenizer: Tokenizer, question: str, system_prompt: str | None = None
) -> tuple[str, tuple[int, ...]]:
    """The standard prompt (protocol system prompt + question): text and token ids."""
    return render_messages(tokenizer, chat_messages(question, system_prompt))


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has no eos token: cannot mark the end of the assistant turn"
        )
    return int(tokenizer.eos_token_id)


@dataclass(frozen=True)
class RenderedTrajectory:
    """Token ids of prompt + reply, with one trainable flag per id (prompt and results: False)."""

    input_ids: tuple[int, ...]
    trainable: tuple[bool, ...]
    prompt_length: int

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.trainable):
            raise ValueError("input_ids and trainable differ in length")


def render_trajectory(
    tokenizer: Tokenizer, question: str, trajectory: Trajectory, system_prompt: str | None = None
) -> RenderedTrajectory:
    """Render (question, trajectory) for training or scoring, with its trainable mask."""
    prompt_ids = trajectory.prompt_ids or render_prompt(tokenizer, question, system_prompt)[1]
    ids: list[int] = list(prompt_ids)
    mask: list[bool] = [False] * len(prompt_ids)
    for segment in trajectory.segments:
        seg_ids = segment.token_ids or tuple(
            tokenizer.encode(segment.text, add_special_tokens=False)
        )
        ids.extend(seg_ids)
        mask.extend([segment.trainable] * len(seg_ids))
    if trajectory.finish_reason in ("answer", "eos"):
        ids.append(end_of_turn_id(tokenizer))
        mask.append(True)
    return RenderedTrajectory(
        input_ids=tuple(ids), trainable=tuple(mask), prompt_length=len(prompt_ids)
    )
