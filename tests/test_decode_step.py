"""The CPU decoder's speed-ups keep its results: buffered KV cache, packed linears, fast step.

Each speed-up is checked against the path it replaces, on real tensors and tiny real models
(Llama and Qwen2 with q/k/v biases), on CPU in bfloat16 and in float32. bf16 is kept as bf16 for
these tests on every CPU (`cpu_bf16`): where oneDNN has no bf16 kernels (AVX2-only x86) the fast
step computes its linears with `F.linear` and is still checked bit for bit against the
transformers forward; only the tests of the bf16 packing itself need oneDNN's bf16 kernels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from autotraj.models import decode_step, decoding
from autotraj.models.cpu_linear import packed_linears, packing_available
from autotraj.models.decode_step import FastStep
from autotraj.models.generator import GenerationRequest
from autotraj.models.kv_cache import BufferedLayer, fill_holes
from autotraj.models.loading import GeneratorConfig, load_generator

needs_packing = pytest.mark.skipif(
    not packing_available(), reason="no oneDNN bf16 packing (this torch or CPU)"
)
needs_fp32_packing = pytest.mark.skipif(
    not packing_available(torch.float32), reason="no oneDNN float32 packing (this torch or CPU)"
)


def _kv(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (rows, 2, length, 4)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_buffered_layer_matches_dynamic_layer_through_a_decode():
    """Prefill, steps past the first room (growth), front trims, row compaction, a crop."""
    ours, ref = BufferedLayer(capacity=6), DynamicLayer()
    for layer in (ours, ref):
        layer.update(*_kv(5, 4, 0))
    for step in range(8):
        k, v = _kv(ours.keys.shape[0], 1, step + 1)
        got, want = ours.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ours.trim_front(2)
    ref.keys, ref.values = ref.keys[:, :, 2:], ref.values[:, :, 2:]
    order = fill_holes([0, 2, 4], 5)
    ours.compact(order)
    ref.batch_select_indices(torch.tensor(order))
    for layer in (ours, ref):
        layer.update(*_kv(3, 1, 99))
        layer.crop(-1)
    assert ours.get_seq_length() == ref.get_seq_length() == 10
    assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
    ours.batch_select_indices(torch.tensor([2, 0]))
    ref.batch_select_indices(torch.tensor([2, 0]))
    assert torch.equal(ours.keys, ref.keys)


@pytest.mark.parametrize("grow", [0, 3])
def test_a_fixed_grow_adds_that_many_columns_and_the_views_stay_the_written_columns(grow):
    """The fast step reads `keys` / `values` (views of the written columns) in place; through
    growth, front trims and compaction they must stay exactly the written columns, and a fixed
    `grow` must add that many columns instead of doubling."""
    layer, ref = BufferedLayer(capacity=6, grow=grow), DynamicLayer()
    for x in (layer, ref):
        x.update(*_kv(5, 4, 0))
    rooms = []
    for step in range(9):
        kv = _kv(layer.keys.shape[0], 1, step + 1)
        layer.update(*kv)
        ref.update(*kv)
        rooms.append(layer.room)
        if step == 3:
            layer.trim_front(2)
            order = fill_holes([1, 3, 4], 5)
            layer.compact(order)
            ref.keys, ref.values = ref.keys[order, :, 2:], ref.values[order, :, 2:]
        assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)
    # room 6, then +3 columns at a time, or doubling
    assert rooms == (
        [6, 6, 9, 9, 9, 12, 12, 12, 12] if grow else [6, 6, 12, 12, 12, 12, 12, 12, 24]
    )
    # a strided view of the buffer, not a copy: the products read it in place
    assert layer.keys._base is not None and not layer.keys.is_contiguous()


@pytest.mark.parametrize(
    ("dtype", "atol"),
    [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)],
)
def test_fast_attention_over_a_buffers_written_columns_is_attention_over_them(dtype, atol):
    """`_attention` over the written columns of a buffer with room (views; the other columns
    hold garbage, even NaN) gives the bits it gives over a contiguous copy of those columns, and
    what sdpa gives within rounding; with a held prefix, what attention over the prefix and
    the columns together gives."""
    g = torch.Generator().manual_seed(3)
    rows, kv_heads, groups, dim, room, start, end = 5, 2, 3, 16, 40, 7, 29
    keys = torch.randn(rows, kv_heads, room, dim, generator=g).to(dtype)
    values = torch.randn(rows, kv_heads, room, dim, generator=g).to(dtype)
    for buffer in (keys, values):
        buffer[:, :, :start] = float("nan")
        buffer[:, :, end:] = float("nan")
    q = torch.randn(rows, kv_heads, groups, dim, generator=g).to(dtype)
    written = torch.ones(rows, end - start, dtype=torch.long)
    for row in range(rows):
        written[row, : 2 * row] = 0  # left padding
    mask = decode_step._padding_mask(written)
    k, v = keys[:, :, start:end], values[:, :, start:end]
    got = decode_step._attention(q, k, v, mask, dim**-0.5)
    assert torch.equal(
        got, decode_step._attention(q, k.contiguous(), v.contiguous(), mask, dim**-0.5)
    )
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=written.bool()[:, None, None, :], scale=dim**-0.5
    )
    assert torch.allclose(got.float(), want.float(), atol=atol)
    prefix = tuple(torch.randn(1, kv_heads, 11, dim, generator=g).to(dtype) for _ in "kv")
    got = decode_step._attention(q, k, v, mask, dim**-0.5, prefix)
    both = [
        torch.cat([p.expand(rows, -1, -1, -1), x], dim=2)
        for p, x in zip(prefix, (k, v), strict=True)
    ]
    seen = torch.cat([torch.ones(rows, 11, dtype=torch.bool), written.bool()], dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, *both, attn_mask=seen[:, None, None, :], scale=dim**-0.5
    )
    assert torch.allclose(got.float(), want.float(), atol=atol)


@pytest.mark.parametrize("dim", [16, 24])  # a power-of-two scale (one fused add) and another
def test_fast_attention_is_transformers_eager_attention_bit_for_bit(dim):
    from types import SimpleNamespace

    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(5)
    rows, kv_heads, groups, columns = 4, 2, 3, 21
    # the written columns of a buffer with room, as the fast step reads them
    keys = torch.randn(rows, kv_heads, columns + 9, dim, generator=g).to(torch.bfloat16)[:, :, 4:-5]
    values = torch.randn(rows, kv_heads, columns + 9, dim, generator=g).to(torch.bfloat16)
    values = values[:, :, 4:-5]
    q = torch.randn(rows, kv_heads, groups, dim, generator=g).to(torch.bfloat16)
    written = torch.ones(rows, columns, dtype=torch.long)
    written[1, :5] = 0
    mask = decode_step._padding_mask(written)
    got = decode_step._attention(q, keys, values, mask, dim**-0.5)
    module = SimpleNamespace(num_key_value_groups=groups, training=False)
    query = q.reshape(rows, kv_heads * groups, 1, dim)
    want, _ = eager_attention_forward(
        module, query, keys, values, mask[:, :, :1].to(torch.bfloat16), scaling=dim**-0.5
    )
    assert torch.equal(got.reshape(rows, kv_heads * groups, dim), want[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_norm_and_rotary_are_transformers_llama_bit_for_bit(dtype):
    """The fast step's RMSNorm (torch's rms_norm on the input as it is; the weight inside it in
    float32) and rotary embedding (a roll times a sin with its first half negated) give the bits
    of transformers' Llama RMSNorm and `apply_rotary_pos_emb`, at decode and prefill row counts
    and several input scales."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, rotate_half

    g = torch.Generator().manual_seed(5)
    for rows, scale in ((1, 4.0), (16, 0.01), (64, 30.0), (300, 4.0)):
        x = (torch.randn(rows, 1, 576, generator=g) * scale).to(dtype)
        norm = LlamaRMSNorm(576, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(576, generator=g) + 1)
        with torch.inference_mode():
            assert torch.equal(decode_step._rms_norm(x, norm.weight, 1e-5), norm(x)), rows
        qk = (torch.randn(rows, 7, 1, 64, generator=g) * 3).to(dtype)
        angles = torch.randn(rows, 1, 1, 32, generator=g) * 50
        emb = torch.cat((angles, angles), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        reference = qk * cos + rotate_half(qk) * sin
        ours = decode_step._rotate(qk, cos, decode_step._signed_sin(sin))
        assert torch.equal(ours, reference), rows
        # a wrong half negated is caught
        wrong = torch.cat((sin[..., :32], -sin[..., 32:]), dim=-1)
        assert not torch.equal(decode_step._rotate(qk, cos, wrong), reference)


def test_gather_columns_reorders_each_rows_written_columns_in_place():
    """New column c of row j is old column order[j, c], in the buffer (room and trimmed columns
    untouched), and the views stay the written columns."""
    layer = BufferedLayer(capacity=12)
    layer.update(*_kv(3, 7, 0))
    layer.trim_front(2)
    before_k, before_v = layer.keys.clone(), layer.values.clone()
    g = torch.Generator().manual_seed(1)
    order = torch.stack([torch.randperm(5, generator=g) for _ in range(3)])
    layer.gather_columns(order)
    for j in range(3):
        assert torch.equal(layer.keys[j], before_k[j][:, order[j]])
        assert torch.equal(layer.values[j], before_v[j][:, order[j]])
    assert layer.get_seq_length() == 5 and layer.room == 12 and layer.keys._base is not None


def test_drop_trimmed_keeps_the_written_columns_and_the_free_room():
    layer = BufferedLayer(capacity=10)
    keys, values = _kv(3, 7, seed=5)
    layer.update(keys, values)
    layer.trim_front(4)
    before = (layer.keys.clone(), layer.values.clone(), layer.room - layer.buffers()[3])
    layer.drop_trimmed()
    k, v, first, end = layer.buffers()
    assert (first, end, k.shape[2]) == (0, 3, 3 + before[2])  # the same free room after them
    assert torch.equal(layer.keys, before[0]) and torch.equal(layer.values, before[1])
    assert torch.equal(k[:, :, :3], keys[:, :, 4:]) and not k[:, :, 3:].any()
    layer.update(*_kv(3, 1, seed=6))  # decodes on into the room
    assert layer.get_seq_length() == 4 and layer.room == 3 + before[2]
    layer.grow = 2
    layer.update(*_kv(3, before[2], seed=7))  # past the room: it grows by `grow` from here
    assert layer.room == 3 + before[2] + 2


def test_row_ranges_start_at_each_ranges_first_real_column():
    pads = [20 - row // 2 for row in range(40)]  # padding first, less of it further down
    assert decode_step._row_ranges(pads) == [(0, 16, 13), (16, 32, 5), (32, 40, 1)]
    assert decode_step._row_ranges(pads[:31]) is None  # below two ranges: one, from column 0
    pads[39] = 0  # a row without padding in every range: nothing to skip
    pads[15] = pads[31] = 0
    assert decode_step._row_ranges(pads) is None


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_reads_a_buffers_written_columns_as_a_dense_batch(dtype, held):
    """The written columns of a buffer (a view with room after them) give the bits of the same
    columns stored back to back; in bf16 `_batch_of` hands `torch.bmm` a dense copy of them
    (oneDNN's bf16 product copies a strided batch itself, slowly), in float32 the view itself."""
    g = torch.Generator().manual_seed(3)
    rows, kv_heads, groups, dim, columns = 5, 2, 3, 8, 11
    room = torch.randn(rows, kv_heads, 20, dim, generator=g).to(dtype)
    keys, values = room[:, :, 2 : 2 + columns], room.flip(2)[:, :, 1 : 1 + columns]
    q = torch.randn(rows, kv_heads, groups, dim, generator=g).to(dtype)
    mask = torch.zeros(rows, 1, 1, columns)
    mask[1, ..., :4] = float("-inf")
    prefix = torch.randn(2, 1, kv_heads, 6, dim, generator=g).to(dtype)
    given = (prefix[0], prefix[1]) if held else None
    viewed = decode_step._attention(q, keys, values, mask, 0.125, given)
    dense = decode_step._attention(q, keys.contiguous(), values.contiguous(), mask, 0.125, given)
    assert not keys.is_contiguous() and torch.equal(viewed, dense)
    batch = decode_step._batch_of(keys.reshape(rows * kv_heads, columns, dim))
    assert batch.is_contiguous() == (dtype == torch.bfloat16)
    assert torch.equal(batch, keys.reshape(rows * kv_heads, columns, dim))


@pytest.mark.parametrize(
    "keep,rows", [([0, 2, 3, 5], 6), ([4], 5), ([0, 1, 2], 3), ([1, 3, 5, 6, 7], 8)]
)
def test_fill_holes_moves_only_rows_above_the_new_size(keep, rows):
    order = fill_holes(keep, rows)
    assert sorted(order) == keep
    assert all(order[j] == j for j in range(len(order)) if j in keep)  # kept slots stay


@pytest.mark.parametrize(
    "dtype",
    [
        pytest.param(torch.bfloat16, marks=needs_packing),
        pytest.param(torch.float32, marks=needs_fp32_packing),
    ],
)
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linears_match_f_linear_and_follow_weight_updates(rows, dtype):
    """bf16: bit for bit; float32: oneDNN sums in another order than MKL (last bits)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.Linear(96, 32, bias=False))
    model = model.to(dtype)
    x = torch.randn(rows, 48, dtype=dtype)

    def same(a, b):
        return torch.equal(a, b) if dtype == torch.bfloat16 else torch.allclose(a, b, atol=1e-5)

    with torch.inference_mode():
        plain = model(x)
        with packed_linears(model) as n:
            packed = model(x)
    assert n == 2 and same(packed, plain)
    with torch.no_grad():  # an optimizer step or weight push changes the weights in place
        model[0].weight.mul_(-1)
    with torch.inference_mode():
        plain = model(x)
        with packed_linears(model):
            packed = model(x)
    assert same(packed, plain)  # repacked, not the stale weights
    assert "forward" not in vars(model[0])  # the context leaves the modules as they were


@needs_fp32_packing
def test_the_float32_fast_step_computes_on_packed_weights(tiny_model_dir):
    """On x86 the float32 decoder takes oneDNN's packed kernel (2-4x MKL's sgemm at decoding's
    row counts for wide weights: cpu_linear.py), not `F.linear`."""
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32"))
    step = FastStep(gen.model)
    assert step.packed and step.lm_head.is_mkldnn


def _qwen2_dir(tiny_model_dir, tmp_path, sliding: bool = False):
    """A tiny Qwen2 (biased q/k/v); `sliding`: its second layer attends in a window of 8."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
        **(
            {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
            if sliding
            else {}
        ),
    )
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # biases as Qwen2 has them, not zeros
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture(
    params=[(arch, dtype) for arch in ("llama", "qwen2") for dtype in ("bfloat16", "float32")],
    ids=lambda p: "-".join(p),
)
def fast_generator(request, tiny_model_dir, tmp_path, cpu_bf16):
    """A tiny model's generator in a dtype the fast step runs (bf16 kept as bf16: `cpu_bf16`)."""
    arch, dtype = request.param
    path = tiny_model_dir if arch == "llama" else _qwen2_dir(tiny_model_dir, tmp_path)
    gen = load_generator(GeneratorConfig(model=str(path), dtype=dtype, device="cpu"))
    assert FastStep.supports(gen.model) and gen.model.dtype == getattr(torch, dtype)
    return gen


def _requests(tokenizer, temperature=0.0):
    texts = ["Hello there, how are", "2+2=", "A much longer prompt than the others, to pad"]
    budgets = (40, 25, 33)
    return [
        GenerationRequest(
            prompt_text="",
            prompt_ids=tuple(tokenizer.encode(t)),
            max_new_tokens=b,
            temperature=temperature,
            top_p=0.9,
            stop=("zz",),
            seed=7,
        )
        for t, b in zip(texts, budgets, strict=True)
    ]


def _both_paths(gen, requests, monkeypatch):
    gen.model.set_attn_implementation("eager")
    fast = gen.generate(requests)
    assert gen._fast is not None
    with monkeypatch.context() as m:
        m.setattr(decode_step.FastStep, "supports", staticmethod(lambda model: False))
        plain = gen.generate(requests)
        assert gen._fast is None
    return fast, plain


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fast_step_generates_what_the_transformers_forward_does(
    fast_generator, monkeypatch, temperature
):
    """Token-identical, greedy and seeded sampling, with log-probs, over rows of different
    prompt lengths that end at different steps."""
    gen = fast_generator
    gen.logprobs = True
    fast, plain = _both_paths(gen, _requests(gen.tokenizer, temperature), monkeypatch)
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]
    assert [c.stop_reason for c in fast] == [c.stop_reason for c in plain]
    if gen.model.dtype == torch.bfloat16:  # bit for bit
        assert [c.logprobs for c in fast] == [c.logprobs for c in plain]
    else:  # float32: F.linear's fused q/k/v and gate/up products round apart in the last bits
        for a, b in zip(fast, plain, strict=True):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    assert len({len(c.token_ids) for c in fast}) > 1  # rows did leave at different steps


