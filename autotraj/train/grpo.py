"""Stage `autotraj rl`: GRPO with multi-turn tool rollouts, composite rewards, on accelerate.

Each step (METHOD.md section 10; release values in `RlConfig`):
1. take `prompts_per_step` queries (a seeded shuffle per epoch; each process its share);
2. roll out `rollouts_per_prompt` trajectories per query with THE rollout engine (rollout.py) and
   real tools, generating with the current policy weights: the policy model itself, or an
   unsharded rollout engine (a bf16 transformers copy, or vLLM) that the policy's full weights
   are copied into before the step (train/policy_weights.py);
3. reward them (rewards.compute_rewards: the release formula, the trajectory RM when configured);
   a rollout that hit an infrastructure failure is excluded from its group, never scored 0; a
   step in which every rollout hit one (the generator or a tool is down) raises `StageIncomplete`
   before any update, so it is not counted and a re-run resumes from the last checkpoint;
4. group advantages A = (R - mean) / (std + 1e-6) on every trainable token (train/advantages.py);
5. re-render each trajectory with the one renderer (render.render_trajectory: prompt and
   tool-result tokens are not trainable) and update the policy on them (grpo_update.py: the
   rollout policy's log-probs on those ids, then `ppo_epochs` x `mini_batches` optimizer steps
   of the PPO-clip loss with entropy bonus and optional k3 KL to a frozen reference, averaged
   over trainable tokens).

Outputs under `<run_dir>/rl/`: `metrics.jsonl` (`rl/...`, one row per step), `rollouts.jsonl`
(trajectories with reward breakdowns and advantages), `checkpoints/step-N` (accelerate
`save_state`: model, optimizer, RNG, step), `model/`, `config.resolved.yaml`, `manifest.json`.
A re-run resumes from the latest checkpoint.

Multi-GPU: the same command under `accelerate launch` with DDP, FSDP2 or DeepSpeed ZeRO-1/2/3:
each process rolls out its share of the prompts (a group stays on one process), the loss is
normalized by the global trainable-token count, and every process runs the same number of
forward/backward passes (padded with empty micro-batches), which sharded engines need.

Not here: the config, its checks and what it resolves (rl_config.py), reward functions
(rewards.py), advantage/loss math (advantages.py, rl_loss.py), sampling (rl_sampling.py), the
optimizer steps
(grpo_update.py), weights into the rollout engine (policy_weights.py), the reward model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed

from autotraj.config import ConfigError, to_dict
from autotraj.io import check_same_config, truncate_steps, write_manifest
from autotraj.metrics import MetricsLog
from autotraj.models.loading import (
    GeneratorConfig,
    load_tokenizer,
    resolve_model_path,
)
from autotraj.records import Query, Trajectory
from autotraj.render import render_trajectory
from autotraj.rewards import RewardBreakdown, compute_rewards
from autotraj.rollout import rollout
from autotraj.run_dir import StageIncomplete
from autotraj.tools.toolbox import close_tools, open_tools
from autotraj.train.advantages import prompt_indices
from autotraj.train.grpo_update import PolicyUpdate, Sample
from autotraj.train.policy_weights import (
    HfRolloutCopy,
    VllmRolloutEngine,
    full_parameters,
    parameter_count,
    sharding,
    unsharded_load,
)
from autotraj.train.processes import process_state
from autotraj.train.rl_config import (  # noqa: F401 (re-exported: the stage's public names)
    RlConfig,
    RlGeneratorConfig,
    TrajectoryScorer,
    autocast_setting,
    check_rl_config,
    frozen_dtype,
    load_rl_queries,
    resolve_model,
    resolve_rm,
    rollout_metrics,
    stage_dir,
)
from autotraj.train.rl_lora import is_lora, merged_parameters, save_merged, wrap_lora
from autotraj.train.rl_loss import (
    sampler_logprobs,
)
from autotraj.train.rl_sampling import (
    ScoredGroups,
    dynamic_sample,
    refill_indices,
    rollout_items,
    score_groups,
)
from autotraj.train.sft import check_vocab

log = logging.getLogger(__name__)

# Config fields that may change when a run is resumed (everything else must match).
RESUMABLE_CHANGES = ("steps", "resume", "report_to", "save_every", "keep_checkpoints")


class _Progress:
    """The step counter, saved and restored with accelerate's checkpoints."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def _latest_checkpoint(out_dir: Path) -> Path | None:
    return max((p.parent for p in (out_dir / "checkpoints").glob("step-*/complete")), default=None)


