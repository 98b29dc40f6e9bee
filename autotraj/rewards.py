r"""RL rewards: outcome, format and trajectory-RM signals and their composition (METHOD.md 10).

Reward functions are plain callables `(text, query, trajectory) -> float` over the whole
assistant turn (tool results included, as the release's format rule needs them); each documents
its range. `compute_rewards(trajectories, queries, rm_scores, cfg)` turns a batch of rollouts
into one `RewardBreakdown` per trajectory with every component recorded:

- the release formula (default, `RewardConfig.formula == "release"`):
  ```
  if format invalid or no \boxed{} in <answer>:  R = -1
  F = outcome
  if F > 0:  R = max(F, clip(F + rm_weight * RM, -clip, clip))   else: R = F
  ```
  with rm_weight 0.2 and clip 3 (release). autotraj's outcome is `grading.Grade.score`: math
  equivalence (1/0) for math, and for QA the query's benchmark rule (grading.qa_rule): F1 under
  SQuAD's or HotpotQA's rule, EM under "exact" (the built-in multi-hop task), the same rule
  evaluation reports. The release scored every answer with HotpotQA's F1, math included
  (Tool-Star re_search.py get_f1_score): `f1_on_math=True` reproduces that on math. RM is
  the z-score-normalized trajectory-RM score (`normalize_rm`; the caller chooses which score to
  pass, this module only records it);
- plus a weighted list of named reward functions (`RewardConfig.components`): each adds
  `weight * value` to R; weight 0 means "log only".

A trajectory that ended with `finish_reason == "infra_error"` (a sandbox crash, a search outage)
gets no reward: its breakdown says `excluded=True` and `reward is None`; it is never scored 0.

Not here: running the reward model (train/reward_model.py), advantages (train/advantages.py).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from autotraj.grading import Grade, grade_answer, qa_f1
from autotraj.records import Query, Trajectory
from autotraj.tags import check_format, extract_answer

log = logging.getLogger(__name__)

RewardFn = Callable[[str, Query, Trajectory], float]


# ---------------------------------------------------------------------------------------------
# Reward functions: (text, query, trajectory) -> float


def format_valid(
    text: str, query: Query | None = None, trajectory: Trajectory | None = None
) -> float:
    r"""1.0 when the release's format rule holds and the answer has a balanced `\boxed{}`, else 0.0.

    >>> format_valid(r"<think>x</think><answer>\boxed{2}</answer>")
    1.0
    >>> format_valid(r"<answer>\boxed{2}</answer>")  # no <think> block
    0.0
    """
    ok = check_format(text).valid and extract_answer(text) is not None
    return 1.0 if ok else 0.0


def outcome(
    text: str, query: Query, trajectory: Trajectory | None = None, f1_on_math: bool = False
) -> float:
    r"""Outcome score F in [0, 1] of the final answer (the last `\boxed{}` in `<answer>`).

    `grading.grade_answer(...).score`, the rule evaluation uses too: math, 1.0 if mathematically
    equivalent to a gold answer, else 0.0; QA, the F1 of the query's benchmark rule (HotpotQA's:
    0 for a yes/no answer that differs) or its EM (the built-in multi-hop task's "exact" rule).
    `f1_on_math=True` scores math with HotpotQA's F1, as the release did (a defect: `\frac{1}{2}`
    vs `0.5` gets 0, `72` vs `720` gets 0 but `72 apples` vs `72` gets 0.67).

    >>> q = Query(id="q", question="?", answers=("0.5",), kind="math")
    >>> outcome(r"<answer>\boxed{\frac{1}{2}}</answer>", q)
    1.0
    >>> outcome(r"<answer>\boxed{\frac{1}{2}}</answer>", q, f1_on_math=True)
    0.0
    >>> qa = Query(id="h", question="?", answers=("yes",), kind="qa", source="hotpotqa")
    >>> outcome(r"<answer>\boxed{yes, it is}</answer>", qa)  # HotpotQA: a yes/no is all or none
    0.0
    """
    answer = extract_answer(text)
    return _outcome(answer, grade_answer(answer, query), query, f1_on_math)


def _outcome(answer: str | None, grade: Grade, query: Query, f1_on_math: bool) -> float:
    if f1_on_math and query.kind == "math":
        return qa_f1(answer, query.answers, "hotpot")
    return grade.score


def outcome_f1(text: str, query: Query, trajectory: Trajectory | None = None) -> float:
    r"""HotpotQA-rule token F1 in [0, 1] of the final answer against the gold answers, for any
    kind: the release's outcome (Tool-Star re_search.py get_f1_score), as a log-only view.

    >>> q = Query(id="q", question="?", answers=("72",), kind="math")
    >>> outcome_f1(r"<answer>\boxed{72}</answer>", q)
    1.0
    """
    return qa_f1(extract_answer(text), query.answers, "hotpot")


def tool_error_rate(text: str, query: Query, trajectory: Trajectory) -> float:
    """Fraction in [0, 1] of the trajectory's tool calls that errored, timed out or were
    rejected; 0.0 when it made no call."""
    calls = trajectory.tool_calls
    if not calls:
        return 0.0
    return sum(c.status != "ok" for c in calls) / len(calls)


def tool_calls(text: str, query: Query, trajectory: Trajectory) -> float:
    """Number of tool calls (>= 0), rejected calls included."""
    return float(len(trajectory.tool_calls))


def tool_wellformed(text: str, query: Query, trajectory: Trajectory) -> float:
    """1.0 when the trajectory made at least one tool call and every call ran cleanly (status
    ok: opened and closed tags, an available tool, no error or timeout), else 0.0. A small
    weight rewards tool use that works (off by default; the release has no such term).

    >>> from dataclasses import replace
    >>> from autotraj.records import Provenance, ToolCall
    >>> ok = ToolCall(tool="python", input="print(1)", output="1", status="ok")
    >>> t = Trajectory("t", "q", (), (ok,), "answer", Provenance("m", "b", 1.0, 1.0, 8))
    >>> tool_wellformed("", None, t), tool_wellformed("", None, replace(t, tool_calls=()))
    (1.0, 0.0)
    """
    calls = trajectory.tool_calls
    return float(bool(calls) and all(c.status == "ok" for c in calls))


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "format_valid": format_valid,
    "outcome": outcome,
    "outcome_f1": outcome_f1,
    "tool_error_rate": tool_error_rate,
    "tool_calls": tool_calls,
    "tool_wellformed": tool_wellformed,
}


def resolve_reward_fn(name: str) -> RewardFn:
    """A built-in reward function by name, or a user function as `package.module:function`."""
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if ":" not in name:
        raise ValueError(
            f"unknown reward function {name!r}: one of {sorted(BUILTIN_REWARDS)} "
            f"or a 'package.module:function' path"
        )
    module, attr = name.split(":", 1)
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {name!r}: {module} has no callable {attr!r}")
    return fn


# ---------------------------------------------------------------------------------------------
# The release formula and the composition


def release_reward(
    format_ok: bool, f: float, rm: float | None, rm_weight: float, clip: float
) -> float:
    """The release's reward (METHOD.md section 10), in [-1, max(1, clip)].

    >>> release_reward(False, 1.0, 5.0, 0.2, 3.0)
    -1.0
    >>> release_reward(True, 0.0, 5.0, 0.2, 3.0)  # F = 0: the RM never rescues a wrong answer
    0.0
    >>> release_reward(True, 1.0, -2.0, 0.2, 3.0)  # a negative RM never pushes below F
    1.0
    >>> release_reward(True, 1.0, 50.0, 0.2, 3.0)  # clipped at +3
    3.0
    """
    if not format_ok:
        return -1.0
    if f <= 0:
        return f
    shaped = f + rm_weight * (rm if rm is not None else 0.0)
    return max(f, min(clip, max(-clip, shaped)))


@dataclass(frozen=True)
class ComponentConfig:
    """One extra named reward function: R += weight * fn(text, query, trajectory)."""

    name: str  # a built-in (BUILTIN_REWARDS) or 'package.module:function'
    weight: float = 0.0  # 0: log only


@dataclass(frozen=True)
class RewardConfig:
    # release: the gated, RM-shaped formula of METHOD.md section 10; none: only the components
    formula: Literal["release", "none"] = "release"
    rm_weight: float = 0.2  # release: 0.2 * RM; 0 disables the reward model
    clip: float = 3.0  # release: clip(F + 0.2 RM, -3, 3)
    f1_on_math: bool = False  # release: True (HotpotQA's token F1 on math answers, a defect)
    # autotraj: z-score the RM with the stats stored with the model; release: raw scores
    normalize_rm: bool = True
    components: tuple[ComponentConfig, ...] = ()


@dataclass(frozen=True)
class RewardBreakdown:
    """Every number behind one trajectory's reward. `reward` is None iff `excluded`."""

    trajectory_id: str
    query_id: str
    reward: float | None
    excluded: bool
    reason: str  # why excluded ("" otherwise)
    format_valid: bool
    outcome: float
    correct: bool  # the grader's verdict (math equivalence; QA: the benchmark rule, grading.py)
    rm: float | None  # the RM value used in the formula (normalized or raw, see RewardConfig)
    components: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "trajectory_id": self.trajectory_id,
            "query_id": self.query_id,
            "reward": self.reward,
            "excluded": self.excluded,
            "reason": self.reason,
            "format_valid": self.format_valid,
            "outcome": self.outcome,
            "correct": self.correct,
            "rm": self.rm,
            "components": dict(self.components),
        }


