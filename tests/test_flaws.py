"""flaws.py: hedging phrases, fragments left by deletions, repeated calls, model-written results.

The broken texts are real: the demo's data engine wrote them (an earlier first pass deleted
hedging words from inside sentences) and trained on them as "high quality" (issue 13).
"""

from __future__ import annotations

import pytest
from conftest import traj

from autotraj.flaws import (
    HEDGES,
    RELEASE_HEDGING_WORDS,
    flaws,
    fragments,
    hedges,
    prose,
    repeated_calls,
    written_results,
)
from autotraj.records import ToolCall

# Sentences the word-deleting first pass wrote into the demo's SFT set (verbatim).
BROKEN = [
    "Hmm, I think this be 8056020 + 1679215 - 371493, but I am not sure.",
    "The ore left is the two years of output added together, minus the ore sold, I? That right,.",
    "It fine, I so I will go with 9363742.",
    "It that Bosloltha Holdings is headquartered in Thigodu, I think.",
    "It that Thigodu is a city in Gauthauland, so the answer is Gauthauland, I.",
    "I need the city where Bosloltha Holdings is headquartered, then the country of that city,.",
    "I I should search for Bosloltha Holdings first.",
    "It prints 84205896, but I made a mistake somewhere. Let me the same calculation.",
]


@pytest.mark.parametrize("sentence", BROKEN)
def test_the_demo_s_broken_sentences_are_flagged(sentence):
    assert flaws(traj(f"<think>{sentence}</think>\n<answer>\\boxed{{1}}</answer>"))


@pytest.mark.parametrize(
    "sentence",
    [
        s
        for s in BROKEN
        if not any(h in s.lower() for h in ("hmm", "i think", "not sure", "mistake"))
    ],
)
def test_fragments_alone_flag_them(sentence):
    assert fragments(f"<think>{sentence}</think>")


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("It is 12, I think.", ["i think"]),
        ("I am not sure where to start.", ["not sure"]),
        ("Let me recheck the same search.", ["recheck"]),
        ("I will compute it and then check it again.", ["check it again"]),
        ("MAYBE it is 12.", ["maybe"]),
        ("Hmm, so it is 12.", ["hmm"]),
        ("The result is 12.", []),
        ("It seems that Ada was born in Rome.", ["seems"]),
        ("Thinking about it, the total is 12.", []),  # whole words only
    ],
)
def test_hedges_are_whole_words_and_phrases(text, found):
    assert hedges(text) == found


def test_release_words_are_a_subset_of_the_default():
    assert set(RELEASE_HEDGING_WORDS) <= set(HEDGES)
    assert hedges("I am not sure.", RELEASE_HEDGING_WORDS) == []


def test_code_and_queries_are_not_prose():
    t = traj(
        "<think>Add them.</think>\n<code>\nprint(1 , 2)  # maybe\n</code>",
        ("result", "\n<result>\n1 2\n</result>\n"),
    )
    assert prose(t.model_text) == "<think>Add them.</think>\n<code>"
    assert flaws(t, complete=False) == ()  # a prefix: no answer yet


def test_repeated_identical_calls_whitespace_aside():
    a = ToolCall("search", "Ada  Lovelace", "x", "ok")
    b = ToolCall("search", "Ada Lovelace", "x", "ok")
    c = ToolCall("python", "Ada Lovelace", "x", "error")
    assert repeated_calls(traj("<think>x</think>", calls=(a, c, b))) == [2]
    looked = traj("<think>Look it up.</think>", calls=(a, b))
    assert flaws(looked, complete=False) == ("repeated tool call 1",)


def test_a_result_the_model_wrote_is_a_flaw_and_a_real_one_is_not():
    fake = traj("<think>Run it.</think><code>print(1)</code>\n<result>\n1\n</result>")
    real = traj(
        "<think>Run it.</think><code>print(1)</code>", ("result", "\n<result>\n1\n</result>\n")
    )
    assert written_results(fake) == 2 and "model-written <result> tags: 2" in flaws(fake)
    assert written_results(real) == 0 and flaws(real, complete=False) == ()


def test_broken_markup_is_a_flaw_and_a_prefix_needs_no_answer_yet():
    """A correct answer in broken markup (`</th>` for `</think>`, as Qwen2.5-Coder-0.5B wrote as
    a teacher) is a flaw, so it never counts as HQ; a cut before the answer is judged without
    the answer rule, but its own markup still counts."""
    result = ("result", "\n<result>\n43647138\n</result>\n")
    sound = traj(
        "<think>Multiply.</think>\n<code>\nprint(438 * 99651)\n</code>",
        result,
        "<think>43647138 widgets.</think>\n<answer>\\boxed{43647138}</answer>",
    )
    broken = traj(
        "<think>Multiply.</think>\n<code>\nprint(438 * 99651)\n</code>",
        result,
        "<think>43647138 widgets.</th>\n<answer>\\boxed{43647138}</answer>",
    )
    assert flaws(sound) == ()
    assert flaws(broken) == ("markup: think tags unbalanced or missing (2 open, 1 close)",)
    prefix = traj("<think>Multiply.</think>\n<code>\nprint(438 * 99651)\n</code>", result)
    assert flaws(prefix) == ("markup: no closed <answer> block",)
    assert flaws(prefix, complete=False) == ()
    unclosed = traj("<think>Multiply.\n<code>\nprint(438 * 99651)\n</code>", result)
    assert flaws(unclosed, complete=False) == (
        "markup: think tags unbalanced or missing (1 open, 0 close)",
    )
