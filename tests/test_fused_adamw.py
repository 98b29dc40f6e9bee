"""Fused AdamW, which the RL loop uses when unsharded, makes the same update as the loop AdamW."""

from types import SimpleNamespace

import pytest
import torch
from test_grpo import tiny_config

from autotraj.train.grpo import GrpoRun


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(fused: bool) -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, fused=fused)
    data = torch.randn(32, 8)
    for _ in range(5):
        loss = model(data).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def test_fused_adamw_matches_loop_adamw():
    loop, fused = _train(False), _train(True)
    start = [p.detach() for p in _model().parameters()]
    assert all((a - s).abs().max() > 1e-3 for a, s in zip(loop, start, strict=True))
    for a, b in zip(loop, fused, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_rl_run_builds_a_fused_adamw_when_unsharded(tmp_path, tiny_model_dir):
    run = GrpoRun(tiny_config(tmp_path, tiny_model_dir))  # one process: DDP's layout, "none"
    adamw = run.optimizer.optimizer  # inside accelerate's wrapper
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.defaults["fused"] is True
    assert all(group["fused"] is True for group in adamw.param_groups)


@pytest.mark.parametrize(
    ("layout", "zero_stage", "fused"),
    [
        ("none", None, True),  # DDP (or one process): plain whole tensors
        ("fsdp2", None, False),  # sharded DTensors
        ("none", 2, False),  # ZeRO-1/2 keep parameters whole, but DeepSpeed owns the optimizer
        ("zero3", 3, False),
    ],
)
def test_fused_adamw_only_for_unsharded_layouts_without_deepspeed(layout, zero_stage, fused):
    plugin = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    run = SimpleNamespace(
        accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    )
    assert GrpoRun._fused_adamw(run, layout) is fused
