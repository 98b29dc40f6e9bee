"""The RL policy's full weights, streamed into the engine that samples the rollouts.

Training may shard the policy over processes (FSDP2, DeepSpeed ZeRO-3); sampling must not use
the sharded model: every process rolls out its own prompts for as many tokens as they take, and
a forward pass that all-gathers shards would wait forever on a process that already stopped.
So before each step's rollouts the trainer gathers the full weights, one parameter at a time
(never the whole model at once), and copies them into an unsharded engine on each process:

- `HfRolloutCopy`: a transformers model in bfloat16 on the process's device;
- `VllmRolloutEngine`: a vLLM engine in the same process (`generator.backend: vllm`).

`sharding(accelerator)` names the layout; `full_parameters(accelerator, model)` yields
`(name, tensor)` in the same order on every process (the gathers are collectives, so every
process must drain the iterator). Names are the checkpoint's own (`model.layers.0...`), with the
wrappers' prefixes removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch

from autotraj.config import ConfigError
from autotraj.models.cpu_bf16 import cpu_dtype

log = logging.getLogger(__name__)

Sharding = Literal["none", "fsdp2", "zero3"]


def sharding(accelerator: Any) -> Sharding:
    """How the prepared policy's parameters are laid out across processes.

    DDP and DeepSpeed ZeRO-1/2 keep every parameter whole on every process ("none"); FSDP2 and
    ZeRO-3 shard them. FSDP1 (flat parameters) is refused: use `fsdp_version: 2`.
    """
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        if not accelerator.is_fsdp2:
            raise ConfigError(
                "rl: FSDP1 is not supported (its flat parameters have no per-parameter full "
                "view); set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml)"
            )
        return "fsdp2"
    if kind == "DEEPSPEED" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "zero3"
    return "none"


def _clean(name: str) -> str:
    """The checkpoint's name: without what activation checkpointing under FSDP inserts."""
    return name.replace("_checkpoint_wrapped_module.", "")


def full_parameters(accelerator: Any, model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of the prepared `model`, whole, detached, one at a time.

    A yielded tensor is valid until the next one is requested (under ZeRO-3 its storage is
    released again); consumers copy it. Collective under FSDP2 and ZeRO-3: every process must
    iterate to the end.
    """
    kind = sharding(accelerator)
    module = accelerator.unwrap_model(model)
    for name, param in module.named_parameters():
        if kind == "fsdp2" and hasattr(param, "full_tensor"):
            yield _clean(name), param.full_tensor().detach()
        elif kind == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield _clean(name), param.detach()
        else:
            yield _clean(name), param.detach()


def parameter_count(model: Any) -> int:
    """The model's parameter count, whole also when ZeRO-3 has partitioned it (`ds_numel`)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


@contextlib.contextmanager
def unsharded_load(accelerator: Any) -> Iterator[None]:
    """A context in which `from_pretrained` loads the whole model on every process. Two
    settings of the training layout would otherwise reach it: a registered ZeRO-3 config
    (transformers partitions every model it loads) and FSDP's `cpu_ram_efficient_loading`
    (processes other than the first load empty meta tensors, filled later by `prepare`)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    zero3 = plugin is not None and plugin.zero_stage == 3
    efficient = os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    if zero3:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if zero3:
            plugin.set_deepspeed_weakref()
        if efficient is not None:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = efficient


class HfRolloutCopy:
    """An unsharded bf16 transformers copy of the policy, refreshed by `sync` every step (in
    float32 on a CPU without bf16 kernels: models/cpu_bf16.py)."""

    def __init__(self, model: Any, dtype: torch.dtype = torch.bfloat16):
        self.model = model.to(dtype).requires_grad_(False).eval()

    @classmethod
    def load(cls, path: str, accelerator: Any) -> HfRolloutCopy:
        from transformers import AutoModelForCausalLM

        dtype = cpu_dtype(torch.bfloat16, accelerator.device, "rl.generator.dtype bfloat16")
        with unsharded_load(accelerator):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model.to(accelerator.device), dtype)

    @torch.no_grad()
    def sync(self, params: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy every `(name, tensor)` into the copy; return how many. A name the copy lacks,
        a shape that differs, or a parameter of the copy left unset raises."""
        own = dict(self.model.named_parameters())
        seen: set[str] = set()
        for name, tensor in params:
            if name not in own:
                raise RuntimeError(f"rollout copy has no parameter {name!r}")
            if own[name].shape != tensor.shape:
                raise RuntimeError(
                    f"parameter {name}: policy shape {tuple(tensor.shape)} != rollout copy "
                    f"{tuple(own[name].shape)}"
                )
            own[name].copy_(tensor)
            seen.add(name)
        if missing := sorted(set(own) - seen):
            raise RuntimeError(f"the policy sent no weights for {missing[:5]} (of {len(missing)})")
        return len(seen)


def weight_loaders_intact(model: torch.nn.Module, layer_types: tuple[type, ...]) -> bool:
    """Whether every parameter of the layers of `layer_types` still has its `weight_loader`.

    vLLM's linear layers load fused weights (q/k/v into `qkv_proj`, gate/up into
    `gate_up_proj`) through the loader attached to each parameter, which `model.load_weights`
    calls one shard at a time, so any subset of the weights can be pushed. vLLM's CPU build
    repacks those weights after loading into new parameters without loaders
    (`AttributeError: 'Parameter' object has no attribute 'weight_loader'`). Norms and
    embeddings never need one (`load_weights` falls back to a plain copy), so only the given
    layer types are checked.

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    >>> weight_loaders_intact(model, (torch.nn.Linear,))
    False
    >>> for p in model[0].parameters():
    ...     p.weight_loader = print
    >>> weight_loaders_intact(model, (torch.nn.Linear,))
    True
    """
    return all(
        hasattr(param, "weight_loader")
        for module in model.modules()
        if isinstance(module, layer_types)
        for param in module.parameters(recurse=False)
    )


class VllmWeightLoader:
    """vLLM worker extension (`worker_extension_cls`): loads pushed weights into the model that
    the worker runs. vLLM mixes this class into its worker, so `self.model_runner` and
    `self.reload_weights` are the worker's own."""

    def policy_weights_chunkable(self) -> bool:
        from vllm.model_executor.layers.linear import LinearBase

        return weight_loaders_intact(self.model_runner.model, (LinearBase,))  # type: ignore[attr-defined]

    def load_policy_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=weights)  # type: ignore[attr-defined]

    def reload_policy_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.reload_weights(weights_iterator=weights, is_checkpoint_format=True)  # type: ignore[attr-defined]


