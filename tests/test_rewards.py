"""The RL reward: the release formula as a table, outcome kinds, components, infra exclusion."""

from __future__ import annotations

import pytest
from conftest import traj

from autotraj.eval_summary import grade_result
from autotraj.records import Query, ToolCall
from autotraj.rewards import (
    ComponentConfig,
    RewardConfig,
    compute_rewards,
    format_valid,
    outcome,
    release_reward,
    reward_summary,
)
from autotraj.tasks.builtin import task_splits

MATH = Query(
    id="q",  # the query id of conftest.traj's trajectories
    question="1/2 as a decimal?",
    answers=("0.5",),
    kind="math",
)
QA = Query(id="h", question="Who founded Westfield?", answers=("Frank Lowy",), kind="qa")


def answer(boxed, think="<think>ok</think>"):
    return f"{think}<answer>\\boxed{{{boxed}}}</answer>"


# (format ok, F, RM, expected R) with the release's rm_weight 0.2 and clip 3
RELEASE_TABLE = [
    (False, 1.0, 10.0, -1.0),  # format gate
    (False, 0.0, None, -1.0),
    (True, 0.0, 10.0, 0.0),  # F = 0: R = F whatever the RM says
    (True, 1.0, None, 1.0),  # no RM: R = F
    (True, 1.0, 2.0, 1.4),  # F + 0.2 RM
    (True, 1.0, -2.0, 1.0),  # negative RM: max(F, ...) keeps F
    (True, 1.0, 100.0, 3.0),  # clip at +3
    (True, 0.5, -100.0, 0.5),  # clip at -3, then max(F, -3) = F
    (True, 0.4, 1.0, 0.6),  # QA partial F1 is shaped too
]


@pytest.mark.parametrize(("fmt", "f", "rm", "expected"), RELEASE_TABLE)
def test_release_formula_table(fmt, f, rm, expected):
    assert release_reward(fmt, f, rm, rm_weight=0.2, clip=3.0) == pytest.approx(expected)


def test_format_gate_needs_think_answer_and_box():
    assert format_valid(answer("1")) == 1.0
    assert format_valid(answer("1", think="")) == 0.0
    assert format_valid("<think>x</think><answer>1</answer>") == 0.0  # no \boxed{}
    assert format_valid("<think>x</think><answer>\\boxed{1</answer>") == 0.0  # unbalanced
    # a tool call must be followed by its <result> block
    assert format_valid("<think>x</think><code>print(1)</code>" + answer("1", think="")) == 0.0


def test_math_outcome_is_equivalence_and_f1_on_math_reproduces_the_release():
    text = answer("\\frac{1}{2}")
    assert outcome(text, MATH) == 1.0
    assert outcome(text, MATH, f1_on_math=True) == 0.0
    [default] = compute_rewards([traj(text)], [MATH], None, RewardConfig(rm_weight=0))
    [release] = compute_rewards(
        [traj(text)], [MATH], None, RewardConfig(rm_weight=0, f1_on_math=True)
    )
    assert (default.reward, default.correct) == (1.0, True)
    assert (release.reward, release.outcome) == (0.0, 0.0)


def test_qa_outcome_is_token_f1_against_aliases():
    [b] = compute_rewards(
        [traj(answer("Frank Lowy AC"), qid=QA.id)], [QA], None, RewardConfig(rm_weight=0)
    )
    assert b.outcome == pytest.approx(0.8)
    assert b.reward == pytest.approx(0.8)
    assert b.correct  # F1 >= 0.5 counts as correct (the release's QA rule)


def test_qa_outcome_follows_the_benchmark_rule():
    hotpot = Query(id="h", question="Is it?", answers=("yes",), kind="qa", source="hotpotqa")
    musique = Query(id="u", question="Is it?", answers=("yes",), kind="qa", source="musique")
    text = answer("yes, it is")
    assert outcome(text, hotpot) == 0.0  # HotpotQA's official F1 for a yes/no answer
    assert outcome(text, musique) == pytest.approx(0.5)  # MuSiQue's is SQuAD's
    [b] = compute_rewards([traj(text, qid=hotpot.id)], [hotpot], None, RewardConfig(rm_weight=0))
    assert (b.outcome, b.reward, b.correct) == (0.0, 0.0, False)


def test_builtin_multihop_outcome_is_exact_match():
    query = task_splits("multihop")["train"][0]
    country = query.answers[0]
    assert outcome(answer(f"Republic of {country}"), query) == 1.0
    assert outcome(answer("Republic of Zzyzx"), query) == 0.0  # F1 0.67 under SQuAD's rule
    assert outcome(answer("Republic"), query) == 0.0


@pytest.fixture(scope="module")
def tokenizer():
    from autotraj.models.tiny import build_char_tokenizer

    return build_char_tokenizer()


# One (answer, query) per rule and kind: the RL outcome must be the number evaluation reports.
SAME_RULE = [
    ("yes, it is", Query(id="h", question="?", answers=("yes",), kind="qa", source="hotpotqa")),
    (
        "New York",
        Query(id="w", question="?", answers=("New York City",), kind="qa", source="2wiki"),
    ),
    ("yes, it is", Query(id="u", question="?", answers=("yes",), kind="qa", source="musique")),
    ("Titan IIIE rocket", Query(id="b", question="?", answers=("Titan IIIE",), kind="qa")),
    ("\\frac{1}{2}", MATH),
    ("0.6", MATH),
]


