"""The RL objective's options (the `rl.loss` section) and their pure numbers.

Options that TRL, verl and OpenRLHF users expect, each off or equal to today's loss by default
(docs/rl.md, "Objective and sampling options", gives each one's source):
- `aggregation`: how per-token losses become the step's loss. `token_mean` (the default, what
  autotraj always did: the mean over every trainable token of the step, DAPO's token-level
  loss), `seq_mean` (GRPO: each sequence's token mean, then the mean over sequences),
  `dr_grpo` (Dr. GRPO: each sequence's token sum over a constant, the response budget, and
  advantages not divided by the group's std), `gspo` (GSPO: one importance ratio per sequence,
  the geometric mean of its token ratios, clipped per sequence, sequence-mean loss);
- `clip_low` / `clip_high`: asymmetric PPO clip range (DAPO's clip-higher);
- `overlong_mask` (DAPO's overlong filtering: truncated rollouts leave the loss) and
  `overlong_buffer` / `overlong_penalty` (DAPO's soft overlong punishment on the reward);
- `tis_cap`: truncated importance sampling, weighting each token's policy-gradient term by
  min(pi_trainer / pi_sampler, cap) when the rollout engine returned log-probs.

Pure functions on floats and (batch, tokens) tensors; no model, no I/O. Not here: the PPO-clip
loss itself (advantages.policy_loss, which takes these pieces), the loop (grpo.py,
grpo_update.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

from autotraj.config import ConfigError
from autotraj.records import Trajectory
from autotraj.render import RenderedTrajectory
from autotraj.rewards import RewardBreakdown

Aggregation = Literal["token_mean", "seq_mean", "dr_grpo", "gspo"]


@dataclass(frozen=True)
class RlLossConfig:
    # token_mean: autotraj's loss since the first release of this stage (docs/rl.md)
    aggregation: Aggregation = "token_mean"
    clip_low: float | None = None  # None: `rl.clip`; ratio floor 1 - clip_low
    clip_high: float | None = None  # None: `rl.clip`; DAPO's clip-higher uses 0.28
    overlong_mask: bool = False  # DAPO overlong filtering: finish_reason "length" -> no loss
    overlong_buffer: int = 0  # DAPO soft punishment over the last N response tokens (0: off)
    overlong_penalty: float = 1.0  # DAPO: the penalty reaches -1.0 at the budget
    tis_cap: float = 0.0  # truncated importance sampling cap (0: off; verl/the TIS note: 2)


def check_loss_config(cfg: RlLossConfig, max_response_tokens: int) -> None:
    """Raise `ConfigError` naming the first `rl.loss` field with a value out of range."""
    if cfg.clip_low is not None and not 0.0 < cfg.clip_low < 1.0:
        raise ConfigError(f"rl: loss.clip_low must be in (0, 1), got {cfg.clip_low}")
    if cfg.clip_high is not None and cfg.clip_high <= 0.0:
        raise ConfigError(f"rl: loss.clip_high must be > 0, got {cfg.clip_high}")
    if not 0 <= cfg.overlong_buffer < max_response_tokens:
        raise ConfigError(
            f"rl: loss.overlong_buffer must be in [0, rollout.max_response_tokens="
            f"{max_response_tokens}), got {cfg.overlong_buffer}"
        )
    if cfg.overlong_penalty < 0:
        raise ConfigError(f"rl: loss.overlong_penalty must be >= 0, got {cfg.overlong_penalty}")
    if cfg.tis_cap < 0 or 0 < cfg.tis_cap < 1:
        raise ConfigError(f"rl: loss.tis_cap must be 0 (off) or >= 1, got {cfg.tis_cap}")


def clip_range(cfg: RlLossConfig, clip: float) -> tuple[float, float]:
    """(low, high): the ratio is clipped to [1 - low, 1 + high]."""
    low = clip if cfg.clip_low is None else cfg.clip_low
    return low, clip if cfg.clip_high is None else cfg.clip_high


def overlong_penalty(length: int, budget: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward.

    0 up to `budget - buffer` response tokens, then falling linearly to `-factor` at `budget`
    (and below it past the budget is impossible here: the rollout stops at it).

    >>> overlong_penalty(90, 100, 20), overlong_penalty(90, 100, 0), overlong_penalty(100, 100, 20)
    (-0.5, 0.0, -1.0)
    """
    if buffer <= 0 or length <= budget - buffer:
        return 0.0
    return -factor * min(1.0, (length - (budget - buffer)) / buffer)


def with_overlong_penalty(
    breakdown: RewardBreakdown, length: int, cfg: RlLossConfig, budget: int
) -> RewardBreakdown:
    """`breakdown` with `overlong_penalty` added to its reward and logged as the component
    `overlong_penalty`; an excluded rollout (reward None) stays as it is."""
    if breakdown.reward is None:
        return breakdown
    penalty = overlong_penalty(length, budget, cfg.overlong_buffer, cfg.overlong_penalty)
    return replace(
        breakdown,
        reward=breakdown.reward + penalty,
        components=(*breakdown.components, ("overlong_penalty", penalty)),
    )