def compute_rewards(
    trajectories: Sequence[Trajectory],
    queries: Sequence[Query],
    rm_scores: Sequence[float | None] | None,
    cfg: RewardConfig,
) -> list[RewardBreakdown]:
    """One breakdown per trajectory (same order). `queries[i]` is trajectory i's query.

    `rm_scores[i]` is the RM value of trajectory i (None for excluded ones); it is required
    when the release formula uses the RM (`rm_weight != 0`). Raises on any inconsistency
    instead of scoring a trajectory 0.
    """
    if len(queries) != len(trajectories):
        raise ValueError(f"{len(queries)} queries for {len(trajectories)} trajectories")
    uses_rm = cfg.formula == "release" and cfg.rm_weight != 0
    if uses_rm and (rm_scores is None or len(rm_scores) != len(trajectories)):
        raise ValueError(
            "reward.rm_weight != 0 needs one reward-model score per trajectory; "
            "set reward.rm_weight=0 to train without a reward model"
        )
    extras = [(c.name, c.weight, resolve_reward_fn(c.name)) for c in cfg.components]
    out = []
    for i, (traj, query) in enumerate(zip(trajectories, queries, strict=True)):
        if traj.query_id != query.id:
            raise ValueError(f"trajectory {traj.id} answers {traj.query_id}, not {query.id}")
        rm = rm_scores[i] if uses_rm and rm_scores is not None else None
        out.append(_breakdown(traj, query, rm, uses_rm, cfg, extras))
    return out