@pytest.mark.parametrize(("boxed", "query"), SAME_RULE, ids=[q.id + b for b, q in SAME_RULE])
def test_reward_outcome_is_the_evaluation_rule(boxed, query, tokenizer):
    text = answer(boxed)
    t = traj(text, qid=query.id)
    result = grade_result(t, query, "bench", 0, tokenizer)
    [b] = compute_rewards([t], [query], None, RewardConfig(rm_weight=0))
    assert b.correct == result.correct
    if query.kind == "qa":
        assert b.outcome == pytest.approx(result.f1)
    else:
        assert b.outcome == float(result.correct)


def test_release_outcome_on_math_is_hotpot_f1():
    yes = Query(id="y", question="?", answers=("yes",), kind="math")
    assert outcome(answer("yes indeed"), yes, f1_on_math=True) == 0.0
    assert outcome(
        answer("72 apples"),
        Query(id="a", question="?", answers=("72",), kind="math"),
        f1_on_math=True,
    ) == pytest.approx(2 / 3)


def test_rm_score_is_used_and_recorded():
    trajectories = [traj(answer("0.5")), traj(answer("7")), traj("no format")]
    out = compute_rewards(trajectories, [MATH] * 3, [2.0, 5.0, 9.0], RewardConfig())
    assert [b.reward for b in out] == pytest.approx([1.4, 0.0, -1.0])
    assert [b.rm for b in out] == [2.0, 5.0, 9.0]
    assert [b.format_valid for b in out] == [True, True, False]


def test_rm_weight_without_scores_raises_instead_of_scoring_zero():
    with pytest.raises(ValueError, match="rm_weight"):
        compute_rewards([traj(answer("0.5"))], [MATH], None, RewardConfig(rm_weight=0.2))
    with pytest.raises(ValueError, match="no reward-model score"):
        compute_rewards([traj(answer("0.5"))], [MATH], [None], RewardConfig(rm_weight=0.2))


def test_infra_error_is_excluded_never_scored():
    broken = traj("<think>x</think><code>print(1)</code>", finish="infra_error", error="sandbox")
    out = compute_rewards([broken, traj(answer("0.5"))], [MATH, MATH], [None, 1.0], RewardConfig())
    assert out[0].excluded and out[0].reward is None and "sandbox" in out[0].reason
    assert not out[1].excluded and out[1].reward == pytest.approx(1.2)
    summary = reward_summary(out)
    assert summary["infra_excluded"] == 1.0
    assert summary["reward/mean"] == pytest.approx(1.2)  # the excluded one is not averaged in


def test_components_log_only_at_weight_zero_and_add_otherwise():
    calls = (
        ToolCall(tool="python", input="1", output="Error: x", status="error"),
        ToolCall(tool="python", input="2", output="2", status="ok"),
    )
    t = traj(answer("0.5"), calls=calls)
    logged = RewardConfig(rm_weight=0, components=(ComponentConfig("tool_error_rate", 0.0),))
    added = RewardConfig(rm_weight=0, components=(ComponentConfig("tool_error_rate", -1.0),))
    [a] = compute_rewards([t], [MATH], None, logged)
    [b] = compute_rewards([t], [MATH], None, added)
    assert a.reward == 1.0 and dict(a.components) == {"tool_error_rate": 0.5}
    assert b.reward == pytest.approx(0.5)
    only = RewardConfig(formula="none", components=(ComponentConfig("outcome", 2.0),))
    assert compute_rewards([t], [MATH], None, only)[0].reward == 2.0


def test_dotted_component_and_unknown_names():
    cfg = RewardConfig(
        rm_weight=0, components=(ComponentConfig("autotraj.rewards:tool_calls", 0.25),)
    )
    ok = ToolCall(tool="python", input="1", output="1", status="ok")
    [b] = compute_rewards([traj(answer("0.5"), calls=(ok, ok))], [MATH], None, cfg)
    assert dict(b.components) == {"autotraj.rewards:tool_calls": 2.0}  # two calls
    assert b.reward == pytest.approx(1.0 + 0.25 * 2.0)  # outcome 1, plus the weighted count
    with pytest.raises(ValueError, match="unknown reward function"):
        compute_rewards(
            [traj("x")],
            [MATH],
            None,
            RewardConfig(rm_weight=0, components=(ComponentConfig("nope"),)),
        )


def test_mismatched_query_raises():
    with pytest.raises(ValueError, match="answers"):
        compute_rewards([traj(answer("1"), qid=QA.id)], [MATH], None, RewardConfig(rm_weight=0))


def test_wellformed_tool_use_reward_is_off_by_default_and_adds_its_weight():
    ok = ToolCall(tool="python", input="1", output="1", status="ok")
    bad = ToolCall(tool="python", input="", output="Error: no opening tag", status="error")
    used = traj(answer("0.5"), calls=(ok, ok))
    failed = traj(answer("0.5"), calls=(ok, bad))
    none = traj(answer("0.5"))
    default = compute_rewards([used, failed, none], [MATH] * 3, None, RewardConfig(rm_weight=0))
    assert [b.reward for b in default] == [1.0, 1.0, 1.0]  # the release: no tool term
    bonus = RewardConfig(rm_weight=0, components=(ComponentConfig("tool_wellformed", 0.1),))
    out = compute_rewards([used, failed, none], [MATH] * 3, None, bonus)
    assert [b.reward for b in out] == pytest.approx([1.1, 1.0, 1.0])
    assert [dict(b.components)["tool_wellformed"] for b in out] == [1.0, 0.0, 0.0]
