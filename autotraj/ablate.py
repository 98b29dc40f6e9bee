"""`autotraj ablate`: what each part of AutoTraj adds, measured side by side with intervals.

One config (a pipeline config plus an `ablation:` section) and one run directory. The variants
(METHOD.md section 6b) share everything upstream of where they differ:

- the data engine, once: synthesize -> score -> repair -> build, the build writing every SFT set
  the variants train on (build.SFT_FILES): `all` (every candidate as sampled), `correct` (every
  correct candidate: rejection sampling), `hq` (HQ only) and `autotraj` (HQ + verified repairs);
- SFT, once per set, all from the same base model for the SAME number of optimizer steps
  (`sft_steps`; the sets differ in size, so one epoch each would compare training lengths, not
  data), each variant's loss curve kept to judge convergence;
- the trajectory reward model, once, trained on the preference pairs from the AutoTraj SFT model
  (as in the pipeline);
- GRPO from each start in `rl_starts` (an SFT set's model) with each reward in `rl_rewards`:
  `outcome_format` (the release formula without the RM: rm_weight 0) or `outcome_format_rm`
  (AutoTraj: + rm_weight x RM); same seed, steps and prompts for all;
- evaluation of every model on the same held-out items (the `eval` section), plus the base model
  with `base_demonstrations` worked examples as a floor that measures reasoning rather than the
  missing tag protocol.

Every stage is cached like `autotraj run`'s (pipeline.claim_stage_dir): a key of its config and
its upstream keys, so a re-run redoes exactly what changed. The comparison (compare.py) is
written to `<run_dir>/ablation/`: `comparison.json` (every row), `table.md` (accuracy with 95%
bootstrap intervals, paired differences against the reference variant with 95% paired-bootstrap
intervals, tokens, tool calls, format-valid, hedging and repeated-call rates) and `sft.json`
(each SFT variant's steps, data size, epochs and loss curve).

Layout: `<run_dir>/{synthesize,score,repair,build,rm}/` (shared), `<run_dir>/variants/<name>/
{sft,rl}/`, `<run_dir>/eval/<name>/`.

Not here: the stages themselves, the statistics (compare.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autotraj.build import SFT_FILES, SftData
from autotraj.compare import compare, render_markdown, sft_note
from autotraj.config import ConfigError, to_dict
from autotraj.eval_summary import EvalResult
from autotraj.evaluate import run_eval
from autotraj.evaluate import stage_dir as eval_dir
from autotraj.io import load_records, write_json_atomic, write_text_atomic
from autotraj.pipeline import (
    PipelineConfig,
    claim_stage_dir,
    config_key,
    run_pipeline,
    stage_keys,
)
from autotraj.stage_process import run_stage
from autotraj.train.grpo import RlConfig, run_rl
from autotraj.train.reward_model import run_rm
from autotraj.train.sft import run_sft

log = logging.getLogger(__name__)

RlReward = Literal["outcome_format", "outcome_format_rm"]
BASE = "base+demos"


@dataclass(frozen=True)
class AblationSettings:
    sft_data: tuple[SftData, ...] = ("all", "correct", "hq", "autotraj")
    sft_steps: int = 24  # optimizer steps of every SFT variant (equal budgets)
    rl_starts: tuple[SftData, ...] = ("autotraj", "all")  # SFT models GRPO starts from
    rl_rewards: tuple[RlReward, ...] = ("outcome_format", "outcome_format_rm")
    base_demonstrations: int = 2  # the floor row: the base model shown worked examples (0: none)
    reference: str = "sft-autotraj"  # what SFT variants and the floor are compared with
    rl_reference: str = "rl-autotraj-outcome_format_rm"  # what RL variants are compared with
    bootstrap_samples: int = 2000
    bootstrap_seed: int = 0
    # each stage in its own child process (stage_process.py): memory peaks at the largest stage
    # instead of growing across all of them; false: one process (a debugger, or no spawn)
    isolate_stages: bool = True


@dataclass(frozen=True)
class AblateConfig(PipelineConfig):
    """A pipeline config (its sections configure every variant) plus the ablation's choices."""

    run_dir: str = "runs/ablation"
    ablation: AblationSettings = field(default_factory=AblationSettings)