def token_weights(mask: torch.Tensor, aggregation: Aggregation, budget: int) -> torch.Tensor:
    """Per-token weights (B, T) that, summed with the mask and divided by `loss_units`, give the
    step's loss under `aggregation`: 1 (token_mean), 1/|o_i| (seq_mean, gspo), 1/budget
    (dr_grpo: a constant, so long and short answers weigh alike per token).

    >>> m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    >>> token_weights(m, "seq_mean", 8)[:, 0].tolist()
    [0.5, 1.0]
    """
    if aggregation == "token_mean":
        return torch.ones_like(mask)
    if aggregation == "dr_grpo":
        return torch.full_like(mask, 1.0 / budget)
    lengths = mask.sum(-1, keepdim=True).clamp(min=1.0)
    return (1.0 / lengths).expand_as(mask)


def loss_units(trainable: Sequence[Sequence[bool]], aggregation: Aggregation) -> int:
    """What the step's loss is a mean over: trainable tokens (token_mean) or sequences with at
    least one trainable token (the others)."""
    if aggregation == "token_mean":
        return sum(sum(flags) for flags in trainable)
    return sum(1 for flags in trainable if any(flags))


def sequence_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's log-ratio per token (arXiv 2507.18071, GSPO-token): the sequence's mean token
    log-ratio, detached, plus logp - sg(logp). Its value is log s_i on every token; its gradient
    per sequence, averaged over tokens, is that of s_i.

    >>> lp = torch.tensor([[0.0, -1.0, -3.0]]); m = torch.tensor([[0.0, 1.0, 1.0]])
    >>> sequence_log_ratio(lp, torch.tensor([[0.0, -2.0, -2.0]]), m).tolist()
    [[0.0, 0.0, 0.0]]
    """
    lengths = mask.sum(-1).clamp(min=1.0)
    log_s = ((logprobs - old_logprobs) * mask).sum(-1) / lengths
    return log_s.detach().unsqueeze(-1) + logprobs - logprobs.detach()


def truncated_is_weights(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, known: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weights min(exp(trainer - sampler), cap) per token, 1 where the
    sampler's log-prob is not `known` (no gradient flows through them).

    >>> w = truncated_is_weights(torch.tensor([[0.0, 0.0]]), torch.tensor([[-1.0, 0.0]]),
    ...                          torch.tensor([[1.0, 0.0]]), cap=2.0)
    >>> w.tolist()
    [[2.0, 1.0]]
    """
    ratio = torch.exp((trainer_logprobs - sampler_logprobs).clamp(-20.0, 20.0)).clamp(max=cap)
    return torch.where(known > 0, ratio, torch.ones_like(ratio)).detach()


def sampler_logprobs(
    trajectory: Trajectory, rendered: RenderedTrajectory
) -> tuple[tuple[float, ...], tuple[bool, ...]] | None:
    """The rollout engine's log-probs aligned with `rendered.input_ids` and which are known, or
    None when no segment carries them (a backend that does not return them).

    Segments are laid out after the prompt as render.render_trajectory lays them out; the
    end-of-turn token appended at rendering was not returned by the engine (unknown).
    """
    if not any(s.logprobs is not None for s in trajectory.segments):
        return None
    values = [0.0] * len(rendered.input_ids)
    known = [False] * len(rendered.input_ids)
    at = rendered.prompt_length
    for segment in trajectory.segments:
        n = len(segment.token_ids)
        if segment.logprobs is not None and segment.trainable and len(segment.logprobs) == n:
            values[at : at + n] = segment.logprobs
            known[at : at + n] = [True] * n
        elif not segment.token_ids:
            return None  # text-only segments: positions cannot be aligned
        at += n
    return tuple(values), tuple(known)


def mismatch_stats(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, known: torch.Tensor
) -> dict[str, float]:
    """Sums over the known tokens of the sampler/trainer divergence: `tokens`, `abs_diff`
    (|log pi_trainer - log pi_sampler|), `k3` (k3 estimate of KL(sampler || trainer)), and the
    max per-token probability ratio `ratio_max`."""
    known = known.to(trainer_logprobs.dtype)
    diff = (trainer_logprobs - sampler_logprobs).clamp(-20.0, 20.0)
    k3 = torch.exp(diff) - diff - 1  # r = trainer - sampler, sampled from the sampler
    ratio = torch.exp(diff) * known
    return {
        "tokens": float(known.sum()),
        "abs_diff": float((diff.abs() * known).sum()),
        "k3": float((k3 * known).sum()),
        "ratio_max": float(ratio.max()) if known.any() else 0.0,
    }