def test_fast_step_follows_a_weight_update(fast_generator, monkeypatch):
    """RL pushes new weights into the generator's model: the next rollout must come from them."""
    gen = fast_generator
    requests = _requests(gen.tokenizer)
    before = gen.generate(requests)
    with torch.no_grad():
        gen.model.model.layers[0].mlp.down_proj.weight.mul_(-3)
    after, plain = _both_paths(gen, requests, monkeypatch)
    assert [c.token_ids for c in after] == [c.token_ids for c in plain]
    assert [c.token_ids for c in after] != [c.token_ids for c in before]


def test_fast_step_declines_what_it_does_not_reproduce(tiny_model_dir):
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float16"))
    assert not FastStep.supports(gen.model)  # float16: the transformers forward runs
    fp32 = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32"))
    assert FastStep.supports(fp32.model)
    fp32.model.config.rope_parameters = {**fp32.model.config.rope_parameters, "rope_type": "yarn"}
    assert not FastStep.supports(fp32.model)
    fp32.model.train()
    assert not FastStep.supports(fp32.model)


def _prefill_against_rows_alone(gen, prompts, starts):
    """`FastStep.prefill` of `prompts` whose first `starts[j]` tokens are already cached (taken
    from each prompt's own reference cache), against the transformers forward with eager
    attention of each prompt alone: (row, logits equal, keys and values equal) per row."""
    from transformers import DynamicCache

    from autotraj.models.kv_cache import buffered_cache

    model = gen.model
    model.set_attn_implementation("eager")
    alone = []
    with torch.inference_mode():
        for prompt in prompts:
            cache = DynamicCache(config=model.config)
            out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
            alone.append((out.logits[0, -1].float(), cache))
        cached = max(starts)
        cache = buffered_cache(model.config, 512)
        if cached:
            for number, layer in enumerate(cache.layers):
                like = alone[0][1].layers[number].keys
                shape = (len(prompts), like.shape[1], cached, like.shape[3])
                keys, values = like.new_zeros(shape), like.new_zeros(shape)
                for j, start in enumerate(starts):
                    keys[j, :, :start] = alone[j][1].layers[number].keys[0, :, :start]
                    values[j, :, :start] = alone[j][1].layers[number].values[0, :, :start]
                layer.update(keys, values)
        rests = [p[s:] for p, s in zip(prompts, starts, strict=True)]
        logits = FastStep(model).prefill(rests, starts, cache.layers)
    width = max(len(r) for r in rests)
    exact = model.dtype == torch.bfloat16
    results = []
    for j, (rest, start) in enumerate(zip(rests, starts, strict=True)):
        ours = [
            (
                x.keys[j, :, cached + width - len(rest) :],
                x.values[j, :, cached + width - len(rest) :],
            )
            for x in cache.layers
        ]
        ref = [(x.keys[0, :, start:], x.values[0, :, start:]) for x in alone[j][1].layers]
        same_kv = all(
            _same(a, c, exact) and _same(b, d, exact)
            for (a, b), (c, d) in zip(ours, ref, strict=True)
        )
        results.append((j, _same(logits[j], alone[j][0], exact), same_kv))
    return results


