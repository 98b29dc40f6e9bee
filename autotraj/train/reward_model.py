"""Stage `rm`: the trajectory reward model (METHOD.md section 9), and its batched scoring API.

Training: reads `<run_dir>/build/preferences.jsonl` (chosen = accepted repair, rejected = its
original), renders both sides with `render.render_trajectory` (system + question + trajectory +
end of turn: the rendering the model later scores), holds out a fraction of the *queries* (no
query on both sides of the split) and trains `AutoModelForSequenceClassification(num_labels=1)`
with TRL's `RewardTrainer`: Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected)), the scalar
read at the last non-pad token (pad = `<|endoftext|>`, never the end-of-turn token). Release:
LoRA rank 8 on all linear layers, lr 1e-5, 2 epochs, effective batch 32.

Writes under `<run_dir>/rm/`: `model/` (LoRA merged; plus `autotraj-rm.json`: the sha256 of the
trained score head and the system prompt it was trained with), `stats.json` (mean/std of the
held-out chosen + rejected scores, for z-scores; held-out pairwise accuracy), `metrics.jsonl`,
`checkpoints/`, `config.resolved.yaml`, `manifest.json`.

Scoring: `TrajectoryRewardModel.load(path)` refuses a model whose score head is missing or is not
the head that training saved (the release served a randomly initialized head), and
`score(items, batch_size)` returns raw scores, `normalized(...)` z-scores. A failure raises;
a score is never replaced by 0.

Not here: building pairs (build.py), rendering (render.py), how RL composes rewards (rewards.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from autotraj import run_dir as layout
from autotraj.config import ConfigError, to_dict
from autotraj.io import check_same_config, write_json_atomic, write_manifest
from autotraj.metrics import MetricsLog
from autotraj.models.loading import EMBEDDED_MODEL, GeneratorConfig, load_tokenizer
from autotraj.records import Trajectory
from autotraj.render import render_trajectory
from autotraj.train.batches import PreferenceExample, pad_sequences, preference_examples_from_file
from autotraj.train.sft import (
    LoraSettings,
    TrainingIncomplete,
    check_vocab,
    import_train_deps,
    last_checkpoint,
    load_examples,
    metrics_callback,
    peft_config,
    restart_log,
    tracker_callbacks,
    trainer_arguments,
)

log = logging.getLogger(__name__)

MARKER = "autotraj-rm.json"  # written next to the weights by training; checked by `load`


class RewardModelError(RuntimeError):
    """The reward model cannot be loaded or cannot score (never read as a score of 0)."""


@dataclass(frozen=True)
class RmConfig:
    run_dir: str = "runs/default"
    data: str | None = None  # None: <run_dir>/build/preferences.jsonl
    # None: <run_dir>/sft/model when it exists, else the embedded model.
    model: str | None = None
    # release: LoRA rank 8 on all linear layers; None: full fine-tuning.
    lora: LoraSettings | None = field(default_factory=lambda: LoraSettings(rank=8, alpha=16))
    learning_rate: float = 1e-5  # release
    epochs: float = 2.0  # release
    max_steps: int | None = None  # smoke runs
    per_device_batch_size: int = 4  # pairs per device and micro-step
    effective_batch_size: int = 32  # release
    warmup_ratio: float = 0.0  # not given by the release; TRL's default
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "linear"  # idem
    heldout_fraction: float = 0.2  # of the queries; their pairs give accuracy and z-score stats
    max_length: int = 4096  # pairs with a longer side are dropped (cutting moves the scored token)
    bf16: bool = True
    gradient_checkpointing: bool = True
    seed: int = 42
    save_steps: int = 200
    save_total_limit: int | None = 2
    logging_steps: int = 10
    resume: bool = True
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = ()
    use_cpu: bool = False
    score_batch_size: int = 16  # batch of the held-out scoring pass


def stage_dir(cfg: RmConfig) -> Path:
    return layout.stage_dir(cfg.run_dir, "rm")


def data_path(cfg: RmConfig) -> Path:
    return Path(cfg.data) if cfg.data else layout.record_path(cfg.run_dir, "preferences")


def base_model(cfg: RmConfig) -> str:
    if cfg.model:
        return cfg.model
    sft_model = layout.model_dir(cfg.run_dir, "sft")
    return str(sft_model) if sft_model.is_dir() else EMBEDDED_MODEL


def split_by_query(
    examples: Sequence[PreferenceExample], fraction: float, seed: int
) -> tuple[list[PreferenceExample], list[PreferenceExample]]:
    """(train, held-out): a seeded `fraction` of the query ids (at least one when fraction > 0
    and there are two queries or more) goes to held-out with all its pairs."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"rm: heldout_fraction must be in [0, 1), got {fraction}")
    queries = sorted({e.query_id for e in examples})
    random.Random(seed).shuffle(queries)
    count = math.ceil(fraction * len(queries)) if fraction > 0 and len(queries) > 1 else 0
    held = set(queries[: min(count, len(queries) - 1)])
    return [e for e in examples if e.query_id not in held], [
        e for e in examples if e.query_id in held
    ]


