"""The `rl.loss` options, each tested for its effect on the loss or its gradient."""

from __future__ import annotations

import math

import pytest
import torch

from autotraj.config import ConfigError, build
from autotraj.records import Provenance, Segment, Trajectory
from autotraj.render import RenderedTrajectory
from autotraj.rewards import RewardBreakdown
from autotraj.train.advantages import group_advantages, policy_loss
from autotraj.train.rl_loss import (
    RlLossConfig,
    check_loss_config,
    clip_range,
    loss_units,
    mismatch_stats,
    overlong_penalty,
    sampler_logprobs,
    token_weights,
    with_overlong_penalty,
)

# two sequences of 3 and 1 trainable tokens (a padded batch), advantages +1 and +1
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def grads(aggregation, budget=8, advantages=(1.0, 1.0), **kwargs):
    """d loss / d logp for MASK under `aggregation`, the step's normalizer as grpo_update makes it."""
    logp = torch.zeros(2, 3, requires_grad=True)
    flags = [[bool(v) for v in row] for row in MASK.tolist()]
    loss, _ = policy_loss(
        logp,
        torch.zeros(2, 3),
        torch.tensor(advantages),
        MASK,
        normalizer=float(loss_units(flags, aggregation)),
        weights=token_weights(MASK, aggregation, budget),
        sequence_ratio=aggregation == "gspo",
        **kwargs,
    )
    loss.backward()
    return logp.grad


def test_token_mean_is_the_default_and_todays_loss():
    assert RlLossConfig().aggregation == "token_mean"
    g = grads("token_mean")
    assert g[MASK > 0].tolist() == pytest.approx([-1 / 4] * 4)  # every token alike: 1/N tokens


def test_seq_mean_weighs_each_sequence_alike():
    g = grads("seq_mean")
    # 2 sequences: the short one's single token gets 1/2, each long-sequence token 1/6
    assert g[0].tolist() == pytest.approx([-1 / 6] * 3)
    assert float(g[1, 0]) == pytest.approx(-1 / 2)


def test_dr_grpo_divides_by_a_constant_and_keeps_the_std():
    g = grads("dr_grpo", budget=8)
    assert g[MASK > 0].tolist() == pytest.approx([-1 / 16] * 4)  # 1 / (budget * sequences)
    rewards, groups = [1.0, 0.0, 0.0, 0.0], ["g"] * 4
    scaled = group_advantages(rewards, groups)
    plain = group_advantages(rewards, groups, scale=False)
    assert plain == pytest.approx([0.75, -0.25, -0.25, -0.25])  # R - mean, no std division
    assert scaled[0] == pytest.approx(0.75 / (0.5 + 1e-6))


def test_gspo_clips_whole_sequences_on_the_sequence_ratio():
    # sequence 0: token ratios e^0.6, 1, 1 -> sequence ratio e^0.2 > 1.2: the whole sequence
    # is clipped (no gradient on any token), where the token-level loss clips only token 0
    old = torch.zeros(2, 3)
    new_values = torch.tensor([[0.6, 0.0, 0.0], [0.0, 0.0, 0.0]])
    out = {}
    for sequence_ratio in (False, True):
        new = new_values.clone().requires_grad_(True)
        loss, stats = policy_loss(
            new,
            old,
            torch.tensor([1.0, 1.0]),
            MASK,
            2.0,
            clip=0.2,
            weights=token_weights(MASK, "gspo", 8),
            sequence_ratio=sequence_ratio,
        )
        loss.backward()
        out[sequence_ratio] = (new.grad.clone(), stats.clipped)
    token_grad, token_clipped = out[False]
    seq_grad, seq_clipped = out[True]
    assert token_clipped == 1.0 and float(token_grad[0, 0]) == 0 and float(token_grad[0, 1]) < 0
    assert seq_clipped == 3.0 and seq_grad[0].abs().sum() == 0
    assert float(seq_grad[1, 0]) == pytest.approx(-1 / 2)  # the other sequence still learns


def test_gspo_gradient_is_the_sequence_ratio_gradient():
    # unclipped: d/dlogp_t of -A * s_i / n_seq with s_i = exp(mean_t(logp - old)) is
    # -A * s_i / (|o_i| * n_seq) on every token of the sequence
    logp = torch.tensor([[0.05, -0.05, 0.09], [0.0, 0.0, 0.0]], requires_grad=True)
    loss, _ = policy_loss(
        logp,
        torch.zeros(2, 3),
        torch.tensor([2.0, 0.0]),
        MASK,
        2.0,
        weights=token_weights(MASK, "gspo", 8),
        sequence_ratio=True,
    )
    loss.backward()
    s = math.exp(0.09 / 3)
    assert logp.grad[0].tolist() == pytest.approx([-2 * s / 6] * 3)


