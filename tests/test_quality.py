"""Quality dimensions with hand-computed values, the HQ / AC-LQ / AW partition, records."""

from __future__ import annotations

import dataclasses
import math

import pytest
from conftest import traj
from hypothesis import given, settings
from hypothesis import strategies as st

from autotraj import quality
from autotraj.quality import (
    QualityConfig,
    confidence,
    group_length_refs,
    length_score,
    partition,
    repetition,
    score_group,
    score_one,
    tool_validity,
)
from autotraj.records import QualityScore, RecordError, ToolCall

ANSWER = r"<answer>\boxed{4}</answer>"


# A: 7 words, all distinct: <think> alpha beta gamma delta </think> <answer>...</answer>
A_TEXT = f"<think> alpha beta gamma delta </think> {ANSWER}"
# B: 12 words [T a b g d maybe a b g d /T ANS]; 10 trigrams, "a b g" and "b g d" occur twice
#    -> R = (2 + 2) / 10 = 0.4, e = 0.6; "maybe" in <think> -> c = 0
B_TEXT = f"<think> alpha beta gamma delta maybe alpha beta gamma delta </think> {ANSWER}"


# ---------------------------------------------------------------------------------------------
# Dimensions


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>It seems right.</think> done", 0.0),
        ("<think>MAYBE not</think>", 0.0),
        ("<think>first</think> <think>I will recheck.</think>", 0.0),
        ("<think>sure</think> Maybe the answer is 4", 1.0),  # outside <think>: not counted
        ("<think>sure</think><result>\nprobably 4\n</result>", 1.0),  # a tool result
        ("<think>this is unlikely, a seemsless guesswork</think>", 1.0),  # whole words only
        ("<think>unclosed maybe", 1.0),  # only closed blocks are read
        ("no think at all, perhaps", 1.0),
    ],
)
def test_confidence(text, expected):
    assert confidence(text) == expected


def test_confidence_custom_words():
    assert confidence("<think>I reckon so</think>", ("reckon",)) == 0.0
    assert confidence("<think>maybe</think>", ("reckon",)) == 1.0


@pytest.mark.parametrize(
    ("length", "reference", "expected"),
    [
        (150, 100, math.exp(-0.5)),  # sigma = 50: exp(-50^2 / (2 * 50^2))
        (12, 7, math.exp(-25 / 24.5)),  # sigma = 3.5
        (100, 100, 1.0),
        (0, 0, 1.0),  # L* = 0 (an empty candidate): our rule, the release divides by zero
        (5, 0, 0.0),
    ],
)
def test_length_score_values(length, reference, expected):
    assert length_score(length, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a b c a b c", 0.5),  # trigrams abc bca cab abc: abc twice -> R = 2/4
        ("x y z x y z x", 0.2),  # xyz yzx zxy xyz yzx: 2 + 2 repeated of 5 -> R = 0.8
        ("one two three four five", 1.0),  # fewer than 6 words
        ("a a a a a a", 0.0),  # 4 trigrams, all "a a a" -> R = 1
        ("one two three four five six", 1.0),  # 4 distinct trigrams
        ("A b c a b c", 1.0),  # case is kept: "A b c" != "a b c"
    ],
)
def test_repetition(text, expected):
    assert repetition(text.split()) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        (
            (
                ToolCall("python", "print(1)\n", "1", "ok"),
                ToolCall("python", "  print(1)", "1", "ok"),  # a duplicate up to whitespace
                ToolCall("python", "1/0", "Error: division by zero", "error"),
                ToolCall("search", "capital of France", "", "timeout"),
            ),
            0.25,  # 1 good call of 4
        ),
        ((), 1.0),
        # the same input to another tool is not a duplicate
        ((ToolCall("python", "x", "", "ok"), ToolCall("search", "x", "", "ok")), 1.0),
        ((ToolCall("python", "x", "", "ok"), ToolCall("python", "y", "", "rejected")), 0.5),
    ],
    ids=["duplicate-error-timeout", "no-calls", "same-input-two-tools", "rejected"],
)
def test_tool_validity(calls, expected):
    assert tool_validity(traj(A_TEXT, calls=calls)) == expected


# ---------------------------------------------------------------------------------------------
# The release score


