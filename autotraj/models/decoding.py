"""Our batched decoding loop: prefill once, then decode with a KV cache that drops finished rows.

`decode_batch(model, tokenizer, requests, eos_ids, pad_id)` continues each request's
`prompt_ids` (which must be set) and returns, per request, the raw new token ids: they end with
the token that finished the row (an eos id, the token that completed one of its stop strings) or
at its own `max_new_tokens`. Cutting those ids into a `Completion` (eos excluded, the first stop
string, the stop reason) is `truncate_at_stop`'s job in transformers_backend.py.

How it works:
- prefill: the prompts are left-padded into one batch (attention mask 1 on real tokens,
  position ids = cumsum(mask) - 1, as HF `generate` builds them) and run once into a
  transformers `DynamicCache`; only the last position's logits are computed when the model
  supports `logits_to_keep`;
- decode: one token per live row per step. After each step the rows that finished are removed
  from the batch (input ids, attention mask, positions, sampling params and every cache layer),
  so a row that ended costs nothing afterwards; leading columns that are padding in every
  remaining row are cut from the mask and the cache as well;
- a row finishes at an eos id, at its token budget, or when the decoded tail of its new ids (the
  last `len(longest stop) + 2` tokens, not the whole text) contains one of its stop strings;
- sampling is per row inside one batch: temperature 0 is greedy (argmax of the logits, as HF
  `generate` with `do_sample=False`); otherwise the float32 logits are divided by the row's
  temperature and the draw is restricted to the row's top-p nucleus (top-k is off, as in vLLM and
  OpenAI-compatible servers).

Seeds: one `torch.Generator` per call, seeded with the first request's seed (the global RNG when
that seed is None); the draws of a row depend on which rows are still in the batch, so sampling
is reproducible for the same requests, batch and hardware, not across batch compositions. Greedy
rows never consume randomness that changes their output.

Log-probs: `decode_batch_logprobs` also returns, per new token, its log-probability under the
model's own distribution (log-softmax of the float32 logits, before temperature and top-p), the
number a trainer recomputes for the same ids; RL logs the two's divergence (train/rl_loss.py).

The caller runs this under `torch.inference_mode()` with the model in eval mode. Not here:
beam search, repetition penalties, static caches or `torch.compile`.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from autotraj.models.decode_step import FastStep
from autotraj.models.generator import GenerationRequest
from autotraj.models.kv_cache import BufferedLayer, buffered_cache, compact_cache, fill_holes


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """The one decoding used for generated ids: special tokens kept, no space clean-up."""
    return tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def has_stop(text: str, stops: Sequence[str]) -> bool:
    return any(s in text for s in stops)


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One next token per row of float32 `logits` (rows x vocab).

    Rows with temperature <= 0 take the argmax; the others draw from softmax(logits / T)
    restricted to the smallest set of most likely tokens whose probability reaches the row's
    top_p (the most likely token is always kept).
    """
    greedy = temperature <= 0
    if bool(greedy.all()):
        return _argmax(logits)
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    probs, order = scaled.softmax(dim=-1).sort(dim=-1, descending=True)
    mass_before = probs.cumsum(dim=-1) - probs
    outside = mass_before >= top_p[:, None]
    outside[:, 0] = False
    pick = torch.multinomial(probs.masked_fill(outside, 0.0), 1, generator=generator)
    drawn = order.gather(1, pick).squeeze(1)
    return torch.where(greedy, _argmax(logits), drawn)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)`: the first index of each row's maximum. `max(-1).indices` gives the
    same (first maximal index, documented) ~2.5x faster on CPU at 64 x 49152 float32."""
    return logits.max(dim=-1).indices


@dataclass
class _Batch:
    """The live rows of one decoding batch and their model state (all shrink together)."""

    rows: list[int]  # index of each live row in the caller's requests
    pads: list[int]  # leading padding columns of each live row
    attention_mask: torch.Tensor  # (live, columns), 1 on real tokens
    positions: torch.Tensor  # (live,) position id of each row's last token
    temperature: torch.Tensor  # (live,) float32, 0 = greedy
    top_p: torch.Tensor  # (live,) float32
    cache: DynamicCache

    def keep(self, keep: list[int]) -> list[int]:
        """Keep only the live rows at batch positions `keep` (ascending). The rows above the
        new batch size move into the freed slots (kv_cache.fill_holes), so that the cache copies
        only those rows; returns the new order (new row j = old row order[j])."""
        order = fill_holes(keep, len(self.rows))
        index = torch.tensor(order, dtype=torch.long, device=self.attention_mask.device)
        self.rows = [self.rows[j] for j in order]
        self.pads = [self.pads[j] for j in order]
        self.attention_mask = self.attention_mask[index]
        self.positions = self.positions[index]
        self.temperature = self.temperature[index]
        self.top_p = self.top_p[index]
        compact_cache(self.cache, order)
        self._trim_padding()
        return order

    def _trim_padding(self) -> None:
        """Cut the leading columns that are padding in every live row (plain cache layers only:
        a sliding-window layer's columns are not aligned with the mask's)."""
        cut = min(self.pads)
        if cut == 0 or not all(isinstance(layer, BufferedLayer) for layer in self.cache.layers):
            return
        for layer in self.cache.layers:
            layer.trim_front(cut)
        self.attention_mask = self.attention_mask[:, cut:]
        self.pads = [p - cut for p in self.pads]


def decode_batch(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    eos_ids: Collection[int],
    pad_id: int,
    fast: FastStep | None = None,
) -> list[tuple[int, ...]]:
    """Raw new ids per request, each ending with its finishing token or at its budget.
    `fast`: the model's decode_step.FastStep, used for the decode steps (None: transformers)."""
    return [ids for ids, _ in _decode(model, tokenizer, requests, eos_ids, pad_id, False, fast)]


def decode_batch_logprobs(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    eos_ids: Collection[int],
    pad_id: int,
    fast: FastStep | None = None,
) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """`decode_batch`'s ids per request with each id's log-prob under the unscaled logits."""
    return _decode(model, tokenizer, requests, eos_ids, pad_id, True, fast)


def _decode(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    eos_ids: Collection[int],
    pad_id: int,
    with_logprobs: bool,
    fast: FastStep | None,
) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    if any(not r.prompt_ids for r in requests):
        raise ValueError("decode_batch needs prompt_ids on every request")
    out: list[list[int]] = [[] for _ in requests]
    logprobs: list[list[float]] = [[] for _ in requests]
    live = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
    if not live:
        return [((), ()) for _ in requests]
    generator = _generator(requests[0].seed, model.device)
    batch, logits = _prefill(model, [requests[i] for i in live], live, pad_id)
    windows = [max((len(s) for s in r.stop), default=0) + 2 for r in requests]
    eos = set(eos_ids)
    while True:
        tokens = sample_next(logits, batch.temperature, batch.top_p, generator)
        if with_logprobs:
            picked = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
            for row, value in zip(batch.rows, picked.tolist(), strict=True):
                logprobs[row].append(value)
        keep = []
        for j, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)):
            out[row].append(token)
            if not _finished(out[row], requests[row], eos, tokenizer, windows[row]):
                keep.append(j)
        if not keep:
            return [(tuple(ids), tuple(lp)) for ids, lp in zip(out, logprobs, strict=True)]
        if len(keep) < len(batch.rows):
            tokens = tokens[batch.keep(keep)]
        logits = _step(model, batch, tokens, fast)


def _finished(
    ids: list[int], request: GenerationRequest, eos: set[int], tokenizer: Any, window: int
) -> bool:
    if ids[-1] in eos or len(ids) >= request.max_new_tokens:
        return True
    return bool(request.stop) and has_stop(decode(tokenizer, ids[-window:]), request.stop)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _prefill(
    model: Any, requests: Sequence[GenerationRequest], rows: list[int], pad_id: int
) -> tuple[_Batch, torch.Tensor]:
    """Run the prompts once; the batch state and the last position's logits.

    When every prompt starts with the same `shared_prefix` tokens (at least _MIN_SHARED; a
    system prompt, worked examples, a rollout group's question), that prefix is computed once
    for a batch of one and its cache copied to every row; the rest of each prompt follows it,
    left-padded to the longest rest (the padding sits between prefix and rest, masked out).
    Otherwise the whole prompts are left-padded and run together."""
    device = model.device
    shared = shared_prefix([r.prompt_ids for r in requests])
    if len(requests) < 2 or shared < _MIN_SHARED:
        shared = 0
    width = max(len(r.prompt_ids) for r in requests) - shared
    cache = buffered_cache(model.config, shared + width + _FIRST_ROOM)
    if shared and not all(isinstance(layer, BufferedLayer) for layer in cache.layers):
        # sliding-window layers cannot take a copied prefix: the plain layout, one cache
        width, shared = width + shared, 0
        cache = buffered_cache(model.config, width + _FIRST_ROOM)
    rests = [r.prompt_ids[shared:] for r in requests]
    pads = [width - len(rest) for rest in rests]
    input_ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.ones((len(requests), shared + width), dtype=torch.long)
    for j, (rest, pad) in enumerate(zip(rests, pads, strict=True)):
        input_ids[j, pad:] = torch.tensor(rest, dtype=torch.long)
        mask[j, shared : shared + pad] = 0
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 0)
    if shared:
        prefix = torch.tensor([requests[0].prompt_ids[:shared]], dtype=torch.long, device=device)
        _forward(model, prefix, mask[:1, :shared], positions[:1, :shared], cache)
        for layer in cache.layers:
            layer.batch_repeat_interleave(len(requests))
    greedy = [r.temperature <= 0 for r in requests]
    temperature = [
        0.0 if g else float(r.temperature) for g, r in zip(greedy, requests, strict=True)
    ]
    top_p = [1.0 if g else float(r.top_p) for g, r in zip(greedy, requests, strict=True)]
    batch = _Batch(
        rows=list(rows),
        pads=[0] * len(requests) if shared else pads,  # leading padding columns
        attention_mask=mask,
        positions=positions[:, -1],
        temperature=_floats(temperature, device),
        top_p=_floats(top_p, device),
        cache=cache,
    )
    return batch, _forward(model, input_ids, mask, positions[:, shared:], batch.cache)


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt has in common, keeping at least one token of each
    prompt after it (its logits are the first step's).

    >>> shared_prefix([(1, 2, 3, 4), (1, 2, 3, 9, 9), (1, 2, 3, 4, 5)])
    3
    >>> shared_prefix([(1, 2), (1, 2)])
    1
    """
    first, limit = prompts[0], min(len(p) for p in prompts) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n


# A shared prefix shorter than this is computed with each row (not worth a separate pass).
_MIN_SHARED = 32
# New-token room of a fresh cache; it doubles when a row needs more (kv_cache.py).
_FIRST_ROOM = 128


def _step(model: Any, batch: _Batch, tokens: torch.Tensor, fast: FastStep | None) -> torch.Tensor:
    """Feed each live row its new token; the logits for the token after it."""
    ones = torch.ones_like(batch.attention_mask[:, :1])
    batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
    batch.positions = batch.positions + 1
    if fast is not None and all(isinstance(x, BufferedLayer) for x in batch.cache.layers):
        return fast(tokens, batch.positions, batch.attention_mask, batch.cache.layers)
    return _forward(
        model, tokens[:, None], batch.attention_mask, batch.positions[:, None], batch.cache
    )


def _forward(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    extra = {"logits_to_keep": 1} if _supports_logits_to_keep(model) else {}
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        **extra,
    )
    return output.logits[:, -1].to(dtype=torch.float32)


def _supports_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)