def _comparable_yaml(cfg: RlConfig) -> str:
    """The resolved config minus the fields a resumed run may change (saved and compared)."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
    return yaml.safe_dump(data, sort_keys=True)


class GrpoRun:
    """Owns the policy, optimizer, tools and scorer of one RL run; `train()` runs the steps."""

    def __init__(self, cfg: RlConfig, scorer: TrajectoryScorer | None = None):
        check_rl_config(cfg)
        self.cfg = cfg
        self.out_dir = stage_dir(cfg)
        on_cpu = process_state().device.type == "cpu"
        self.accelerator = Accelerator(
            mixed_precision=autocast_setting(cfg.mixed_precision, on_cpu),
            log_with=list(cfg.report_to) or None,
            project_dir=str(self.out_dir),
        )
        layout = sharding(self.accelerator)
        gen = cfg.generator
        if layout != "none" and gen.backend == "transformers" and gen.dtype == "policy":
            raise ConfigError(
                f"rl: generator.dtype=policy samples from the policy object itself, which "
                f"{layout} shards across processes; set generator.dtype=bfloat16 (an "
                f"unsharded copy per process) or generator.backend=vllm"
            )
        if cfg.prompts_per_step % self.accelerator.num_processes:
            raise ConfigError(
                f"rl: prompts_per_step={cfg.prompts_per_step} must be divisible by the "
                f"{self.accelerator.num_processes} processes"
            )
        set_seed(cfg.seed, device_specific=True)
        self.model_ref = resolve_model(cfg)
        self.tokenizer = load_tokenizer(GeneratorConfig(model=self.model_ref))
        policy = self._load_lm(self.model_ref, train=True)
        check_vocab(policy, self.tokenizer, self.model_ref)
        self.policy_size = parameter_count(policy)
        if self.accelerator.device.type == "cuda" and cfg.lora is None:
            self._check_memory(layout)  # full fine-tuning's training state (train/memory.py)
        if cfg.lora is not None:
            if layout != "none":
                raise ConfigError(
                    f"rl: lora with {layout} is not supported (the adapters are small: train "
                    f"them under DDP or ZeRO-1/2), or set lora=null for full fine-tuning"
                )
            policy = wrap_lora(policy, cfg.lora, cfg.gradient_checkpointing)
        self.ref_model = self._load_lm(self.model_ref, train=False) if cfg.kl_coef > 0 else None
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=self._fused_adamw(layout)
        )
        self._configure_deepspeed()
        self.model, self.optimizer = self.accelerator.prepare(policy, optimizer)
        self.rollout_engine = self._load_rollout_engine()
        self.progress = _Progress()
        self.accelerator.register_for_checkpointing(self.progress)
        # the step of the last checkpoint, in memory: every process must decide alike whether
        # to save (a collective), and only the main process writes the `complete` marker
        self.saved_step = -1
        self.scorer = scorer if scorer is not None else self._load_scorer()
        self.queries = load_rl_queries(cfg, self.tokenizer)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.updater = PolicyUpdate(
            cfg, self.accelerator, self.model, self.optimizer, self.ref_model, self.tokenizer
        )

    def _fused_adamw(self, layout: str) -> bool:
        """Fused AdamW (one kernel over all tensors; same update as the loop, to rounding) when
        the parameters are plain unsharded tensors: not under FSDP2 and not DeepSpeed, which
        brings its own optimizer state handling."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return layout == "none" and plugin is None

    def _check_memory(self, layout: str) -> None:
        """Refuse a layout whose resident memory per GPU exceeds the GPU (train/memory.py)."""
        from autotraj.train.memory import check_rl_memory, rl_resident_gib

        acc, cfg, gen = self.accelerator, self.cfg, self.cfg.generator
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        name = layout if layout != "none" else "ddp"
        if layout == "none" and plugin is not None and plugin.zero_stage in (1, 2):
            name = f"zero{plugin.zero_stage}"
        gpu_gib = torch.cuda.get_device_properties(acc.device).total_memory / 2**30
        engine = 0.0
        if gen.backend == "vllm":
            engine = gen.gpu_memory_utilization * gpu_gib
        elif gen.dtype == "bfloat16":
            engine = 2 * self.policy_size / 2**30
        frozen = int(cfg.kl_coef > 0) + int(resolve_rm(cfg) is not None)
        width = 2 if frozen_dtype(cfg.frozen_dtype, acc.device) == torch.bfloat16 else 4
        parts = rl_resident_gib(self.policy_size, name, acc.num_processes, frozen, width, engine)
        log.info("resident per GPU (GiB, lower bound): %s", parts)
        check_rl_memory(parts, gpu_gib, name, acc.num_processes)

    def _configure_deepspeed(self) -> None:
        """DeepSpeed takes the micro-batch size and the gradient clipping from its own config
        (there is no dataloader to infer them from; the engine clips inside its step)."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is None:
            return
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.cfg.micro_batch_size
        plugin.deepspeed_config["gradient_accumulation_steps"] = 1  # the loop accumulates
        plugin.deepspeed_config["gradient_clipping"] = self.cfg.max_grad_norm

    def _load_rollout_engine(self) -> HfRolloutCopy | VllmRolloutEngine | None:
        """The unsharded engine that samples rollouts (None: the policy model itself)."""
        gen = self.cfg.generator
        path = resolve_model_path(self.model_ref)
        if gen.backend == "vllm":
            return VllmRolloutEngine.load(
                path,
                self.accelerator,
                gpu_memory_utilization=gen.gpu_memory_utilization,
                max_model_len=gen.max_model_len,
                enforce_eager=gen.enforce_eager,
                sleep=gen.sleep,
                seed=self.cfg.seed,
                parameters=self.policy_size,
            )
        if gen.dtype == "bfloat16":
            return HfRolloutCopy.load(path, self.accelerator)
        return None

    def _load_lm(self, ref: str, train: bool) -> Any:
        from transformers import AutoModelForCausalLM

        if not train:  # the frozen KL reference: whole on every process, never sharded
            dtype = frozen_dtype(self.cfg.frozen_dtype, self.accelerator.device)
            with unsharded_load(self.accelerator):
                model = AutoModelForCausalLM.from_pretrained(resolve_model_path(ref), dtype=dtype)
            return model.requires_grad_(False).eval().to(self.accelerator.device)
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(ref), dtype=torch.float32)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        log.info("policy %s: %d parameters", ref, model.num_parameters())
        return model.train()

    def _load_scorer(self) -> TrajectoryScorer | None:
        path = resolve_rm(self.cfg)
        if path is None:
            return None
        from autotraj.train.reward_model import TrajectoryRewardModel

        dtype = frozen_dtype(self.cfg.frozen_dtype, self.accelerator.device)
        rm = TrajectoryRewardModel.load(
            path, device=str(self.accelerator.device), dtype=str(dtype).removeprefix("torch.")
        )
        if rm.tokenizer.get_vocab() != self.tokenizer.get_vocab():
            raise ConfigError(
                f"rl: the reward model {path} has another tokenizer than the policy "
                f"{self.model_ref}: it would score token ids it does not know; train the reward "
                f"model from the policy's base (autotraj rm model=...)"
            )
        return rm

    def _generator(self) -> Any:
        """The generator for this step's rollouts, holding the policy's current weights."""
        engine = self.rollout_engine
        if engine is not None:  # this step's weights (LoRA: merged into the base weights)
            policy = self.accelerator.unwrap_model(self.model)
            if is_lora(policy):
                engine.sync(merged_parameters(policy))
            else:
                engine.sync(full_parameters(self.accelerator, self.model))
        if isinstance(engine, VllmRolloutEngine):
            from autotraj.models.vllm_backend import VllmGenerator

            return VllmGenerator(
                engine.llm,
                self.tokenizer,
                name=self.model_ref,
                max_model_len=self.cfg.generator.max_model_len,
            )
        from autotraj.models.transformers_backend import TransformersGenerator

        model = engine.model if engine is not None else self.accelerator.unwrap_model(self.model)
        return TransformersGenerator(
            model,
            self.tokenizer,
            name=self.model_ref,
            batch_size=self.cfg.generator.batch_size,
            logprobs=self.cfg.sampling.sampler_logprobs,
            kept_prefix_mb=self.cfg.generator.kept_prefix_mb,
            unpadded_prefill=self.cfg.generator.unpadded_prefill,
            held_prefix=self.cfg.generator.held_prefix,
        )

    def restore(self) -> int:
        """Load the latest checkpoint (model, optimizer, RNG, step), if any; return the step."""
        latest = _latest_checkpoint(self.out_dir)
        if latest is not None:
            if not self.cfg.resume:
                raise ConfigError(f"{self.out_dir} has checkpoints; set resume=true or clear it")
            self.accelerator.load_state(str(latest))
            self.saved_step = self.progress.step
            log.info("resumed from %s at step %d", latest, self.progress.step)
        if self.accelerator.is_main_process:
            for name in ("metrics.jsonl", "rollouts.jsonl"):
                truncate_steps(self.out_dir / name, self.progress.step)
        return self.progress.step

    def train(self) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        self.restore()
        acc.init_trackers("autotraj-rl", config=_flat_config(cfg))
        tools = open_tools(cfg.tools)
        try:
            while self.progress.step < cfg.steps:
                values = self.step(self.progress.step, tools)
                self.progress.step += 1
                if acc.is_main_process:
                    self.metrics.write(self.progress.step, values)
                acc.log(values, step=self.progress.step)
                log.info("step %d: %s", self.progress.step, _brief(values))
                if cfg.save_every and self.progress.step % cfg.save_every == 0:
                    self.save_checkpoint()
            if self.saved_step != self.progress.step:
                self.save_checkpoint()  # the final state, so that `steps` can be raised later
            self.save_final()  # before end_training, which takes the process group down
        finally:
            close_tools(tools)
            acc.end_training()
        return {"steps": self.progress.step, "model": str(self.out_dir / "model")}

    def step(self, step: int, tools: dict) -> dict[str, float]:
        """One GRPO step (0-based `step`): rollouts, rewards, advantages, update; its metrics."""
        cfg, acc = self.cfg, self.accelerator
        began = time.perf_counter()
        indices = prompt_indices(len(self.queries), step, cfg.prompts_per_step, cfg.seed)
        mine = list(enumerate(indices))[acc.process_index :: acc.num_processes]
        policy = acc.unwrap_model(self.model)
        policy.eval()  # no autocast here: it re-casts every weight at every token (2x slower)
        generator = self._generator()
        sync_s = time.perf_counter() - began
        items = rollout_items(
            step, 0, [(j, self.queries[i]) for j, i in mine], cfg.rollouts_per_prompt
        )
        trajectories = rollout(
            generator, tools, self.tokenizer, items, replace(cfg.rollout, seed=cfg.seed)
        )
        all_down = all(t.finish_reason == "infra_error" for t in trajectories)
        if down := gather_object([trajectories[0].error] if all_down else []):  # all stop
            raise StageIncomplete(
                f"rl step {step + 1}: every rollout hit an infrastructure failure on "
                f"{len(down)} of {acc.num_processes} processes ({down[0]}); re-run to resume "
                f"from the last checkpoint"
            )
        batch = self._score(items, trajectories)
        generated, dynamic = batch, {}
        if cfg.sampling.dynamic:  # local to this process: no collective in the extra rounds
            batch, generated, dynamic = dynamic_sample(
                batch,
                cfg.sampling.max_rounds,
                lambda r, n: self._refill(generator, tools, step, r, n),
            )
        if isinstance(self.rollout_engine, VllmRolloutEngine):
            self.rollout_engine.release()
        policy.train()
        rollout_s = time.perf_counter() - began - sync_s
        keep = [  # DAPO overlong filtering: truncated rollouts leave the loss when asked
            a is not None and not (cfg.loss.overlong_mask and t.finish_reason == "length")
            for a, t in zip(batch.advantages, batch.trajectories, strict=True)
        ]
        samples = [
            Sample(r, a, sampler_logprobs(t, r))  # type: ignore[arg-type]
            for r, a, t, k in zip(
                batch.rendered, batch.advantages, batch.trajectories, keep, strict=True
            )
            if k
        ]
        update = self.update(samples, step)
        if cfg.save_rollouts:
            self._save_rollouts(
                step + 1, generated.trajectories, generated.breakdowns, generated.advantages
            )
        values = rollout_metrics(
            gather_object(list(generated.trajectories)),
            gather_object(list(generated.breakdowns)),
            gather_object([len(r.input_ids) - r.prompt_length for r in generated.rendered]),
        )
        advantages = batch.advantages
        zero = sum(1 for a in advantages if a == 0.0) / max(1, len(advantages))
        values.update(update)
        for key, value in dynamic.items():  # summed over processes
            values[key] = float(sum(gather_object([value])))
        values["rl/advantage/zero_fraction"] = zero
        values["rl/overlong_masked"] = float(sum(gather_object([keep.count(False)])))
        values["rl/time/sync_s"] = sync_s  # full weights into the rollout engine
        values["rl/time/rollout_s"] = rollout_s
        values["rl/time/step_s"] = time.perf_counter() - began
        return values

    def _refill(self, generator: Any, tools: dict, step: int, round_: int, count: int) -> Any:
        """Dynamic sampling's extra round: `count` new groups, rolled out and scored."""
        cfg, acc = self.cfg, self.accelerator
        seed = f"{cfg.seed}/{acc.process_index}"
        picked = refill_indices(len(self.queries), count, step, round_, seed)
        items = rollout_items(
            step,
            round_,
            [(j, self.queries[i]) for j, i in enumerate(picked)],
            cfg.rollouts_per_prompt,
        )
        trajectories = rollout(
            generator, tools, self.tokenizer, items, replace(cfg.rollout, seed=cfg.seed)
        )
        return self._score(items, trajectories)

    def _score(
        self, items: Sequence[tuple[str, Query]], trajectories: Sequence[Trajectory]
    ) -> ScoredGroups:
        """Rewards, renderings and advantages of one round (rl_sampling.score_groups)."""
        cfg = self.cfg
        queries = [q for _, q in items]
        breakdowns = compute_rewards(
            trajectories, queries, self._rm_scores(trajectories, queries), cfg.reward
        )
        rendered = [
            render_trajectory(self.tokenizer, q.question, t, cfg.rollout.system_prompt)
            for t, q in zip(trajectories, queries, strict=True)
        ]
        return score_groups(
            items, trajectories, breakdowns, rendered, cfg.loss, cfg.rollout.max_response_tokens
        )

    def _rm_scores(
        self, trajectories: Sequence[Trajectory], queries: Sequence[Query]
    ) -> list[float | None] | None:
        if self.scorer is None:
            return None
        keep = [i for i, t in enumerate(trajectories) if t.finish_reason != "infra_error"]
        items = [(queries[i].question, trajectories[i]) for i in keep]
        bs = self.cfg.rm_batch_size
        if self.cfg.reward.normalize_rm:
            scores = self.scorer.normalized(items, batch_size=bs)
        else:
            scores = self.scorer.score(items, batch_size=bs)
        if len(scores) != len(items):
            raise RuntimeError(f"reward model returned {len(scores)} scores for {len(items)}")
        out: list[float | None] = [None] * len(trajectories)
        for i, s in zip(keep, scores, strict=True):
            out[i] = float(s)
        return out

    def update(self, samples: Sequence[Sample], step: int) -> dict[str, float]:
        """PPO-clip updates on this process's samples (grpo_update.PolicyUpdate); its metrics."""
        return self.updater.run(samples, step)

    # --- outputs -------------------------------------------------------------------------

    def _save_rollouts(
        self,
        step: int,
        trajectories: Sequence[Trajectory],
        breakdowns: Sequence[RewardBreakdown],
        advantages: Sequence[float | None],
    ) -> None:
        rows = [
            {"step": step, "advantage": a, "reward": b.to_dict(), "trajectory": t.to_dict()}
            for t, b, a in zip(trajectories, breakdowns, advantages, strict=True)
        ]
        rows = gather_object(rows)
        if self.accelerator.is_main_process:
            with (self.out_dir / "rollouts.jsonl").open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def _checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / f"step-{self.progress.step:06d}"

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        path = self._checkpoint_path()
        acc.save_state(str(path))
        acc.wait_for_everyone()
        self.saved_step = self.progress.step
        if acc.is_main_process:
            (path / "complete").write_text(f"{self.progress.step}\n", encoding="utf-8")
            done = sorted((self.out_dir / "checkpoints").glob("step-*"))
            for stale in done[: max(0, len(done) - self.cfg.keep_checkpoints)]:
                shutil.rmtree(stale)
        log.info("checkpoint %s", path)
        return path

    def save_final(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)  # gathers shards: every process takes part
        if not acc.is_main_process:
            return
        out = self.out_dir / "model"
        policy = acc.unwrap_model(self.model)
        if is_lora(policy):
            save_merged(policy, self.tokenizer, out)
        else:
            policy.save_pretrained(out, state_dict=state)
            self.tokenizer.save_pretrained(out)
        write_manifest(
            self.out_dir,
            stage="rl",
            config=to_dict(self.cfg),
            inputs={"queries": self.cfg.queries} if self.cfg.queries else {},
            counts={"steps": self.progress.step, "queries": len(self.queries)},
        )