def test_release_score_by_hand():
    a, b = traj(A_TEXT, tid="a"), traj(B_TEXT, tid="b")
    sa, sb = score_group([a, b], [True, True], QualityConfig.release())
    # A: c = 1, L = L* = 7 -> l = 1, e = 1 -> S = 0.4 + 0.3 + 0.3 = 1.0
    assert sa.score == pytest.approx(1.0)
    assert dict(sa.components)["length"] == 1.0
    # B: c = 0, l = exp(-(12 - 7)^2 / (2 * 3.5^2)) = exp(-25/24.5) = 0.360447, e = 0.6
    #    S = 0.3 * 0.360447 + 0.3 * 0.6 = 0.288134
    l_b = math.exp(-25 / 24.5)
    assert sb.component("confidence") == 0.0
    assert sb.component("length") == pytest.approx(l_b)
    assert sb.component("repetition") == pytest.approx(0.6)
    assert sb.score == 0.4 * 0.0 + 0.3 * l_b + 0.3 * 0.6  # exactly the release's expression
    assert sb.score == pytest.approx(0.288134, abs=1e-6)
    # partition: not all >= 0.9 -> best (A, 1.0 >= 0.86) HQ, B AC-LQ
    assert (sa.label, sb.label) == ("HQ", "AC-LQ")


def test_singleton_gets_full_length():
    (s,) = score_group([traj(B_TEXT)], [True], QualityConfig.release())
    # l = 1 (L = L*), c = 0, e = 0.6 -> S = 0.3 + 0.18 = 0.48
    assert s.component("length") == 1.0
    assert s.score == pytest.approx(0.48)
    assert s.label == "AC-LQ"  # the best (only) one is below 0.86


def test_release_does_not_penalize_hedging_outside_think():
    text = f"<think> alpha beta gamma delta </think> Maybe probably {ANSWER}"
    (s,) = score_group([traj(text)], [True], QualityConfig.release())
    assert s.component("confidence") == 1.0
    assert s.score == pytest.approx(1.0)
    assert s.label == "HQ"


def test_default_keeps_hedging_outside_think_out_of_hq():
    # The score is the release's (confidence reads <think> only), but the flaw rule sees the
    # hedging anywhere in the model's text: a correct candidate, S = 1.0, still AC-LQ.
    text = f"<think> alpha beta gamma delta </think> Maybe probably {ANSWER}"
    (s,) = score_group([traj(text)], [True], QualityConfig())
    assert s.score == pytest.approx(1.0)
    assert (s.label, s.flaws) == ("AC-LQ", ("hedging: 'maybe'", "hedging: 'probably'"))


@pytest.mark.parametrize(
    "think",
    [
        "I think the total is 4.",  # a phrase the release's nine words miss
        "The total is 4, but I am not sure.",
        "Hmm, the total is 4.",
        "It prints 4. Let me check it again.",
    ],
)
def test_default_confidence_catches_hedging_phrases(think):
    text = f"<think>{think}</think> {ANSWER}"
    (s,) = score_group([traj(text)], [True], QualityConfig())
    assert s.component("confidence") == 0.0
    assert s.label == "AC-LQ"
    (r,) = score_group([traj(text)], [True], QualityConfig.release())
    assert r.component("confidence") == 1.0


def test_a_repeated_call_is_never_hq_by_default():
    call = ToolCall("python", "print(2+2)", "4", "ok")
    text = ("<think>Add.</think><code>print(2+2)</code>", ("result", "<result>4</result>"))
    t = traj(*text, *text, f"<think>Four.</think>{ANSWER}", calls=(call, call))
    (s,) = score_group([t], [True], QualityConfig())
    assert s.label == "AC-LQ" and s.flaws == ("repeated tool call 1",)
    assert score_group([t], [True], QualityConfig.release())[0].label == "HQ"


def test_wrong_answers_are_aw():
    a, b = traj(A_TEXT, tid="a"), traj(B_TEXT, tid="b")
    labels = [s.label for s in score_group([a, b], [False, True], QualityConfig())]
    assert labels == ["AW", "AC-LQ"]  # B is the only correct one and is below 0.86
    labels = [s.label for s in score_group([a, b], [False, False], QualityConfig())]
    assert labels == ["AW", "AW"]


# ---------------------------------------------------------------------------------------------
# Partition edge cases