def _same(a: torch.Tensor, b: torch.Tensor, exact: bool) -> bool:
    """`exact` (a bf16 model): bit for bit; else (float32) up to the last bits (F.linear's
    fused products round apart)."""
    if exact:
        return torch.equal(a, b)
    return torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mlp_tokens", [4096, 7])
def test_unpadded_prefill_is_each_row_alone_bit_for_bit(fast_generator, monkeypatch, mlp_tokens):
    """Rows of different lengths in one sequence, some after cached starts (a kept cache, a
    shared prefix): each row's last logits and the keys/values written for it are what the
    transformers forward (eager attention) gives for that prompt alone; with the MLP in blocks
    of 7 tokens too."""
    monkeypatch.setattr(decode_step, "_MLP_TOKENS", mlp_tokens)
    g = torch.Generator().manual_seed(3)
    vocab = fast_generator.model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (23, 4, 41, 17)]
    for starts in ([0, 0, 0, 0], [5, 3, 0, 16]):
        results = _prefill_against_rows_alone(fast_generator, prompts, starts)
        assert results == [(j, True, True) for j in range(len(prompts))], starts


def test_unpadded_prefill_refuses_an_empty_rest(fast_generator):
    from autotraj.models.kv_cache import buffered_cache

    cache = buffered_cache(fast_generator.model.config, 16)
    with pytest.raises(ValueError, match="at least one token"):
        FastStep(fast_generator.model).prefill([[5, 6], []], [0, 0], cache.layers)