def sft_name(data: str) -> str:
    return f"sft-{data}"


def rl_name(start: str, reward: str) -> str:
    return f"rl-{start}-{reward}"


def check(cfg: AblateConfig) -> None:
    a = cfg.ablation
    if "autotraj" not in a.sft_data:
        raise ConfigError("ablation.sft_data must include autotraj (the reward model starts there)")
    missing = [s for s in a.rl_starts if s not in a.sft_data]
    if missing:
        raise ConfigError(f"ablation.rl_starts {missing} are not in ablation.sft_data")
    if a.sft_steps < 1:
        raise ConfigError(f"ablation.sft_steps must be >= 1, got {a.sft_steps}")
    names = variant_names(cfg)
    for ref in (a.reference, a.rl_reference):
        if ref not in names:
            raise ConfigError(f"ablation reference {ref!r} is not a variant: {names}")


def variant_names(cfg: AblateConfig) -> list[str]:
    a = cfg.ablation
    names = [BASE] if a.base_demonstrations else []
    names += [sft_name(d) for d in a.sft_data]
    names += [rl_name(s, r) for s in a.rl_starts for r in a.rl_rewards]
    return names


def _stage(
    run_dir: Path, out_dir: Path, config: Any, upstream: list[str], runner: Any, isolate: bool
) -> str:
    """Run (or reuse) one cached stage; return its key."""
    key = config_key(to_dict(config), upstream)
    claim_stage_dir(run_dir, out_dir, key)
    start = time.perf_counter()
    run_stage(runner, config, isolate)
    log.info("%s: done in %.1f s", out_dir, time.perf_counter() - start)
    return key


def run_ablation(cfg: AblateConfig) -> dict[str, Any]:
    """Run (or resume) every variant and write the comparison; return the variant names, the
    output folder and the Markdown table."""
    check(cfg)
    a = cfg.ablation
    root = Path(cfg.run_dir)
    iso = a.isolate_stages
    extra = tuple(d for d in a.sft_data if d != "autotraj")
    engine = dataclasses.replace(
        cfg,
        stages=("synthesize", "score", "repair", "build"),
        build=dataclasses.replace(cfg.build, extra_sets=extra),
    )
    run_stage(run_pipeline, engine, iso)
    keys = stage_keys(engine)

    sft_keys: dict[str, str] = {}
    models: dict[str, tuple[str, int]] = {}  # variant -> (model path, demonstrations)
    if a.base_demonstrations:
        models[BASE] = (cfg.eval.generator.model, a.base_demonstrations)
    for data in a.sft_data:
        vdir = root / "variants" / sft_name(data)
        scfg = dataclasses.replace(
            cfg.sft,
            run_dir=str(vdir),
            data=str(root / "build" / SFT_FILES[data]),
            max_steps=a.sft_steps,
        )
        sft_keys[data] = _stage(root, vdir / "sft", scfg, [keys["build"]], run_sft, iso)
        models[sft_name(data)] = (str(vdir / "sft" / "model"), 0)

    rm_cfg = dataclasses.replace(
        cfg.rm, run_dir=str(root), model=str(root / "variants" / sft_name("autotraj") / "sft/model")
    )
    rm_key = ""
    if "outcome_format_rm" in a.rl_rewards:
        rm_key = _stage(
            root, root / "rm", rm_cfg, [keys["build"], sft_keys["autotraj"]], run_rm, iso
        )

    rl_keys: dict[str, str] = {}
    for start in a.rl_starts:
        for reward in a.rl_rewards:
            name = rl_name(start, reward)
            vdir = root / "variants" / name
            weight = cfg.rl.reward.rm_weight if reward == "outcome_format_rm" else 0.0
            rcfg: RlConfig = dataclasses.replace(
                cfg.rl,
                run_dir=str(vdir),
                model=str(root / "variants" / sft_name(start) / "sft/model"),
                queries=str(root / "synthesize" / "queries.jsonl"),
                rm=str(root / "rm" / "model") if weight else "",
                reward=dataclasses.replace(cfg.rl.reward, rm_weight=weight),
            )
            upstream = [keys["synthesize"], sft_keys[start], rm_key if weight else ""]
            rl_keys[name] = _stage(root, vdir / "rl", rcfg, upstream, run_rl, iso)
            models[name] = (str(vdir / "rl" / "model"), 0)

    upstream_of = {sft_name(d): sft_keys[d] for d in a.sft_data} | rl_keys
    results: dict[str, list[EvalResult]] = {}
    for name, (model, demos) in models.items():
        ecfg = dataclasses.replace(
            cfg.eval,
            run_dir=str(root),
            name=name,
            generator=dataclasses.replace(cfg.eval.generator, model=model),
            rollout=dataclasses.replace(cfg.eval.rollout, demonstrations=demos),
        )
        _stage(root, eval_dir(ecfg), ecfg, [upstream_of.get(name, "")], run_eval, iso)
        results[name] = load_records(eval_dir(ecfg) / "results.jsonl", EvalResult.from_dict)
    return write_comparison(cfg, results)


