"""SFT/preference examples and collators: labels only on model-written tokens, never on the
prompt or inside <result>...</result>; token-in, token-out; padding."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PROV, traj

from autotraj.build import prompt_messages
from autotraj.io import write_jsonl_atomic
from autotraj.records import Message, PreferencePair, Segment, SftRecord, ToolCall, Trajectory
from autotraj.render import render_prompt
from autotraj.train.batches import (
    IGNORE_INDEX,
    pad_sequences,
    pad_sft,
    preference_example,
    preference_examples_from_file,
    sft_example,
    sft_examples_from_file,
)

SYSTEM = "Solve with tools. Put the answer in \\boxed{}."
HEDGE = "<think>maybe it is probably this, perhaps that, I might recheck, it seems likely</think>\n"


def question(i: int) -> str:
    return f"What is {i + 2}*{i + 3}?"


def make_trajectory(i: int, tid: str | None = None, noisy: bool = False) -> Trajectory:
    """A clean one-tool-call trajectory for query q{i}; `noisy`: hedging and long repetition."""
    a, b = i + 2, i + 3
    think = HEDGE * 2 if noisy else "<think>multiply</think>\n"
    return traj(
        f"{think}<code>\nprint({a}*{b})\n</code>",
        f"\n<result>\n{a * b}\n</result>\n",
        f"<answer>\\boxed{{{a * b}}}</answer>",
        tid=tid or f"q{i}/s0",
        qid=f"q{i}",
        calls=(ToolCall("python", f"print({a}*{b})", str(a * b), "ok", 0.01),),
    )


def write_sft_file(path: Path, count: int = 16) -> Path:
    rows = []
    for i in range(count):
        t = make_trajectory(i)
        messages = (*prompt_messages(question(i), SYSTEM), Message("assistant", t.text))
        rows.append(SftRecord(t.id, t.query_id, "HQ", messages, t).to_dict())
    write_jsonl_atomic(path, rows)
    return path


def write_preference_file(path: Path, count: int = 20) -> Path:
    rows = []
    for i in range(count):
        chosen = make_trajectory(i, f"q{i}/s0/r")
        rejected = make_trajectory(i, f"q{i}/s0", noisy=True)
        pair = PreferencePair(
            f"q{i}/s0/r", f"q{i}", prompt_messages(question(i), SYSTEM), chosen, rejected,
            "AC-LQ", 0.95, 0.6,
        )  # fmt: skip
        rows.append(pair.to_dict())
    write_jsonl_atomic(path, rows)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def trained_text(tokenizer, labels) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_labels_skip_prompt_and_results(tokenizer):
    t = make_trajectory(3)
    ex = sft_example(tokenizer, t.id, question(3), t, SYSTEM)
    text = trained_text(tokenizer, ex.labels)
    assert text == t.model_text + "<|im_end|>"
    assert "<result>" not in text and "</result>" not in text and question(3) not in text
    prompt_len = len(render_prompt(tokenizer, question(3), SYSTEM)[1])
    assert all(label == IGNORE_INDEX for label in ex.labels[:prompt_len])
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        assert label in (IGNORE_INDEX, token)
    # every token of the result span is masked, tags included
    result_ids = tokenizer.encode("\n<result>\n30\n</result>\n", add_special_tokens=False)
    start = next(
        i
        for i in range(len(ex.input_ids))
        if list(ex.input_ids[i : i + len(result_ids)]) == result_ids
    )
    assert all(label == IGNORE_INDEX for label in ex.labels[start : start + len(result_ids)])


def test_stored_token_ids_are_used_as_is(tokenizer):
    """Token-in, token-out: ids stored on a segment are trained on, not a re-tokenization."""
    t = make_trajectory(1)
    odd = tuple(tokenizer.encode("XYZ", add_special_tokens=False))
    first = Segment(t.segments[0].text, True, token_ids=odd)
    t2 = Trajectory(t.id, t.query_id, (first, *t.segments[1:]), t.tool_calls, "answer", PROV)
    ex = sft_example(tokenizer, t.id, question(1), t2, SYSTEM)
    assert trained_text(tokenizer, ex.labels).startswith("XYZ<answer>")


def test_truncation_keeps_start_and_drops_untrainable(tokenizer):
    t = make_trajectory(2)
    prompt_len = len(render_prompt(tokenizer, question(2), SYSTEM)[1])
    ex = sft_example(tokenizer, t.id, question(2), t, SYSTEM, max_length=prompt_len + 5)
    assert ex.truncated and len(ex.input_ids) == prompt_len + 5 and ex.trained_tokens == 5
    assert sft_example(tokenizer, t.id, question(2), t, SYSTEM, max_length=prompt_len) is None


def test_sft_file_and_padding(tokenizer, tmp_path):
    examples, counts = sft_examples_from_file(tokenizer, write_sft_file(tmp_path / "sft.jsonl", 4))
    assert counts == {"records": 4, "examples": 4, "truncated": 0, "dropped_no_trainable_token": 0}
    batch = pad_sft(examples, tokenizer.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, width)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == list(e.input_ids)
        assert batch["labels"][row, :n].tolist() == list(e.labels)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].sum() == n


def test_preference_examples(tokenizer, tmp_path):
    path = write_preference_file(tmp_path / "pairs.jsonl", 3)
    examples, counts, system = preference_examples_from_file(tokenizer, path)
    assert counts["examples"] == 3 and system == SYSTEM
    ex = examples[0]
    assert ex.chosen_ids[-1] == tokenizer.eos_token_id == ex.rejected_ids[-1]
    assert tokenizer.decode(ex.chosen_ids).startswith("<|im_start|>system\n" + SYSTEM)
    short = preference_example(
        tokenizer, "x", question(0), make_trajectory(0), make_trajectory(0, noisy=True),
        SYSTEM, max_length=len(ex.chosen_ids),
    )  # fmt: skip
    assert short is None  # the noisy side is longer: the pair is dropped, never cut
    batch = pad_sequences([ex.chosen_ids, ex.rejected_ids], tokenizer.pad_token_id)
    assert batch["attention_mask"][0].sum() == len(ex.chosen_ids)