@pytest.mark.slow
def test_embedded_model_unpadded_prefill_is_each_prompt_alone_on_gsm8k(monkeypatch):
    """The same check on the embedded model and 8 GSM8K chat prompts, with and without the chat
    template's shared start cached."""
    from pathlib import Path

    from autotraj.models.decoding import shared_prefix
    from autotraj.querysets import load_queries

    data = Path(__file__).resolve().parents[2] / "shared/data/benchmarks/gsm8k_test.jsonl"
    gen = load_generator(GeneratorConfig(dtype="bfloat16", device="cpu"))
    prompts = [
        gen.tokenizer.encode(
            gen.tokenizer.apply_chat_template(
                [{"role": "user", "content": q.question}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )
        for q in load_queries(str(data), limit=8)
    ]
    shared = shared_prefix(prompts)
    assert shared >= 8
    for starts in ([0] * len(prompts), [shared] * len(prompts)):
        results = _prefill_against_rows_alone(gen, prompts, starts)
        assert results == [(j, True, True) for j in range(len(prompts))], starts


@pytest.mark.slow
def test_embedded_model_fast_path_is_token_identical_on_gsm8k_prompts(monkeypatch):
    from pathlib import Path

    from autotraj.querysets import load_queries

    data = Path(__file__).resolve().parents[2] / "shared/data/benchmarks/gsm8k_test.jsonl"
    gen = load_generator(GeneratorConfig(dtype="bfloat16", device="cpu", batch_size=8))
    requests = []
    for q in load_queries(str(data), limit=8):
        text = gen.tokenizer.apply_chat_template(
            [{"role": "user", "content": q.question}], tokenize=False, add_generation_prompt=True
        )
        ids = tuple(gen.tokenizer.encode(text, add_special_tokens=False))
        requests.append(GenerationRequest(prompt_text=text, prompt_ids=ids, max_new_tokens=96))
    requests = [dataclasses.replace(r, temperature=0.0) for r in requests]
    # the decode steps on the same caches: both paths take the padded transformers prefill (the
    # unpadded one is checked above; its caches' columns lie otherwise, and decode attention
    # sums them in another order, so a near-tie may then go the other way)
    prefill = decoding._prefill
    monkeypatch.setattr(decoding, "_prefill", lambda *args: prefill(*args[:7]))
    fast, plain = _both_paths(gen, requests, monkeypatch)
    assert [c.token_ids for c in fast] == [c.token_ids for c in plain]


def test_prefill_leaves_each_rows_padding_before_its_real_columns(tiny_model_dir, monkeypatch):
    """After the prefill a row's columns are `[padding | start | rest]`, not `[start | padding |
    rest]`: its real keys and values are those of the layout before, in the same order, and the
    padding every row has is trimmed off the front."""
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32"))
    system = gen.tokenizer.encode("You are a careful solver. ")
    requests = [
        GenerationRequest(prompt_text="", prompt_ids=tuple(system + gen.tokenizer.encode(t)))
        for t in ["2+3?", "Name a prime above 10.", "Say hi", "Count to five, slowly please"]
    ]
    fast = FastStep(gen.model)

    def prefill():
        with torch.inference_mode():
            return decoding._prefill(gen.model, requests, [0, 1, 2, 3], 0, fast=fast)[0]

    batch = prefill()
    with monkeypatch.context() as m:
        m.setattr(decoding, "_padding_first", lambda batch: None)
        middle = prefill()
    assert middle.attention_mask[:, 0].all() and not middle.attention_mask.all(dim=1).all()
    mask = batch.attention_mask
    assert torch.equal(mask, mask.sort(dim=1).values)  # every row: zeros, then ones
    assert min(batch.pads) == 0 and batch.pads == (mask == 0).sum(dim=1).tolist()
    for ours, theirs in zip(batch.cache.layers, middle.cache.layers, strict=True):
        for j in range(len(requests)):
            mine, before = mask[j].bool(), middle.attention_mask[j].bool()
            assert torch.equal(ours.keys[j][:, mine], theirs.keys[j][:, before])
            assert torch.equal(ours.values[j][:, mine], theirs.values[j][:, before])


@pytest.mark.parametrize("held", [False, True])
def test_attention_in_row_ranges_decodes_like_one_range(fast_generator, monkeypatch, held):
    """Rows read in ranges, each from its first real column, give the tokens of one range over
    all columns, log-probs within rounding (the masked columns they skip weigh nothing); also
    behind a shared prefix held once (each range attends to it too)."""
    from autotraj.models import decoding

    gen = fast_generator
    gen.logprobs = True
    gen._fast_step().reads_room = False  # ranges are for reading the written columns only
    system = gen.tokenizer.encode("You are a careful solver. Show the steps. " * 2) if held else []
    texts = ["Hi", "2+2=", "A prompt of middling size", "A much longer prompt than the others"]
    requests = [
        GenerationRequest(
            prompt_text="",
            prompt_ids=tuple(system + gen.tokenizer.encode(t * k)),
            max_new_tokens=20,
            temperature=0.0,
        )
        for k in (1, 2)
        for t in texts
    ]
    holds = []
    hold = decoding._hold_prefix_once
    monkeypatch.setattr(decoding, "_hold_prefix_once", lambda *a: holds.append(1) or hold(*a))
    used = []
    ranges = decode_step._row_ranges
    monkeypatch.setattr(decode_step, "_row_ranges", lambda m: used.append(ranges(m)) or used[-1])
    monkeypatch.setattr(decode_step, "_RANGE_ROWS", 2)
    split = gen.generate(requests)
    assert any(r is not None and any(c for _, _, c in r) for r in used)
    assert bool(holds) == held
    monkeypatch.setattr(decode_step, "_RANGE_ROWS", 10**6)
    whole = gen.generate(requests)
    assert [c.token_ids for c in split] == [c.token_ids for c in whole]
    tolerance = 0.05 if gen.model.dtype == torch.bfloat16 else 1e-4
    for a, b in zip(split, whole, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < tolerance


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_whole_buffer_reads_decode_like_the_written_columns(
    fast_generator, monkeypatch, held, temperature
):
    """Reading each layer's whole buffer (bf16's default: the room and trimmed columns masked)
    gives the tokens and log-probs of reading only the written columns (bf16: bit for bit); with
    rows finishing early (front trims) and behind a held prefix."""
    from autotraj.models import decoding

    gen = fast_generator
    gen.logprobs = True
    system = gen.tokenizer.encode("You are a careful solver. Show the steps. " * 2) if held else []
    requests = [  # the longest prompt finishes first: the others' padding is then trimmed
        dataclasses.replace(r, prompt_ids=tuple(system) + r.prompt_ids, max_new_tokens=n)
        for r, n in zip(_requests(gen.tokenizer, temperature), (40, 36, 6), strict=True)
    ]
    holds = []
    hold = decoding._hold_prefix_once
    monkeypatch.setattr(decoding, "_hold_prefix_once", lambda *a: holds.append(1) or hold(*a))
    reads = []
    whole_buffers = decode_step._whole_buffers

    def spy(cache, mask, masks):
        keys, values, widened = whole_buffers(cache, mask, masks)
        _, _, first, end = cache.buffers()
        reads.append((first, end, keys.shape[2]))
        return keys, values, widened

    monkeypatch.setattr(decode_step, "_whole_buffers", spy)
    drops = []
    drop = BufferedLayer.drop_trimmed
    monkeypatch.setattr(BufferedLayer, "drop_trimmed", lambda self: drops.append(1) or drop(self))
    step = gen._fast_step()
    step.reads_room = True
    whole = gen.generate(requests)
    assert reads and any(end < room for _, end, room in reads)  # free room was read
    # and columns trimmed off the front: read (a few) or dropped first (more: a held prefix)
    assert any(first > 0 for first, _, _ in reads) or drops
    assert bool(holds) == held
    reads.clear()
    step.reads_room = False
    written = gen.generate(requests)
    assert not reads
    assert [c.token_ids for c in whole] == [c.token_ids for c in written]
    if gen.model.dtype == torch.bfloat16:  # where whole buffers are read by default
        assert [c.logprobs for c in whole] == [c.logprobs for c in written]
    else:  # MKL's float32 sums depend on the width read: within rounding
        pairs = [
            p
            for a, b in zip(whole, written, strict=True)
            for p in zip(a.logprobs, b.logprobs, strict=True)
        ]
        assert pairs and max(abs(x - y) for x, y in pairs) < 1e-4


def test_greedy_pick_is_the_first_maximum_like_argmax():
    from autotraj.models.decoding import sample_next

    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, -1.0, 5.0, 5.0]])
    zeros = torch.zeros(3)
    picked = sample_next(logits, zeros, torch.ones(3))
    assert picked.tolist() == logits.argmax(dim=-1).tolist() == [1, 0, 2]
    big = torch.randn(64, 49152).round(decimals=1)  # many ties
    assert torch.equal(sample_next(big, torch.zeros(64), torch.ones(64)), big.argmax(dim=-1))


