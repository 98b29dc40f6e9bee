"""`autotraj run`: the stages in order, in one run directory, each skipped once finished.

`PipelineConfig` holds one section per stage (the same config classes the single-stage commands
take) and the run directory they all share. Each stage is itself resumable and a no-op when its
output exists for the same config, so re-running the pipeline after an interruption continues
where it stopped; a stage whose config changed refuses to mix outputs (use another run_dir).

Not here: what any stage computes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from autotraj.build import BuildConfig, run_build
from autotraj.config import ConfigError
from autotraj.repair import RepairConfig, run_repair
from autotraj.score import ScoreConfig, run_score
from autotraj.synthesize import SynthesizeConfig, run_synthesize
from autotraj.train.grpo import RlConfig, run_rl
from autotraj.train.reward_model import RmConfig, run_rm
from autotraj.train.sft import SftConfig, run_sft

log = logging.getLogger(__name__)

StageName = Literal["synthesize", "score", "repair", "build", "sft", "rm", "rl"]
ORDER: tuple[StageName, ...] = ("synthesize", "score", "repair", "build", "sft", "rm", "rl")
RUNNERS: dict[StageName, Callable[[Any], dict[str, Any]]] = {
    "synthesize": run_synthesize,
    "score": run_score,
    "repair": run_repair,
    "build": run_build,
    "sft": run_sft,
    "rm": run_rm,
    "rl": run_rl,
}


@dataclass(frozen=True)
class PipelineConfig:
    run_dir: str = "runs/default"
    stages: tuple[StageName, ...] = ORDER  # which stages to run (always in pipeline order)
    synthesize: SynthesizeConfig = field(default_factory=SynthesizeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    repair: RepairConfig = field(default_factory=RepairConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    rm: RmConfig = field(default_factory=RmConfig)
    rl: RlConfig = field(default_factory=RlConfig)


def stage_config(cfg: PipelineConfig, name: StageName) -> Any:
    """A stage's section with the pipeline's run directory."""
    section = getattr(cfg, name)
    default_dir = type(section)().run_dir
    if section.run_dir not in (default_dir, cfg.run_dir):
        raise ConfigError(
            f"{name}.run_dir is {section.run_dir!r}: in a pipeline set run_dir once at the top level"
        )
    return dataclasses.replace(section, run_dir=cfg.run_dir)


def run_pipeline(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Run the selected stages in order; return each stage's counts."""
    results: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        if name not in cfg.stages:
            continue
        start = time.perf_counter()
        log.info("stage %s: starting", name)
        results[name] = RUNNERS[name](stage_config(cfg, name))
        log.info("stage %s: done in %.1f s: %s", name, time.perf_counter() - start, results[name])
    return results
