"""One decoding step of a Llama-family model, written out for CPU speed.

At the small row counts of decoding, a transformers forward spends much of its time outside the
arithmetic: ~35 small operations and several Python module calls per layer, a 4-D mask built per
step, three separate q/k/v and two gate/up matmuls. `FastStep` runs the same computation for a
one-token step with the model's own weights:
- q/k/v fused into one matmul and gate/up into another, every weight prepacked for oneDNN
  (cpu_linear.pack: bf16, bit-identical to `F.linear` in our checks; float32 on x86, ~2-4x
  faster than `F.linear` for the wide products at decoding's row counts), else by `F.linear`;
- the operations of transformers' Llama code otherwise, in the same dtypes and with the same
  bits: RMSNorm by torch's `rms_norm` (float32 inside), rotary embeddings as one roll times a
  sign-flipped sin (`_rotate`), attention by transformers' eager formula (`_attention`): the
  query heads of a key/value head attend together, so the cache is read once per key/value head;
- keys and values written into the `BufferedLayer` cache (kv_cache.py), which the attention
  products read in place: in float32 the written columns (views: the columns the eager forward
  reads, no room, no columns trimmed off the front), in bf16 each layer's whole buffer with the
  other columns masked (`_whole_buffers`: oneDNN's bf16 product copies a view of the written
  columns first). torch's fused attention kernel (sdpa), which the
  transformers forward uses, took 1.55 ms per layer at 64 rows and ~300 columns; the two batched
  products ~0.5 ms (2-core AMD EPYC);
- a prefix every row shares (a system prompt, worked examples) may be held once instead of in
  every row (`prefix`): each row's query heads then attend to it in one product for all rows,
  and to the row's own columns separately, under one softmax over both.

It is used for the decode steps of models whose architecture it knows (`FastStep.supports`:
LlamaForCausalLM, Qwen2ForCausalLM with full attention, default RoPE, SiLU MLP) on CPU, in
bfloat16 and float32 (float32 is what bf16 requests get on a CPU without bf16 kernels unless
AUTOTRAJ_CPU_BF16=1 keeps them: cpu_bf16.py); other models and other devices run the
transformers forward. Where oneDNN cannot pack the dtype (bf16 kept on such a CPU, bf16 off
x86 where the probe fails) the fused products run through `F.linear`, the kernels the
transformers forward uses: on an AVX2-only x86 CPU these give the same bits too, so the step's
bf16 tests run there as well, all but the packing's (tests/test_decode_step.py, 2026-12-06). Its
tokens and log-probs are bit-identical to the transformers forward with
`attn_implementation="eager"` (tests/test_decode_step.py, greedy and sampled, tiny Llama and
Qwen2 models and the embedded model on GSM8K prompts); against the default sdpa attention they
differ by rounding (bf16 scores), so a near-tie may pick another token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from autotraj.models.cpu_linear import pack, packed_linear, packed_weight, packing_available

_ARCHITECTURES = {"LlamaForCausalLM", "Qwen2ForCausalLM"}
_MLP_TOKENS = 4096  # tokens per MLP block in a prefill
# Rows per range of a decode step's attention (`_row_ranges`): from twice this many rows on, each
# range of this many rows reads the cache from its own first real column instead of the batch's.
_RANGE_ROWS = 16
# Columns trimmed off a buffer's front that a whole-buffer read (`_whole_buffers`) still reads;
# beyond this many they are dropped first (one copy of the written columns).
_TRIMMED_READ = 32


@dataclass
class _Layer:
    norm1: torch.Tensor
    norm2: torch.Tensor
    qkv: torch.Tensor  # packed (q, k, v) rows
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    gate_up: torch.Tensor  # packed (gate, up) rows
    down: torch.Tensor


class FastStep:
    """The decode step of one model; rebuilt when the model's weights change (`current`)."""

    def __init__(self, model: Any):
        config = model.config
        inner = model.model
        self.eps = float(config.rms_norm_eps)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.inter = int(config.intermediate_size)
        rotary = inner.rotary_emb
        self.inv_freq = rotary.inv_freq.float()
        self.rope_scale = float(rotary.attention_scaling)
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        # weights prepacked for oneDNN where cpu_linear packs the dtype, else as they are
        self.packed = packing_available(model.dtype)
        weight, fuse = (packed_weight, pack) if self.packed else (_plain_weight, _same)
        self.lm_head = weight(model.lm_head)  # shared with cpu_linear.packed_linears
        self.layers = []
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            self.layers.append(
                _Layer(
                    norm1=block.input_layernorm.weight,
                    norm2=block.post_attention_layernorm.weight,
                    qkv=fuse(qkv),
                    qkv_bias=None if biases[0] is None else torch.cat(biases),
                    o=weight(attn.o_proj),
                    gate_up=fuse(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    down=weight(mlp.down_proj),
                )
            )
        self.key = weights_key(model)
        # bf16: attention reads each layer's whole buffer (`_whole_buffers`), else the written
        # columns (in place: `_batch_of`)
        self.reads_room = model.dtype == torch.bfloat16

    @staticmethod
    def supports(model: Any) -> bool:
        """True for the architectures and settings this step reproduces, on CPU in bf16 or
        float32 (its linears packed where oneDNN packs the dtype: cpu_linear; else `F.linear`)."""
        config = getattr(model, "config", None)
        if config is None or getattr(model, "dtype", None) not in (torch.bfloat16, torch.float32):
            return False
        architectures = set(getattr(config, "architectures", None) or ())
        rope = getattr(config, "rope_parameters", None) or {}
        layer_types = set(getattr(config, "layer_types", None) or {"full_attention"})
        return (
            bool(architectures & _ARCHITECTURES)
            and type(model).__name__ in _ARCHITECTURES
            and model.device.type == "cpu"
            and getattr(config, "hidden_act", None) == "silu"
            and not getattr(config, "mlp_bias", False)
            and rope.get("rope_type", "default") == "default"
            and layer_types == {"full_attention"}
            and not model.training
        )

    def _linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        return packed_linear(x, weight, bias) if self.packed else F.linear(x, weight, bias)

    def current(self, model: Any) -> bool:
        """False once any weight of `model` changed since this step was built."""
        return self.key == weights_key(model)

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor,
        layers: list[Any],
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        pads: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """float32 logits (rows x vocab) after feeding
        `tokens` (rows,) at `positions` (rows,); `attention_mask` (rows x columns, the new
        token's column included) masks the cache's written columns; `layers`: the cache's
        `BufferedLayer`s (kv_cache.py).
        `prefix`: per layer, keys and values (1 x kv_heads x length x head_dim) that precede
        every row's cached columns (held once; see the module docstring).
        `pads`: each row's padding columns before its first real one (decoding's `_Batch.pads`,
        the padding first); given, in float32, 32 rows or more read attention in ranges
        (`_row_ranges`; bf16 reads whole buffers, `_whole_buffers`)."""
        rows = tokens.shape[0]
        h = F.embedding(tokens[:, None], self.embed)  # (rows, 1, hidden)
        cos, signed_sin = self._rotary(positions, h.dtype)
        mask = _padding_mask(attention_mask)  # the same for every layer
        ranges = None if pads is None or self.reads_room else _row_ranges(pads)
        groups, scale = self.heads // self.kv_heads, self.head_dim**-0.5
        whole: dict[tuple[int, int, int], torch.Tensor] = {}  # masks of whole buffers
        for number, (layer, cache) in enumerate(zip(self.layers, layers, strict=True)):
            q, k, v = self._qkv(h, layer, cos, signed_sin)
            keys, values = cache.update(k, v)  # views of the written columns
            if keys.shape[2] != attention_mask.shape[1]:
                raise RuntimeError(
                    f"decoder state out of step: layer {number} holds {keys.shape[2]} cached "
                    f"columns, the attention mask {attention_mask.shape[1]}"
                )
            if self.reads_room:
                keys, values, layer_mask = _whole_buffers(cache, mask, whole)
            else:
                layer_mask = mask
            # the query heads of one key/value head attend together
            q = q.reshape(rows, self.kv_heads, groups, self.head_dim)
            held = None if prefix is None else prefix[number]
            if ranges is None:
                out = _attention(q, keys, values, layer_mask, scale, held)
            else:  # each range of rows from its first real column
                out = torch.cat(
                    [
                        _attention(
                            q[a:b],
                            keys[a:b, :, c:],
                            values[a:b, :, c:],
                            mask[a:b, ..., c:],
                            scale,
                            held,
                        )
                        for a, b, c in ranges
                    ]
                )
            out = out.reshape(rows, self.heads, 1, self.head_dim).transpose(1, 2)
            h = self._rest_of_layer(h, out.reshape(rows, 1, -1), layer)
        h = _rms_norm(h, self.final_norm, self.eps)
        return self._linear(h, self.lm_head, None)[:, -1].float()

    def prefill(
        self, rests: Sequence[Sequence[int]], starts: Sequence[int], layers: list[Any]
    ) -> torch.Tensor:
        """float32 logits (rows x vocab) of each row's last token after feeding row j its
        `rests[j]` (token ids) unpadded: every row's tokens go through the linear layers as one
        sequence, and each row's queries attend to its own keys only (its start, then its rest,
        causally). `starts[j]`: how many of the first columns of row j's cache (`layers`, the
        cache's `BufferedLayer`s, every row as wide) already hold the row's start (a kept cache,
        a shared prefix; its positions come first). The rests' keys and values are written after
        those columns, left-padded to the longest rest with zeros (the caller masks them).

        A padded prefill computes every row as wide as the longest and attends through a padding
        mask: at 16 GSM8K chat prompts ~40% of its tokens were padding. Each row's logits and
        keys/values here are what the transformers forward with eager attention gives for that
        row alone (tests/test_decode_step.py), so they no longer depend on the batch's other
        rows."""
        lengths = [len(rest) for rest in rests]
        if not lengths or min(lengths) < 1:
            raise ValueError("prefill needs at least one token in every row's rest")
        rows, width = len(rests), max(lengths)
        cached = layers[0].get_seq_length()
        tokens = torch.tensor([t for rest in rests for t in rest], dtype=torch.long)
        positions = torch.cat(
            [torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]
        )
        row_of = torch.repeat_interleave(torch.arange(rows), torch.tensor(lengths))
        column_of = torch.cat([torch.arange(width - n, width) for n in lengths])
        ends = torch.tensor(lengths).cumsum(0)
        h = F.embedding(tokens[:, None], self.embed)  # (tokens, 1, hidden)
        cos, signed_sin = self._rotary(positions, h.dtype)
        groups = self.heads // self.kv_heads
        masks = [_causal_mask(s, n, groups) for s, n in zip(starts, lengths, strict=True)]
        scale = self.head_dim**-0.5
        for layer, cache in zip(self.layers, layers, strict=True):
            q, k, v = self._qkv(h, layer, cos, signed_sin)  # (tokens, heads, 1, head_dim)
            shape = (rows, self.kv_heads, width, self.head_dim)
            padded_k, padded_v = k.new_zeros(shape), v.new_zeros(shape)
            padded_k[row_of, :, column_of] = k[:, :, 0]
            padded_v[row_of, :, column_of] = v[:, :, 0]
            cache.update(padded_k, padded_v)
            keys, values = cache.keys, cache.values
            out = []
            for j, (start, n) in enumerate(zip(starts, lengths, strict=True)):
                first = int(ends[j]) - n
                own_k = keys[j, :, cached + width - n :]
                own_v = values[j, :, cached + width - n :]
                if start:
                    own_k = torch.cat([keys[j, :, :start], own_k], dim=1)
                    own_v = torch.cat([values[j, :, :start], own_v], dim=1)
                # the row's n query tokens of each key/value head's query heads together
                rq = q[first : first + n, :, 0].reshape(n, self.kv_heads, groups, self.head_dim)
                rq = rq.permute(1, 2, 0, 3).reshape(1, self.kv_heads, groups * n, self.head_dim)
                o = _attention(rq, own_k[None], own_v[None], masks[j], scale)
                o = o.view(self.kv_heads, groups, n, self.head_dim).permute(2, 0, 1, 3)
                out.append(o.reshape(n, 1, -1))
            h = self._rest_of_layer(h, torch.cat(out), layer)
        h = _rms_norm(h[ends - 1], self.final_norm, self.eps)
        return self._linear(h, self.lm_head, None)[:, -1].float()

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and signed sin (n x 1 x 1 x head_dim) of the rotary embedding at `positions` (n,):
        the sin's first half negated, for `_rotate` (see there)."""
        freqs = positions[:, None, None].float() * self.inv_freq  # (n, 1, dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(dtype)[:, None]
        sin = (emb.sin() * self.rope_scale).to(dtype)[:, None]
        return cos, _signed_sin(sin)

    def _qkv(
        self, h: torch.Tensor, layer: _Layer, cos: torch.Tensor, signed_sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's queries, rotated keys and values of hidden states `h` (n x 1 x hidden):
        n x heads (kv_heads) x 1 x head_dim."""
        n = h.shape[0]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        x = _rms_norm(h, layer.norm1, self.eps)
        qkv = self._linear(x, layer.qkv, layer.qkv_bias)
        qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
        qk = qk.view(n, 1, self.heads + self.kv_heads, self.head_dim).transpose(1, 2)
        qk = _rotate(qk, cos, signed_sin)  # rotary on q and k at once
        q, k = qk.split([self.heads, self.kv_heads], dim=1)
        return q, k, v.view(n, 1, self.kv_heads, self.head_dim).transpose(1, 2)

    def _rest_of_layer(
        self, h: torch.Tensor, attended: torch.Tensor, layer: _Layer
    ) -> torch.Tensor:
        """The layer after attention: output projection, residual, MLP, residual; `attended`:
        n x 1 x heads * head_dim. The MLP runs in blocks of _MLP_TOKENS tokens (a long prefill's
        intermediate activations stay small; each token's result is the same)."""
        h = h + self._linear(attended, layer.o, None)
        parts = []
        for first in range(0, h.shape[0], _MLP_TOKENS):
            part = h[first : first + _MLP_TOKENS]
            x = _rms_norm(part, layer.norm2, self.eps)
            gate, up = self._linear(x, layer.gate_up, None).split(self.inter, dim=-1)
            parts.append(part + self._linear(F.silu(gate) * up, layer.down, None))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _plain_weight(module: Any) -> torch.Tensor:
    return module.weight


def _same(weight: torch.Tensor) -> torch.Tensor:
    return weight


def _causal_mask(start: int, length: int, groups: int) -> torch.Tensor:
    """The additive float32 mask (1 x 1 x groups * length x start + length) of `length` query
    tokens after `start` cached ones, each query head's tokens together (as `prefill` lays out
    the queries): token i sees columns up to start + i."""
    seen = torch.arange(start + length)[None, :] <= torch.arange(start, start + length)[:, None]
    mask = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))
    return mask.repeat(groups, 1)[None, None]


def _row_ranges(pads: Sequence[int]) -> list[tuple[int, int, int]] | None:
    """Ranges (first row, end row, first column) of _RANGE_ROWS consecutive rows, each from the
    first real column of its rows (`pads`: each row's padding columns, all before its real ones:
    decoding._padding_first), or None (one range from column 0): below twice _RANGE_ROWS rows,
    or where no range starts after column 0.

    Used where the step reads the written columns (float32; bf16 reads whole buffers from
    column 0: `_whole_buffers`). A decode batch's rows are ordered by prompt length (the
    generator's plan) and keep their
    padding to the end; at 64 GSM8K chat prompts the padding was ~23% of the columns attention
    read (docs/models.md). Reading from each range's first real column skips most of it for a
    few more operations per layer; a single range leaves the step's operations (and bits) as
    they are."""
    rows = len(pads)
    if rows < 2 * _RANGE_ROWS:
        return None
    ranges = [
        (a, min(a + _RANGE_ROWS, rows), min(pads[a : a + _RANGE_ROWS]))
        for a in range(0, rows, _RANGE_ROWS)
    ]
    return ranges if any(c for _, _, c in ranges) else None


def _whole_buffers(
    cache: Any, mask: torch.Tensor, masks: dict[tuple[int, int, int], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A `BufferedLayer`'s whole key and value buffers and `mask` (the written columns') widened
    to them: -inf on the columns outside the written ones (trimmed off the front, free room).
    `masks` keeps the widened masks of one step by (first, end, room): the layers of a cache
    share them.

    In bf16 oneDNN's batched product reads a batch in place only when its matrices lie back to
    back, which a buffer's written columns do not and the whole buffer does. Reading the room
    (at most decoding's _GROW_ROOM_READ free columns, and up to _TRIMMED_READ columns trimmed
    off the front; more, such as a prefix just held once, are dropped first with one copy:
    `BufferedLayer.drop_trimmed`) costs less than copying the written columns at every step
    (`_batch_of`): at 64 rows a step took 64.8 ms against 72.2 (Zen 4, bf16, 2026-12-06;
    docs/models.md). The masked columns get probability 0 (exp of -inf), so each row attends to
    what it attends to over its written columns (the same bits: tests/test_decode_step.py)."""
    if cache.buffers()[2] > _TRIMMED_READ:
        cache.drop_trimmed()
    keys, values, first, end = cache.buffers()
    room = keys.shape[2]
    widened = masks.get((first, end, room))
    if widened is None:
        widened = mask.new_full((*mask.shape[:3], room), float("-inf"))
        widened[..., first:end] = mask
        masks[(first, end, room)] = widened
    return keys, values, widened


def _padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The additive float32 mask (rows x 1 x 1 x columns) of the cache's written columns that
    `attention_mask` (rows x columns) covers: -inf where it is 0."""
    mask = torch.zeros(attention_mask.shape).masked_fill_(attention_mask == 0, float("-inf"))
    return mask[:, None, None, :]


def _attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    held: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One query token's attention by transformers' eager formula (`eager_attention_forward`):
    scores in bf16, scaled in bf16, masked and softmaxed in float32, the probabilities cast back
    for the product with the values. Bit-identical to a model run with
    `attn_implementation="eager"` in our checks (tests/test_decode_step.py); not to torch's
    fused kernel (sdpa), which accumulates the scores in float32 and which the transformers
    forward uses (the padded prefill, `unpadded_prefill: false`).

    q: rows x kv_heads x groups x head_dim (the query heads of each key/value head together);
    keys / values: rows x kv_heads x columns x head_dim, contiguous or the written columns of a
    cache buffer (read in place in float32; in bf16 a decode step passes whole buffers, read in
    place, and a prefill row's own columns are copied once: `_batch_of`); mask: float32,
    additive, rows x 1 x 1 x columns; `held`: keys and values (1 x kv_heads x length x
    head_dim) every row attends to before its own columns, one softmax over both. Returns
    rows x kv_heads x groups x head_dim."""
    rows, kv_heads, groups, dim = q.shape
    columns = keys.shape[2]
    flat = q.reshape(rows * kv_heads, groups, dim)
    keys = _batch_of(keys.reshape(rows * kv_heads, columns, dim))
    values = _batch_of(values.reshape(rows * kv_heads, columns, dim))
    scores = torch.bmm(flat, keys.mT).view(rows, kv_heads, groups, columns)
    if held is not None:
        return _attention_held(q, scores, values, mask, scale, held)
    probs = _masked(scores, mask, scale).softmax(dim=-1).to(q.dtype)
    own = torch.bmm(probs.view(rows * kv_heads, groups, columns), values)
    return own.view(rows, kv_heads, groups, dim)


def _batch_of(x: torch.Tensor) -> torch.Tensor:
    """`x` (batch x columns x head_dim, a view of a cache's columns) as `torch.bmm` takes it
    fastest: in bf16 a dense copy where it is not dense already (a whole buffer is: the fast
    step's default in bf16, `_whole_buffers`; a prefill row's own columns are not), else as it
    is.

    oneDNN's bf16 batched product takes a batch in place only when its matrices lie back to back;
    given the written columns of a buffer (a batch stride of the buffer's room) torch copies it
    first, and for the keys' transposed operand that copy runs element by element. On a 2-core
    AMD EPYC with bf16 kernels (Zen 4, 2026-12-06; 64 rows x 300 columns, 3 key/value heads of
    64) the scores' product took 1.09 ms per layer that way, 0.27 ms after our own copy of the
    keys (0.07 ms of it); the values' 0.46 vs 0.24 ms. In float32 (MKL) the strided batch is
    read in place and a copy only adds (0.52 vs 1.26 ms at 64 rows)."""
    if x.dtype == torch.bfloat16 and not x.is_contiguous():
        return x.contiguous()
    return x


def _attention_held(
    q: torch.Tensor,
    scores: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    held: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """`_attention` with a held prefix, given the row's own unscaled `scores` (rows x kv_heads x
    groups x columns): the prefix's scores come from one product for all rows' query heads of
    each key/value head, and both parts' scaled scores are written side by side into one float32
    buffer (prefix first) for one softmax; the row's part of the probabilities is then read in
    place (a strided view), only the prefix's part is copied. Equal to attention over the
    prefix and the columns together within rounding (the two value products are summed)."""
    rows, kv_heads, groups, dim = q.shape
    columns, length = scores.shape[3], held[0].shape[2]
    together = q.transpose(0, 1).reshape(kv_heads, rows * groups, dim)
    shared = torch.bmm(together, held[0][0].transpose(1, 2))  # kv_heads x rows*groups x length
    both = torch.empty(rows, kv_heads, groups, length + columns, device=q.device)
    both[..., :length] = (shared * scale).view(kv_heads, rows, groups, length).transpose(0, 1)
    _masked(scores, mask, scale, out=both[..., length:])
    probs = both.softmax(dim=-1).to(q.dtype)
    first = probs[..., :length].transpose(0, 1).reshape(kv_heads, rows * groups, length)
    out = torch.bmm(first, held[1][0]).view(kv_heads, rows, groups, dim).transpose(0, 1)
    rest = probs.view(rows * kv_heads, groups, length + columns)[..., length:]
    own = torch.bmm(_batch_of(rest), values)  # values: _attention's batch (rows * kv_heads x ...)
    return out + own.view(rows, kv_heads, groups, dim)


def _masked(
    scores: torch.Tensor, mask: torch.Tensor, scale: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Eager attention's scores before the softmax: scaled in their own dtype (bf16), then the
    float32 `mask` added (float32; into `out` when given)."""
    if math.frexp(scale)[0] == 0.5:  # a power of two scales bf16 exactly: one fused operation
        return torch.add(mask, scores, alpha=scale, out=out)
    return torch.add(mask, scores * scale, out=out)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm (in float32, cast back, then times the weight), bit for bit
    (tests/test_decode_step.py) in fewer operations: torch's `F.rms_norm` computes a bf16 input
    in float32 with the same pow/mean/rsqrt and casts back itself (no casts of ours: two
    operations fewer), and in float32 it takes the weight too (one fewer; in bf16 it would
    multiply before rounding, which the Llama norm does not)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """`sin` with the first half of its last dimension negated (negation is exact)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding `x * cos + rotate_half(x) * sin`, where rotate_half(x) is
    (-x2, x1) for x = (x1, x2): here (x2, x1) (one `roll`) times the sin with its first half
    negated (`_signed_sin`, once per step). The same bits in every dtype (IEEE rounding is
    symmetric in sign: -x2 * s1 == x2 * -s1) in one operation fewer than negating and
    concatenating halves of x in every layer (tests/test_decode_step.py)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def weights_key(model: Any) -> tuple:
    """Changes whenever any weight of `model` is replaced or updated in place."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())