def _forward_prefill_only(monkeypatch):
    """The transformers forward for every step (no fast step: its unpadded prefill would run
    instead of the padded, chunked and shared-prefix paths tested here, which other models,
    float16 and GPUs take)."""
    monkeypatch.setattr(decode_step.FastStep, "supports", staticmethod(lambda model: False))


def test_a_shared_prompt_prefix_computed_once_gives_the_same_tokens(tiny_model_dir, monkeypatch):
    """Prompts with a long common start (a system prompt, worked examples): the prefix is run
    once and copied to every row; greedy outputs (float32) equal the plain left-padded
    prefill's."""
    from autotraj.models import decoding

    _forward_prefill_only(monkeypatch)
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32", batch_size=8))
    system = "You are a careful solver. Show the steps, then answer. " * 2
    tails = ["What is 2+3?", "Name a prime above 10.", "Say hi", "Count to five, slowly please"]
    requests = [
        GenerationRequest(
            prompt_text="",
            prompt_ids=tuple(gen.tokenizer.encode(system + t)),
            max_new_tokens=b,
            temperature=0.0,
        )
        for t, b in zip(tails, (30, 12, 25, 18), strict=True)
    ]
    assert decoding.shared_prefix([r.prompt_ids for r in requests]) >= decoding._MIN_SHARED
    calls = []
    real_forward = decoding._forward
    monkeypatch.setattr(
        decoding, "_forward", lambda m, ids, *a: calls.append(ids.shape) or real_forward(m, ids, *a)
    )
    shared = gen.generate(requests)
    assert calls[0][0] == 1 and calls[1][0] == len(requests)  # prefix once, then the rests
    monkeypatch.setattr(decoding, "_MIN_SHARED", 10**9)
    calls.clear()
    plain = gen.generate(requests)
    assert calls[0][0] == len(requests)
    assert [c.token_ids for c in shared] == [c.token_ids for c in plain]


