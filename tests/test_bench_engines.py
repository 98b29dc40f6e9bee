"""bench/bench_engines.py's `forced` setting: every row writes its whole budget, end of turn
ignored (vLLM itself is not installed in the test environment: our engine only)."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from autotraj.models.generator import GenerationRequest
from autotraj.models.loading import GeneratorConfig, load_generator
from autotraj.models.transformers_backend import TransformersGenerator

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_engines", ROOT / "bench/bench_engines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forced_rows_write_their_budget_past_the_end_of_turn(tiny_model_dir, monkeypatch):
    bench = _bench()
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32"))
    prompts = [gen.tokenizer.encode(t) for t in ("Q: 2+3?", "Q: name a prime", "Hi")]
    requests = [
        GenerationRequest("", prompt_ids=tuple(p), max_new_tokens=12, temperature=0.0, seed=0)
        for p in prompts
    ]
    _, _, free = bench.run_plain(gen, requests)
    # an end-of-turn id the first row writes third: a plain run stops there
    ends = {free[0][2]}
    monkeypatch.setattr(TransformersGenerator, "stop_token_ids", lambda self: ends)
    _, tokens, plain = bench.run_plain(gen, requests)
    assert len(plain[0]) == 2 and tokens < 36
    seconds, tokens, forced = bench.run_forced(gen, requests)
    assert tokens == 36 and seconds > 0
    assert forced == free  # the whole budget, cut only at the tokenizer's eos (none written)
    assert gen.stop_token_ids() == ends  # the generator is left as it was
    # a stop string still ends a row: the budget check says so instead of timing less work
    stop = gen.tokenizer.decode(free[0][:4])
    early = dataclasses.replace(requests[0], stop=(stop,))
    with pytest.raises(RuntimeError, match="forced: rows wrote"):
        bench.run_forced(gen, [early])


def test_the_thin_model_keeps_the_embedded_models_attention_and_cache(tmp_path):
    """bench/make_thin_model.py: the embedded model's layers, heads, head size and vocabulary
    (the same KV cache and attention work), products ~20x smaller, and the fast step runs it."""
    from transformers import AutoConfig

    from autotraj.models.decode_step import FastStep
    from autotraj.models.embedded import embedded_model_dir

    spec = importlib.util.spec_from_file_location("thin", ROOT / "bench/make_thin_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = module.make_thin_model(tmp_path / "thin")
    thin, full = AutoConfig.from_pretrained(path), AutoConfig.from_pretrained(embedded_model_dir())
    for name in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(thin, name) == getattr(full, name), name
    assert thin.head_dim == full.hidden_size // full.num_attention_heads
    assert thin.hidden_size == thin.intermediate_size == 72
    gen = load_generator(GeneratorConfig(model=str(path), dtype="float32"))
    assert FastStep.supports(gen.model)
    layer = gen.model.model.layers[0].self_attn
    assert layer.q_proj.weight.shape == (full.hidden_size, 72)  # heads x head size, thin input
    with pytest.raises(ValueError, match="multiple"):
        module.make_thin_model(tmp_path / "bad", hidden=64)


def test_counting_steps_sums_each_calls_longest_row(tiny_model_dir):
    """The critical path of a run: for every generate call, the most tokens one row wrote."""
    bench = _bench()
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32"))
    prompt = tuple(gen.tokenizer.encode("Q: 2+3?"))
    budgets = [(3, 7, 5), (2,), (4, 1)]
    with bench.counting_steps(gen) as longest:
        written = []
        for call in budgets:
            requests = [
                GenerationRequest("", prompt_ids=prompt, max_new_tokens=n, temperature=0.0, seed=0)
                for n in call
            ]
            written.append([len(c.token_ids) for c in gen.generate(requests)])
    assert longest == [max(w) for w in written]
    assert all(len(w) for w in written) and max(written[0]) > 1  # rows of unequal lengths ran
    assert "generate" not in vars(gen)  # the generator's own method again
