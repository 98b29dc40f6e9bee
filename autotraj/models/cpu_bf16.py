"""Whether this CPU computes bf16 at speed, and the dtype to use where bf16 was asked for.

bf16 on CPU is fast where oneDNN has bf16 kernels for the CPU (AVX-512 BW/VL/DQ, AVX512_BF16,
AMX, or AVX-NE-CONVERT): on a 2-core Zen 4 bf16 matmuls ran at ~400 GFLOP/s against ~170 in
fp32 (CPU-MEASUREMENTS.md), so generation and mixed-precision training default to bf16 there.
On an x86 CPU without them (an AVX2-only AMD EPYC, family 23: 2026-12-05) torch falls back to a
reference kernel: a 2048^3 bf16 matmul ran at 0.1 GFLOP/s against 65 in fp32, i.e. 650x
slower, and oneDNN refuses to pack bf16 weights (`cpu_linear`). There every bf16 request on the
CPU (a generator's dtype, RL's rollout copy and autocast, the trainers' `bf16`) runs in float32
instead, with a warning naming what was changed: the run is numerically a little different
(float32 is the more exact of the two) and finishes; bf16 there would not in practice.

`bf16_native()` asks oneDNN once per process (`onednn_bf16`): it packs a tiny bf16 weight for
its bf16 linear kernel, which it refuses ("bf16 path needs the cpu support ...") exactly where it
has no bf16 kernels. Off x86 (no such probe), bf16 is taken as asked. `AUTOTRAJ_CPU_BF16=1`
keeps bf16 requests as they are and `=0` runs them all in float32 on the CPU (docs/install.md);
the packed linears of the CPU decoder (`cpu_linear`) follow oneDNN's answer only.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_ENV = "AUTOTRAJ_CPU_BF16"


@functools.cache
def onednn_bf16() -> bool:
    """True where oneDNN has bf16 kernels for this CPU: it packs a tiny bf16 weight for its
    linear kernel, which it refuses ("bf16 path needs the cpu support ...") where it has none."""
    import torch

    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or not hasattr(ops, "_reorder_linear_weight"):
        return False
    try:
        ops._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 16)
    except RuntimeError as refused:  # the capability answer, logged: no bf16 kernels here
        log.warning("oneDNN has no bf16 kernels for this CPU (%s)", refused)
        return False
    return True


def bf16_native() -> bool:
    """True where bf16 requests on the CPU run in bf16 (see the module docstring)."""
    forced = os.environ.get(_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"{_ENV} must be 0 or 1, not {forced!r}")
    if not on_x86():
        return True
    return onednn_bf16()


def on_x86() -> bool:
    """True on an x86-64 machine (where the probes and measurements here were made)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_dtype(dtype: torch.dtype, device: str | torch.device, what: str) -> torch.dtype:
    """`dtype`, or float32 where it is bf16 on a CPU without bf16 kernels (`what`: the setting,
    named in the warning)."""
    import torch

    on_cpu = torch.device(device).type == "cpu"
    if dtype == torch.bfloat16 and not cpu_bf16(True, on_cpu, what):
        return torch.float32
    return dtype


def cpu_bf16(enabled: bool, on_cpu: bool, what: str) -> bool:
    """A bf16 switch (mixed precision): off where it runs on a CPU without bf16 kernels."""
    if not enabled or not on_cpu or bf16_native():
        return enabled
    _warn_once(what)
    return False


@functools.cache
def _warn_once(what: str) -> None:
    log.warning("%s: bfloat16 asked for, float32 used (this CPU has no bf16 kernels)", what)