def test_sliding_window_layers_take_the_plain_prefill_with_a_shared_prefix(
    tiny_model_dir, tmp_path, monkeypatch
):
    """A model with sliding-window layers cannot take a copied prefix: prompts with a long
    common start are prefilled whole, left-padded, in one cache, and greedy outputs equal each
    prompt generated alone by transformers."""
    from transformers import AutoModelForCausalLM

    from autotraj.models import decoding

    path = _qwen2_dir(tiny_model_dir, tmp_path, sliding=True)
    gen = load_generator(GeneratorConfig(model=str(path), dtype="float32", batch_size=8))
    system = "You are a careful solver. Show the steps, then answer. " * 2
    tails = ["What is 2+3?", "Name a prime above 10.", "Say hi"]
    requests = [
        GenerationRequest(
            prompt_text="",
            prompt_ids=tuple(gen.tokenizer.encode(system + t)),
            max_new_tokens=12,
            temperature=0.0,
        )
        for t in tails
    ]
    assert decoding.shared_prefix([r.prompt_ids for r in requests]) >= decoding._MIN_SHARED
    built, calls = [], []
    real_cache, real_forward = decoding.buffered_cache, decoding._forward
    monkeypatch.setattr(
        decoding, "buffered_cache", lambda c, n, *a: built.append(n) or real_cache(c, n, *a)
    )
    monkeypatch.setattr(
        decoding, "_forward", lambda m, ids, *a: calls.append(ids.shape) or real_forward(m, ids, *a)
    )
    out = gen.generate(requests)
    assert calls[0] == (len(requests), max(len(r.prompt_ids) for r in requests))  # whole prompts
    assert len(built) == 2  # the shared layout's cache, refused, then the plain one
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for request, completion in zip(requests, out, strict=True):
        ids = torch.tensor([request.prompt_ids])
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
        n = len(completion.token_ids)
        assert list(completion.token_ids) == ref.tolist()[:n], request.prompt_ids[-5:]


