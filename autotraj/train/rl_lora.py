"""LoRA RL (`rl.lora`): train low-rank adapters on the policy; the rollout engine gets merged
weights.

The failure users report most with LoRA RL (TRL, verl, OpenRLHF issues) is silent: the adapters
train, but the engine that samples the rollouts keeps the base weights (or an adapter it never
applies), so every step samples from the base model. Here the engine never sees an adapter:
before each step's rollouts `merged_parameters` yields every weight of the policy under the
checkpoint's own names, a LoRA-wrapped linear layer as W + its adapters' delta (peft's
`get_delta_weight`, scaling included), into the same `sync` that full fine-tuning uses
(policy_weights.py). Sampling from the policy object itself (`generator.dtype: policy`) runs the
adapters in its forward pass. The final `model/` is a plain merged transformers checkpoint (what
evaluation loads); the adapter alone is saved next to it in `adapter/`.

Not here: which parameters the optimizer sees (grpo.py passes the trainable ones), sharded
layouts (FSDP2/ZeRO-3 with LoRA are refused: the adapters are small, DDP suffices).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from autotraj.train.sft import LoraSettings, peft_config

log = logging.getLogger(__name__)


def wrap_lora(model: Any, settings: LoraSettings, gradient_checkpointing: bool) -> Any:
    """`model` with fresh LoRA adapters (B = 0: the policy starts equal to the base); only the
    adapters require gradients."""
    from peft import get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input with a grad
    wrapped = get_peft_model(model, peft_config(settings, "CAUSAL_LM"))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    log.info("LoRA rank %d: %d trainable parameters", settings.rank, trainable)
    return wrapped


def is_lora(model: Any) -> bool:
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


@torch.no_grad()
def merged_parameters(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the (unwrapped, unsharded) peft `model` as a plain checkpoint names it,
    with each LoRA layer's active adapters merged in; adapter tensors themselves are not
    yielded. Fresh tensors: the model is not modified."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, param in base.named_parameters():
        if ".lora_" in name:
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        if owner in layers and leaf == "weight":
            layer = layers[owner]
            delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters)
            yield f"{owner}.weight", param.detach() + delta
        elif owner:
            yield f"{owner}.{leaf}", param.detach()
        else:
            yield name, param.detach()


def save_merged(model: Any, tokenizer: Any, out: Path) -> None:
    """The adapter in `out/../adapter`, then the merged model and tokenizer in `out`."""
    model.save_pretrained(out.parent / "adapter")
    merged = model.merge_and_unload()  # the run is over: modifying the model is fine
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
