"""The GRPO update: PPO-clip optimizer steps on one step's rewarded rollouts, on accelerate.

`PolicyUpdate.run(samples, step)` takes this process's `Sample`s (a rendering whose trainable
flags are the loss mask, and the rollout's group advantage), computes the rollout policy's
log-probs on them (and a frozen reference's when `kl_coef > 0`), then runs `ppo_epochs` x
`mini_batches` optimizer steps of the PPO-clip loss with entropy bonus and optional k3 KL
(advantages.policy_loss), each accumulated over micro-batches, and returns the step's loss, KL,
entropy, clip and gradient-norm metrics, and, for samples that carry the rollout engine's own
log-probs, their distance from the trainer's (rl_loss.mismatch_stats).

Under several processes every process runs as many micro-batches as the busiest one (empty ones
on a filler with nothing trainable): FSDP2's and ZeRO-3's forward and backward passes are
collectives, as a DDP backward is. Micro-batches before the last of an optimizer step neither
synchronize gradients nor, under DeepSpeed, step the engine.

Not here: rollouts, rewards and advantages (grpo.py, rewards.py, advantages.py).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from autotraj.render import RenderedTrajectory
from autotraj.train.advantages import collate, policy_loss, token_logprobs
from autotraj.train.rl_loss import (
    clip_range,
    loss_units,
    mismatch_stats,
    token_weights,
    truncated_is_weights,
)

if TYPE_CHECKING:
    from autotraj.train.grpo import RlConfig


@dataclass(frozen=True)
class Sample:
    """One rewarded rollout ready for the update: its rendering and its advantage (and the
    rollout engine's log-probs of its tokens, NaN where unknown, when the engine reports them)."""

    rendered: RenderedTrajectory
    advantage: float
    # the rollout engine's log-probs on `rendered.input_ids` and which are known (None: the
    # engine returned none); rl_loss.sampler_logprobs
    sampler: tuple[tuple[float, ...], tuple[bool, ...]] | None = None


class PolicyUpdate:
    """The policy, optimizer and frozen reference of an RL run, and the update between them."""

    def __init__(
        self,
        cfg: RlConfig,
        accelerator: Any,
        model: Any,
        optimizer: Any,
        ref_model: Any | None,
        tokenizer: Any,
    ):
        self.cfg = cfg
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.ref_model = ref_model
        self.tokenizer = tokenizer
        eos = int(tokenizer.eos_token_id)
        self._filler = RenderedTrajectory((eos, eos), (False, False), 2)  # nothing trainable
        # Forwarding a shared prompt once changes how many forward calls a micro-batch makes,
        # which collectives (FSDP2, ZeRO-3, DDP) must agree on; checkpointed layers return no
        # cache. So: one process, no DeepSpeed, no gradient checkpointing.
        self._rows: Counter[str] = Counter()  # rows forwarded: all, and after a shared prompt
        self._share_prompts = (
            cfg.shared_prompt_forward
            and accelerator.num_processes == 1
            and getattr(accelerator.state, "deepspeed_plugin", None) is None
            and not cfg.gradient_checkpointing
        )

    def _forward_logprobs(
        self, model: Any, batch: Sequence[RenderedTrajectory], with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        ids, attention, mask = collate(batch, self.tokenizer.eos_token_id if pad is None else pad)
        device = self.accelerator.device
        ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
        groups = prompt_groups(batch) if self._share_prompts else []
        self._rows["all"] += len(batch)
        if any(len(rows) > 1 for _, rows in groups):
            self._rows["shared"] += sum(len(rows) for _, rows in groups if len(rows) > 1)
            logp, entropy = self._grouped_logprobs(model, ids, attention, groups, with_entropy)
            return logp, entropy, mask, ids
        # logits only from the position before the first trainable token on: the prompt's
        # positions predict nothing the loss uses, so the lm_head and log-softmax skip them
        trainable = mask.any(dim=0).nonzero()
        skip = max(0, int(trainable[0]) - 1) if len(trainable) else 0
        with self.accelerator.autocast():
            logits = model(
                input_ids=ids,
                attention_mask=attention,
                use_cache=False,
                logits_to_keep=ids.shape[1] - skip,
            ).logits
        logp, entropy = token_logprobs(logits, ids[:, skip:], with_entropy=with_entropy)
        logp = torch.nn.functional.pad(logp, (skip, 0))
        if entropy is not None:
            entropy = torch.nn.functional.pad(entropy, (skip, 0))
        return logp, entropy, mask, ids

    def _grouped_logprobs(
        self,
        model: Any,
        ids: torch.Tensor,
        attention: torch.Tensor,
        groups: Sequence[tuple[int, list[int]]],
        with_entropy: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_forward_logprobs`'s log-probs (and entropies) with each group's shared prompt of
        length P forwarded once: its KV cache (differentiable) is repeated for the group's rows,
        which then forward only their tokens from P on. The logits at P - 1 (the prompt's last
        position, predicting the first reply token) come from the prompt's pass. Causal
        attention makes this the same computation as whole rows."""
        batch, width = ids.shape
        logp = torch.zeros((batch, width), device=ids.device)
        entropy = torch.zeros((batch, width), device=ids.device) if with_entropy else None
        # one autocast region for every call: each weight is cast to the autocast dtype once
        # (autocast caches the casts of leaf weights inside its region), so the backward
        # converts one gradient per weight back, not one per call
        parts = []
        with self.accelerator.autocast():
            for prompt, rows in groups:
                index = torch.tensor(rows, device=ids.device)
                end = int(attention[index].sum(dim=1).max())
                if end <= prompt:  # nothing after the prompt: nothing to score
                    continue
                head = model(
                    input_ids=ids[rows[0] : rows[0] + 1, :prompt], use_cache=True, logits_to_keep=1
                )
                cache = head.past_key_values
                cache.batch_repeat_interleave(len(rows))
                tail = model(
                    input_ids=ids[index, prompt:end],
                    attention_mask=attention[index, :end],
                    past_key_values=cache,
                    use_cache=True,
                ).logits
                logits = torch.cat([head.logits.expand(len(rows), -1, -1), tail], dim=1)
                parts.append((index, prompt - 1, end, logits))
        for index, start, end, logits in parts:
            part, part_entropy = token_logprobs(
                logits, ids[index, start:end], with_entropy=with_entropy
            )
            logp[index, start:end] = part.float()
            if entropy is not None and part_entropy is not None:
                entropy[index, start:end] = part_entropy.float()
        return logp, entropy

    def _micro_batches(self, n: int, collective: bool) -> list[range]:
        """Index ranges of the micro-batches over `n` items. `collective`: the passes run on the
        prepared policy, whose forward and backward are collectives under FSDP2/ZeRO-3 (and a
        DDP backward is one): every process gets as many micro-batches as the busiest one, the
        extra ones empty (run on `_filler`, with nothing trainable)."""
        mb = self.cfg.micro_batch_size
        spans = [range(start, min(start + mb, n)) for start in range(0, n, mb)]
        acc = self.accelerator
        if collective and acc.num_processes > 1:
            most = int(acc.gather(torch.tensor([len(spans)], device=acc.device)).max())
            spans += [range(0)] * (most - len(spans))
        return spans

    @contextlib.contextmanager
    def _accumulating(self, boundary: bool) -> Any:
        """Around one micro-batch's backward: unless it is the last before the optimizer step,
        gradients are not synchronized (DDP, FSDP2) and DeepSpeed does not step its engine."""
        acc = self.accelerator
        if boundary:
            yield
            return
        acc.gradient_state._set_sync_gradients(False)  # what DeepSpeed's backward consults
        try:
            with acc.no_sync(self.model):
                yield
        finally:
            acc.gradient_state._set_sync_gradients(True)

    @torch.no_grad()
    def _fixed_logprobs(
        self, model: Any, samples: Sequence[Sample], collective: bool
    ) -> list[torch.Tensor]:
        """Per-sample log-probs under a model that does not change during the update."""
        out = []
        for span in self._micro_batches(len(samples), collective):
            chunk = [samples[i].rendered for i in span] or [self._filler]
            logp, _, _, _ = self._forward_logprobs(model, chunk, with_entropy=False)
            out.extend(
                logp[row, : len(samples[i].rendered.input_ids)] for row, i in enumerate(span)
            )
        return out

    def on_policy(self) -> bool:
        """Exactly one optimizer step per batch: the policy the loss sees is the sampled one."""
        return self.cfg.ppo_epochs * self.cfg.mini_batches == 1

    def run(self, samples: Sequence[Sample], step: int) -> dict[str, float]:
        """PPO-clip updates on this process's samples; returns loss/kl/entropy/clip metrics."""
        cfg = self.cfg
        began = time.perf_counter()
        self._rows.clear()
        # One optimizer step per batch is on-policy: the old log-probs equal the current ones, so
        # the loss uses the current log-probs detached (ratio exactly 1) and skips a forward pass.
        on_policy = self.on_policy()
        old: list[torch.Tensor | None] = (
            [None] * len(samples)
            if on_policy
            else list(self._fixed_logprobs(self.model, samples, collective=True))
        )
        seen: list[tuple[Sample, torch.Tensor]] = []
        ref = None
        if self.ref_model is not None:  # unsharded on every process: no collective
            ref = self._fixed_logprobs(self.ref_model, samples, collective=False)
        totals: Counter[str] = Counter()
        order = list(range(len(samples)))
        rng = random.Random(f"{cfg.seed}/update/{step}")
        for _ in range(cfg.ppo_epochs):
            rng.shuffle(order)
            for part in range(cfg.mini_batches):
                chosen = order[part :: cfg.mini_batches]
                self._optimizer_step(
                    [(samples[i], old[i], ref[i] if ref else None) for i in chosen], totals, seen
                )
        mismatch = (
            self._mismatch([s for s, _ in seen], [o for _, o in seen])
            if on_policy
            else self._mismatch(samples, old)
        )
        tokens = max(1.0, totals["tokens"])
        return mismatch | {
            "rl/loss": totals["loss"] / max(1, totals["updates"]),
            "rl/kl": totals["kl"] / tokens,
            "rl/entropy": totals["entropy"] / tokens,
            "rl/clip_fraction": totals["clipped"] / tokens,
            "rl/ratio_mean": totals["ratio"] / tokens,
            "rl/grad_norm": totals["grad_norm"] / max(1, totals["updates"]),
            "rl/lr": cfg.lr,
            "rl/trainable_tokens": totals["tokens"] / max(1, cfg.ppo_epochs),
            "rl/time/update_s": time.perf_counter() - began,
            # share of the update's forwarded rows whose prompt was forwarded once for its group
            "rl/update/shared_prompt_rows": self._rows["shared"] / max(1, self._rows["all"]),
            **mismatch,
        }

    def _mismatch(self, samples: Sequence[Sample], old: Sequence[torch.Tensor]) -> dict[str, float]:
        """Sampler/trainer divergence on this process's tokens whose sampler log-prob is known
        (none: the engine returned no log-probs, and the metrics are absent)."""
        sums: Counter[str] = Counter()
        for sample, trainer in zip(samples, old, strict=True):
            if sample.sampler is None:
                continue
            values, known = sample.sampler
            for key, value in mismatch_stats(
                trainer.cpu().unsqueeze(0),
                torch.tensor([values], dtype=trainer.dtype),
                torch.tensor([known], dtype=trainer.dtype),
            ).items():
                sums[key] = max(sums[key], value) if key == "ratio_max" else sums[key] + value
        if not sums["tokens"]:
            return {}
        return {
            "rl/mismatch/abs_logprob_diff": sums["abs_diff"] / sums["tokens"],
            "rl/mismatch/k3": sums["k3"] / sums["tokens"],
            "rl/mismatch/ratio_max": sums["ratio_max"],
            "rl/mismatch/tokens": sums["tokens"],
        }

    def _optimizer_step(
        self,
        chosen: Sequence[tuple[Sample, torch.Tensor | None, torch.Tensor | None]],
        totals: Counter[str],
        seen: list[tuple[Sample, torch.Tensor]],
    ) -> None:
        """Accumulate the loss of `chosen` over micro-batches, then one optimizer step. A sample
        whose old log-probs are None is on-policy: its current log-probs, detached, stand in
        (and are appended to `seen` with the sample, for the mismatch metrics)."""
        cfg, acc = self.cfg, self.accelerator
        loss_cfg = cfg.loss
        local = loss_units([s.rendered.trainable for s, _, _ in chosen], loss_cfg.aggregation)
        count = torch.tensor(float(local), device=acc.device)
        # A mean over all processes' tokens (or sequences, rl_loss.loss_units): DDP averages
        # gradients, so scale by the process count.
        normalizer = float(acc.reduce(count, reduction="sum")) / acc.num_processes
        ref = self.ref_model is not None
        spans = self._micro_batches(len(chosen), collective=True)
        empty = torch.zeros(len(self._filler.input_ids))
        loss_sum = 0.0
        for n, span in enumerate(spans):
            part = [chosen[i] for i in span] or [
                (Sample(self._filler, 0.0), empty, empty if ref else None)
            ]
            with self._accumulating(boundary=n == len(spans) - 1):
                logp, entropy, mask, _ = self._forward_logprobs(
                    self.model, [s.rendered for s, _, _ in part], with_entropy=True
                )
                current = logp.detach()
                rows = []
                for row, (s, o, _) in enumerate(part):
                    if o is None:
                        o = current[row, : len(s.rendered.input_ids)]
                        if span:  # not the filler
                            seen.append((s, o))
                    rows.append(o)
                old = _pad_rows(rows, logp)
                low, high = clip_range(loss_cfg, cfg.clip)
                loss, stats = policy_loss(
                    logp,
                    old,
                    torch.tensor([s.advantage for s, _, _ in part], device=logp.device),
                    mask,
                    normalizer=max(normalizer, 1.0),
                    clip=low,
                    clip_high=high,
                    weights=token_weights(
                        mask, loss_cfg.aggregation, cfg.rollout.max_response_tokens
                    ),
                    sequence_ratio=loss_cfg.aggregation == "gspo",
                    is_weights=self._is_weights([s for s, _, _ in part], old, mask),
                    entropy=entropy,
                    entropy_coef=cfg.entropy_coef,
                    ref_logprobs=_pad_rows([r for _, _, r in part], logp) if ref else None,
                    kl_coef=cfg.kl_coef,
                )
                acc.backward(loss)
            loss_sum += float(loss.detach())
            for key in ("tokens", "clipped", "entropy", "kl", "ratio"):
                totals[key] += getattr(stats, key)
        # DeepSpeed clipped and stepped inside the last backward; this returns its norm
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["loss"] += loss_sum
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        totals["grad_norm"] += float(grad_norm) if grad_norm is not None else 0.0
        totals["updates"] += 1

    def _is_weights(
        self, part: Sequence[Sample], old: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor | None:
        """Truncated importance weights (B, T) against the sampler's log-probs when
        `loss.tis_cap` is set and the engine returned them; else None."""
        cap = self.cfg.loss.tis_cap
        if not cap or all(s.sampler is None for s in part):
            return None
        sampler = torch.zeros_like(old)
        known = torch.zeros_like(mask)
        for row, s in enumerate(part):
            if s.sampler is not None:
                n = len(s.sampler[0])
                sampler[row, :n] = torch.tensor(s.sampler[0], device=old.device)
                known[row, :n] = torch.tensor(s.sampler[1], dtype=mask.dtype, device=old.device)
        return truncated_is_weights(old, sampler, known, cap)


def prompt_groups(batch: Sequence[RenderedTrajectory]) -> list[tuple[int, list[int]]]:
    """The rows of `batch` grouped by identical prompt ids, as (prompt length, rows) in order of
    first appearance. A rollout group's rows share their prompt; nothing before the prompt's end
    is trainable."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, r in enumerate(batch):
        if r.prompt_length < 1 or any(r.trainable[: r.prompt_length]):
            raise ValueError(f"row {row}: a prompt of {r.prompt_length} tokens with trainable ids")
        groups.setdefault(r.input_ids[: r.prompt_length], []).append(row)
    return [(len(prompt), rows) for prompt, rows in groups.items()]


def _pad_rows(rows: Sequence[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """Stack per-sample 1-D tensors into `like`'s (B, T) shape, zero-padded on the right."""
    out = torch.zeros_like(like)
    for i, row in enumerate(rows):
        if row is None:
            raise ValueError("missing log-probs for a sample")
        out[i, : row.shape[0]] = row.to(like.device)
    return out