_CHUNK_TEXTS = ["Say hi", "What is 2+3? Think.", "A", "Count to five, slowly please", "Name it"]


def _chunk_requests(tokenizer) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt_text="",
            prompt_ids=tuple(tokenizer.encode(t)),
            max_new_tokens=14,
            temperature=0.0,
        )
        for t in _CHUNK_TEXTS
    ]


def test_a_chunked_prefill_gives_what_one_padded_batch_gives(tiny_model_dir, monkeypatch):
    """More rows than _PREFILL_ROWS: the prompts are prefilled in chunks of similar lengths, each
    only as wide as its longest prompt; greedy outputs (float32) equal one padded prefill's, and
    a row's position in the batch is kept (requests given out of length order)."""
    from autotraj.models import decoding

    _forward_prefill_only(monkeypatch)
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32"))
    requests = _chunk_requests(gen.tokenizer)
    calls = []
    real_forward = decoding._forward
    monkeypatch.setattr(
        decoding, "_forward", lambda m, ids, *a: calls.append(ids.shape) or real_forward(m, ids, *a)
    )
    monkeypatch.setattr(gen, "_plan", lambda rs: [list(range(len(rs)))])  # keep the order
    monkeypatch.setattr(decoding, "_PREFILL_ROWS", 2)
    chunked = gen.generate(requests)
    lengths = sorted(len(r.prompt_ids) for r in requests)
    assert calls[:3] == [(2, lengths[1]), (2, lengths[3]), (1, lengths[4])]
    monkeypatch.setattr(decoding, "_PREFILL_ROWS", 10**9)
    calls.clear()
    whole = gen.generate(requests)
    assert calls[0] == (len(requests), lengths[-1])
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_chunked_prefill_logits_are_one_batch_logits_up_to_rounding(
    tiny_model_dir, monkeypatch, dtype, tolerance
):
    """The first step's log-probs of a chunked prefill against one padded batch: bf16 matmuls
    of other row counts round differently (enough to flip a near-tie of the random tiny model,
    hence the greedy test above in float32)."""
    from autotraj.models import decoding

    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype=dtype))
    requests = _chunk_requests(gen.tokenizer)
    rows = list(range(len(requests)))
    with torch.inference_mode():
        monkeypatch.setattr(decoding, "_PREFILL_ROWS", 2)
        _, chunked = decoding._prefill(gen.model, requests, rows, 0)
        monkeypatch.setattr(decoding, "_PREFILL_ROWS", 10**9)
        _, whole = decoding._prefill(gen.model, requests, rows, 0)
    gap = (chunked.log_softmax(-1) - whole.log_softmax(-1)).abs().max().item()
    assert gap < tolerance


