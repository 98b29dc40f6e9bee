"""What the RL stage keeps resident on each GPU, and the refusal of a layout that cannot fit.

`rl_resident_gib(...)` adds up, per GPU, the memory that stays allocated through a step: the
policy's training state under the layout (AdamW: fp32 weights, fp32 gradients, two fp32
moments), the frozen models (reward model, KL reference; each the policy's size, in their
dtype), and the rollout engine (a bf16 copy, or vLLM's whole share of the GPU while awake).
Activations, logits and CUDA's own overhead come on top, so this is a lower bound: a layout whose
lower bound exceeds the GPU cannot run, and `check_rl_memory` refuses it before anything is put
on the GPU, with the figures (docs/install.md, "GPU memory of the paper's 7B run").

Not here: measuring memory (nothing here has run on a GPU), SFT and RM (TRL's Trainer).
"""

from __future__ import annotations

from typing import Literal

from autotraj.config import ConfigError

GIB = 2**30

Layout = Literal["ddp", "zero1", "zero2", "fsdp2", "zero3"]


def training_state_bytes(parameters: int, layout: Layout, processes: int) -> float:
    """Per-GPU bytes of the policy's AdamW training state (16 bytes a parameter in all).

    DDP keeps it whole; FSDP2 and ZeRO-3 shard all of it. ZeRO-1/2, in DeepSpeed's bf16 mode
    (the smaller of its modes: this is a lower bound), keep bf16 weights whole and shard the fp32
    master weights and moments (12 bytes), ZeRO-1 keeping bf16 gradients whole, ZeRO-2 sharding
    them too.

    >>> round(training_state_bytes(7_620_000_000, "fsdp2", 6) / 1e9, 1)
    20.3
    """
    if layout == "ddp":
        return 16.0 * parameters
    if layout == "zero1":
        return 4.0 * parameters + 12.0 * parameters / processes
    if layout == "zero2":
        return 2.0 * parameters + 14.0 * parameters / processes
    return 16.0 * parameters / processes


def rl_resident_gib(
    parameters: int,
    layout: Layout,
    processes: int,
    frozen_models: int,
    frozen_bytes: int,
    engine_gib: float,
) -> dict[str, float]:
    """The per-GPU GiB that stay resident through an RL step, by part, and their total."""
    parts = {
        "training state": training_state_bytes(parameters, layout, processes) / GIB,
        "frozen models": frozen_models * frozen_bytes * parameters / GIB,
        "rollout engine": engine_gib,
    }
    parts["total"] = sum(parts.values())
    return parts


def check_rl_memory(
    parts: dict[str, float], gpu_gib: float, layout: Layout, processes: int
) -> None:
    """Refuse, with the figures, a layout whose resident memory alone exceeds the GPU.

    >>> check_rl_memory({"training state": 20.3, "total": 75.6}, 79.2, "fsdp2", 6)
    """
    if parts["total"] <= gpu_gib:
        return
    figures = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "total")
    raise ConfigError(
        f"rl: {layout} over {processes} processes keeps {parts['total']:.1f} GiB resident per "
        f"GPU ({figures}; activations come on top) and this GPU has {gpu_gib:.1f} GiB. Shard "
        f"the policy over more GPUs (FSDP2 / ZeRO-3: configs/accelerate), load the frozen models "
        f"in bfloat16 (frozen_dtype), or lower generator.gpu_memory_utilization "
        f"(docs/install.md, memory)"
    )
