"""edits.py: whole-sentence and whole-clause edits, repeated steps dropped, keep measures."""

from __future__ import annotations

import pytest
from conftest import traj

from autotraj.edits import (
    Steps,
    calls_kept,
    clean_piece,
    clean_sentence,
    drop_repeated,
    edit,
    similarity,
    steps_of,
    steps_of_text,
)
from autotraj.flaws import flaws, fragments
from autotraj.records import ToolCall

RESULT = "\n<result>\n42\n</result>\n"


@pytest.mark.parametrize(
    ("sentence", "edited"),
    [
        ("The total is 42.", "The total is 42."),  # nothing to do
        ("Hmm, the total is 42.", "The total is 42."),
        ("I think the total is 42.", "The total is 42."),
        ("It seems that Ada was born in Rome.", "Ada was born in Rome."),
        (
            "The bill is the price times the count, I guess?",
            "The bill is the price times the count.",
        ),
        ("The total is 42, I think.", "The total is 42."),
        ("That is probably the right passage.", "That is the right passage."),
        ("I should probably let Python do it.", "I should let Python do it."),
        ("Maybe I should search for Rome next.", "I should search for Rome next."),
        ("This might be 42, but I am not sure.", None),  # hedges through: goes whole
        ("That seems right, maybe.", None),
        ("It seems fine, I guess, so I will go with 42.", None),
        ("I guess?", None),  # nothing left
        ("It is likely that Rome is right.", None),  # "likely" is no adverb to drop here
    ],
)
def test_clean_sentence(sentence, edited):
    assert clean_sentence(sentence) == edited


@pytest.mark.parametrize(
    "sentence",
    [
        "Hmm, I think this might be 8056020 + 1679215 - 371493, but I am not sure.",
        "It prints 9363742. I think that is probably the answer, but maybe I misread it.",
        "It seems fine, I guess, so I will go with 9363742.",
    ],
)
def test_an_edit_never_leaves_a_fragment(sentence):
    piece = clean_piece(f"<think>The plan is simple. {sentence}</think>")
    assert piece is not None and fragments(piece) == []


def test_a_block_left_empty_means_the_edit_does_not_apply():
    assert clean_piece("<think>Maybe 42, I am not sure.</think>\n<answer>x</answer>") is None
    assert clean_piece("<think>Add.</think>\n<code>\nprint(1)\n</code>") == (
        "<think>Add.</think>\n<code>\nprint(1)\n</code>"
    )


def test_drop_repeated_takes_the_whole_step():
    steps = Steps(
        (
            "<think>Look.</think><search>Ada</search>",
            "<think>Again.</think><search> Ada </search>",
            "<think>Then Rome.</think><search>Rome</search>",
            "<answer>x</answer>",
        ),
        ("R1", "R2", "R3"),
    )
    kept, dropped = drop_repeated(steps)
    assert dropped == [1]
    assert kept.pieces == (steps.pieces[0], steps.pieces[2], steps.pieces[3])
    assert kept.results == ("R1", "R3")


def test_steps_of_text_inverts_text():
    text = f"<think>a</think><code>1</code>{RESULT}<think>b</think><answer>c</answer>"
    assert steps_of_text(text).text() == text


def test_edit_keeps_calls_and_results_and_drops_repeats():
    call = ToolCall("python", "print(6*7)", "42", "ok")
    original = traj(
        "<think>Perhaps multiply.</think><code>print(6*7)</code>",
        RESULT,
        "<think>Let me recheck it.</think><code>print(6*7)</code>",
        RESULT,
        "<think>It is probably 42.</think><answer>\\boxed{42}</answer>",
        calls=(call, call),
    )
    fixed = edit(original)
    assert fixed is not None and flaws(original) and flaws(fixed) == ()
    assert fixed.tool_calls == (call,)
    assert fixed.text == (
        f"<think>Multiply.</think><code>print(6*7)</code>{RESULT}"
        "<think>It is 42.</think><answer>\\boxed{42}</answer>"
    )


def test_edit_does_not_apply_to_a_clean_or_odd_trajectory():
    clean = traj("<think>It is 42.</think><answer>\\boxed{42}</answer>")
    assert edit(clean) is None  # nothing to change
    rejected = ToolCall("python", "print(1)", "", "rejected")
    odd = traj("<think>Maybe.</think><code>print(1)</code>", calls=(rejected,))
    assert steps_of(odd) is None and edit(odd) is None


def test_keep_measures():
    a, b = ToolCall("search", "Ada", "x", "ok"), ToolCall("search", "Rome", "y", "ok")
    assert calls_kept([a, b], [b, a]) == 1.0
    assert calls_kept([a, b], [a]) == 0.5
    assert calls_kept([], [a]) is None
    assert similarity("a b c", "a b c") == 1.0 and similarity("a b", "c d") == 0.0
