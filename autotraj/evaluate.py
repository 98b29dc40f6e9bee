"""Stage: benchmarks -> one graded rollout per (benchmark, question, seed) and a summary.

Evaluation uses THE rollout loop and tools of training (METHOD.md section 11): greedy decoding by
default, the Python sandbox, search over a local BM25 index or a remote retriever. Benchmarks
are anything `querysets.load_queries` accepts (a local file, a known benchmark or Hub name), the
first `limit` questions or a seeded random sample of them (`sample_seed`). With temperature > 0
each seed of `seeds` is one full pass and every metric is the mean over seeds (the per-seed values
are kept); `rollout.seed` is replaced by each seed in turn.

Output, under `<run_dir>/eval/<name>/`: `results.jsonl` (one `eval_summary.EvalResult` per item:
the question, gold answers, the full trajectory, the extracted answer, correct, EM/F1 for QA,
lengths, tool calls and their failures, format validity, finish reason), `summary.json` (schema
in eval_summary.py and docs/eval.md), `benchmarks.json` (fingerprints of the evaluated questions),
`metrics.jsonl`, `config.resolved.yaml`, `manifest.json`.

Search: `tools.search` as in every stage; or leave `tools.search.index_dir` empty, set `corpus`
to a JSONL corpus and the stage builds a BM25 index of it once into `<run_dir>/index` (reused
while the corpus is unchanged).

Resumable like synthesize: results are appended chunk by chunk, a re-run skips the items already
on disk, a finished eval is a no-op, another config (or a changed benchmark file) in the same
folder is refused. Rollouts ended by an infrastructure failure are not written; the stage raises
`StageIncomplete` at the end so that they are retried by the next run.

Not here: metric definitions and the comparison table (eval_summary.py), the HTML report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm import tqdm

from autotraj import run_dir as layout
from autotraj.config import ConfigError, to_dict
from autotraj.eval_summary import EvalResult, grade_result, summarize_results
from autotraj.grading import Checker, qa_rule
from autotraj.io import (
    DataError,
    ResumableJsonl,
    check_same_config,
    file_sha256,
    load_records,
    write_json_atomic,
    write_manifest,
)
from autotraj.metrics import MetricsLog
from autotraj.models.generator import Generator
from autotraj.models.loading import GeneratorConfig, load_generator
from autotraj.records import Query
from autotraj.rollout import RolloutConfig, rollout
from autotraj.run_dir import StageIncomplete
from autotraj.tools.toolbox import ToolsConfig, close_tools, open_tools

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchmarkConfig:
    name: str = ""  # label in results and summary (e.g. "gsm8k"); no "/"
    path: str = ""  # anything load_queries accepts: a local file, "gsm8k", "owner/name:config"
    kind: Literal["math", "qa"] | None = None  # None: the source's or row's kind
    split: str | None = None  # Hub datasets / saved DatasetDicts
    limit: int | None = None  # evaluate `limit` questions (None: all)
    sample_seed: int | None = None  # None: the first `limit`; else a seeded random sample


@dataclass(frozen=True)
class EvalConfig:
    run_dir: str = "runs/default"
    name: str = "base"  # label of the evaluated model: output in <run_dir>/eval/<name>/
    benchmarks: tuple[BenchmarkConfig, ...] = ()
    seeds: tuple[int, ...] = (0,)  # one pass per seed; more than one needs temperature > 0
    # grading.py; "release"/"release_repair": the authors' checkers (release_checker.py)
    checker: Checker = "default"
    batch_queries: int = 32  # trajectories rolled out together
    corpus: str = ""  # a JSONL corpus to index into <run_dir>/index (tools.search.backend: bm25)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    # Release evaluation: greedy decoding, up to 1024 new tokens per segment (METHOD.md 11).
    rollout: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(temperature=0.0, top_p=1.0)
    )
    tools: ToolsConfig = field(default_factory=ToolsConfig)


@dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark: its questions and the fingerprints recorded in the summary."""

    config: BenchmarkConfig
    queries: tuple[Query, ...]
    file_sha256: str | None
    queries_sha256: str

    def source(self) -> dict[str, Any]:
        return {
            **to_dict(self.config),
            "file_sha256": self.file_sha256,
            "queries_sha256": self.queries_sha256,
            # the official QA rule(s) its answers were graded with (grading.qa_rule)
            "qa_rules": sorted({qa_rule(q) for q in self.queries if q.kind == "qa"}),
        }