def check_engine_memory(
    parameters: int, gpu_bytes: int, gpu_memory_utilization: float, field: str
) -> None:
    """Refuse a vLLM memory share that cannot hold the bf16 weights and some KV cache.

    vLLM's budget is `gpu_memory_utilization` x the GPU's memory, weights included; whatever is
    left after the weights (2 bytes per parameter) and ~1 GiB of activations and CUDA graphs is
    KV cache. Less than 1 GiB of it holds a few thousand tokens of a 7B model: refused here,
    with the figures, instead of by vLLM after a minute of loading (or a step that crawls).

    >>> check_engine_memory(135_000_000, 80 * 2**30, 0.3, "generator.gpu_memory_utilization")
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(f"{field}={gpu_memory_utilization} must be in (0, 1]")
    gib = 2**30
    budget = gpu_memory_utilization * gpu_bytes
    weights = 2 * parameters
    kv = budget - weights - gib
    if kv < gib:
        raise ConfigError(
            f"{field}={gpu_memory_utilization}: vLLM may use {budget / gib:.1f} GiB of this "
            f"{gpu_bytes / gib:.0f} GiB GPU, the bf16 weights take {weights / gib:.1f} GiB and "
            f"~1 GiB goes to activations, leaving {kv / gib:.1f} GiB of KV cache (need >= 1); "
            f"raise it to >= {min(1.0, (weights + 2 * gib) / gpu_bytes + 0.05):.2f} if the "
            f"training state leaves that much free (docs/install.md, memory)"
        )


class VllmRolloutEngine:
    """A vLLM engine in this process, fed the policy's weights after every update.

    One engine per training process, each on that process's GPU (`external_launcher` under
    `accelerate launch`/torchrun: every rank keeps its own engine and its own prompts). With
    `sleep`, the engine sleeps at level 2 while the policy trains: its weights and KV cache are
    discarded, not copied to host memory (level 1 would pin a bf16 copy of the weights in host
    memory per rank, ~15 GB at 7B, and copy the stale weights back at every wake-up). Before the
    next rollouts `sync` returns the training step's freed blocks to the driver
    (`torch.cuda.empty_cache()`: vLLM allocates outside PyTorch's caching allocator), wakes the
    weights alone, pushes the new ones, and only then wakes the KV cache, so the pushed tensors
    and the KV cache are never on the GPU at once.

    How the weights go in depends on the build, asked of the worker at the first `sync`
    (`weight_loaders_intact`): where vLLM's linear layers keep their weight loaders (GPU builds),
    `model.load_weights` in chunks of `CHUNK` tensors; where it has repacked them (the CPU
    build), one `reload_weights` call for the whole model, fed one tensor at a time from an
    iterator. That call must get every tensor: in chunks, the CPU build's reload leaves a model
    that only emits `<|endoftext|>`. Either way each tensor is copied in the engine's dtype.
    """

    # parameters per load_weights call: bounds the tensors held at once while gathering
    CHUNK = 32

    def __init__(self, llm: Any, sleep: bool, dtype: torch.dtype = torch.bfloat16):
        self.llm = llm
        self.sleep = sleep
        self.dtype = dtype
        self.awake = True
        self.chunked: bool | None = None  # asked of the engine at the first sync

    @classmethod
    def load(
        cls,
        path: str,
        accelerator: Any,
        *,
        gpu_memory_utilization: float,
        max_model_len: int,
        enforce_eager: bool,
        sleep: bool,
        seed: int,
        parameters: int,
    ) -> VllmRolloutEngine:
        from autotraj.models.vllm_backend import _import_vllm

        if sleep and not torch.cuda.is_available():
            raise ConfigError(
                "rl: generator.sleep=true needs a CUDA GPU (vLLM refuses sleep mode on CPU); "
                "set generator.sleep: false"
            )
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(accelerator.device).total_memory
            check_engine_memory(
                parameters, total, gpu_memory_utilization, "rl: generator.gpu_memory_utilization"
            )
        # the engine must live in this process: weights are pushed as tensors, not pickled
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _import_vllm()
        distributed = accelerator.num_processes > 1
        device = "cuda" if torch.cuda.is_available() else "cpu"  # vLLM's platform
        dtype = cpu_dtype(torch.bfloat16, device, "rl.generator backend vllm (bfloat16)")
        llm = vllm.LLM(
            model=path,
            dtype=str(dtype).removeprefix("torch."),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            enable_sleep_mode=sleep,
            seed=seed + accelerator.process_index,
            distributed_executor_backend="external_launcher" if distributed else None,
            worker_extension_cls=f"{__name__}.VllmWeightLoader",
        )
        log.info("vLLM rollout engine on process %d (%s)", accelerator.process_index, dtype)
        return cls(llm, sleep=sleep, dtype=dtype)

    def sync(self, params: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Push every `(name, tensor)` into the engine (chunked or whole, as the build allows),
        then drop its prefix cache (cached keys/values were computed with the old weights)."""
        asleep = not self.awake
        if asleep:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the update's freed blocks, back to the driver
            self.llm.wake_up(tags=["weights"])
        if self.chunked is None:
            self.chunked = all(self.llm.collective_rpc("policy_weights_chunkable"))
            log.info("vLLM weight push: %s", "chunked load_weights" if self.chunked else "whole")
        count = self._push_chunked(params) if self.chunked else self._push_whole(params)
        if asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.awake = True
        self.llm.reset_prefix_cache()
        return count

    def _copies(
        self, params: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Each tensor copied in the engine's dtype (the gathered storage may be released)."""
        for name, tensor in params:
            yield name, tensor.to(self.dtype, copy=True)

    def _push_chunked(self, params: Iterable[tuple[str, torch.Tensor]]) -> int:
        count = 0
        chunk: list[tuple[str, torch.Tensor]] = []
        for item in self._copies(params):
            chunk.append(item)
            if len(chunk) == self.CHUNK:
                self.llm.collective_rpc("load_policy_weights", args=(chunk,))
                count += len(chunk)
                chunk = []
        if chunk:
            self.llm.collective_rpc("load_policy_weights", args=(chunk,))
            count += len(chunk)
        return count

    def _push_whole(self, params: Iterable[tuple[str, torch.Tensor]]) -> int:
        """One reload of the whole model; the engine pulls the tensors from the iterator (in this
        process: `collective_rpc` hands it over unpickled), so one copy at a time is alive."""
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in self._copies(params):
                count += 1
                yield item

        weights = counted()
        self.llm.collective_rpc("reload_policy_weights", args=(weights,))
        if next(weights, None) is not None:  # under FSDP2/ZeRO-3 the gathers must all run
            raise RuntimeError("vLLM's reload_weights stopped before the last policy tensor")
        return count

    def release(self) -> None:
        """Free the engine's GPU memory for the update (only with `sleep`): level 2 discards
        the weights too, which the next `sync` replaces whole."""
        if self.sleep and self.awake:
            self.llm.sleep(level=2)
            self.awake = False
