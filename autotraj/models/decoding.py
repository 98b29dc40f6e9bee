"""Our batched decoding loop: prefill once, then decode with a KV cache that drops finished rows.

`decode_batch(model, tokenizer, requests, eos_ids, pad_id)` continues each request's
`prompt_ids` (which must be set) and returns, per request, the raw new token ids: they end with
the token that finished the row (an eos id, the token that completed one of its stop strings) or
at its own `max_new_tokens`. Cutting those ids into a `Completion` (eos excluded, the first stop
string, the stop reason) is `truncate_at_stop`'s job in transformers_backend.py.

How it works:
- prefill: with the fast step (models/decode_step.py) and `unpadded_prefill` (the defaults on
  CPU) the prompts go unpadded, every row's tokens in one sequence (`FastStep.prefill`);
  otherwise they are left-padded (attention mask 1 on real tokens, position ids =
  cumsum(mask) - 1, as HF `generate` builds them), at most _PREFILL_ROWS rows per forward
  (`_chunked_prefill`); either way into a transformers `DynamicCache` of buffered layers; only
  the last position's logits are computed when the model supports `logits_to_keep`;
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
from autotraj.models.kept_prefixes import Kept, KeptPrefixes
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
    # per layer, the keys and values of a prefix every row shares, held once (1 x kv_heads x
    # length x head_dim) and not in `cache` (the fast step's split attention), or None
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None

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
    kept: KeptPrefixes | None = None,
    held_prefix: bool = True,
    unpadded_prefill: bool = True,
) -> list[tuple[int, ...]]:
    """Raw new ids per request, each ending with its finishing token or at its budget.
    `fast`: the model's decode_step.FastStep, used for the decode steps (None: transformers).
    `kept`: the store of finished rows' caches that prompts may continue (kept_prefixes.py);
    rows that end on one of their `resume_after` strings are added to it.
    `held_prefix`: let the fast step hold a prefix of at least _MIN_HELD tokens that all rows
    share once (see _prefill).
    `unpadded_prefill`: with `fast`, prefill the prompts unpadded (FastStep.prefill)."""
    out = _decode(
        model,
        tokenizer,
        requests,
        eos_ids,
        pad_id,
        False,
        fast,
        kept,
        held_prefix,
        unpadded_prefill,
    )
    return [ids for ids, _ in out]


def decode_batch_logprobs(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    eos_ids: Collection[int],
    pad_id: int,
    fast: FastStep | None = None,
    kept: KeptPrefixes | None = None,
    held_prefix: bool = True,
    unpadded_prefill: bool = True,
) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    """`decode_batch`'s ids per request with each id's log-prob under the unscaled logits."""
    return _decode(
        model, tokenizer, requests, eos_ids, pad_id, True, fast, kept, held_prefix, unpadded_prefill
    )


def _decode(
    model: Any,
    tokenizer: Any,
    requests: Sequence[GenerationRequest],
    eos_ids: Collection[int],
    pad_id: int,
    with_logprobs: bool,
    fast: FastStep | None,
    kept: KeptPrefixes | None,
    held_prefix: bool = True,
    unpadded_prefill: bool = True,
) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    if any(not r.prompt_ids for r in requests):
        raise ValueError("decode_batch needs prompt_ids on every request")
    out: list[list[int]] = [[] for _ in requests]
    logprobs: list[list[float]] = [[] for _ in requests]
    live = [i for i, r in enumerate(requests) if r.max_new_tokens > 0]
    if not live:
        return [((), ()) for _ in requests]
    generator = _generator(requests[0].seed, model.device)
    split = held_prefix and fast is not None
    grow = 0 if fast is None else _GROW_ROOM_READ if fast.reads_room else _GROW
    packer = fast if unpadded_prefill else None
    batch, logits = _prefill(
        model, [requests[i] for i in live], live, pad_id, kept, split, grow, packer
    )
    windows = [max((len(s) for s in r.stop), default=0) + 2 for r in requests]
    eos = set(eos_ids)
    while True:
        tokens = sample_next(logits, batch.temperature, batch.top_p, generator)
        if with_logprobs:
            picked = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
            for row, value in zip(batch.rows, picked.tolist(), strict=True):
                logprobs[row].append(value)
        keep, resumed = [], []
        for j, (row, token) in enumerate(zip(batch.rows, tokens.tolist(), strict=True)):
            out[row].append(token)
            if not _finished(out[row], requests[row], eos, tokenizer, windows[row]):
                keep.append(j)
            elif kept is not None and _resumes(out[row], requests[row], tokenizer, windows[row]):
                resumed.append(j)
        if resumed:
            _keep_rows(batch, resumed, requests, out, kept)
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


def _resumes(ids: list[int], request: GenerationRequest, tokenizer: Any, window: int) -> bool:
    """True when a finished row ended on one of the strings after which it will be resumed."""
    return bool(request.resume_after) and has_stop(
        decode(tokenizer, ids[-window:]), request.resume_after
    )


def _keep_rows(
    batch: _Batch,
    positions: list[int],
    requests: Sequence[GenerationRequest],
    out: list[list[int]],
    kept: KeptPrefixes,
) -> None:
    """Copy the cache of the live rows at batch `positions` into `kept`, keyed by the ids it
    holds: the row's prompt and its new ids but the last (sampled, not yet fed)."""
    layers = batch.cache.layers
    if not all(isinstance(layer, BufferedLayer) for layer in layers):
        return  # a sliding-window layer's columns are not the mask's
    prefix = batch.prefix or [None] * len(layers)
    held = 0 if batch.prefix is None else batch.prefix[0][0].shape[2]
    for j in positions:
        row = batch.rows[j]
        columns = batch.attention_mask[j].nonzero().squeeze(1)
        ids = tuple(requests[row].prompt_ids) + tuple(out[row][:-1])
        if held + len(columns) != len(ids) or (
            layers[0].get_seq_length() != batch.attention_mask.shape[1]
        ):
            raise RuntimeError(
                f"decoder state out of step: row {row} holds {held + len(columns)} cached "
                f"tokens for {len(ids)} ids"
            )
        kept.keep(
            Kept(ids, [_row_kv(x, j, columns, p) for x, p in zip(layers, prefix, strict=True)])
        )


