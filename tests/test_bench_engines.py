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