def stage_dir(cfg: EvalConfig) -> Path:
    return layout.stage_dir(cfg.run_dir, "eval") / cfg.name


def check_config(cfg: EvalConfig) -> None:
    """Raise `ConfigError` for a config that cannot be evaluated."""
    if not cfg.name or cfg.name in (".", "..") or "/" in cfg.name or "\\" in cfg.name:
        raise ConfigError(f"eval: name must be a plain folder name, got {cfg.name!r}")
    if not cfg.benchmarks:
        raise ConfigError("eval: list at least one benchmark under 'benchmarks'")
    names = [b.name for b in cfg.benchmarks]
    for i, b in enumerate(cfg.benchmarks):
        if not b.name or "/" in b.name:
            raise ConfigError(f"eval: benchmarks[{i}].name must be set and contain no '/'")
        if not b.path:
            raise ConfigError(f"eval: benchmarks[{i}] ({b.name}): set 'path'")
        if b.limit is not None and b.limit < 1:
            raise ConfigError(f"eval: benchmarks[{i}] ({b.name}): limit must be >= 1")
        if names.count(b.name) > 1:
            raise ConfigError(f"eval: benchmark name {b.name!r} is used twice")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"eval: seeds must be distinct and non-empty, got {list(cfg.seeds)}")
    if len(cfg.seeds) > 1 and cfg.rollout.temperature <= 0:
        raise ConfigError(
            "eval: greedy decoding (rollout.temperature 0) gives the same result for every "
            "seed; use one seed or set rollout.temperature > 0"
        )
    if cfg.batch_queries < 1:
        raise ConfigError(f"eval: batch_queries must be >= 1, got {cfg.batch_queries}")
    if cfg.corpus and cfg.tools.search.backend != "bm25":
        raise ConfigError("eval: 'corpus' is indexed for tools.search.backend=bm25 only")
    if cfg.corpus and cfg.tools.search.index_dir:
        raise ConfigError("eval: set either 'corpus' or tools.search.index_dir, not both")


def load_benchmark(cfg: BenchmarkConfig) -> Benchmark:
    """The questions of one benchmark: the first `limit`, or a seeded sample of `limit`."""
    from autotraj.querysets import load_queries

    try:
        if cfg.sample_seed is None:
            queries = load_queries(cfg.path, kind=cfg.kind, split=cfg.split, limit=cfg.limit)
        else:
            queries = load_queries(cfg.path, kind=cfg.kind, split=cfg.split)
            if cfg.limit is not None and cfg.limit < len(queries):
                picked = random.Random(cfg.sample_seed).sample(range(len(queries)), cfg.limit)
                queries = [queries[i] for i in sorted(picked)]
    except DataError as e:
        raise DataError(f"benchmark {cfg.name}: {e}") from e
    if not queries:
        raise DataError(f"benchmark {cfg.name}: {cfg.path} holds no questions")
    canonical = json.dumps([q.to_dict() for q in queries], sort_keys=True, ensure_ascii=False)
    return Benchmark(
        config=cfg,
        queries=tuple(queries),
        file_sha256=file_sha256(cfg.path) if Path(cfg.path).is_file() else None,
        queries_sha256=hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
    )


def _check_same_benchmarks(out_dir: Path, benchmarks: list[Benchmark]) -> None:
    """Save the evaluated questions' fingerprints, or refuse a folder holding others."""
    fingerprints = {b.config.name: b.queries_sha256 for b in benchmarks}
    saved = out_dir / "benchmarks.json"
    if saved.exists():
        before = json.loads(saved.read_text(encoding="utf-8"))
        changed = sorted(
            k for k in fingerprints.keys() | before.keys() if before.get(k) != fingerprints.get(k)
        )
        if changed:
            raise ConfigError(
                f"{out_dir}: the questions of benchmark(s) {changed} changed since this eval "
                f"started (compare {saved}); use another name or delete that folder"
            )
    else:
        write_json_atomic(saved, fingerprints)