def _row_kv(
    layer: BufferedLayer,
    row: int,
    columns: torch.Tensor,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A row's keys and values (kv_heads x length x head_dim): the held prefix, if any, then the
    row's unmasked cache columns."""
    keys, values = (
        layer.keys[row].index_select(1, columns),
        layer.values[row].index_select(1, columns),
    )
    if prefix is None:
        return keys, values
    return torch.cat([prefix[0][0], keys], dim=1), torch.cat([prefix[1][0], values], dim=1)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _prefill(
    model: Any,
    requests: Sequence[GenerationRequest],
    rows: list[int],
    pad_id: int,
    kept: KeptPrefixes | None = None,
    split: bool = False,
    grow: int = 0,
    fast: FastStep | None = None,
) -> tuple[_Batch, torch.Tensor]:
    """Run the prompts once; the batch state and the last position's logits.

    Three layouts, each row's columns being [start | padding | rest of its prompt], the rests
    left-padded to the longest:
    - kept: when `kept` holds the cache of an earlier call's row that a prompt continues (a tool
      loop's next turn), that cache is the row's start and only the rest is forwarded; rows
      without one start empty;
    - shared: otherwise, when every prompt starts with the same `shared_prefix` tokens (at least
      _MIN_SHARED, or _MIN_SHARED_PACKED with the fast step's unpadded prefill; a system prompt,
      worked examples, a rollout group's question), that prefix is computed once for a batch of
      one and its cache copied to every row;
    - plain: otherwise the whole prompts, left-padded, run together.
    More than _PREFILL_ROWS rows are forwarded in chunks of similar rest lengths, each padded
    only to its own longest rest (`_chunked_prefill`; at 64 GSM8K chat prompts, 42% of one
    padded batch's tokens were padding); their caches are then written into the batch's.
    Padding is masked out; positions count real tokens only. Sliding-window models take the
    plain layout (their layers cannot take a copied start). With `split` (the fast step decodes
    the batch), a prefix of at least _MIN_HELD tokens every row's start begins with (the shared
    one, or in the kept layout the longest common start of prompts that all continue kept rows)
    is afterwards held once (`_Batch.prefix`) and cut from every row's cache. `grow`: how the
    batch's cache grows when full (kv_cache.BufferedLayer). With `fast` (the model's FastStep)
    and a buffered cache, the rests (and a shared prefix) are fed unpadded in one
    sequence instead (`FastStep.prefill`: no padding computed, no chunks needed). With a
    buffered cache the decode steps then see each row's padding first (`_padding_first`)."""
    device = model.device
    hits = [kept.longest(r.prompt_ids) for r in requests] if kept else [None] * len(requests)
    shared = 0
    if any(h is not None for h in hits):
        starts = [0 if h is None else len(h.ids) for h in hits]
    else:
        hits = [None] * len(requests)
        shared = shared_prefix([r.prompt_ids for r in requests])
        least = _MIN_SHARED if fast is None else _MIN_SHARED_PACKED
        shared = shared if len(requests) > 1 and shared >= least else 0
        starts = [shared] * len(requests)
    cached = max(starts)
    width = max(len(r.prompt_ids) - s for r, s in zip(requests, starts, strict=True))
    room = grow or _FIRST_ROOM
    cache = buffered_cache(model.config, cached + width + room, grow)
    if cached and not all(isinstance(layer, BufferedLayer) for layer in cache.layers):
        # sliding-window layers cannot take a copied start: the plain layout, one cache
        hits, shared, starts = [None] * len(requests), 0, [0] * len(requests)
        width, cached = max(len(r.prompt_ids) for r in requests), 0
        cache = buffered_cache(model.config, width + room, grow)
    rests = [r.prompt_ids[s:] for r, s in zip(requests, starts, strict=True)]
    input_ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    mask = torch.ones((len(requests), cached + width), dtype=torch.long)
    for j, (rest, start) in enumerate(zip(rests, starts, strict=True)):
        pad = width - len(rest)
        input_ids[j, pad:] = torch.tensor(rest, dtype=torch.long)
        mask[j, start:cached] = 0
        mask[j, cached : cached + pad] = 0
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 0)
    starts_kv: _Starts | None = None
    packed = fast is not None and _all_buffered(cache)
    if shared:
        prefix = buffered_cache(model.config, shared)
        if packed:
            fast.prefill([requests[0].prompt_ids[:shared]], [0], prefix.layers)
        else:
            ids = torch.tensor([requests[0].prompt_ids[:shared]], dtype=torch.long, device=device)
            _forward(model, ids, mask[:1, :shared], positions[:1, :shared], prefix)
        starts_kv = _Starts(prefix=prefix)
    elif cached:
        starts_kv = _Starts(hits=hits)
        for hit in hits:
            if hit is not None:
                kept.consume(hit)
                kept.hits += len(hit.ids)
    greedy = [r.temperature <= 0 for r in requests]
    temperature = [
        0.0 if g else float(r.temperature) for g, r in zip(greedy, requests, strict=True)
    ]
    top_p = [1.0 if g else float(r.top_p) for g, r in zip(greedy, requests, strict=True)]
    batch = _Batch(
        rows=list(rows),
        pads=_leading_pads(mask),
        attention_mask=mask,
        positions=positions[:, -1],
        temperature=_floats(temperature, device),
        top_p=_floats(top_p, device),
        cache=cache,
    )
    lengths = [len(rest) for rest in rests]
    if packed:
        if starts_kv is not None:
            starts_kv.load(cache, list(range(len(requests))), cached)
        logits = fast.prefill(rests, starts, cache.layers)
    elif len(requests) <= _PREFILL_ROWS or not _all_buffered(cache):
        if starts_kv is not None:
            starts_kv.load(cache, list(range(len(requests))), cached)
        logits = _forward(model, input_ids, mask, positions[:, cached:], cache)
    else:
        logits = _chunked_prefill(model, lengths, starts_kv, input_ids, mask, positions, cache)
    if split and _all_buffered(cache):
        if shared >= _MIN_HELD:
            _hold_prefix_once(batch, [(x.keys, x.values) for x in starts_kv.prefix.layers])
        elif cached and all(h is not None for h in hits):
            common = shared_prefix([r.prompt_ids for r in requests])
            if common >= _MIN_HELD and common <= min(starts):
                # the first row's copy for all (the same numbers where the earlier call held or
                # copied one prefix; within rounding where its rows computed it each)
                first = hits[0].layers
                held = [
                    (k[None, :, :common].contiguous(), v[None, :, :common].contiguous())
                    for k, v in first
                ]
                _hold_prefix_once(batch, held)
    if _all_buffered(cache):
        _padding_first(batch)
    return batch, logits