def _flat_config(cfg: RlConfig) -> dict[str, Any]:
    """The config as scalars (nested sections as JSON), which every tracker accepts."""
    scalar = (int, float, str, bool)
    return {k: v if isinstance(v, scalar) else json.dumps(v) for k, v in to_dict(cfg).items()}


def _brief(values: dict[str, float]) -> str:
    keys = ("rl/reward/mean", "rl/accuracy", "rl/format_rate", "rl/kl", "rl/time/step_s")
    return " ".join(f"{k.removeprefix('rl/')}={values[k]:.3f}" for k in keys if k in values)


def run_rl(cfg: RlConfig, scorer: TrajectoryScorer | None = None) -> dict[str, Any]:
    """Run (or resume) the RL stage; `scorer` replaces the configured reward model (tests)."""
    check_rl_config(cfg)
    out_dir = stage_dir(cfg)
    state = process_state()
    if state.is_main_process:
        check_same_config(out_dir, _comparable_yaml(cfg))
    state.wait_for_everyone()
    latest = _latest_checkpoint(out_dir)
    done = int(latest.name.removeprefix("step-")) if latest else 0
    if done >= cfg.steps and (out_dir / "model").is_dir():
        log.info("%s is finished (%d steps); nothing to do", out_dir, done)
        return {"steps": done, "model": str(out_dir / "model")}
    return GrpoRun(cfg, scorer=scorer).train()