@pytest.mark.parametrize(
    ("scores", "correct", "labels"),
    [
        ([0.95, 0.9, 0.99], [True] * 3, ["HQ", "HQ", "HQ"]),  # all >= 0.9 (0.9 included)
        ([0.95, 0.5, 0.9], [True, False, True], ["HQ", "AW", "HQ"]),  # wrong ones ignored
        ([0.86, 0.5], [True, True], ["HQ", "AC-LQ"]),  # best exactly 0.86 -> HQ (>=)
        ([0.85999, 0.5], [True, True], ["AC-LQ", "AC-LQ"]),  # best below 0.86
        ([0.88, 0.89], [True, True], ["AC-LQ", "HQ"]),
        ([0.88, 0.88, 0.5], [True, True, True], ["HQ", "AC-LQ", "AC-LQ"]),  # tie: first
        ([0.95], [True], ["HQ"]),
        ([0.87], [True], ["HQ"]),  # singleton: best of one, >= 0.86
        ([0.85], [True], ["AC-LQ"]),
        ([0.99], [False], ["AW"]),
        ([], [], []),
    ],
)
def test_partition(scores, correct, labels):
    assert partition(scores, correct) == labels


def test_partition_thresholds_from_config():
    cfg = QualityConfig(hq_all=0.5, hq_best=0.4)
    assert partition([0.6, 0.45], [True, True], cfg.hq_all, cfg.hq_best) == ["HQ", "AC-LQ"]


# ---------------------------------------------------------------------------------------------
# Extra dimensions and options


RESULT_REPEATS = ("result", "\n<result>\nx x x x x x x x x x\n</result>\n")
CODE_TEXT = "<think> alpha beta gamma delta </think> <code> print(1) </code>"


def test_exclude_tool_results():
    t = traj(CODE_TEXT, RESULT_REPEATS, f" {ANSWER}", calls=(ToolCall("python", "x", "", "ok"),))
    (full,) = score_group([t], [True], QualityConfig())
    (model_only,) = score_group([t], [True], QualityConfig(exclude_tool_results=True))
    # whole text: 9 words of code text + 12 of result (<result>, 10 x, </result>) + 1 answer
    # = 22 words, 20 trigrams; "x x x" occurs 8 times (inside the 10 x's) -> R = 8/20, e = 0.6
    assert full.component("repetition") == pytest.approx(0.6)
    # model text only: 10 distinct words -> e = 1
    assert model_only.component("repetition") == 1.0
    assert model_only.score == pytest.approx(1.0)


def test_format_and_tool_validity_weights():
    no_think = traj(f"The answer. {ANSWER}", tid="n")
    good = traj(A_TEXT, tid="g")
    cfg = QualityConfig(weight_confidence=0.3, weight_format=0.1)
    s_no, s_good = score_group([no_think, good], [True, True], cfg)
    assert s_no.component("format") == 0.0 and s_good.component("format") == 1.0
    # no_think: 3 words (L*), c = 1, e = 1 (< 6 words), format 0 -> 0.3 + 0.3 + 0.3 + 0 = 0.9
    assert s_no.score == pytest.approx(0.9)
    # good: 7 words vs L* = 3: sigma 1.5, l = exp(-16 / 4.5); c = e = format = 1
    assert s_good.score == pytest.approx(0.3 + 0.3 * math.exp(-16 / 4.5) + 0.3 + 0.1)
    # default weights: format is reported (log only) but not scored
    s_default, _ = score_group([no_think, good], [True, True], QualityConfig())
    assert s_default.component("format") == 0.0 and s_default.score == pytest.approx(1.0)

    bad_calls = (ToolCall("python", "1/0", "Error", "error"), ToolCall("python", "1", "1", "ok"))
    tv = QualityConfig(weight_confidence=0.2, weight_tool_validity=0.2)
    (s,) = score_group([traj(A_TEXT, calls=bad_calls)], [True], tv)
    assert s.score == pytest.approx(0.2 + 0.3 + 0.3 + 0.2 * 0.5)


