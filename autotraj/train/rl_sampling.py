"""Dynamic sampling (the `rl.sampling` section): drop prompt groups that carry no signal and
refill the step's batch with fresh groups, a bounded number of extra generation rounds.

A group whose rollouts all earned the same reward (all right, all wrong) gets zero advantages:
it costs a forward and backward pass and teaches nothing. DAPO (arXiv 2503.14476, "dynamic
sampling") over-samples and keeps only groups with 0 < accuracy < 1 until the batch is full;
here a group is kept when any of its rollouts has a nonzero advantage (so the same holds for
any reward, not only 0/1), and refilling stops after `max_rounds` extra rounds, so a step's
cost stays bounded when almost every group is uniform (then it trains on what it has).

`ScoredGroups` holds one or more rounds of rewarded rollouts; `dynamic_sample` runs the rounds
through a caller-given `roll(round, groups)` that generates and scores that many new groups.
`rollout_items` names a round's rollouts and `score_groups` turns its rewards into advantages.
No model, no I/O. Not here: generation and rewards (grpo.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autotraj.config import ConfigError
from autotraj.records import Query, Trajectory
from autotraj.render import RenderedTrajectory
from autotraj.rewards import RewardBreakdown
from autotraj.train.advantages import group_advantages
from autotraj.train.rl_loss import RlLossConfig, with_overlong_penalty


@dataclass(frozen=True)
class RlSamplingConfig:
    dynamic: bool = False  # DAPO dynamic sampling; off: every group trains, as before
    max_rounds: int = 2  # extra generation rounds per step at most (a bound on the cost)
    # ask the rollout engine for each sampled token's log-prob: logs the sampler/trainer
    # mismatch (rl/mismatch/*) and is needed by loss.tis_cap (the vllm backend always returns
    # them: SamplingParams(logprobs=0), vLLM's raw log-probs, before temperature and top-p)
    sampler_logprobs: bool = False


def check_sampling_config(cfg: RlSamplingConfig, tis_cap: float) -> None:
    if cfg.max_rounds < 0:
        raise ConfigError(f"rl: sampling.max_rounds must be >= 0, got {cfg.max_rounds}")
    if tis_cap and not cfg.sampler_logprobs:
        raise ConfigError(
            "rl: loss.tis_cap needs the sampler's log-probs: set sampling.sampler_logprobs=true"
        )


@dataclass(frozen=True)
class ScoredGroups:
    """Rewarded rollouts, one entry per trajectory, in group order."""

    groups: tuple[str, ...]
    queries: tuple[Query, ...]
    trajectories: tuple[Trajectory, ...]
    breakdowns: tuple[RewardBreakdown, ...]
    rendered: tuple[RenderedTrajectory, ...]
    advantages: tuple[float | None, ...]

    def group_names(self) -> list[str]:
        return list(dict.fromkeys(self.groups))

    def select(self, keep: Sequence[str]) -> ScoredGroups:
        wanted = set(keep)
        rows = [i for i, g in enumerate(self.groups) if g in wanted]
        return ScoredGroups(*(tuple(column[i] for i in rows) for column in self._columns()))

    def __add__(self, other: ScoredGroups) -> ScoredGroups:
        return ScoredGroups(
            *(a + b for a, b in zip(self._columns(), other._columns(), strict=True))
        )

    def _columns(self) -> tuple[tuple, ...]:
        return (
            self.groups,
            self.queries,
            self.trajectories,
            self.breakdowns,
            self.rendered,
            self.advantages,
        )


def rollout_items(
    step: int, round_: int, chosen: Sequence[tuple[int, Query]], per_prompt: int
) -> list[tuple[str, Query]]:
    """(trajectory id, query) per rollout of step `step` (0-based); `chosen` is (slot, query).
    A group's key is its trajectory ids minus the `/rK` suffix; refill rounds tag theirs.

    >>> q = Query(id="q7", question="?", answers=("1",), kind="math")
    >>> [i for i, _ in rollout_items(0, 1, [(0, q)], 2)]
    ['rl/s1/f1p0/q7/r0', 'rl/s1/f1p0/q7/r1']
    """
    tag = "p" if round_ == 0 else f"f{round_}p"
    return [
        (f"rl/s{step + 1}/{tag}{j}/{q.id}/r{k}", q) for j, q in chosen for k in range(per_prompt)
    ]


def score_groups(
    items: Sequence[tuple[str, Query]],
    trajectories: Sequence[Trajectory],
    breakdowns: Sequence[RewardBreakdown],
    rendered: Sequence[RenderedTrajectory],
    loss: RlLossConfig,
    budget: int,
) -> ScoredGroups:
    """One round's rewarded rollouts with their group advantages: DAPO's soft overlong
    penalty added to the rewards when `loss.overlong_buffer` is set, advantages without the
    std division under `dr_grpo` (train/advantages.group_advantages)."""
    groups = [traj_id.rsplit("/r", 1)[0] for traj_id, _ in items]
    if loss.overlong_buffer:
        breakdowns = [
            with_overlong_penalty(b, len(r.input_ids) - r.prompt_length, loss, budget)
            for b, r in zip(breakdowns, rendered, strict=True)
        ]
    advantages = group_advantages(
        [b.reward for b in breakdowns], groups, scale=loss.aggregation != "dr_grpo"
    )
    return ScoredGroups(
        tuple(groups),
        tuple(q for _, q in items),
        tuple(trajectories),
        tuple(breakdowns),
        tuple(rendered),
        tuple(advantages),
    )


def signal_groups(advantages: Sequence[float | None], groups: Sequence[str]) -> list[str]:
    """The groups (in order) with at least one nonzero advantage.

    >>> signal_groups([1.0, -1.0, 0.0, 0.0, None], ["a", "a", "b", "b", "c"])
    ['a']
    """
    return list(dict.fromkeys(g for a, g in zip(advantages, groups, strict=True) if a))


def refill_indices(n_queries: int, count: int, step: int, round_: int, seed: str) -> list[int]:
    """`count` query indices for a refill round, a seeded draw that depends only on its
    arguments (without repeats while `count` <= `n_queries`).

    >>> refill_indices(5, 2, 0, 1, "0/0") == refill_indices(5, 2, 0, 1, "0/0")
    True
    """
    rng = random.Random(f"{seed}/refill/{step}/{round_}")
    if count <= n_queries:
        return rng.sample(range(n_queries), count)
    return [rng.randrange(n_queries) for _ in range(count)]


def dynamic_sample(
    first: ScoredGroups, max_rounds: int, roll: Callable[[int, int], ScoredGroups]
) -> tuple[ScoredGroups, ScoredGroups, dict[str, float]]:
    """Keep `first`'s signal groups and refill up to its group count with `roll(round, count)`
    (round 1, 2, ...) for at most `max_rounds` rounds. Returns (kept, everything generated,
    metrics `rl/dynamic/{dropped_groups,rounds,kept_groups}`)."""
    target = len(first.group_names())
    kept = first.select(signal_groups(first.advantages, first.groups))
    generated = first
    rounds = 0
    while len(kept.group_names()) < target and rounds < max_rounds:
        rounds += 1
        more = roll(rounds, target - len(kept.group_names()))
        generated = generated + more
        kept = kept + more.select(signal_groups(more.advantages, more.groups))
    n_generated = len(generated.group_names())
    return (
        kept,
        generated,
        {
            "rl/dynamic/dropped_groups": float(n_generated - len(kept.group_names())),
            "rl/dynamic/rounds": float(rounds),
            "rl/dynamic/kept_groups": float(len(kept.group_names())),
        },
    )
