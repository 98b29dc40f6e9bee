"""Stage: scored candidates and accepted repairs -> the SFT set and the preference set.

What it does (METHOD.md section 7): reads, under `<run_dir>/`,
`synthesize/queries.jsonl`, `synthesize/trajectories.jsonl`, `score/scores.jsonl`,
`repair/repairs.jsonl` and (if present) `repair/hard_cases.jsonl`, checks that they agree, and
writes under `<run_dir>/build/`:
- `sft.jsonl`: one `SftRecord` per HQ trajectory and per accepted repair: the standard
  conversation (`render.chat_messages`) plus the assistant reply (the trajectory's full text,
  tool results kept in the text) and the `Trajectory` itself, so training can render the exact
  token ids with tool-result spans masked (render.render_trajectory).
- `preferences.jsonl`: one `PreferencePair` per accepted repair: chosen = the repair,
  rejected = its original, both answering the same prompt.
- `sft_hf/`, `preferences_hf/` (`save_hf`): the same records as Hugging Face datasets
  (`datasets.load_from_disk`), nested trajectories stored as JSON strings; `push_to_hub` also
  pushes them to a Hub dataset repo (configs "sft" and "preferences").
- `manifest.json` with the counts per partition and per source, `config.resolved.yaml`.

A finished build with the same config and unchanged inputs is a no-op (`push_to_hub` is not part
of that comparison: re-running with it pushes the existing build). Changed inputs are refused
(run_dir.py's rule).

Not here: scoring (quality.py, score stage), repairing (repair stage), training (train/).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from autotraj.config import to_dict
from autotraj.flaws import flaws
from autotraj.io import (
    DataError,
    check_same_config,
    write_jsonl_atomic,
    write_manifest,
)
from autotraj.records import Message, PreferencePair, Repair, SftRecord, SftSource, Trajectory
from autotraj.render import chat_messages
from autotraj.run_dir import (
    RecordFile,
    RunFiles,
    check_same_inputs,
    check_unique_ids,
    finished_counts,
    load_preference_pairs,
    load_sft_records,
    read_run_files,
    record_path,
    require_records,
)

log = logging.getLogger(__name__)

# Which records an SFT set holds: AutoTraj's (HQ + verified repairs) and the ablation baselines
# (METHOD.md section 6b): HQ only, every correct candidate (rejection sampling), every candidate.
SftData = Literal["autotraj", "hq", "correct", "all"]
SFT_FILES: dict[SftData, str] = {
    "autotraj": "sft.jsonl",
    "hq": "sft_hq.jsonl",
    "correct": "sft_correct.jsonl",
    "all": "sft_all.jsonl",
}
# The sets that must be clean (flaws.flaws) record by record; the baselines are not, on purpose.
CLEAN_SETS: frozenset[SftData] = frozenset({"autotraj", "hq"})
REPAIR_SOURCE: dict[str, SftSource] = {"AC-LQ": "repair:AC-LQ", "AW": "repair:AW"}
T = TypeVar("T")


@dataclass(frozen=True)
class BuildConfig:
    run_dir: str = "runs/default"
    # A Hub dataset repo id ("user/name") to push both sets to; only when a user asks for it.
    push_to_hub: str | None = None
    save_hf: bool = True  # also write sft_hf/ and preferences_hf/ with save_to_disk
    # The system prompt of the SFT/preference prompts. None: the synthesize stage's
    # rollout.system_prompt (the packaged protocol prompt when that is unset too).
    system_prompt: str | None = None
    # Baseline SFT sets to write beside sft.jsonl for the ablation (`autotraj ablate`):
    # sft_hq.jsonl, sft_correct.jsonl, sft_all.jsonl (JSONL only).
    extra_sets: tuple[Literal["hq", "correct", "all"], ...] = ()
    # False: the sets' trajectories are written as text only (Trajectory.text_only: no prompt
    # or segment token ids), so a student whose tokenizer differs from the generator's can train
    # on them (distillation from another model family); the exact generated ids are given up.
    keep_token_ids: bool = True


def stage_dir(cfg: BuildConfig) -> Path:
    return record_path(cfg.run_dir, "sft").parent


def input_paths(run_dir: str | Path) -> dict[str, Path]:
    """The record files the build reads (run_dir.RECORD_FILES); hard_cases.jsonl may be absent."""
    names: tuple[RecordFile, ...] = ("queries", "trajectories", "scores", "repairs", "hard_cases")
    return {name: record_path(run_dir, name) for name in names}


# ---------------------------------------------------------------------------------------------
# Reading and checking the inputs


def load_inputs(run_dir: str | Path) -> RunFiles:
    """Read the five stage files (hard_cases.jsonl may be absent) and check that they agree."""
    inputs = read_run_files(run_dir, optional=frozenset({"hard_cases"}))
    check_inputs(inputs, input_paths(run_dir))
    return inputs


def check_inputs(inputs: RunFiles, paths: dict[str, Path]) -> None:
    """Every reference resolves: trajectory -> query, score -> trajectory, repair -> original."""
    for t in inputs.trajectories.values():
        if t.query_id not in inputs.queries:
            raise DataError(
                f"{paths['trajectories']}: trajectory {t.id}: unknown query {t.query_id!r}"
            )
    for tid, row in inputs.scores.items():
        original = inputs.trajectories.get(tid)
        if original is None:
            raise DataError(f"{paths['scores']}: score of unknown trajectory {tid!r}")
        if row.quality.query_id != original.query_id:
            raise DataError(
                f"{paths['scores']}: trajectory {tid}: query {row.quality.query_id!r} in the "
                f"score, {original.query_id!r} in the trajectory"
            )
    known = set(inputs.trajectories)
    for repair in inputs.repairs.values():
        _check_repair(repair, inputs, paths["repairs"])
        if repair.trajectory.id in known:
            raise DataError(
                f"{paths['repairs']}: repair of {repair.original_id}: id "
                f"{repair.trajectory.id!r} is already used by another trajectory or repair"
            )
        known.add(repair.trajectory.id)
    for case in inputs.hard_cases:
        if case.original_id not in inputs.trajectories:
            raise DataError(
                f"{paths['hard_cases']}: hard case of unknown trajectory {case.original_id!r}"
            )


def _check_repair(repair: Repair, inputs: RunFiles, path: Path) -> None:
    where = f"{path}: repair of {repair.original_id}"
    original = inputs.trajectories.get(repair.original_id)
    if original is None:
        raise DataError(f"{where}: the original is not in synthesize/trajectories.jsonl")
    score = inputs.scores.get(repair.original_id)
    if score is None:
        raise DataError(f"{where}: the original has no score in score/scores.jsonl")
    if score.quality.label != repair.label:
        raise DataError(
            f"{where}: labelled {repair.label} but the original is {score.quality.label}"
        )
    fixed = repair.trajectory
    if fixed.parent_id != repair.original_id:
        raise DataError(f"{where}: the repair's parent_id is {fixed.parent_id!r}")
    check_same_prompt(original, fixed, where)


def check_same_prompt(original: Trajectory, repair: Trajectory, where: str) -> None:
    """A repair answers its original's prompt: same query, and the same prompt ids if both have
    them (a repair generated from the repairer's prompt must leave `prompt_ids` empty)."""
    if repair.query_id != original.query_id:
        raise DataError(
            f"{where}: the repair answers query {repair.query_id!r}, "
            f"the original {original.query_id!r}"
        )
    if original.prompt_ids and repair.prompt_ids and original.prompt_ids != repair.prompt_ids:
        raise DataError(f"{where}: the repair's prompt_ids differ from the original's")


def synthesize_system_prompt(run_dir: str | Path) -> str | None:
    """rollout.system_prompt of the synthesize stage's resolved config (None when unset)."""
    saved = Path(run_dir) / "synthesize" / "config.resolved.yaml"
    if not saved.is_file():
        return None
    resolved = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    return (resolved.get("rollout") or {}).get("system_prompt")


# ---------------------------------------------------------------------------------------------
# Building the two sets


def prompt_messages(question: str, system_prompt: str | None) -> tuple[Message, ...]:
    """[system, user] of the standard conversation (render.chat_messages)."""
    return tuple(Message.from_dict(m) for m in chat_messages(question, system_prompt))


def sft_records(
    inputs: RunFiles,
    system_prompt: str | None = None,
    data: SftData = "autotraj",
    keep_token_ids: bool = True,
) -> list[SftRecord]:
    """The records of one SFT set. "autotraj": HQ trajectories (file order), then accepted
    repairs (file order); nothing else. "hq": the HQ ones only. "correct": every candidate with
    a correct answer, as sampled. "all": every scored candidate, as sampled. Without
    `keep_token_ids` the trajectories are stored as text only (BuildConfig.keep_token_ids)."""
    wanted = {"autotraj": {"HQ"}, "hq": {"HQ"}, "correct": {"HQ", "AC-LQ"}}.get(
        data, {"HQ", "AC-LQ", "AW"}
    )
    chosen: list[tuple[Trajectory, SftSource]] = [
        (t, inputs.scores[t.id].quality.label)
        for t in inputs.trajectories.values()
        if t.id in inputs.scores and inputs.scores[t.id].quality.label in wanted
    ]
    if data == "autotraj":
        chosen += [(r.trajectory, REPAIR_SOURCE[r.label]) for r in inputs.repairs.values()]
    records = []
    for trajectory, source in chosen:
        question = inputs.queries[trajectory.query_id].question
        reply = Message("assistant", trajectory.text)
        records.append(
            SftRecord(
                id=trajectory.id,
                query_id=trajectory.query_id,
                source=source,
                messages=(*prompt_messages(question, system_prompt), reply),
                trajectory=trajectory if keep_token_ids else trajectory.text_only(),
            )
        )
    check_unique_ids((r.id for r in records), "sft set")
    return records


def drop_flawed(items: list[T], trajectory: Callable[[T], Trajectory], what: str) -> list[T]:
    """`items` without those whose trajectory has a flaw (flaws.flaws), each drop logged.

    Upstream, the scorer keeps flawed candidates out of HQ and the repair stage rejects flawed
    repairs, so with the default scorer nothing is dropped; the release's scorer
    (`QualityConfig.release()`) lets hedging phrases and repeated calls into HQ, and they stop
    here.
    """
    kept = []
    for item in items:
        found = flaws(trajectory(item))
        if found:
            log.warning("%s %s left out: %s", what, trajectory(item).id, "; ".join(found))
        else:
            kept.append(item)
    return kept


def preference_pairs(
    inputs: RunFiles, system_prompt: str | None = None, keep_token_ids: bool = True
) -> list[PreferencePair]:
    """One pair per accepted repair: chosen = the repair, rejected = its original (text only
    without `keep_token_ids`)."""
    pairs = []
    for repair in inputs.repairs.values():
        original = inputs.trajectories[repair.original_id]
        check_same_prompt(original, repair.trajectory, f"repair of {repair.original_id}")
        question = inputs.queries[original.query_id].question
        chosen = repair.trajectory
        if not keep_token_ids:
            chosen, original = chosen.text_only(), original.text_only()
        pairs.append(
            PreferencePair(
                id=repair.trajectory.id,
                query_id=original.query_id,
                prompt=prompt_messages(question, system_prompt),
                chosen_trajectory=chosen,
                rejected_trajectory=original,
                label=repair.label,
                chosen_score=repair.repair_score,
                rejected_score=repair.original_score,
            )
        )
    check_unique_ids((p.id for p in pairs), "preference set")
    return pairs


def build_counts(
    inputs: RunFiles, sft: list[SftRecord], pairs: list[PreferencePair]
) -> dict[str, Any]:
    """The numbers reported in manifest.json (and returned by `run_build`)."""
    labels = Counter(row.quality.label for row in inputs.scores.values())
    accepted = Counter(r.label for r in inputs.repairs.values())
    hard = Counter(
        inputs.scores[c.original_id].quality.label if c.original_id in inputs.scores else "unscored"
        for c in inputs.hard_cases
    )
    sources = Counter(r.source for r in sft)
    return {
        "queries": len(inputs.queries),
        "trajectories": len(inputs.trajectories),
        "unscored": len(inputs.trajectories) - len(inputs.scores),
        "HQ": labels["HQ"],
        "AC-LQ": labels["AC-LQ"],
        "AW": labels["AW"],
        "repairs_accepted": {
            "AC-LQ": accepted["AC-LQ"],
            "AW": accepted["AW"],
            "total": sum(accepted.values()),
        },
        "repairs_by_how": dict(sorted(Counter(r.how for r in inputs.repairs.values()).items())),
        "hard_cases": {**dict(sorted(hard.items())), "total": len(inputs.hard_cases)},
        "sft": {
            "HQ": sources["HQ"],
            "repair:AC-LQ": sources["repair:AC-LQ"],
            "repair:AW": sources["repair:AW"],
            "total": len(sft),
        },
        "preference_pairs": len(pairs),
    }


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def hf_datasets(sft: list[SftRecord], pairs: list[PreferencePair]) -> tuple[Any, Any]:
    """(sft, preferences) as `datasets.Dataset`s; trajectories as JSON strings."""
    from datasets import Features, Value

    text = Value("string")
    messages = [{"role": text, "content": text}]
    sft_features = Features(
        {"id": text, "query_id": text, "source": text, "messages": messages, "trajectory": text}
    )
    pair_features = Features(
        {
            "id": text,
            "query_id": text,
            "prompt": messages,
            "chosen": text,
            "rejected": text,
            "chosen_trajectory": text,
            "rejected_trajectory": text,
            "label": text,
            "chosen_score": Value("float64"),
            "rejected_score": Value("float64"),
        }
    )
    sft_rows = [_json_fields(r.to_dict(), ("trajectory",)) for r in sft]
    pair_rows = [
        _json_fields(p.to_dict(), ("chosen_trajectory", "rejected_trajectory")) for p in pairs
    ]
    return _dataset(sft_rows, sft_features), _dataset(pair_rows, pair_features)


def _dataset(rows: list[dict[str, Any]], features: Any) -> Any:
    # Column-wise, so that an empty set keeps its columns (from_list([]) has none).
    from datasets import Dataset

    return Dataset.from_dict({k: [r[k] for r in rows] for k in features}, features=features)


def _json_fields(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: json.dumps(v, ensure_ascii=False) if k in keys else v for k, v in row.items()}


def _save_to_disk_atomic(dataset: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def push_to_hub(sft: Any, preferences: Any, repo_id: str) -> None:
    """Push both datasets to one Hub dataset repo, as configs "sft" and "preferences"."""
    from datasets import DatasetDict

    log.info("pushing the SFT and preference sets to the Hub dataset %s", repo_id)
    DatasetDict({"train": sft}).push_to_hub(repo_id, config_name="sft")
    DatasetDict({"train": preferences}).push_to_hub(repo_id, config_name="preferences")


# ---------------------------------------------------------------------------------------------
# The stage


def _check_same_config(out_dir: Path, cfg: BuildConfig) -> None:
    """synthesize's check, leaving out `push_to_hub` (it does not change the outputs)."""
    resolved = {k: v for k, v in to_dict(cfg).items() if k != "push_to_hub"}
    check_same_config(out_dir, yaml.safe_dump(resolved, sort_keys=True))


def _outputs(out_dir: Path, cfg: BuildConfig) -> list[Path]:
    names = ["sft.jsonl", "preferences.jsonl"] + (
        ["sft_hf", "preferences_hf"] if cfg.save_hf else []
    )
    names += [SFT_FILES[name] for name in cfg.extra_sets]
    return [out_dir / name for name in names]


def run_build(cfg: BuildConfig) -> dict[str, Any]:
    """Build (or find already built) the SFT and preference sets; return the counts."""
    out_dir = stage_dir(cfg)
    _check_same_config(out_dir, cfg)
    require_records(cfg.run_dir, ("queries", "trajectories", "scores", "repairs"))
    check_same_inputs(out_dir, input_paths(cfg.run_dir))
    counts = finished_counts(out_dir, _outputs(out_dir, cfg))
    if counts is not None:
        if cfg.push_to_hub:
            sft = load_sft_records(out_dir / "sft.jsonl")
            pairs = load_preference_pairs(out_dir / "preferences.jsonl")
            push_to_hub(*hf_datasets(sft, pairs), cfg.push_to_hub)
        return counts
    system_prompt = cfg.system_prompt
    if system_prompt is None:
        system_prompt = synthesize_system_prompt(cfg.run_dir)
    inputs = load_inputs(cfg.run_dir)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # a crash below leaves no stale "finished"
    keep = cfg.keep_token_ids
    all_sft = sft_records(inputs, system_prompt, keep_token_ids=keep)
    all_pairs = preference_pairs(inputs, system_prompt, keep_token_ids=keep)
    sft = drop_flawed(all_sft, lambda r: r.trajectory, "SFT record")
    pairs = drop_flawed(all_pairs, lambda p: p.chosen_trajectory, "preference pair")
    write_jsonl_atomic(out_dir / "sft.jsonl", (r.to_dict() for r in sft))
    write_jsonl_atomic(out_dir / "preferences.jsonl", (p.to_dict() for p in pairs))
    extra: dict[str, int] = {}
    for name in cfg.extra_sets:
        records = sft_records(inputs, system_prompt, name, keep_token_ids=keep)
        if name in CLEAN_SETS:
            records = drop_flawed(records, lambda r: r.trajectory, f"SFT record ({name})")
        write_jsonl_atomic(out_dir / SFT_FILES[name], (r.to_dict() for r in records))
        extra[name] = len(records)
    if cfg.save_hf or cfg.push_to_hub:
        sft_ds, pairs_ds = hf_datasets(sft, pairs)
        if cfg.save_hf:
            _save_to_disk_atomic(sft_ds, out_dir / "sft_hf")
            _save_to_disk_atomic(pairs_ds, out_dir / "preferences_hf")
        if cfg.push_to_hub:
            push_to_hub(sft_ds, pairs_ds, cfg.push_to_hub)
    counts = build_counts(inputs, sft, pairs)
    counts["dropped_flawed"] = {
        "sft": len(all_sft) - len(sft),
        "preference_pairs": len(all_pairs) - len(pairs),
    }
    if extra:
        counts["extra_sets"] = extra
    log.info(
        "SFT records: %d (%s); preference pairs: %d",
        counts["sft"]["total"],
        ", ".join(f"{k} {v}" for k, v in counts["sft"].items() if k != "total"),
        counts["preference_pairs"],
    )
    write_manifest(
        out_dir,
        stage="build",
        config=to_dict(cfg),
        inputs=input_paths(cfg.run_dir),
        counts=counts,
    )
    return counts