def _padding_first(batch: _Batch) -> None:
    """Move each row's padding columns before its real ones, the real ones in their order:
    `[start | padding | rest]` becomes `[padding | start | rest]` (one gather of the cache per
    layer, once per batch). A row's columns are then one run from its first real column, so the
    padding every live row has is trimmed off the front as rows finish (`_trim_padding`; with a
    start in the middle none was), and the fast step (in float32) reads a range of rows from
    that range's first real column (FastStep, `_RANGE_ROWS`). Attention does not depend on where
    a masked column sits; the transformers forward decodes the same layout."""
    mask = batch.attention_mask
    order = torch.sort(mask, dim=1, stable=True).indices  # zeros first, each kind in order
    if bool((order == torch.arange(mask.shape[1], device=mask.device)).all()):
        return  # already so
    for layer in batch.cache.layers:
        layer.gather_columns(order)
    batch.attention_mask = mask.gather(1, order)
    batch.pads = _leading_pads(batch.attention_mask)
    batch._trim_padding()


def _hold_prefix_once(batch: _Batch, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Keep a prefix that every row's cache begins with once (`batch.prefix`: per layer, keys
    and values of 1 x kv_heads x length x head_dim) and cut its columns from every row's cache
    and mask (no copy)."""
    length = prefix[0][0].shape[2]
    batch.prefix = prefix
    for layer in batch.cache.layers:
        layer.trim_front(length)
    batch.attention_mask = batch.attention_mask[:, length:]
    batch.pads = _leading_pads(batch.attention_mask)


def _leading_pads(mask: torch.Tensor) -> list[int]:
    """Each row's count of padding columns before its first real one."""
    return (mask.cumsum(dim=-1) == 0).sum(dim=-1).tolist()


