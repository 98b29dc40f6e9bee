"""Fused AdamW, which the RL loop uses when unsharded, makes the same update as the loop AdamW."""

import torch


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