def load_sequence_classifier(model: str, pad_token_id: int, dtype: str = "float32") -> Any:
    """AutoModelForSequenceClassification(num_labels=1) of `model`, pad id set for pooling."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from autotraj.models.loading import resolve_model_path

    loaded, info = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(model),
        num_labels=1,
        dtype=getattr(torch, dtype),
        output_loading_info=True,
    )
    loaded.config.pad_token_id = pad_token_id
    return loaded, info


def training_arguments(cfg: RmConfig, out_dir: Path, report_to: list[str]) -> Any:
    from trl import RewardConfig

    return RewardConfig(**trainer_arguments(cfg, out_dir, report_to))


def build_trainer(
    cfg: RmConfig, tokenizer: Any, train: Sequence[PreferenceExample], callbacks: Sequence[Any] = ()
) -> Any:
    """TRL's RewardTrainer on pre-tokenized pairs (`chosen_ids`, `rejected_ids`)."""
    from datasets import Dataset
    from trl import RewardTrainer

    out_dir = stage_dir(cfg)
    extra, report_to = tracker_callbacks(cfg.report_to, out_dir / "tensorboard")
    model, _ = load_sequence_classifier(base_model(cfg), tokenizer.pad_token_id)
    check_vocab(model, tokenizer, base_model(cfg))
    dataset = Dataset.from_dict(
        {
            "chosen_ids": [list(e.chosen_ids) for e in train],
            "rejected_ids": [list(e.rejected_ids) for e in train],
        }
    )
    return RewardTrainer(
        model=model,
        args=training_arguments(cfg, out_dir, report_to),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config(cfg.lora, "SEQ_CLS") if cfg.lora else None,
        callbacks=[metrics_callback(out_dir / "metrics.jsonl", "rm"), *extra, *callbacks],
    )