def _all_buffered(cache: DynamicCache) -> bool:
    return all(isinstance(layer, BufferedLayer) for layer in cache.layers)


def _chunked_prefill(
    model: Any,
    lengths: list[int],
    starts: _Starts | None,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """The prefill in chunks of _PREFILL_ROWS rows of similar rest lengths (`lengths`), each cut
    to its longest rest: a chunk's cache holds its rows' starts and rests, and is then written
    into the empty `cache` (zeros in the padding columns: masked, never NaN). The last
    position's logits of every row."""
    rows, width = input_ids.shape
    cached = mask.shape[1] - width
    order = sorted(range(rows), key=lambda j: lengths[j])
    logits, parts = None, []
    for first in range(0, rows, _PREFILL_ROWS):
        chunk = order[first : first + _PREFILL_ROWS]
        index = torch.tensor(chunk, dtype=torch.long, device=input_ids.device)
        cut = width - max(lengths[j] for j in chunk)
        part = buffered_cache(model.config, cached + width - cut)
        if starts is not None:
            starts.load(part, chunk, cached)
        columns = torch.cat([mask[index, :cached], mask[index, cached + cut :]], dim=1)
        out = _forward(
            model, input_ids[index, cut:], columns, positions[index, cached + cut :], part
        )
        if logits is None:
            logits = out.new_empty((rows, out.shape[1]))
        logits[index] = out
        parts.append((index, cut, part))
    for number, layer in enumerate(cache.layers):
        like = parts[0][2].layers[number].keys
        shape = (rows, like.shape[1], cached + width, like.shape[3])
        keys, values = like.new_zeros(shape), like.new_zeros(shape)
        for index, cut, part in parts:
            written = part.layers[number]
            keys[index, :, :cached] = written.keys[:, :, :cached]
            keys[index, :, cached + cut :] = written.keys[:, :, cached:]
            values[index, :, :cached] = written.values[:, :, :cached]
            values[index, :, cached + cut :] = written.values[:, :, cached:]
        layer.update(keys, values)
    return logits


@dataclass
class _Starts:
    """What the first `cached` columns of the rows hold before their rests are forwarded: a
    shared prefix computed once (a batch of one), or each row's kept cache (None: empty)."""

    prefix: DynamicCache | None = None
    hits: Sequence[Kept | None] = ()

    def load(self, cache: DynamicCache, rows: list[int], columns: int) -> None:
        """Write the starts of `rows` (in that order) into the first `columns` columns of the empty
        `cache`, each from column 0 (zeros after it and where a row has none: masked, never
        NaN)."""
        if self.prefix is not None:
            for layer, prefix in zip(cache.layers, self.prefix.layers, strict=True):
                count = (len(rows), -1, -1, -1)
                layer.update(prefix.keys.expand(count), prefix.values.expand(count))
            return
        hits = [self.hits[j] for j in rows]
        found = next(h for h in self.hits if h is not None)
        for number, layer in enumerate(cache.layers):
            like = found.layers[number][0]
            shape = (len(rows), like.shape[0], columns, like.shape[2])
            keys, values = like.new_zeros(shape), like.new_zeros(shape)
            for j, hit in enumerate(hits):
                if hit is not None:
                    k, v = hit.layers[number]
                    keys[j, :, : k.shape[1]] = k
                    values[j, :, : v.shape[1]] = v
            layer.update(keys, values)


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


# A shared prefix shorter than this is computed with each row (not worth a separate pass). In
# the unpadded prefill (FastStep.prefill) a separate pass costs no padding and gives the same bits
# as computing the prefix in every row, so a shorter one is worth it there (a chat template's
# default system prompt: 24 tokens for SmolLM2).
_MIN_SHARED = 32
_MIN_SHARED_PACKED = 8
# The fast step holds a prefix every row shares once (`held_prefix`) from this length on. Its
# split attention costs a few operations per layer that read the scores again; at 64 rows and 300
# own columns (float32, 2-core AMD EPYC, bench/bench_held_attention.py) a layer's attention took
# 1.04-1.19x the time of the prefix in every row at 16-48 prefix tokens, 0.95x at 64, 0.80x at
# 256 (docs/models.md, seventh round). In bf16 (Zen 4, 2026-12-07) the same bench gave 1.43x at
# 64, 1.03x at 256 and 0.92x at 459, yet end to end holding still won with tools (docs/models.md,
# tenth round: the prefix's copies in every row cost more than its extra operations).
_MIN_HELD = 64
# New-token room of a fresh cache; it doubles when a row needs more (kv_cache.py). Where the fast
# step decodes, the room is _GROW columns and grows by as many: one copy of the cache every _GROW
# steps, and no more than _GROW columns a row held as room (doubling holds up to the cache's size
# again; at 64 rows of ~400 columns, 1.2 GB in float32 for SmolLM2-135M). In float32 the step
# reads only the written columns; until 2026-12-06 it read the room too, and _GROW was 32.
_FIRST_ROOM = 128
_GROW = 128
# The room of a fast step that reads its whole buffers (bf16: decode_step._whole_buffers): it
# reads the room at every step, so the room is kept small; the cache is then copied every
# _GROW_ROOM_READ steps.
_GROW_ROOM_READ = 32
# The prefill runs more rows than this in chunks of similar rest lengths (_chunked_prefill).
_PREFILL_ROWS = 16


def _step(model: Any, batch: _Batch, tokens: torch.Tensor, fast: FastStep | None) -> torch.Tensor:
    """Feed each live row its new token; the logits for the token after it."""
    ones = torch.ones_like(batch.attention_mask[:, :1])
    batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
    batch.positions = batch.positions + 1
    if fast is not None and all(isinstance(x, BufferedLayer) for x in batch.cache.layers):
        layers = batch.cache.layers
        return fast(tokens, batch.positions, batch.attention_mask, layers, batch.prefix, batch.pads)
    if batch.prefix is not None:
        raise RuntimeError("a batch holding its shared prefix once needs the fast step")
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
