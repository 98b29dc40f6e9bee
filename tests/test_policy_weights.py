"""Full policy weights into rollout engines: the bf16 transformers copy and the vLLM push.

The sharded paths (FSDP2, ZeRO-3) run end to end in tests/test_distributed.py; vLLM needs a
GPU or the CPU tier's environment (tests/vllm_cpu/), so here its engine is a stand-in that
records what the trainer sends it.
"""

from __future__ import annotations

import pytest
import torch

from autotraj.config import ConfigError
from autotraj.train.policy_weights import (
    HfRolloutCopy,
    VllmRolloutEngine,
    check_engine_memory,
    full_parameters,
    parameter_count,
)


class Unsharded:
    """An accelerator with nothing distributed (what full_parameters needs of one)."""

    class distributed_type:  # noqa: N801 - mimics accelerate's enum member
        value = "NO"

    @staticmethod
    def unwrap_model(model):
        return model


@pytest.fixture
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def test_copy_receives_every_parameter(policy, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    copy = HfRolloutCopy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    count = copy.sync(full_parameters(Unsharded, policy))
    assert count == len(list(policy.named_parameters()))
    for name, p in policy.named_parameters():
        got = copy.model.get_parameter(name)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, p.to(torch.bfloat16))


def test_copy_refuses_partial_or_foreign_weights(policy, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    copy = HfRolloutCopy(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    params = list(full_parameters(Unsharded, policy))
    with pytest.raises(RuntimeError, match="no weights for"):
        copy.sync(params[1:])
    with pytest.raises(RuntimeError, match="no parameter 'model.extra.weight'"):
        copy.sync([*params, ("model.extra.weight", torch.zeros(1))])
    name, tensor = params[0]
    with pytest.raises(RuntimeError, match=f"parameter {name}: policy shape"):
        copy.sync([(name, tensor[:1]), *params[1:]])


class FakeLLM:
    """Records the calls a VllmRolloutEngine makes on vllm.LLM; `chunkable` is what its worker
    answers (GPU builds: True; the CPU build, whose linear layers lost their loaders: False)."""

    def __init__(self, chunkable=True):
        self.chunkable = chunkable
        self.calls = []
        self.loaded = {}

    def collective_rpc(self, method, args=()):
        if method == "policy_weights_chunkable":
            return [self.chunkable]
        (weights,) = args
        if method == "reload_policy_weights":
            assert not isinstance(weights, list | tuple)  # streamed, never all at once
            received = 0
            for name, tensor in weights:
                self.loaded[name] = tensor
                received += 1
            self.calls.append((method, received))
        else:
            self.calls.append((method, len(weights)))
            self.loaded.update(weights)
        return [None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache", 0))

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else "all"))


def assert_pushed_in_bf16(llm, params):
    for name, p in params.items():
        assert llm.loaded[name].dtype == torch.bfloat16  # the engine's dtype
        torch.testing.assert_close(llm.loaded[name], p.detach().to(torch.bfloat16))
        assert llm.loaded[name].data_ptr() != p.data_ptr()  # a copy: gathered storage is freed


def test_vllm_push_sends_all_weights_in_chunks_then_drops_the_prefix_cache(policy, monkeypatch):
    monkeypatch.setattr(VllmRolloutEngine, "CHUNK", 3)
    llm = FakeLLM()
    engine = VllmRolloutEngine(llm, sleep=True)
    params = dict(policy.named_parameters())
    assert engine.sync(full_parameters(Unsharded, policy)) == len(params)
    pushes = [n for method, n in llm.calls if method == "load_policy_weights"]
    assert sum(pushes) == len(params) and max(pushes) == 3
    assert llm.calls[-1] == ("reset_prefix_cache", 0)
    assert_pushed_in_bf16(llm, params)


def test_vllm_push_without_weight_loaders_reloads_the_whole_model_in_one_call(policy):
    """The CPU build: one reload_weights call gets every tensor (chunks of reloads break it)."""
    llm = FakeLLM(chunkable=False)
    engine = VllmRolloutEngine(llm, sleep=False)
    params = dict(policy.named_parameters())
    for _ in range(2):  # the build is asked once; every sync is one whole reload
        llm.calls.clear()
        assert engine.sync(full_parameters(Unsharded, policy)) == len(params)
        assert llm.calls == [("reload_policy_weights", len(params)), ("reset_prefix_cache", 0)]
    assert engine.chunked is False
    assert_pushed_in_bf16(llm, params)


def test_vllm_whole_reload_that_stops_early_is_an_error(policy):
    class Stopping(FakeLLM):
        def collective_rpc(self, method, args=()):
            if method == "reload_policy_weights":
                next(args[0])  # takes one tensor and returns
                return [None]
            return super().collective_rpc(method, args)

    engine = VllmRolloutEngine(Stopping(chunkable=False), sleep=False)
    with pytest.raises(RuntimeError, match="stopped before the last policy tensor"):
        engine.sync(full_parameters(Unsharded, policy))


def test_weight_loaders_intact_checks_only_the_given_layer_types():
    from autotraj.train.policy_weights import weight_loaders_intact

    model = torch.nn.Sequential(
        torch.nn.Embedding(4, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    )
    for p in model[1].parameters():
        p.weight_loader = object()
    assert not weight_loaders_intact(model, (torch.nn.Linear,))  # model[2] was repacked
    for p in model[2].parameters():
        p.weight_loader = object()
    assert weight_loaders_intact(model, (torch.nn.Linear,))  # the embedding needs none


def test_vllm_sleeps_at_level_2_and_wakes_weights_then_pushes_then_kv_cache(policy, monkeypatch):
    """Level 1 would copy the stale weights to pinned host memory and back every step; the KV
    cache must not be on the GPU while the new weights arrive; PyTorch's cached blocks of the
    update go back to the driver (vLLM allocates outside PyTorch) before vLLM wakes."""
    monkeypatch.setattr(VllmRolloutEngine, "CHUNK", 1000)
    llm = FakeLLM()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: llm.calls.append(("empty_cache", 0)))
    engine = VllmRolloutEngine(llm, sleep=True)
    engine.sync(full_parameters(Unsharded, policy))
    assert [c for c, _ in llm.calls] == ["load_policy_weights", "reset_prefix_cache"]  # awake
    engine.release()
    engine.release()  # already asleep: nothing more
    assert llm.calls[2:] == [("sleep", 2)]
    llm.calls.clear()
    engine.sync(full_parameters(Unsharded, policy))
    assert llm.calls == [
        ("empty_cache", 0),
        ("wake_up", ("weights",)),
        ("load_policy_weights", len(dict(policy.named_parameters()))),
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache", 0),
    ]
    assert engine.awake


def test_vllm_without_sleep_never_sleeps(policy):
    llm = FakeLLM()
    engine = VllmRolloutEngine(llm, sleep=False)
    engine.release()
    engine.sync(full_parameters(Unsharded, policy))
    assert not [c for c, _ in llm.calls if c in ("sleep", "wake_up")]


def test_engine_memory_share_too_small_for_the_weights_is_refused():
    field = "rl: generator.gpu_memory_utilization"
    gib = 2**30
    check_engine_memory(7_600_000_000, 80 * gib, 0.5, field)  # 40 GiB: 14 of weights
    # the old default 0.3 of a 48 GB GPU cannot even hold a 7B model's bf16 weights
    with pytest.raises(ConfigError, match=r"generator.gpu_memory_utilization=0.3.*14.2 GiB"):
        check_engine_memory(7_600_000_000, 48 * gib, 0.3, field)
    with pytest.raises(ConfigError, match="must be in"):
        check_engine_memory(1000, 80 * gib, 1.5, field)


def test_parameter_count_counts_zero3_partitioned_parameters(policy):
    whole = sum(p.numel() for p in policy.parameters())
    assert parameter_count(policy) == whole
    first = next(policy.parameters())
    first.ds_numel = first.numel()  # what ZeRO-3 sets before it empties the local tensor
    first.data = torch.empty(0)
    assert parameter_count(policy) == whole


def test_vllm_engine_load_checks_memory_before_starting_and_passes_options(monkeypatch):
    import sys
    import types
    from types import SimpleNamespace

    made = []
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kwargs: made.append(kwargs) or SimpleNamespace()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=48 * 2**30)
    )
    accelerator = SimpleNamespace(num_processes=1, process_index=0, device="cuda:0")
    options = dict(max_model_len=4096, enforce_eager=True, sleep=True, seed=3)
    options["parameters"] = 7_600_000_000
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="generator.sleep=true needs a CUDA GPU"):
        VllmRolloutEngine.load("m", accelerator, gpu_memory_utilization=0.5, **options)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="rl: generator.gpu_memory_utilization=0.3"):
        VllmRolloutEngine.load("m", accelerator, gpu_memory_utilization=0.3, **options)
    assert not made  # refused before vLLM spent a minute loading
    engine = VllmRolloutEngine.load("m", accelerator, gpu_memory_utilization=0.5, **options)
    (kwargs,) = made
    assert kwargs["enforce_eager"] is True and kwargs["enable_sleep_mode"] is True
    assert kwargs["max_model_len"] == 4096 and kwargs["gpu_memory_utilization"] == 0.5
    assert engine.sleep and engine.awake