def test_a_shared_prefix_with_chunked_rests_gives_the_same_tokens(tiny_model_dir, monkeypatch):
    """A long common start and more rows than _PREFILL_ROWS: the prefix is computed once, each
    chunk's rows start from it; greedy outputs (float32) equal whole prompts in one batch."""
    from autotraj.models import decoding

    _forward_prefill_only(monkeypatch)
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32"))
    system = "You are a careful solver. Show the steps, then answer. " * 2
    requests = [
        dataclasses.replace(r, prompt_ids=tuple(gen.tokenizer.encode(system)) + r.prompt_ids)
        for r in _chunk_requests(gen.tokenizer)
    ]
    shared = decoding.shared_prefix([r.prompt_ids for r in requests])
    assert shared >= decoding._MIN_SHARED
    calls = []
    real_forward = decoding._forward
    monkeypatch.setattr(
        decoding, "_forward", lambda m, ids, *a: calls.append(ids.shape) or real_forward(m, ids, *a)
    )
    monkeypatch.setattr(decoding, "_PREFILL_ROWS", 2)
    chunked = gen.generate(requests)
    assert calls[0] == (1, shared) and [c[0] for c in calls[1:4]] == [2, 2, 1]
    monkeypatch.setattr(decoding, "_PREFILL_ROWS", 10**9)
    monkeypatch.setattr(decoding, "_MIN_SHARED", 10**9)
    calls.clear()
    whole = gen.generate(requests)
    assert calls[0] == (len(requests), max(len(r.prompt_ids) for r in requests))
    assert [c.token_ids for c in chunked] == [c.token_ids for c in whole]


def test_a_prefix_held_once_decodes_like_a_prefix_in_every_row(fast_generator):
    """The fast step's split attention (a shared prefix held once, its softmax merged with each
    row's own by log-sum-exp) against the same prefix copied into every row, fed the same
    tokens for a few steps: the prefix is held once and cut from the rows' caches, and the
    log-probs differ by bf16 rounding only."""
    from autotraj.models import decoding

    gen = fast_generator
    system = gen.tokenizer.encode("You are a careful solver. Show the steps, then answer. " * 2)
    requests = [
        dataclasses.replace(r, prompt_ids=tuple(system) + r.prompt_ids)
        for r in _requests(gen.tokenizer)
    ]
    shared = decoding.shared_prefix([r.prompt_ids for r in requests])
    rows = list(range(len(requests)))
    fast = FastStep(gen.model)
    with torch.inference_mode():
        held, first = decoding._prefill(gen.model, requests, rows, 0, None, split=True)
        copied, again = decoding._prefill(gen.model, requests, rows, 0, None, split=False)
        assert held.prefix is not None and held.prefix[0][0].shape[2] == shared
        assert copied.prefix is None
        assert held.cache.layers[0].get_seq_length() + shared == copied.attention_mask.shape[1]
        assert torch.equal(first, again)
        tokens = again.argmax(dim=-1)
        for _ in range(4):
            a = decoding._step(gen.model, held, tokens, fast).log_softmax(-1)
            b = decoding._step(gen.model, copied, tokens, fast).log_softmax(-1)
            assert 0 < (a - b).abs().max().item() < 0.1
            tokens = b.argmax(dim=-1)


def _with_system(tokenizer, length: int, temperature: float = 0.0) -> list[GenerationRequest]:
    """`_requests` behind a common start of exactly `length` tokens (their own starts differ)."""
    system = tuple(tokenizer.encode("You are a careful solver. Show the steps. " * 8))[:length]
    assert len(system) == length
    return [
        dataclasses.replace(r, prompt_ids=system + r.prompt_ids)
        for r in _requests(tokenizer, temperature)
    ]


@pytest.mark.parametrize("extra", [-1, 0])
def test_only_a_shared_prefix_of_min_held_tokens_is_held(fast_generator, extra):
    """The split attention pays from _MIN_HELD shared tokens on (docs/models.md): a shorter
    shared prefix stays in every row's cache, a long enough one is held once."""
    gen = fast_generator
    requests = _with_system(gen.tokenizer, decoding._MIN_HELD + extra)
    assert decoding.shared_prefix([r.prompt_ids for r in requests]) == decoding._MIN_HELD + extra
    with torch.inference_mode():
        batch, _ = decoding._prefill(
            gen.model, requests, list(range(len(requests))), 0, None, split=True
        )
    if extra < 0:
        assert batch.prefix is None
    else:
        assert batch.prefix is not None and batch.prefix[0][0].shape[2] == decoding._MIN_HELD


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_generator_holds_a_long_shared_prefix_by_default(
    fast_generator, monkeypatch, temperature
):
    """The default generator holds a long shared prefix once (`held_prefix` is on) and writes
    what a generator that keeps it in every row writes: the same tokens and log-probs within
    rounding in float32; in bf16, the same first token (it comes from the prefill, the same in
    both) and log-probs within bf16 rounding up to the first token where the two differ (a
    near-tie may go either way)."""
    gen = fast_generator
    gen.logprobs = True
    requests = _with_system(gen.tokenizer, 2 * decoding._MIN_HELD, temperature)
    held = []
    real = decoding._hold_prefix_once
    monkeypatch.setattr(
        decoding, "_hold_prefix_once", lambda batch, prefix: held.append(1) or real(batch, prefix)
    )
    assert gen.held_prefix
    once = gen.generate(requests)
    assert held == [1]
    gen.held_prefix = False
    every = gen.generate(requests)
    assert held == [1]
    assert max(len(c.token_ids) for c in once) > 3  # decode steps ran on the held prefix
    for a, b in zip(once, every, strict=True):
        if gen.model.dtype == torch.float32:
            assert a.token_ids == b.token_ids
        assert a.token_ids[:1] == b.token_ids[:1]  # so the log-probs below compare at least one
        same = 0
        while same < min(len(a.token_ids), len(b.token_ids)):
            if a.token_ids[same] != b.token_ids[same]:
                break
            same += 1
        tolerance = 1e-4 if gen.model.dtype == torch.float32 else 0.1
        pairs = zip(a.logprobs[:same], b.logprobs[:same], strict=True)
        assert all(abs(x - y) < tolerance for x, y in pairs)
