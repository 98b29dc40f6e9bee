"""Linear layers with oneDNN-prepacked weights while the CPU decoder runs.

bf16: `F.linear` on CPU reorders its weight into oneDNN's blocked layout on every call; at the
small row counts of decoding (1-64 rows) that reorder is about half the matmul's time. Packing
each weight once (`torch.ops.mkldnn._reorder_linear_weight`, what torch's inductor does for CPU
inference) and calling the packed kernel (`torch.ops.mkldnn._linear_pointwise`) makes the linear
layers ~1.7x faster there, with bit-identical outputs in our checks (tests/test_decode_step.py;
the pack is done for 64 rows, whose kernel choice matched `F.linear` at every row count tried).

float32 on x86: `F.linear` calls MKL's sgemm, which at decoding's row counts is slow for wide
weights: on a 2-core AVX2-only AMD EPYC (2026-12-06, 16 rows) SmolLM2-135M's gate/up product ran
at 14 GFLOP/s and its LM head at 10, against 36 and 42 for oneDNN's packed fp32 kernel (the
machine's fp32 peak: ~65; vLLM-CPU computes its fp32 linears with oneDNN too). oneDNN sums in
another order than MKL, so float32 results differ from `F.linear` in the last bits (as fused
products already do: decode_step.py); bf16 stays bit-identical.

`packed_linears(model)` is a context manager: inside it, every bf16 (float32 on x86) `nn.Linear`
of a CPU model computes with its packed weight; outside it the model is untouched. Packed weights
are cached on the module and rebuilt when the weight changes (an optimizer step or a weight push
bumps the tensor's version counter), so RL's policy copy is repacked once per update, not per
call. They double the memory of the linear weights (270 MB for SmolLM2-135M in bf16, 540 MB in
float32).

Anything else (GPU, other dtypes, no oneDNN, a torch without these ops, bf16 on a CPU without
oneDNN's bf16 kernels: cpu_bf16.py, float32 off x86) runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from autotraj.models.cpu_bf16 import on_x86, onednn_bf16

_PACK_ROWS = 64  # the row count oneDNN picks its kernel for (see the module docstring)


def packing_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """True where CPU linear layers of `dtype` compute on packed weights: bf16 where oneDNN
    has bf16 kernels for the CPU, float32 on x86 (where it was measured: the module docstring)."""
    ops = getattr(torch.ops, "mkldnn", None)
    if dtype == torch.bfloat16:
        supported = onednn_bf16()
    elif dtype == torch.float32:
        supported = on_x86()
    else:
        return False
    return (
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and supported
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """`weight` (out x in, bf16 or float32, CPU) in oneDNN's blocked layout for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with the weight packed by `pack` (inference only)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _eligible(module: nn.Module, dtypes: tuple[torch.dtype, ...]) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and weight is not None
        and weight.device.type == "cpu"
        and weight.dtype in dtypes
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
    if x.dtype != module.weight.dtype or torch.is_grad_enabled():
        return nn.functional.linear(x, module.weight, module.bias)
    return packed_linear(x, packed, module.bias)


@contextlib.contextmanager
def packed_linears(model: Any) -> Iterator[int]:
    """Run `model`'s bf16 (float32 on x86) CPU linear layers on packed weights inside the
    block; yields how many layers were packed (0 where packing does not apply)."""
    dtypes = tuple(d for d in (torch.bfloat16, torch.float32) if packing_available(d))
    modules = [m for m in model.modules() if _eligible(m, dtypes)]
    for module in modules:
        packed = packed_weight(module)
        module.forward = lambda x, m=module, p=packed: _packed_forward(m, p, x)
    try:
        yield len(modules)
    finally:
        for module in modules:
            del module.forward
