"""Training examples and padded batches, built from the one rendering (render.render_trajectory).

- `sft_example`: (question, trajectory) -> `SftExample(input_ids, labels)`, where
  `labels[i] = input_ids[i]` if the token is trainable and -100 otherwise: the prompt and every
  tool-result token (`<result>...</result>`, tags included) never carry a label. Long examples
  keep their start (cut at `max_length`); one left without a trainable token is dropped.
- `preference_example`: (question, chosen, rejected) -> `PreferenceExample(chosen_ids,
  rejected_ids)`, the whole chat of each side (system + question + reply + end of turn), exactly
  what the reward model scores. Pairs longer than `max_length` are dropped, never cut: cutting
  would move the scored last token.
- `pad_sft`, `pad_sequences`: right-padding collators (labels padded with -100).
- `sft_examples_from_file`, `preference_examples_from_file`: the build stage's files -> examples.

Token-in, token-out: a trajectory's stored token ids are used as they are; the assistant text of
the chat records is never re-tokenized. Not here: the loss or the training loop (sft.py,
reward_model.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autotraj.records import Trajectory
from autotraj.render import RenderedTrajectory, Tokenizer, render_trajectory

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch cross-entropy default)


@dataclass(frozen=True)
class SftExample:
    id: str
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class PreferenceExample:
    id: str
    query_id: str
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]


def labels_from_rendering(rendered: RenderedTrajectory) -> tuple[int, ...]:
    """input_ids where trainable, IGNORE_INDEX elsewhere (prompt, tool results, padding).

    >>> r = RenderedTrajectory(input_ids=(5, 6, 7, 8), trainable=(False, True, False, True),
    ...                        prompt_length=1)
    >>> labels_from_rendering(r)
    (-100, 6, -100, 8)
    """
    return tuple(
        token if trainable else IGNORE_INDEX
        for token, trainable in zip(rendered.input_ids, rendered.trainable, strict=True)
    )


def sft_example(
    tokenizer: Tokenizer,
    example_id: str,
    question: str,
    trajectory: Trajectory,
    system_prompt: str | None = None,
    max_length: int | None = None,
) -> SftExample | None:
    """One SFT example (see the module docstring); None when nothing trainable is left."""
    rendered = render_trajectory(tokenizer, question, trajectory, system_prompt)
    ids, labels = rendered.input_ids, labels_from_rendering(rendered)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return SftExample(example_id, ids, labels, truncated)


def preference_example(
    tokenizer: Tokenizer,
    example_id: str,
    question: str,
    chosen: Trajectory,
    rejected: Trajectory,
    system_prompt: str | None = None,
    max_length: int | None = None,
) -> PreferenceExample | None:
    """One preference pair as token ids; None when a side is longer than `max_length`."""
    chosen_ids = render_trajectory(tokenizer, question, chosen, system_prompt).input_ids
    rejected_ids = render_trajectory(tokenizer, question, rejected, system_prompt).input_ids
    if max_length is not None and max(len(chosen_ids), len(rejected_ids)) > max_length:
        return None
    return PreferenceExample(example_id, chosen.query_id, chosen_ids, rejected_ids)


def sft_examples_from_file(
    tokenizer: Tokenizer, path: str | Path, max_length: int | None = None
) -> tuple[list[SftExample], dict[str, int]]:
    """The build stage's sft.jsonl as examples, plus counts (records, truncated, dropped)."""
    from autotraj.run_dir import load_sft_records

    records = load_sft_records(path)
    examples = []
    for record in records:
        example = sft_example(
            tokenizer,
            record.id,
            record.question,
            record.trajectory,
            system_prompt=record.messages[0].content,
            max_length=max_length,
        )
        if example is not None:
            examples.append(example)
    counts = {
        "records": len(records),
        "examples": len(examples),
        "truncated": sum(e.truncated for e in examples),
        "dropped_no_trainable_token": len(records) - len(examples),
    }
    if counts["truncated"] or counts["dropped_no_trainable_token"]:
        log.warning("%s at max_length=%s: %s", path, max_length, counts)
    return examples, counts


def preference_examples_from_file(
    tokenizer: Tokenizer, path: str | Path, max_length: int | None = None
) -> tuple[list[PreferenceExample], dict[str, int], str | None]:
    """The build stage's preferences.jsonl as examples, counts, and the shared system prompt
    (None when the pairs use different ones)."""
    from autotraj.run_dir import load_preference_pairs

    pairs = load_preference_pairs(path)
    examples = []
    for pair in pairs:
        example = preference_example(
            tokenizer,
            pair.id,
            pair.question,
            pair.chosen_trajectory,
            pair.rejected_trajectory,
            system_prompt=pair.prompt[0].content,
            max_length=max_length,
        )
        if example is not None:
            examples.append(example)
    counts = {"pairs": len(pairs), "examples": len(examples), "dropped_too_long": 0}
    counts["dropped_too_long"] = len(pairs) - len(examples)
    if counts["dropped_too_long"]:
        log.warning(
            "%s: %d pairs longer than %s dropped", path, counts["dropped_too_long"], max_length
        )
    systems = {p.prompt[0].content for p in pairs}
    return examples, counts, systems.pop() if len(systems) == 1 else None


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, Any]:
    """Right-padded `input_ids` and `attention_mask` tensors for a list of id sequences."""
    import torch

    if not sequences:
        raise ValueError("cannot pad an empty batch")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def pad_sft(examples: Sequence[SftExample | dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """A padded SFT batch: input_ids, attention_mask, and labels (-100 on padding)."""
    import torch

    rows = [
        e if isinstance(e, dict) else {"input_ids": e.input_ids, "labels": e.labels}
        for e in examples
    ]
    batch = pad_sequences([r["input_ids"] for r in rows], pad_id)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for i, r in enumerate(rows):
        labels[i, : len(r["labels"])] = torch.tensor(list(r["labels"]), dtype=torch.long)
    batch["labels"] = labels
    return batch
