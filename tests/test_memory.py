"""Per-GPU resident memory of the RL stage and the up-front refusal (train/memory.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_grpo import tiny_config

from autotraj.config import ConfigError
from autotraj.train.grpo import GrpoRun
from autotraj.train.memory import check_rl_memory, rl_resident_gib, training_state_bytes

QWEN_7B = 7_620_000_000
H100_GIB = 79.2  # what torch reports for an 80 GB GPU, roughly


def test_training_state_per_layout():
    n = 1_000
    assert training_state_bytes(n, "ddp", 8) == 16_000
    assert training_state_bytes(n, "fsdp2", 8) == training_state_bytes(n, "zero3", 8) == 2_000
    assert training_state_bytes(n, "zero2", 7) == 2_000 + 2_000
    assert training_state_bytes(n, "zero1", 6) == 4_000 + 2_000


def test_a_7b_policy_under_ddp_is_refused_with_its_figures():
    parts = rl_resident_gib(QWEN_7B, "ddp", 8, frozen_models=0, frozen_bytes=2, engine_gib=0.0)
    with pytest.raises(ConfigError, match=r"ddp over 8 processes keeps 113\.5 GiB.*79\.2 GiB"):
        check_rl_memory(parts, H100_GIB, "ddp", 8)


def test_the_paper_rl_layout_fits_only_with_bf16_frozen_models():
    """rl_paper.yaml over 6 GPUs with FSDP2, the reward model, vLLM at 0.5 of the GPU."""
    engine = 0.5 * H100_GIB
    bf16 = rl_resident_gib(QWEN_7B, "fsdp2", 6, frozen_models=1, frozen_bytes=2, engine_gib=engine)
    check_rl_memory(bf16, H100_GIB, "fsdp2", 6)  # 18.9 + 14.2 + 39.6 = 72.7
    fp32 = rl_resident_gib(QWEN_7B, "fsdp2", 6, frozen_models=1, frozen_bytes=4, engine_gib=engine)
    with pytest.raises(ConfigError, match=r"frozen models 28\.4"):
        check_rl_memory(fp32, H100_GIB, "fsdp2", 6)


def test_the_rl_stage_counts_its_own_engine_and_frozen_models(
    tmp_path, tiny_model_dir, monkeypatch
):
    run = GrpoRun(
        tiny_config(tmp_path, tiny_model_dir, kl_coef=0.1, generator={"dtype": "bfloat16"})
    )
    gib = 2**30
    size = run.policy_size
    tight = (16 + 4 + 2) * size  # training state, an fp32 reference on CPU, the bf16 copy
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=tight + 64)
    )
    run._check_memory("none")  # fits
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=tight - 1)
    )
    with pytest.raises(ConfigError, match=f"ddp over 1 processes keeps {tight / gib:.1f}"):
        run._check_memory("none")
