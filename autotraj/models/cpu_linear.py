"""Linear layers with oneDNN-prepacked weights while the CPU decoder runs.

A bf16 `F.linear` on CPU reorders its weight into oneDNN's blocked layout on every call; at the
small row counts of decoding (1-64 rows) that reorder is about half the matmul's time. Packing
each weight once (`torch.ops.mkldnn._reorder_linear_weight`, what torch's inductor does for CPU
inference) and calling the packed kernel (`torch.ops.mkldnn._linear_pointwise`) makes the linear
layers ~1.7x faster there, with bit-identical outputs in our checks (tests/test_decoding_speed.py;
the pack is done for 64 rows, whose kernel choice matched `F.linear` at every row count tried).

`packed_linears(model)` is a context manager: inside it, every bf16 `nn.Linear` of a CPU model
computes with its packed weight; outside it the model is untouched. Packed weights are cached on
the module and rebuilt when the weight changes (an optimizer step or a weight push bumps the
tensor's version counter), so RL's policy copy is repacked once per update, not per call. They
double the memory of the linear weights (270 MB for SmolLM2-135M).

Anything else (GPU, float32, no oneDNN, a torch without these ops, a CPU without oneDNN's bf16
kernels: cpu_bf16.py) runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from autotraj.models.cpu_bf16 import onednn_bf16

_PACK_ROWS = 64  # the row count oneDNN picks its kernel for (see the module docstring)


def packing_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and onednn_bf16()
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out x in, bf16, CPU) in oneDNN's blocked layout for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with the weight packed by `pack` (inference only)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _eligible(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
    )


def packed_weight(module: nn.Linear) -> torch.Tensor:
    """`module`'s weight packed, cached on the module until the weight changes."""
    weight = module.weight
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = getattr(module, "_autotraj_packed", None)
    if cached is None or cached[0] != key:
        cached = (key, pack(weight))
        module._autotraj_packed = cached
    return cached[1]


def _packed_forward(module: nn.Linear, packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.bfloat16 or torch.is_grad_enabled():
        return nn.functional.linear(x, module.weight, module.bias)
    return packed_linear(x, packed, module.bias)


@contextlib.contextmanager
def packed_linears(model: Any) -> Iterator[int]:
    """Run `model`'s bf16 CPU linear layers on packed weights inside the block; yields how
    many layers were packed (0 where packing does not apply)."""
    modules = [m for m in model.modules() if _eligible(m)] if packing_available() else []
    for module in modules:
        packed = packed_weight(module)
        module.forward = lambda x, m=module, p=packed: _packed_forward(m, p, x)
    try:
        yield len(modules)
    finally:
        for module in modules:
            del module.forward