def test_clip_higher_lets_a_rising_token_keep_its_gradient():
    old, mask = torch.zeros(1, 1), torch.ones(1, 1)
    grads_at = {}
    for high in (None, 0.28):
        new = torch.tensor([[math.log(1.25)]], requires_grad=True)
        loss, _ = policy_loss(new, old, torch.tensor([1.0]), mask, 1.0, clip=0.2, clip_high=high)
        loss.backward()
        grads_at[high] = float(new.grad)
    assert grads_at[None] == 0.0  # ratio 1.25 > 1.2: clipped
    assert grads_at[0.28] == pytest.approx(-1.25)  # inside 1.28: -A * ratio
    # the lower bound: ratio 0.75 with A < 0 is clipped at clip_low 0.2, not at 0.3
    for low, expected in ((0.2, 0.0), (0.3, 0.75)):
        new = torch.tensor([[math.log(0.75)]], requires_grad=True)
        loss, _ = policy_loss(new, old, torch.tensor([-1.0]), mask, 1.0, clip=low)
        loss.backward()
        assert float(new.grad) == pytest.approx(expected)
    cfg = build(RlLossConfig, {"clip_low": 0.2, "clip_high": 0.28})
    assert clip_range(cfg, 0.1) == (0.2, 0.28) and clip_range(RlLossConfig(), 0.1) == (0.1, 0.1)


def test_truncated_importance_weights_scale_the_policy_gradient():
    plain = grads("token_mean")
    weighted = grads("token_mean", is_weights=torch.tensor([[2.0, 1.0, 0.5], [1.0, 1.0, 1.0]]))
    p = plain[0].tolist()
    assert weighted[0].tolist() == pytest.approx([2 * p[0], p[1], 0.5 * p[2]])


def test_overlong_penalty_follows_dapo():
    budget, buffer = 100, 20
    assert overlong_penalty(80, budget, buffer) == 0.0  # up to budget - buffer: none
    assert overlong_penalty(90, budget, buffer) == pytest.approx(-0.5)
    assert overlong_penalty(100, budget, buffer, factor=0.5) == pytest.approx(-0.5)
    assert overlong_penalty(100, budget, 0) == 0.0  # off
    b = RewardBreakdown("t", "q", 1.0, False, "", True, 1.0, True, None)
    cfg = RlLossConfig(overlong_buffer=buffer)
    penalized = with_overlong_penalty(b, 95, cfg, budget)
    assert penalized.reward == pytest.approx(0.25)
    assert dict(penalized.components)["overlong_penalty"] == pytest.approx(-0.75)
    excluded = RewardBreakdown("t", "q", None, True, "infra", False, 0.0, False, None)
    assert with_overlong_penalty(excluded, 100, cfg, budget) is excluded


def _trajectory(segments):
    return Trajectory(
        id="t",
        query_id="q",
        segments=tuple(segments),
        tool_calls=(),
        finish_reason="answer",
        provenance=Provenance("m", "scripted", 1.0, 1.0, 8),
    )


def test_sampler_logprobs_line_up_with_the_rendering():
    segments = [
        Segment(text="ab", trainable=True, token_ids=(5, 6), logprobs=(-0.1, -0.2)),
        Segment(text="<result>", trainable=False, token_ids=(7,)),
        Segment(text="c", trainable=True, token_ids=(8,), logprobs=(-0.3,)),
    ]
    rendered = RenderedTrajectory((1, 2, 5, 6, 7, 8, 0), (False, False) + (True,) * 5, 2)
    values, known = sampler_logprobs(_trajectory(segments), rendered)
    assert values == (0.0, 0.0, -0.1, -0.2, 0.0, -0.3, 0.0)
    assert known == (False, False, True, True, False, True, False)  # eot: not the engine's
    no_logprobs = [Segment(text="ab", trainable=True, token_ids=(5, 6))]
    assert sampler_logprobs(_trajectory(no_logprobs), rendered) is None


def test_mismatch_stats_measure_the_divergence():
    trainer = torch.tensor([[0.0, -1.0, -2.0]])
    known = torch.tensor([[0.0, 1.0, 1.0]])
    same = mismatch_stats(trainer, trainer, known)
    assert same["tokens"] == 2.0 and same["abs_diff"] == 0.0 and same["k3"] == 0.0
    off = mismatch_stats(trainer, torch.tensor([[5.0, -1.5, -2.0]]), known)
    assert off["abs_diff"] == pytest.approx(0.5)  # the unknown token's 5.0 is ignored
    assert off["k3"] == pytest.approx(math.exp(0.5) - 0.5 - 1)
    assert off["ratio_max"] == pytest.approx(math.exp(0.5))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("clip_low", 1.0),
        ("clip_high", 0.0),
        ("overlong_buffer", 64),
        ("overlong_penalty", -1.0),
        ("tis_cap", 0.5),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"loss.{field}"):
        check_loss_config(build(RlLossConfig, {field: value}), max_response_tokens=64)
    with pytest.raises(ConfigError, match="aggregation"):
        build(RlLossConfig, {"aggregation": "mean"})