def check_pad(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError(
            "rm: the tokenizer's pad token must exist and differ from eos: the score is read at "
            "the last non-pad token, which must be the end of turn"
        )


def run_rm(cfg: RmConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train (or resume, or skip when finished) the reward model; return the stage's counts."""
    import_train_deps()
    out_dir = stage_dir(cfg)
    check_same_config(out_dir, yaml.safe_dump(to_dict(cfg), sort_keys=True))
    if (out_dir / "manifest.json").is_file() and (out_dir / "stats.json").is_file():
        log.info("%s is finished; nothing to do", out_dir)
        return {"finished": True, "model": str(out_dir / "model"), "trained": False}
    model_name = base_model(cfg)
    tokenizer = load_tokenizer(GeneratorConfig(model=model_name))
    check_pad(tokenizer)
    examples, counts, system_prompt = load_examples(
        lambda: preference_examples_from_file(tokenizer, data_path(cfg), cfg.max_length),
        data_path(cfg),
        model_name,
    )
    train, heldout = split_by_query(examples, cfg.heldout_fraction, cfg.seed)
    if not train:
        raise ConfigError(f"rm: no training pair in {data_path(cfg)}")
    trainer = build_trainer(cfg, tokenizer, train, callbacks)
    resume_from = last_checkpoint(out_dir / "checkpoints") if cfg.resume else None
    restart_log(out_dir / "metrics.jsonl", resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    if trainer.state.global_step < trainer.state.max_steps:
        raise TrainingIncomplete(f"rm stopped at step {trainer.state.global_step}; re-run")
    model_dir = out_dir / "model"
    save_reward_model(trainer, tokenizer, model_dir, model_name, bool(cfg.lora), system_prompt)
    summary: dict[str, Any] = {
        **counts,
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "base_model": model_name,
        "model": str(model_dir),
    }
    if trainer.is_world_process_zero():
        served = TrajectoryRewardModel.load(model_dir, device=str(trainer.args.device))
        stats = heldout_stats(served, heldout or train, cfg)
        stats["source"] = "heldout" if heldout else "train (no held-out pair)"
        write_json_atomic(out_dir / "stats.json", stats)
        MetricsLog(out_dir / "metrics.jsonl").write(
            trainer.state.global_step,
            {"rm/heldout/accuracy": stats["pairwise_accuracy"], "rm/heldout/mean": stats["mean"]},
        )
        summary["heldout_accuracy"] = stats["pairwise_accuracy"]
        write_manifest(
            out_dir,
            stage="rm",
            config=to_dict(cfg),
            inputs={"pairs": data_path(cfg)},
            counts=summary,
        )
    return summary


def heldout_stats(
    rm: TrajectoryRewardModel, pairs: Sequence[PreferenceExample], cfg: RmConfig
) -> dict[str, Any]:
    """Pairwise accuracy and mean/std of the chosen + rejected scores of `pairs`."""
    chosen = rm.score_ids([p.chosen_ids for p in pairs], cfg.score_batch_size)
    rejected = rm.score_ids([p.rejected_ids for p in pairs], cfg.score_batch_size)
    scores = chosen + rejected
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    return {
        "mean": mean,
        "std": std,
        "count": len(scores),
        "pairs": len(pairs),
        "pairwise_accuracy": wins / len(pairs),
        "chosen_mean": sum(chosen) / len(chosen),
        "rejected_mean": sum(rejected) / len(rejected),
    }


def head_sha256(model_dir: Path) -> str | None:
    """sha256 of the score head as stored in `model_dir`'s safetensors (as fp32 values), or None
    when no file holds a `score.weight`: identifies the trained head whatever the load dtype."""
    import torch
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if key == "score.weight" or key.endswith(".score.weight"):
                    weight = f.get_tensor(key).to(torch.float32).contiguous()
                    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()
    return None


def save_reward_model(
    trainer: Any,
    tokenizer: Any,
    model_dir: Path,
    base: str,
    merge_lora: bool,
    system_prompt: str | None,
) -> None:
    """Final model + tokenizer (+ marker with the head's sha256) to `model_dir`, atomically."""
    staging = model_dir.with_name(model_dir.name + ".partial")
    trainer.save_model(str(staging))
    if not trainer.is_world_process_zero():
        return
    if merge_lora:
        from peft import PeftModel

        fresh, _ = load_sequence_classifier(base, tokenizer.pad_token_id)
        merged = PeftModel.from_pretrained(fresh, str(staging)).merge_and_unload()
        shutil.rmtree(staging)
        merged.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    head = head_sha256(staging)
    if head is None:
        raise RewardModelError(f"{staging}: the saved weights hold no score head")
    marker = {"head_sha256": head, "base_model": base, "system_prompt": system_prompt}
    write_json_atomic(staging / MARKER, marker)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    staging.rename(model_dir)
    log.info("reward model saved to %s", model_dir)


def head_outputs(
    model: Any, pad_id: int, sequences: Sequence[Sequence[int]], batch_size: int
) -> Any:
    """A sequence classifier's pooled outputs (read at each row's last non-pad token) for id
    sequences: a float32 tensor [len(sequences), width], in input order, batched longest first."""
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    device = next(model.parameters()).device
    rows: dict[int, Any] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = pad_sequences([sequences[i] for i in chunk], pad_id)
        with torch.inference_mode():
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        rows.update(zip(chunk, logits, strict=True))
    if not rows:
        return torch.empty(0, 0)
    return torch.stack([rows[i] for i in range(len(sequences))])


def head_inputs(
    model: str, pad_id: int, sequences: Sequence[Sequence[int]], batch_size: int = 16
) -> Any:
    """What a score head on `model` (a folder or Hub id) reads for each id sequence: the final
    hidden state at the last non-pad token, pooled exactly as scoring pools ([N, hidden]). A
    reward model's score is this times its head; the audit's untrained-RM control uses it."""
    import torch
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no "score.weight MISSING" report: the head is replaced
    try:
        classifier, _ = load_sequence_classifier(model, pad_id)
    finally:
        hf_logging.set_verbosity(before)
    classifier.score = torch.nn.Identity()
    return head_outputs(classifier.eval(), pad_id, sequences, batch_size)


class TrajectoryRewardModel:
    """A trained trajectory reward model that scores (question, trajectory) items in batches."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        system_prompt: str | None = None,
        stats: dict[str, Any] | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.stats = stats

    @classmethod
    def load(
        cls,
        path: str | Path,
        stats_path: str | Path | None = None,
        device: str = "cpu",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    ) -> TrajectoryRewardModel:
        """Load `path` (an `rm/model` folder); stats from `stats_path` or `<path>/../stats.json`.

        Raises `RewardModelError` when the weights have no score head, or when the head is not
        the one training saved (sha256 in `autotraj-rm.json`): such a head would be random.
        """
        from transformers import AutoTokenizer

        path = Path(path)
        marker_path = path / MARKER
        if not marker_path.is_file():
            raise RewardModelError(
                f"{path}: no {MARKER}: not a reward model trained by `autotraj rm`"
            )
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        head = head_sha256(path)
        if head is None:
            raise RewardModelError(f"{path}: the score head is missing from the weights")
        if head != marker["head_sha256"]:
            raise RewardModelError(
                f"{path}: the score head is not the trained one (sha256 differs)"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model, info = load_sequence_classifier(str(path), tokenizer.pad_token_id, dtype)
        check_vocab(model, tokenizer, str(path))
        missing = [k for k in info.get("missing_keys", ()) if "score" in k]
        if missing:
            raise RewardModelError(f"{path}: the score head was not loaded ({missing})")
        stats_file = Path(stats_path) if stats_path else path.parent / "stats.json"
        stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else None
        return cls(model.to(device), tokenizer, marker.get("system_prompt"), stats)

    def score_ids(self, sequences: Sequence[Sequence[int]], batch_size: int = 16) -> list[float]:
        """Raw scores of rendered id sequences, in input order (batched longest first)."""
        scores = head_outputs(self.model, self.tokenizer.pad_token_id, sequences, batch_size)
        scores = scores[:, 0].tolist() if len(sequences) else []
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise RewardModelError(f"non-finite reward scores at items {bad[:10]}")
        return scores

    def score(
        self,
        items: Sequence[tuple[str, Trajectory]],
        batch_size: int = 16,
        system_prompt: str | None = None,
    ) -> list[float]:
        """Raw scores of (question, trajectory) items, rendered exactly as in training."""
        system = system_prompt if system_prompt is not None else self.system_prompt
        sequences = [
            render_trajectory(self.tokenizer, question, trajectory, system).input_ids
            for question, trajectory in items
        ]
        return self.score_ids(sequences, batch_size)

    def normalized(
        self,
        items: Sequence[tuple[str, Trajectory]],
        batch_size: int = 16,
        system_prompt: str | None = None,
    ) -> list[float]:
        """z-scores (score - mean) / std with the held-out statistics saved by training."""
        if not self.stats:
            raise RewardModelError("no score statistics (stats.json) loaded: cannot normalize")
        mean, std = float(self.stats["mean"]), max(float(self.stats["std"]), 1e-6)
        return [(s - mean) / std for s in self.score(items, batch_size, system_prompt)]