def search_tools(cfg: EvalConfig) -> tuple[ToolsConfig, dict[str, Any] | None]:
    """The tools to open (with the BM25 index built from `corpus` if set) and the index meta."""
    search = cfg.tools.search
    if cfg.corpus:
        from autotraj.tools.search import build_index

        corpus, index_dir = Path(cfg.corpus), Path(cfg.run_dir) / "index"
        if not corpus.is_file():
            raise DataError(f"{corpus}: no such corpus file")
        meta_path = index_dir / "meta.json"
        if not meta_path.is_file():
            log.info("building the BM25 index of %s into %s", corpus, index_dir)
            build_index(corpus, index_dir)
        elif json.loads(meta_path.read_text(encoding="utf-8"))["sha256"] != file_sha256(corpus):
            raise ConfigError(
                f"{index_dir} indexes another corpus than {corpus}; delete it to rebuild"
            )
        search = replace(search, index_dir=str(index_dir))
    if search.backend != "bm25":
        return cfg.tools, None
    meta_path = Path(search.index_dir) / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else None
    return replace(cfg.tools, search=search), meta


Item = tuple[str, str, int, Query]  # (result id, benchmark name, seed, query)


def run_eval(cfg: EvalConfig, generator: Generator | None = None) -> dict[str, Any]:
    """Run (or resume) the evaluation and return the summary (also in summary.json).

    `generator` replaces the configured one (library use and tests); it needs a `tokenizer`.
    """
    check_config(cfg)
    out_dir = stage_dir(cfg)
    check_same_config(out_dir, yaml.safe_dump(to_dict(cfg), sort_keys=True))
    benchmarks = [load_benchmark(b) for b in cfg.benchmarks]
    _check_same_benchmarks(out_dir, benchmarks)
    out = ResumableJsonl(out_dir / "results.jsonl", key=lambda row: row["id"])
    summary_path = out_dir / "summary.json"
    if out.finished and summary_path.exists():
        log.info("%s is finished; nothing to do", summary_path)
        return json.loads(summary_path.read_text(encoding="utf-8"))
    items: list[Item] = [
        (f"{b.config.name}/{q.id}/s{seed}", b.config.name, seed, q)
        for seed in cfg.seeds
        for b in benchmarks
        for q in b.queries
    ]
    stray = set(out.done) - {item[0] for item in items}
    if stray:
        raise ConfigError(
            f"{out.path}: holds results for items not in the benchmarks (e.g. {min(stray)}); "
            "delete that folder to start afresh"
        )
    todo = [item for item in items if item[0] not in out.done]
    log.info("%d items: %d done, %d to evaluate", len(items), len(items) - len(todo), len(todo))
    if any(q.kind == "qa" for *_, q in todo) and cfg.tools.search.backend == "none":
        log.warning("QA benchmarks without a search tool: the model is told search is unavailable")
    tools_cfg, index_meta = search_tools(cfg)
    infra_errors = 0
    if todo:
        generator = generator or load_generator(cfg.generator, role="policy")
        infra_errors = _generate(cfg, tools_cfg, generator, todo, out)
    if infra_errors:
        raise StageIncomplete(
            f"{infra_errors} rollouts hit infrastructure failures and were not written; "
            "re-run the same command to retry them"
        )
    out.finish()
    results = load_records(out.path, EvalResult.from_dict)
    summary = _summary(cfg, benchmarks, results, index_meta)
    inputs: dict[str, str | Path] = {b.config.name: b.config.path for b in benchmarks}
    if cfg.corpus:
        inputs["corpus"] = cfg.corpus
    counts = {"results": len(results), "generated": len(todo)}
    manifest = write_manifest(
        out_dir, stage="eval", config=to_dict(cfg), inputs=inputs, counts=counts
    )
    summary.update(git_sha=manifest["git_sha"], versions=manifest["versions"])
    write_json_atomic(summary_path, summary)
    return summary


