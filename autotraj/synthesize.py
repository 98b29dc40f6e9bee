"""Stage 1: training queries -> N candidate trajectories per query, with real tool execution.

Reads queries (a local file or a Hub dataset), removes any that appear in the evaluation sets,
and rolls out `n` candidates per query through the batched rollout engine (METHOD.md section 3:
N = 2, temperature 0.3, top_p 0.9 in the release). Output, under `<run_dir>/synthesize/`:
`queries.jsonl`, `trajectories.jsonl`, `metrics.jsonl`, `config.resolved.yaml`, `manifest.json`.

Resumable: trajectories are appended chunk by chunk; a re-run skips every trajectory id already
on disk and a finished stage is a no-op. Trajectories ended by an infrastructure failure are not
written; they are retried by the next run, and the stage raises `StageIncomplete` so the failure
is not missed. A tool failure affects single calls, so the stage goes on with the next chunks; a
generator failure (the endpoint is down after its retries) stops the stage after writing what
that chunk finished, since every later chunk would wait out the same retries.

Not here: grading or scoring the candidates (score stage).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from tqdm import tqdm

from autotraj.config import ConfigError, to_dict
from autotraj.io import (
    DataError,
    ResumableJsonl,
    check_same_config,
    write_jsonl_atomic,
    write_manifest,
)
from autotraj.metrics import MetricsLog
from autotraj.models.generator import Generator
from autotraj.models.loading import GeneratorConfig, load_generator
from autotraj.records import Query, Trajectory
from autotraj.rollout import RolloutConfig, generator_failed, rollout
from autotraj.run_dir import StageIncomplete, record_path
from autotraj.tools.toolbox import ToolsConfig, close_tools, open_tools

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthesizeConfig:
    queries: str = ""  # a local .jsonl/.json/.parquet file, a save_to_disk folder, or a Hub name
    kind: Literal["math", "qa"] | None = None  # None: inferred per row
    split: str | None = None
    limit: int | None = None  # first N queries (after decontamination)
    n: int = 2  # release: 2 candidates per query
    run_dir: str = "runs/default"
    chunk_queries: int = 8  # queries rolled out together (n trajectories each)
    decontaminate: bool = True  # drop queries whose question is in an evaluation set
    eval_sets: tuple[str, ...] = ()  # extra local benchmark files to decontaminate against
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)


def stage_dir(cfg: SynthesizeConfig) -> Path:
    return record_path(cfg.run_dir, "trajectories").parent


def load_training_queries(cfg: SynthesizeConfig) -> tuple[list[Query], int]:
    """Queries to synthesize for, decontaminated against the evaluation sets."""
    from autotraj.querysets import decontaminate, load_eval_hashes, load_queries

    if not cfg.queries:
        raise ConfigError("synthesize: set 'queries' to a local file or a Hub dataset name")
    queries = load_queries(cfg.queries, kind=cfg.kind, split=cfg.split)
    if not queries:
        raise DataError(f"{cfg.queries}: no queries (an empty file?)")
    removed = 0
    if cfg.decontaminate:
        queries, removed = decontaminate(queries, load_eval_hashes(cfg.eval_sets))
        log.info("decontamination removed %d queries that appear in evaluation sets", removed)
    if cfg.limit is not None:
        queries = queries[: cfg.limit]
    return queries, removed


def run_synthesize(cfg: SynthesizeConfig, generator: Generator | None = None) -> dict[str, int]:
    """Run (or resume) the stage and return its counts.

    `generator` replaces the configured one (library use and tests); it needs a `tokenizer`.
    """
    if cfg.n < 1:
        raise ConfigError(f"synthesize: n must be >= 1, got {cfg.n}")
    out_dir = stage_dir(cfg)
    check_same_config(out_dir, yaml.safe_dump(to_dict(cfg), sort_keys=True))
    out = ResumableJsonl(record_path(cfg.run_dir, "trajectories"), key=lambda row: row["id"])
    if out.finished:
        log.info("%s is finished; nothing to do", out.path)
        return {"trajectories": len(out.done), "generated": 0}
    queries, removed = load_training_queries(cfg)
    write_jsonl_atomic(record_path(cfg.run_dir, "queries"), (q.to_dict() for q in queries))
    items = [(f"{q.id}/s{k}", q) for q in queries for k in range(cfg.n)]
    todo = [item for item in items if item[0] not in out.done]
    log.info(
        "%d queries x %d candidates: %d done, %d to generate",
        len(queries),
        cfg.n,
        len(items) - len(todo),
        len(todo),
    )
    counts: Counter[str] = Counter()
    first_error = ""
    if todo:
        generator = generator or load_generator(cfg.generator, role="teacher")
        counts, first_error = _generate(
            cfg, generator, todo, out, MetricsLog(out_dir / "metrics.jsonl")
        )
    if counts["infra_error"] or counts["not_started"]:
        raise StageIncomplete(
            f"{counts['infra_error']} trajectories hit infrastructure failures and were not "
            f"written ({counts['not_started']} more not started); re-run the same command to "
            f"retry them. First failure: {first_error}"
        )
    out.finish()
    summary = {
        "queries": len(queries),
        "decontaminated": removed,
        "trajectories": len(out.done),
        "generated": counts["written"],
    }
    write_manifest(
        out_dir,
        stage="synthesize",
        config=to_dict(cfg),
        inputs={"queries": cfg.queries},
        counts=summary,
    )
    return summary


def _generate(
    cfg: SynthesizeConfig,
    generator: Generator,
    todo: list[tuple[str, Query]],
    out: ResumableJsonl,
    metrics: MetricsLog,
) -> tuple[Counter[str], str]:
    """Roll out `todo` chunk by chunk; return the counts and the first infrastructure error."""
    tools = open_tools(cfg.tools)
    counts: Counter[str] = Counter()
    first_error = ""
    chunk = max(1, cfg.chunk_queries * cfg.n)
    try:
        with tqdm(total=len(todo), desc="synthesize", unit="traj") as bar:
            for start in range(0, len(todo), chunk):
                began = time.perf_counter()
                trajectories = rollout(
                    generator,
                    tools,
                    generator.tokenizer,
                    todo[start : start + chunk],
                    cfg.rollout,
                    role="teacher",
                    progress=bar.update,
                )
                kept = [t for t in trajectories if t.finish_reason != "infra_error"]
                out.append([t.to_dict() for t in kept])
                counts["written"] += len(kept)
                counts["infra_error"] += len(trajectories) - len(kept)
                failed = [t.error for t in trajectories if t.finish_reason == "infra_error"]
                first_error = first_error or (failed[0] if failed else "")
                metrics.write(
                    start // chunk, _chunk_metrics(trajectories, time.perf_counter() - began)
                )
                if any(generator_failed(t) for t in trajectories):
                    counts["not_started"] = max(0, len(todo) - start - chunk)
                    break
    finally:
        close_tools(tools)
    return counts, first_error


def _chunk_metrics(trajectories: list[Trajectory], seconds: float) -> dict[str, float]:
    calls = [c for t in trajectories for c in t.tool_calls]
    values: dict[str, float] = {
        "synthesize/speed/trajectories_per_min": 60 * len(trajectories) / max(seconds, 1e-9),
        "synthesize/speed/seconds": seconds,
        "synthesize/tools/calls_per_trajectory": len(calls) / max(1, len(trajectories)),
    }
    for status, n in Counter(c.status for c in calls).items():
        values[f"synthesize/tools/{status}_rate"] = n / max(1, len(calls))
    for reason, n in Counter(t.finish_reason for t in trajectories).items():
        values[f"synthesize/finish/{reason}"] = n
    return values
