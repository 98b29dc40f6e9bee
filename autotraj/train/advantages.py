"""The numbers of a GRPO update: group advantages, per-token log-probs, entropy, KL, PPO-clip.

Pure functions (METHOD.md section 10): no I/O, no model, no global state. `group_advantages`
works on plain floats; the loss pieces work on tensors shaped (batch, tokens) with a float mask
that is 1.0 on trainable response tokens and 0.0 on prompt, tool-result and padding tokens.

- `group_advantages`: A = (R - mean(R_group)) / (std(R_group) + 1e-6) per prompt group; excluded
  rollouts (reward None: infrastructure failures) take no part and get no advantage.
- `token_logprobs`: log pi(token_t | tokens_<t) of each token, and the entropy of the
  distribution it was drawn from, from logits (in fp32, a chunk of positions at a time).
- `kl_k3`: the k3 estimator of KL(pi || pi_ref) per token, exp(r) - r - 1 with r = ref - logp.
- `prompt_indices`: which queries a step samples (a seeded shuffle per epoch).
- `collate`: padded ids and the loss mask, taken from each rendering's own trainable flags.
- `policy_loss`: PPO-clip surrogate + entropy bonus + optional KL penalty, summed over masked
  tokens and divided by a caller-given token count (the loss is a mean over trainable tokens).

Not here: models, sampling, rewards (rewards.py), the training loop (grpo.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from autotraj.render import RenderedTrajectory
from autotraj.train.rl_loss import sequence_log_ratio

ADVANTAGE_EPS = 1e-6  # METHOD.md section 10: (R - mean) / (std + 1e-6)


def group_advantages(
    rewards: Sequence[float | None],
    groups: Sequence[Hashable],
    eps: float = ADVANTAGE_EPS,
    scale: bool = True,
) -> list[float | None]:
    """GRPO advantages, one per rollout; None for excluded rollouts (reward None).

    Rollouts sharing a group key (their prompt) are normalized together over the rollouts that
    have a reward: A = (R - mean) / (std + eps), std the sample (Bessel-corrected) standard
    deviation as `torch.std` computes it. A group whose rewards are all equal, or that has fewer
    than two rewarded rollouts, gets 0.0 advantages: it carries no learning signal.
    `scale=False` leaves out the division by the std (Dr. GRPO, arXiv 2503.20783): A = R - mean.

    >>> adv = group_advantages([1.0, 0.0, None, 0.0, 0.0], ["a", "a", "a", "b", "b"])
    >>> [None if a is None else round(a, 4) for a in adv]
    [0.7071, -0.7071, None, 0.0, 0.0]
    """
    if len(rewards) != len(groups):
        raise ValueError(f"{len(rewards)} rewards for {len(groups)} group keys")
    members: dict[Hashable, list[int]] = {}
    for i, (reward, group) in enumerate(zip(rewards, groups, strict=True)):
        if reward is not None:
            if not math.isfinite(reward):
                raise ValueError(f"rollout {i}: non-finite reward {reward}")
            members.setdefault(group, []).append(i)
    out: list[float | None] = [None] * len(rewards)
    for indices in members.values():
        values = [float(rewards[i]) for i in indices]  # type: ignore[arg-type]
        if len(values) < 2:
            out[indices[0]] = 0.0
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        for i, v in zip(indices, values, strict=True):
            if std == 0:
                out[i] = 0.0
            else:
                out[i] = (v - mean) / (std + eps) if scale else v - mean
    return out


# Positions whose full-vocabulary fp32 log-softmax exists at once: 512 x 152064 (Qwen2.5) x 4
# bytes = 0.3 GB, instead of 7 GB for a micro-batch of 4 x 2816 tokens.
LOGPROB_CHUNK = 512


def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    with_entropy: bool = False,
    chunk: int = LOGPROB_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, T) and, when asked, entropies (B, T), aligned with `input_ids`.

    Column t is log p(input_ids[:, t] | input_ids[:, :t]) and the entropy of that predictive
    distribution; column 0 (no prediction) is 0. So a mask over `input_ids` (1 where a token is
    trainable) selects the log-prob of generating exactly that token. Computed in fp32 over
    `chunk` positions at a time, forward and backward (`_ChunkedLogprobs`): the (B, T, vocab)
    fp32 log-softmax is never materialized; the gradient has the logits' dtype.
    """
    batch, length, vocab = logits.shape
    targets = torch.nn.functional.pad(input_ids[:, 1:], (0, 1))  # the last position: unused
    logp, entropy = _ChunkedLogprobs.apply(
        logits.reshape(batch * length, vocab), targets.reshape(-1), chunk, with_entropy
    )
    picked = logp.view(batch, length)[:, :-1]
    if not with_entropy:
        return _shift_to_tokens(picked), None
    return _shift_to_tokens(picked), _shift_to_tokens(entropy.view(batch, length)[:, :-1])


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(target) and entropy of (N, V) logits, `chunk` rows of fp32 at a time.

    With lse = logsumexp(x), log p = x - lse, p = exp(log p), H = lse - sum(p x):
    d log p(t) / dx = onehot(t) - p and dH / dx = -p (log p + H).
    """

    @staticmethod
    def forward(ctx: Any, logits, targets, chunk, with_entropy):  # type: ignore[override]
        n = logits.shape[0]
        picked = logits.new_empty(n, dtype=torch.float32)
        lse = logits.new_empty(n, dtype=torch.float32)
        entropy = logits.new_zeros(n if with_entropy else 0, dtype=torch.float32)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            x = logits[rows].float()
            lse[rows] = torch.logsumexp(x, dim=-1)
            picked[rows] = x.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]
            if with_entropy:
                p = torch.softmax(x, dim=-1)
                entropy[rows] = lse[rows] - (p * x).sum(-1)
        ctx.chunk, ctx.with_entropy = chunk, with_entropy
        ctx.save_for_backward(logits, targets, lse, entropy)
        if not with_entropy:
            ctx.mark_non_differentiable(entropy)
        return picked, entropy

    @staticmethod
    def backward(ctx: Any, grad_picked, grad_entropy):  # type: ignore[override]
        logits, targets, lse, entropy = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            logp = logits[rows].float() - lse[rows].unsqueeze(-1)
            p = logp.exp()
            g = p * -grad_picked[rows].unsqueeze(-1)
            if ctx.with_entropy:
                g -= grad_entropy[rows].unsqueeze(-1) * p * (logp + entropy[rows].unsqueeze(-1))
            g.scatter_add_(-1, targets[rows].unsqueeze(-1), grad_picked[rows].unsqueeze(-1))
            grad[rows] = g.to(grad.dtype)
        return grad, None, None, None


def _shift_to_tokens(values: torch.Tensor) -> torch.Tensor:
    """Prediction-aligned (B, T-1) values -> token-aligned (B, T): token t+1 gets column t."""
    return torch.nn.functional.pad(values, (1, 0))


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(r) - r - 1, r = ref - logp (>= 0).

    >>> float(kl_k3(torch.tensor([0.0]), torch.tensor([0.0])))
    0.0
    """
    r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return torch.exp(r) - r - 1