def reference_of(cfg: AblateConfig, names: list[str]) -> dict[str, str]:
    """The model each variant is compared with: RL variants with the AutoTraj RL model, the
    others with the AutoTraj SFT model."""
    a = cfg.ablation
    return {n: a.rl_reference if n.startswith("rl-") else a.reference for n in names}


def sft_curves(cfg: AblateConfig) -> dict[str, dict[str, Any]]:
    """Each SFT variant's data size, steps, epochs and logged loss curve, and a convergence
    verdict: the mean loss of the last quarter of the logged steps within 10% of the quarter
    before it (a plateau), and the last logged loss."""
    out = {}
    root = Path(cfg.run_dir)
    for data in cfg.ablation.sft_data:
        sft_dir = root / "variants" / sft_name(data) / "sft"
        losses = [
            row["sft/train/loss"]
            for row in map(json.loads, (sft_dir / "metrics.jsonl").read_text().splitlines())
            if "sft/train/loss" in row
        ]
        size = sum(1 for _ in (root / "build" / SFT_FILES[data]).open(encoding="utf-8"))
        q = max(1, len(losses) // 4)
        last, before = losses[-q:], losses[-2 * q : -q]
        plateau = bool(before) and abs(sum(last) / len(last) - sum(before) / len(before)) <= 0.1 * (
            sum(before) / len(before)
        )
        steps = cfg.ablation.sft_steps
        out[sft_name(data)] = {
            "records": size,
            "steps": steps,
            "epochs": steps * cfg.sft.effective_batch_size / max(1, size),
            "losses": losses,
            "final_loss": losses[-1] if losses else None,
            "converged": plateau,
        }
    return out


def write_comparison(cfg: AblateConfig, results: dict[str, list[EvalResult]]) -> dict[str, Any]:
    a = cfg.ablation
    rows = compare(
        results,
        reference_of(cfg, list(results)),
        samples=a.bootstrap_samples,
        seed=a.bootstrap_seed,
    )
    curves = sft_curves(cfg)
    notes = {name: sft_note(c) for name, c in curves.items()}
    out = Path(cfg.run_dir) / "ablation"
    table = render_markdown(rows, notes)
    write_text_atomic(out / "table.md", table + "\n")
    write_json_atomic(out / "comparison.json", {"rows": [r.to_dict() for r in rows]})
    write_json_atomic(out / "sft.json", curves)
    log.info("ablation table written to %s", out / "table.md")
    return {"variants": list(results), "dir": str(out), "table": table}
