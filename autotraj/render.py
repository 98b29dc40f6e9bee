"""The one rendering: chat messages -> token ids and a trainable mask, for every stage.

A trajectory is the assistant's reply to [system prompt, user question], rendered with the
model's own chat template (METHOD.md section 1). The prompt is never trainable; model-written
segments are; tool-result segments (`<result>...</result>`, tags included) never are; the
end-of-turn token is trainable when the model ended its turn (answer or eos).

Token-in, token-out: segments that carry the ids the generator produced are used as they are,
so re-rendering a trajectory gives exactly the ids the policy saw. Segments from text-only
backends (HTTP endpoints) are tokenized one segment at a time, which keeps every result span
separate from the model's tokens. Stored ids made by another tokenizer would be trained on
silently, so they are checked first (`check_token_ids`: `TokenizerMismatch`, a `DataError`).

Text to tokenize must be valid Unicode: a lone surrogate (possible in a Python str, e.g. from a
JSON "\\ud800" escape) raises `DataError` naming where it is, instead of the tokenizer's
TypeError. Any other string renders; model output is never parsed here, so tags in it (nested,
unclosed, forged <result> blocks) cannot move the mask, which follows the segments only.

Not here: generation (rollout.py) or loss computation (train/).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol

from autotraj.io import DataError
from autotraj.records import Trajectory


class TokenizerMismatch(DataError):
    """A trajectory's stored token ids were made by another tokenizer."""


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # no surrogate code point encodes to UTF-8


def check_text(text: str, where: str) -> str:
    """`text`, or a `DataError` if it holds a lone surrogate (no tokenizer can encode one)."""
    if not text.isascii() and (bad := _LONE_SURROGATE.search(text)):
        raise DataError(
            f"{where}: lone surrogate U+{ord(bad.group()):04X} at character {bad.start()}: "
            f"not valid Unicode text"
        )
    return text


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the renderer uses."""

    eos_token_id: int | None

    def __len__(self) -> int: ...

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
    for i, message in enumerate(messages):
        check_text(message["content"], f"message {i} ({message['role']})")
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


def check_token_ids(tokenizer: Tokenizer, trajectory: Trajectory) -> None:
    """Raise `TokenizerMismatch` unless the ids stored in `trajectory` can be this tokenizer's.

    Three checks that never fail for ids the tokenizer made: every id is in its vocabulary; the
    prompt ids are its own tokenization of their text (encode(decode(ids)) == ids, whatever the
    system prompt was); tool-result segments are its encoding of their text (rollout.py encodes
    them). Model-written ids are not re-encoded: a sampled tokenization need not be canonical.
    """
    size = len(tokenizer)
    where = f"trajectory {trajectory.id}"
    stored = [("prompt_ids", trajectory.prompt_ids)] + [
        (f"segments[{i}].token_ids", s.token_ids) for i, s in enumerate(trajectory.segments)
    ]
    for field, ids in stored:
        if ids and not 0 <= max(ids) < size:
            raise TokenizerMismatch(
                f"{where}: {field} holds id {max(ids)}, outside this tokenizer's {size} tokens: "
                f"the ids were made by another tokenizer"
            )
    prompt = list(trajectory.prompt_ids)
    if prompt:
        text = tokenizer.decode(prompt, clean_up_tokenization_spaces=False)
        if tokenizer.encode(text, add_special_tokens=False) != prompt:
            raise TokenizerMismatch(
                f"{where}: prompt_ids are not this tokenizer's tokenization of their own text: "
                f"they were made by another tokenizer"
            )
    for i, segment in enumerate(trajectory.segments):
        if segment.token_ids and not segment.trainable:
            ids = tuple(tokenizer.encode(segment.text, add_special_tokens=False))
            if ids != segment.token_ids:
                raise TokenizerMismatch(
                    f"{where}: segments[{i}].token_ids (a tool result) are not this "
                    f"tokenizer's encoding of the segment's text: made by another tokenizer"
                )


def render_trajectory(
    tokenizer: Tokenizer, question: str, trajectory: Trajectory, system_prompt: str | None = None
) -> RenderedTrajectory:
    """Render (question, trajectory) for training or scoring, with its trainable mask.

    Raises `TokenizerMismatch` when the trajectory's stored ids are not this tokenizer's.
    """
    check_token_ids(tokenizer, trajectory)
    prompt_ids = trajectory.prompt_ids or render_prompt(tokenizer, question, system_prompt)[1]
    ids: list[int] = list(prompt_ids)
    mask: list[bool] = [False] * len(prompt_ids)
    for i, segment in enumerate(trajectory.segments):
        seg_ids = segment.token_ids or tuple(
            tokenizer.encode(
                check_text(segment.text, f"trajectory {trajectory.id} segments[{i}].text"),
                add_special_tokens=False,
            )
        )
        ids.extend(seg_ids)
        mask.extend([segment.trainable] * len(seg_ids))
    if trajectory.finish_reason in ("answer", "eos"):
        ids.append(end_of_turn_id(tokenizer))
        mask.append(True)
    return RenderedTrajectory(
        input_ids=tuple(ids), trainable=tuple(mask), prompt_length=len(prompt_ids)
    )