@dataclass(frozen=True)
class LossStats:
    """Sums over the masked tokens of one micro-batch (divide by the token count to average)."""

    tokens: float
    clipped: float
    entropy: float
    kl: float
    ratio: float


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    normalizer: float,
    clip: float = 0.2,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    clip_high: float | None = None,
    weights: torch.Tensor | None = None,
    sequence_ratio: bool = False,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """PPO-clip loss of one micro-batch, as a share of the mean over `normalizer` tokens.

    Per token: max(-A r, -A clip(r, 1-clip, 1+clip)) - entropy_coef * H + kl_coef * k3, with r
    the probability ratio to the rollout policy; summed where `mask` is 1 and divided by
    `normalizer` (the trainable-token count of the whole step, so that micro-batches add up to a
    token mean). `advantages` is (B,) per sequence or (B, T) per token. KL stats are taken to
    `ref_logprobs` when given, else to the rollout policy (how far this update has moved).

    The `rl.loss` options (rl_loss.py): `clip_high` replaces the upper clip (the ratio is kept
    in [1 - clip, 1 + clip_high]); `weights` (B, T) multiply each token's term before the sum
    (the aggregation, rl_loss.token_weights); `sequence_ratio` uses GSPO's one ratio per
    sequence; `is_weights` (B, T) multiply the policy-gradient term (truncated importance
    sampling).

    >>> lp = torch.zeros(1, 3); m = torch.tensor([[0.0, 1.0, 1.0]])
    >>> loss, stats = policy_loss(lp, lp, torch.tensor([2.0]), m, normalizer=2.0)
    >>> float(loss), stats.tokens, stats.clipped
    (-2.0, 2.0, 0.0)
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    mask = mask.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs
    if sequence_ratio:
        log_ratio = sequence_log_ratio(logprobs, old_logprobs, mask)
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(
        1.0 - clip, 1.0 + (clip if clip_high is None else clip_high)
    )
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    kl = kl_k3(logprobs, ref_logprobs if ref_logprobs is not None else old_logprobs)
    if ref_logprobs is not None and kl_coef:
        per_token = per_token + kl_coef * kl
    weighted = mask if weights is None else mask * weights
    loss = (per_token * weighted).sum() / normalizer
    with torch.no_grad():
        stats = LossStats(
            tokens=float(mask.sum()),
            clipped=float(((clipped > unclipped).to(mask.dtype) * mask).sum()),
            entropy=float((entropy * mask).sum()) if entropy is not None else 0.0,
            kl=float((kl * mask).sum()),
            ratio=float((ratio * mask).sum()),
        )
    return loss, stats


def prompt_indices(n_queries: int, step: int, per_step: int, seed: int) -> list[int]:
    """Query indices for step `step` (0-based): consecutive slices of a per-epoch seeded shuffle.

    Depends only on its arguments, so a resumed run continues the same sequence; every query
    is used once per epoch.

    >>> sorted(prompt_indices(3, 0, 3, seed=0))
    [0, 1, 2]
    """
    if n_queries < 1:
        raise ValueError("no queries to sample from")
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, n_queries)
        order = list(range(n_queries))
        random.Random(f"{seed}/{epoch}").shuffle(order)
        out.append(order[offset])
    return out


def collate(
    rendered: Sequence[RenderedTrajectory], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask); loss_mask is each rendering's own
    trainable flags (prompt, tool-result and padding tokens 0)."""
    width = max(len(r.input_ids) for r in rendered)
    ids = torch.full((len(rendered), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rendered), width), dtype=torch.long)
    mask = torch.zeros((len(rendered), width), dtype=torch.float32)
    for row, r in enumerate(rendered):
        n = len(r.input_ids)
        ids[row, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        attention[row, :n] = 1
        mask[row, :n] = torch.tensor(r.trainable, dtype=torch.float32)
    return ids, attention, mask