def test_token_length():
    short = traj("<think> a b </think>", ("result", "\nr r r r\n"), tid="s", token_ids=True)
    long = traj("<think> a b c d e f </think>", ("result", "\nr r r r\n"), tid="l", token_ids=True)
    cfg = QualityConfig(weight_length=0.0, weight_token_length=0.3)
    assert group_length_refs([short, long], cfg) == (8, 8)
    _, s_long = score_group([short, long], [True, True], cfg)
    # tokens: 8 vs 12 (one id per word here): sigma 4, l = exp(-16 / 32)
    assert s_long.component("token_length") == pytest.approx(math.exp(-0.5))
    # excluding tool results: 4 vs 8 model tokens: sigma 2, exp(-16 / 8)
    cfg_x = dataclasses.replace(cfg, exclude_tool_results=True)
    _, s_long_x = score_group([short, long], [True, True], cfg_x)
    assert s_long_x.component("token_length") == pytest.approx(math.exp(-2.0))
    # a candidate without token ids: the group falls back to words
    no_ids = traj("<think> a b c d e f </think>", ("result", "\nr r r r\n"), tid="n")
    assert group_length_refs([short, no_ids], cfg) == (8, None)
    _, s_fb = score_group([short, no_ids], [True, True], cfg)
    assert s_fb.component("token_length") == s_fb.component("length")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"weight_format": 0.1}, "sum to 1"),
        ({"weight_confidence": 0.5, "weight_length": 0.6, "weight_repetition": -0.1}, ">= 0"),
        ({"hedging_words": ()}, "hedging"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(ValueError, match=message):
        QualityConfig(**fields)


# ---------------------------------------------------------------------------------------------
# score_one (repair acceptance), boundaries, records, determinism


def test_score_one_with_length_reference():
    original, repair = traj(B_TEXT, tid="o"), traj(A_TEXT, tid="r", qid="q")
    cfg = QualityConfig()
    ref = min(
        quality.length_words(original, cfg), quality.length_words(repair, cfg)
    )  # AC-LQ: L* = min(12, 7) = 7
    s = score_one(repair, cfg, ref, correct=True)
    assert s.score == pytest.approx(1.0) and s.label == "HQ"
    s_orig = score_one(original, cfg, ref, correct=True)
    assert s_orig.score == pytest.approx(0.3 * math.exp(-25 / 24.5) + 0.3 * 0.6)
    # AW repair: L* = itself -> l = 1
    assert score_one(original, cfg, 12, correct=True).component("length") == 1.0
    assert score_one(original, cfg, 12, correct=False).label == "AW"
    # same as a group of one
    (g,) = score_group([original], [True], cfg)
    assert score_one(original, cfg, 12, correct=True) == g


@pytest.mark.parametrize(
    ("group", "correct", "message"),
    [
        ([traj(A_TEXT, qid="q1"), traj(A_TEXT, qid="q2")], [True, True], "one query"),
        ([traj(A_TEXT)], [True, False], "correctness"),
        ([traj(A_TEXT, finish="infra_error")], [True], "infra"),
    ],
    ids=["two-queries", "correctness-count", "infra-error"],
)
def test_group_boundaries_raise(group, correct, message):
    with pytest.raises(ValueError, match=message):
        score_group(group, correct, QualityConfig())


def test_an_empty_group_scores_nothing():
    assert score_group([], [], QualityConfig()) == []


def test_quality_score_round_trip():
    a, b = traj(A_TEXT, tid="a"), traj(B_TEXT, tid="b")
    for s in score_group([a, b], [True, False], QualityConfig()):
        assert QualityScore.from_dict(s.to_dict()) == s
    bad = score_group([a], [True], QualityConfig())[0].to_dict() | {"label": "LQ"}
    with pytest.raises(RecordError, match="label"):
        QualityScore.from_dict(bad)
    with pytest.raises(RecordError, match="missing"):
        QualityScore.from_dict({"trajectory_id": "x"})


def test_deterministic_and_order_independent():
    group = [traj(A_TEXT, tid="a"), traj(B_TEXT, tid="b"), traj(A_TEXT + " extra", tid="c")]
    correct = [True, True, False]
    first = score_group(group, correct, QualityConfig())
    assert score_group(group, correct, QualityConfig()) == first
    reversed_scores = score_group(group[::-1], correct[::-1], QualityConfig())
    assert {s.trajectory_id: s.score for s in reversed_scores} == {
        s.trajectory_id: s.score for s in first
    }


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6).flatmap(
        lambda s: st.tuples(st.just(s), st.lists(st.booleans(), min_size=len(s), max_size=len(s)))
    )
)
def test_partition_invariants(case):
    scores, correct = case
    labels = partition(scores, correct)
    assert all((label == "AW") == (not ok) for label, ok in zip(labels, correct, strict=True))
    right = [s for s, ok in zip(scores, correct, strict=True) if ok]
    if right and min(right) < 0.9:
        assert labels.count("HQ") == (1 if max(right) >= 0.86 else 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "a", "b", "maybe", "x"]), max_size=40))
def test_scores_stay_in_unit_interval(words):
    group = [traj(" ".join(words), tid="w"), traj(A_TEXT, tid="a")]
    for s in score_group(group, [True, True], QualityConfig()):
        assert 0.0 <= s.score <= 1.0 + 1e-12
        assert all(0.0 <= v <= 1.0 for _, v in s.components)
