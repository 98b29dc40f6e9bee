"""Kept KV caches for tool loops: the store's rules, and a continued row generates what a
recomputed one does while only its new tokens are prefilled."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from autotraj.models import decoding
from autotraj.models.decoding import decode
from autotraj.models.generator import GenerationRequest
from autotraj.models.kept_prefixes import Kept, KeptPrefixes
from autotraj.models.loading import GeneratorConfig, load_generator


def _kept(ids, layers=2, width=4) -> Kept:
    k = torch.zeros(1, len(ids), width)
    return Kept(tuple(ids), [(k.clone(), k.clone()) for _ in range(layers)])


def test_longest_kept_start_of_a_prompt_leaving_one_token():
    store = KeptPrefixes(10**6)
    for ids in ([1, 2], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [7, 8, 9]):
        store.keep(_kept(ids))
    assert store.longest([1, 2, 3, 4, 5, 9]).ids == (1, 2, 3, 4)
    assert store.longest([1, 2, 3, 4, 5, 6, 0]).ids == (1, 2, 3, 4, 5, 6)
    # the whole prompt kept: one token must still be fed for its logits
    assert store.longest([1, 2, 3, 4, 5, 6]).ids == (1, 2, 3, 4)
    assert store.longest([2, 1, 3]) is None
    store.consume(store.longest([7, 8, 9, 10]))
    assert store.longest([7, 8, 9, 10]) is None and len(store) == 3


def test_budget_drops_the_oldest_and_weights_change_empties():
    one = _kept([1, 2, 3]).nbytes
    store = KeptPrefixes(2 * one)
    for start in (10, 20, 30):
        store.keep(_kept([start, start + 1, start + 2]))
    assert len(store) == 2 and store.nbytes == 2 * one
    assert store.longest([10, 11, 12, 13]) is None  # the oldest went first
    assert store.longest([30, 31, 32, 33]) is not None
    store.keep(_kept(range(100)))  # bigger than the whole budget: not kept, nothing dropped
    assert len(store) == 2
    store.check("weights A")
    assert len(store) == 0  # first check: the store may hold another model's caches
    store.keep(_kept([1, 2, 3]))
    store.check("weights A")
    assert len(store) == 1
    store.check("weights B")
    assert len(store) == 0 and store.nbytes == 0
    with pytest.raises(ValueError, match="budget"):
        KeptPrefixes(-1)


def _first_turn(gen, prompts, budget=24):
    """Greedy requests that stop (and will resume) after a short string each row writes."""
    free = gen.generate(
        [
            GenerationRequest("", prompt_ids=p, max_new_tokens=budget, temperature=0.0)
            for p in prompts
        ]
    )
    requests = []
    for p, c in zip(prompts, free, strict=True):
        stop = decode(gen.tokenizer, c.token_ids[5:7])  # written at the 6th-7th token
        assert stop.strip(), "the tiny model wrote only blanks"
        requests.append(
            GenerationRequest(
                "",
                prompt_ids=p,
                max_new_tokens=budget,
                temperature=0.0,
                stop=(stop,),
                resume_after=(stop,),
            )
        )
    return requests


def test_a_continued_row_prefills_only_its_new_tokens_and_generates_the_same(
    tiny_model_dir, monkeypatch
):
    """Two turns of a tool loop: rows stop on their call, a result is appended, generation goes
    on. With the store, the second prefill forwards only each row's last written token and the
    result; greedy outputs (float32) equal those of a generator that recomputes every context.
    Through the transformers forward, whose calls are counted here (the tests below take the
    fast step where the dtype allows)."""
    from autotraj.models import decode_step

    monkeypatch.setattr(decode_step.FastStep, "supports", staticmethod(lambda model: False))
    dtype = "float32"
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype=dtype, batch_size=8))
    ref = load_generator(
        GeneratorConfig(model=str(tiny_model_dir), dtype=dtype, batch_size=8, kept_prefix_mb=0)
    )
    assert ref.kept is None
    texts = ["Q: what is 2+3?", "Q: name a prime above ten.", "Q: hi", "Q: count to five, slowly"]
    prompts = [tuple(gen.tokenizer.encode(t)) for t in texts]
    first = _first_turn(gen, prompts)
    one, one_ref = gen.generate(first), ref.generate(first)
    assert [c.token_ids for c in one] == [c.token_ids for c in one_ref]
    assert [c.stop_reason for c in one] == ["stop"] * 4
    assert len(gen.kept) == 4
    result = tuple(gen.tokenizer.encode(" <result>5</result> "))
    second = [
        dataclasses.replace(
            r, prompt_ids=r.prompt_ids + c.token_ids + result, stop=(), resume_after=()
        )
        for r, c in zip(first, one, strict=True)
    ]
    widths = []
    real_forward = decoding._forward
    monkeypatch.setattr(
        decoding,
        "_forward",
        lambda m, ids, *a: widths.append(ids.shape) or real_forward(m, ids, *a),
    )
    two = gen.generate(second)
    assert widths[0] == (4, len(result) + 1)  # the last written token and the result
    assert len(gen.kept) == 0  # consumed; these rows ended at their budget, nothing kept
    assert gen.kept.hits == sum(len(r.prompt_ids) - len(result) - 1 for r in second)
    widths.clear()
    two_ref = ref.generate(second)
    assert widths[0] == (4, max(len(r.prompt_ids) for r in second))  # whole contexts again
    assert [c.token_ids for c in two] == [c.token_ids for c in two_ref]


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-4), ("bfloat16", 0.1)])
def test_continued_logits_are_the_recomputed_ones_up_to_rounding(tiny_model_dir, dtype, tolerance):
    """The first step's log-probs of continued rows against a whole-context prefill. In bf16 the
    kept keys and values (computed one token at a time) round differently from a prefill's: the
    gap measured here, 0.028, is of the size batch composition alone causes (a row prefilled
    alone vs in its padded batch: 0.017), enough to flip a greedy near-tie of the random tiny
    model, which is why the greedy test above runs in float32."""
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype=dtype, batch_size=8))
    prompts = [tuple(gen.tokenizer.encode(t)) for t in ["Q: what is 2+3?", "Q: a prime, please"]]
    first = _first_turn(gen, prompts)
    one = gen.generate(first)
    requests = [
        GenerationRequest("", prompt_ids=r.prompt_ids + c.token_ids + (5, 6, 7), max_new_tokens=4)
        for r, c in zip(first, one, strict=True)
    ]
    with torch.inference_mode():
        _, continued = decoding._prefill(gen.model, requests, [0, 1], 0, gen.kept)
        _, recomputed = decoding._prefill(gen.model, requests, [0, 1], 0, None)
    assert gen.kept.hits > 0
    gap = (continued.log_softmax(-1) - recomputed.log_softmax(-1)).abs().max().item()
    assert gap < tolerance


@pytest.mark.parametrize("chunk_rows", [16, 1])
def test_rows_with_and_without_a_kept_start_in_one_batch(tiny_model_dir, monkeypatch, chunk_rows):
    """A batch where some prompts continue kept rows and others are new, prefilled together or
    one row per chunk: greedy outputs equal the recomputed ones, and rows that did not stop on
    a resume string are not kept."""
    monkeypatch.setattr(decoding, "_PREFILL_ROWS", chunk_rows)
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32", batch_size=8))
    ref = load_generator(
        GeneratorConfig(model=str(tiny_model_dir), dtype="float32", batch_size=8, kept_prefix_mb=0)
    )
    prompts = [tuple(gen.tokenizer.encode(t)) for t in ["Q: one plus one", "Q: the sky is"]]
    first = _first_turn(gen, prompts)
    first[1] = dataclasses.replace(first[1], resume_after=())  # stops, but will not resume
    one = gen.generate(first)
    assert len(gen.kept) == 1
    new = tuple(gen.tokenizer.encode("Q: a brand new question, longer than the others"))
    second = [
        dataclasses.replace(first[0], prompt_ids=first[0].prompt_ids + one[0].token_ids + (5, 6)),
        GenerationRequest("", prompt_ids=new, max_new_tokens=20, temperature=0.0),
        dataclasses.replace(first[1], prompt_ids=first[1].prompt_ids + one[1].token_ids + (5, 6)),
    ]
    second = [dataclasses.replace(r, stop=(), resume_after=()) for r in second]
    assert [c.token_ids for c in gen.generate(second)] == [
        c.token_ids for c in ref.generate(second)
    ]
    assert gen.kept.hits == len(second[0].prompt_ids) - 3


def test_a_weight_change_drops_the_kept_caches(tiny_model_dir):
    """RL updates the generator's model in place: the next call must not continue caches the
    old weights computed."""
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32", batch_size=8))
    prompts = [tuple(gen.tokenizer.encode("Q: two times three"))]
    first = _first_turn(gen, prompts)
    one = gen.generate(first)
    assert len(gen.kept) == 1
    with torch.no_grad():
        gen.model.model.layers[0].mlp.down_proj.weight.mul_(-3)
    again = dataclasses.replace(first[0], prompt_ids=first[0].prompt_ids + one[0].token_ids + (7,))
    gen.generate([again])
    assert gen.kept.hits == 0


def test_a_negative_budget_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="kept_prefix_mb"):
        load_generator(GeneratorConfig(model=str(tiny_model_dir), kept_prefix_mb=-1))


def test_continued_rows_hold_their_common_start_once(tiny_model_dir, cpu_bf16):
    """The next turn of rows that all continue kept caches and share a long start (the system
    prompt and worked examples): the fast step holds that start once, cut from every row's
    cache; a few steps fed the same tokens give the log-probs of the copied layout up to bf16
    rounding."""
    from autotraj.models.decode_step import FastStep

    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="bfloat16"))
    assert gen.model.dtype == torch.bfloat16 and FastStep.supports(gen.model)
    system = tuple(gen.tokenizer.encode("You are a careful solver. Show the steps. " * 2))
    prompts = [system + tuple(gen.tokenizer.encode(t)) for t in ["Q: 2+3?", "Q: a prime?"]]
    first = _first_turn(gen, prompts)
    one = gen.generate(first)
    assert len(gen.kept) == 2
    requests = [
        GenerationRequest("", prompt_ids=r.prompt_ids + c.token_ids + (5, 6, 7), max_new_tokens=4)
        for r, c in zip(first, one, strict=True)
    ]
    common = decoding.shared_prefix([r.prompt_ids for r in requests])
    assert common >= len(system)
    hits = [gen.kept.longest(r.prompt_ids) for r in requests]
    fast = FastStep(gen.model)
    with torch.inference_mode():
        held, a = decoding._prefill(gen.model, requests, [0, 1], 0, gen.kept, split=True)
        for hit in hits:  # the same kept caches again, for the copied layout
            gen.kept.keep(hit)
        copied, b = decoding._prefill(gen.model, requests, [0, 1], 0, gen.kept, split=False)
        assert held.prefix is not None and held.prefix[0][0].shape[2] == common
        assert copied.prefix is None
        assert torch.equal(a, b)
        tokens = b.argmax(dim=-1)
        for _ in range(3):
            x = decoding._step(gen.model, held, tokens, fast).log_softmax(-1)
            y = decoding._step(gen.model, copied, tokens, fast).log_softmax(-1)
            assert (x - y).abs().max().item() < 0.1
            tokens = y.argmax(dim=-1)