def _generate(
    cfg: EvalConfig,
    tools_cfg: ToolsConfig,
    generator: Generator,
    todo: list[Item],
    out: ResumableJsonl,
) -> int:
    """Roll out and grade every item to do, chunk by chunk; return the infra-failed count."""
    tools = open_tools(tools_cfg)
    metrics = MetricsLog(stage_dir(cfg) / "metrics.jsonl")
    infra_errors = step = 0
    try:
        with tqdm(total=len(todo), desc=f"eval {cfg.name}", unit="traj") as bar:
            for seed in cfg.seeds:
                mine = [item for item in todo if item[2] == seed]
                rollout_cfg = replace(cfg.rollout, seed=seed)
                for start in range(0, len(mine), cfg.batch_queries):
                    chunk = mine[start : start + cfg.batch_queries]
                    began = time.perf_counter()
                    trajectories = rollout(
                        generator,
                        tools,
                        generator.tokenizer,
                        [(result_id, q) for result_id, _, _, q in chunk],
                        rollout_cfg,
                        role="policy",
                        progress=bar.update,
                    )
                    results = [
                        grade_result(t, q, name, seed, generator.tokenizer, cfg.checker)
                        for t, (_, name, _, q) in zip(trajectories, chunk, strict=True)
                        if t.finish_reason != "infra_error"
                    ]
                    out.append([r.to_dict() for r in results])
                    infra_errors += len(chunk) - len(results)
                    metrics.write(step, _chunk_metrics(results, time.perf_counter() - began))
                    step += 1
    finally:
        close_tools(tools)
    return infra_errors


def _chunk_metrics(results: list[EvalResult], seconds: float) -> dict[str, float]:
    n = max(1, len(results))
    return {
        "eval/speed/trajectories_per_min": 60 * len(results) / max(seconds, 1e-9),
        "eval/speed/seconds": seconds,
        "eval/chunk/accuracy": sum(r.correct for r in results) / n,
        "eval/chunk/mean_tokens": sum(r.tokens for r in results) / n,
        "eval/chunk/tool_calls_per_trajectory": sum(r.tool_calls for r in results) / n,
        **{
            f"eval/finish/{reason}": count
            for reason, count in Counter(r.finish_reason for r in results).items()
        },
    }


def _summary(
    cfg: EvalConfig,
    benchmarks: list[Benchmark],
    results: list[EvalResult],
    index_meta: dict[str, Any] | None,
) -> dict[str, Any]:
    """summary.json without the manifest's git SHA and versions (schema: eval_summary.py)."""
    names = [b.config.name for b in benchmarks]
    expected = sum(len(b.queries) for b in benchmarks) * len(cfg.seeds)
    if len(results) != expected or len({r.id for r in results}) != expected:
        raise DataError(
            f"{stage_dir(cfg) / 'results.jsonl'}: {len(results)} results for {expected} items"
        )
    metrics = summarize_results(results, names, cfg.seeds)
    for b in benchmarks:
        metrics["benchmarks"][b.config.name]["file_sha256"] = b.file_sha256
    metrics["average"]["file_sha256"] = None
    r = cfg.rollout
    return {
        "name": cfg.name,
        "model": cfg.generator.model,
        "generator": to_dict(cfg.generator),
        "seeds": list(cfg.seeds),
        "decoding": {
            "temperature": r.temperature,
            "top_p": r.top_p,
            "max_new_tokens": r.max_new_tokens,
            "max_response_tokens": r.max_response_tokens,
            "max_tool_calls": r.max_tool_calls,
            "demonstrations": r.demonstrations,
            "checker": cfg.checker,
        },
        **metrics,
        "sources": {b.config.name: b.source() for b in benchmarks},
        "search_index": index_meta,
    }


def load_summary(path: str | Path) -> dict[str, Any]:
    """Read a summary.json (a file, or an eval folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise DataError(f"{path}: no such summary; run `autotraj eval` first")
    summary = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in ("name", "benchmarks", "average") if k not in summary]
    if missing:
        raise DataError(f"{path}: not an eval summary (missing {missing})")
    return summary
