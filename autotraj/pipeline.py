"""`autotraj run`: the stages in order, in one run directory, each cached by its inputs.

`PipelineConfig` holds one section per stage (the same config classes the single-stage commands
take) and the run directory they all share.

The eval stage evaluates each model of `eval_models` with the `eval` section: `base` (the model
`eval.generator.model` names, the policy before training), `sft` (`<run_dir>/sft/model`) and
`rl` (`<run_dir>/rl/model`), each into `<run_dir>/eval/<model>/`, and returns the comparison
table (`eval_summary.render_table`), also written to `<run_dir>/eval/table.txt`.

Caching. Every stage gets a key: the sha256 of its resolved config, of the content of every local
file its config names (a queries file, a benchmark file, a corpus), and of the keys of the stages
it reads from (`UPSTREAM`). The key is written to `<stage dir>/pipeline_key.json` when the stage
starts. On the next run a stage whose folder holds the same key is resumed (a finished stage is a
no-op: each stage detects its own finished output); a folder holding another key is stale, since
its config, an input file or an upstream stage changed, and is moved to `<run_dir>/stale/` (never
deleted) before the stage runs again. A change therefore invalidates exactly the stages
downstream of it. Each evaluated model is keyed on its own: the base model's evaluation does not
depend on training, `sft`'s on the sft stage, `rl`'s on the rl stage.

Not here: what any stage computes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from autotraj.build import BuildConfig, run_build
from autotraj.config import ConfigError, to_dict
from autotraj.eval_summary import render_table
from autotraj.evaluate import EvalConfig, run_eval
from autotraj.io import file_sha256, relocatable, write_json_atomic, write_text_atomic
from autotraj.repair import RepairConfig, run_repair
from autotraj.score import ScoreConfig, run_score
from autotraj.synthesize import SynthesizeConfig, run_synthesize
from autotraj.train.grpo import RESUMABLE_CHANGES, RlConfig, run_rl
from autotraj.train.reward_model import RmConfig, run_rm
from autotraj.train.sft import SftConfig, run_sft

log = logging.getLogger(__name__)

StageName = Literal["synthesize", "score", "repair", "build", "sft", "rm", "rl", "eval"]
ORDER: tuple[StageName, ...] = (
    "synthesize",
    "score",
    "repair",
    "build",
    "sft",
    "rm",
    "rl",
    "eval",
)
EvalModel = Literal["base", "sft", "rl"]
RUNNERS: dict[StageName, Callable[[Any], dict[str, Any]]] = {
    "synthesize": run_synthesize,
    "score": run_score,
    "repair": run_repair,
    "build": run_build,
    "sft": run_sft,
    "rm": run_rm,
    "rl": run_rl,
    "eval": run_eval,  # once per model of `eval_models`
}
# The stages whose output each stage reads (rm starts from the SFT model; rl reads the SFT model,
# the reward model and the synthesized queries).
# The eval stage is keyed per model instead (`eval_configs`).
UPSTREAM: dict[StageName, tuple[StageName, ...]] = {
    "synthesize": (),
    "score": ("synthesize",),
    "repair": ("synthesize", "score"),
    "build": ("score", "repair"),
    "sft": ("build",),
    "rm": ("build", "sft"),
    "rl": ("synthesize", "sft", "rm"),
}
# Fields a stage may change and still resume its own output (not part of its key).
KEY_EXEMPT: dict[StageName, tuple[str, ...]] = {"rl": RESUMABLE_CHANGES}
KEY_FILE = "pipeline_key.json"


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    # models the eval stage evaluates: base = eval.generator.model, sft/rl = this run's models
    eval_models: tuple[EvalModel, ...] = ("base", "sft", "rl")


def stage_config(cfg: PipelineConfig, name: StageName) -> Any:
    """A stage's section with the pipeline's run directory."""
    section = getattr(cfg, name)
    default_dir = type(section)().run_dir
    if section.run_dir not in (default_dir, cfg.run_dir):
        raise ConfigError(
            f"{name}.run_dir is {section.run_dir!r}: in a pipeline set run_dir once at the top level"
        )
    return dataclasses.replace(section, run_dir=cfg.run_dir)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def config_key(config: dict[str, Any], upstream: list[str]) -> str:
    """The cache key of a stage config: its values, its local input files' content, upstream keys.
    Paths inside the run directory count relative to it (a moved run directory keeps its keys)."""
    files = {s: file_sha256(s) for s in sorted(set(_strings(config))) if s and Path(s).is_file()}
    payload = {"config": config, "files": files, "upstream": upstream}
    if isinstance(config.get("run_dir"), str):
        payload = relocatable(payload, config["run_dir"])
    payload = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def stage_keys(cfg: PipelineConfig) -> dict[StageName, str]:
    """Every stage's cache key but eval's, in pipeline order (stages not selected included, as
    inputs)."""
    keys: dict[StageName, str] = {}
    for name in UPSTREAM:
        config = to_dict(stage_config(cfg, name))
        config = {k: v for k, v in config.items() if k not in KEY_EXEMPT.get(name, ())}
        keys[name] = config_key(config, [keys[u] for u in UPSTREAM[name]])
    return keys


def claim_stage_dir(run_dir: Path, out_dir: Path, key: str) -> None:
    """Make `out_dir` hold the output of `key`: a folder of another key is moved to stale/.

    A folder without a key file (written by a single-stage command) is adopted as it is; the
    stage's own config check still refuses to mix configs.
    """
    key_file = out_dir / KEY_FILE
    if key_file.is_file():
        old = json.loads(key_file.read_text(encoding="utf-8"))["key"]
        if old == key:
            return
        stale = run_dir / "stale" / f"{out_dir.relative_to(run_dir).as_posix().replace('/', '-')}"
        target = Path(f"{stale}-{old[:12]}-{time.strftime('%Y%m%d-%H%M%S')}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(out_dir, target)
        log.warning("%s is stale (its inputs or config changed); moved to %s", out_dir, target)
    elif out_dir.exists():
        log.info("%s has no pipeline key; adopting it", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(key_file, {"key": key})


def eval_configs(
    cfg: PipelineConfig, keys: dict[StageName, str]
) -> dict[str, tuple[EvalConfig, str]]:
    """(EvalConfig, cache key) of every model in `eval_models`, by model name."""
    base = stage_config(cfg, "eval")
    out: dict[str, tuple[EvalConfig, str]] = {}
    for model in dict.fromkeys(cfg.eval_models):
        path = base.generator.model if model == "base" else str(Path(cfg.run_dir) / model / "model")
        ecfg = dataclasses.replace(
            base, name=model, generator=dataclasses.replace(base.generator, model=path)
        )
        upstream = [] if model == "base" else [keys[model], _exempt_values(cfg, model)]
        out[model] = (ecfg, config_key(to_dict(ecfg), upstream))
    return out


def _exempt_values(cfg: PipelineConfig, name: StageName) -> str:
    """The fields left out of a stage's key (`KEY_EXEMPT`): they change what the stage produces
    (more RL steps, another model), so they belong in the keys of the stages that read it."""
    config = to_dict(stage_config(cfg, name))
    return json.dumps({k: config[k] for k in KEY_EXEMPT.get(name, ())}, sort_keys=True)


def _run_evals(cfg: PipelineConfig, keys: dict[StageName, str]) -> dict[str, Any]:
    """Evaluate every model of `eval_models`; their accuracies and the comparison table."""
    run_dir = Path(cfg.run_dir)
    summaries = []
    for model, (ecfg, key) in eval_configs(cfg, keys).items():
        claim_stage_dir(run_dir, run_dir / "eval" / model, key)
        summaries.append(RUNNERS["eval"](ecfg))
    table = render_table(summaries)
    write_text_atomic(run_dir / "eval" / "table.txt", table + "\n")
    return {
        "models": {
            s["name"]: {k: s["average"][k] for k in ("accuracy", "mean_tokens")} for s in summaries
        },
        "table": table,
    }


def run_pipeline(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """Run the selected stages in order; return each stage's counts (eval: the table too)."""
    run_dir = Path(cfg.run_dir)
    keys = stage_keys(cfg)
    results: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        if name not in cfg.stages:
            continue
        start = time.perf_counter()
        log.info("stage %s: starting", name)
        if name == "eval":
            results[name] = _run_evals(cfg, keys)
        else:
            claim_stage_dir(run_dir, run_dir / name, keys[name])
            results[name] = RUNNERS[name](stage_config(cfg, name))
        log.info("stage %s: done in %.1f s", name, time.perf_counter() - start)
    return results
