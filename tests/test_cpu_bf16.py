"""bf16 on a CPU without bf16 kernels (models/cpu_bf16.py): every bf16 request on the CPU runs
in float32 there, and as asked where the CPU has them. `AUTOTRAJ_CPU_BF16` stands in for the
machine (1: a CPU with bf16 kernels, 0: one without), so both branches run on every machine;
the probe itself is checked against oneDNN on the machine at hand."""

from __future__ import annotations

import platform

import pytest
import torch

from autotraj.models import cpu_bf16
from autotraj.models.cpu_linear import pack, packed_linear, packing_available
from autotraj.models.generator import GenerationRequest
from autotraj.models.loading import GeneratorConfig, load_generator
from autotraj.train.policy_weights import HfRolloutCopy
from autotraj.train.rl_config import autocast_setting, frozen_dtype
from autotraj.train.sft import SftConfig, trainer_arguments


class _Accelerator:
    device = torch.device("cpu")
    state = None


@pytest.mark.parametrize("bf16", ["1", "0"])
def test_generator_dtype_follows_the_cpu(tiny_model_dir, monkeypatch, bf16):
    monkeypatch.setenv("AUTOTRAJ_CPU_BF16", bf16)
    want = torch.bfloat16 if bf16 == "1" else torch.float32
    for dtype in ("auto", "bfloat16"):
        gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype=dtype))
        assert gen.model.dtype == want and gen.model.device.type == "cpu"
        [done] = gen.generate([GenerationRequest(prompt_text="abc", max_new_tokens=3)])
        assert len(done.token_ids) >= 1
    gen = load_generator(GeneratorConfig(model=str(tiny_model_dir), dtype="float32"))
    assert gen.model.dtype == torch.float32  # float32 is never changed


@pytest.mark.parametrize("bf16", ["1", "0"])
def test_training_and_rl_bf16_follow_the_cpu(tmp_path, tiny_model_dir, monkeypatch, bf16):
    monkeypatch.setenv("AUTOTRAJ_CPU_BF16", bf16)
    on = bf16 == "1"
    args = trainer_arguments(SftConfig(run_dir=str(tmp_path), use_cpu=True), tmp_path, [])
    assert args["bf16"] is on and args["use_cpu"] is True
    off = trainer_arguments(SftConfig(run_dir=str(tmp_path), bf16=False), tmp_path, [])
    assert off["bf16"] is False  # never turned on
    cpu = torch.device("cpu")
    assert frozen_dtype("bfloat16", cpu) == (torch.bfloat16 if on else torch.float32)
    assert frozen_dtype("bfloat16", torch.device("cuda", 0)) == torch.bfloat16  # a GPU: as asked
    copy = HfRolloutCopy.load(str(tiny_model_dir), _Accelerator())
    assert next(copy.model.parameters()).dtype == (torch.bfloat16 if on else torch.float32)
    assert autocast_setting("bf16", on_cpu=True) == ("bf16" if on else "no")
    assert autocast_setting("bf16", on_cpu=False) == "bf16"  # a GPU: as asked
    assert autocast_setting("fp16", on_cpu=True) == "fp16"


def test_the_override_must_be_0_or_1(monkeypatch):
    monkeypatch.setenv("AUTOTRAJ_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="AUTOTRAJ_CPU_BF16 must be 0 or 1"):
        cpu_bf16.bf16_native()


def test_the_probe_is_onednn_s_answer_on_this_cpu(monkeypatch):
    """Where the probe says oneDNN has bf16 kernels, a real weight packs and its packed linear
    is F.linear; where it says not, oneDNN refuses the pack and the CPU decoder does not pack."""
    monkeypatch.delenv("AUTOTRAJ_CPU_BF16", raising=False)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert cpu_bf16.bf16_native() == cpu_bf16.onednn_bf16()
    weight = torch.randn(1536, 576).to(torch.bfloat16)
    x = torch.randn(5, 1, 576).to(torch.bfloat16)
    if cpu_bf16.onednn_bf16():
        got = packed_linear(x, pack(weight), None)
        assert torch.equal(got, torch.nn.functional.linear(x, weight))
    else:
        assert not packing_available()
        with pytest.raises(RuntimeError, match="bf16"):
            pack(weight)