def _breakdown(
    traj: Trajectory,
    query: Query,
    rm: float | None,
    uses_rm: bool,
    cfg: RewardConfig,
    extras: list[tuple[str, float, RewardFn]],
) -> RewardBreakdown:
    if traj.finish_reason == "infra_error":
        return RewardBreakdown(
            trajectory_id=traj.id,
            query_id=query.id,
            reward=None,
            excluded=True,
            reason=f"infra_error: {traj.error}",
            format_valid=False,
            outcome=0.0,
            correct=False,
            rm=None,
        )
    text = traj.text
    fmt = format_valid(text, query, traj) == 1.0
    answer = extract_answer(text)
    grade = grade_answer(answer, query)  # graded once: the outcome and the verdict
    f = _outcome(answer, grade, query, cfg.f1_on_math)
    if uses_rm and f > 0 and rm is None:
        raise ValueError(f"trajectory {traj.id}: no reward-model score for a scored trajectory")
    reward = (
        release_reward(fmt, f, rm, cfg.rm_weight, cfg.clip) if cfg.formula == "release" else 0.0
    )
    values = []
    for name, weight, fn in extras:
        value = float(fn(text, query, traj))
        values.append((name, value))
        reward += weight * value
    return RewardBreakdown(
        trajectory_id=traj.id,
        query_id=query.id,
        reward=reward,
        excluded=False,
        reason="",
        format_valid=fmt,
        outcome=f,
        correct=grade.correct,
        rm=rm,
        components=tuple(values),
    )


def reward_summary(breakdowns: Sequence[RewardBreakdown]) -> dict[str, float]:
    """Batch means of a set of breakdowns over the scored (not excluded) trajectories.

    Keys: reward/mean, reward/std (population), reward/format_valid, reward/outcome, reward/rm
    (when an RM was used), reward/<component>, accuracy, format_rate, infra_excluded (a count).
    """
    scored = [b for b in breakdowns if not b.excluded]
    n = max(1, len(scored))
    rewards = [b.reward for b in scored if b.reward is not None]
    mean = sum(rewards) / max(1, len(rewards))
    values = {
        "reward/mean": mean,
        "reward/std": (sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards))) ** 0.5,
        "reward/format_valid": sum(b.format_valid for b in scored) / n,
        "reward/outcome": sum(b.outcome for b in scored) / n,
        "accuracy": sum(b.correct for b in scored) / n,
        "format_rate": sum(b.format_valid for b in scored) / n,
        "infra_excluded": float(len(breakdowns) - len(scored)),
    }
    rm = [b.rm for b in scored if b.rm is not None]
    if rm:
        values["reward/rm"] = sum(rm) / len(rm)
    for name in dict(scored[0].components) if scored else {}:
        values[f"reward/{name}"] = sum(dict(b.components)[name] for b in scored) / n
    return values
