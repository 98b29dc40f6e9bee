"""The run directory: where each stage's files live, and the one "finished?" rule.

Layout, `<run_dir>/<stage>/...` (the only code that maps stage names to folders and record
files to paths; stages take their paths from here):

    synthesize/  queries.jsonl  trajectories.jsonl       (stage 1, synthesize.py)
    score/       scores.jsonl                            (stage 2, score.py)
    repair/      repairs.jsonl  hard_cases.jsonl         (stage 3, repair.py)
    build/       sft.jsonl  preferences.jsonl  sft_hf/ ...  (build.py)
    sft/ rm/ rl/ model/, checkpoints/, metrics.jsonl     (train/)
    eval/<model>/  results.jsonl  summary.json           (evaluate.py)

and in every stage folder `config.resolved.yaml` (io.check_same_config), `manifest.json`
(io.write_manifest, written last: a folder with a manifest and all its outputs is finished),
and, for the stages that read other stages' records, `inputs.json` (the sha256 of each input
file, written when the stage starts).

The rule, one for every stage that reads records (score, repair, build), `check_same_inputs` then
`finished_counts`:
1. A stage folder remembers the input files it was made from (`inputs.json`; folders written
   before that file existed remember them in `manifest.json`).
2. If the inputs are not those (an upstream stage was deleted and run again, a file was
   edited), the stage refuses with `ConfigError` naming the changed files: its output belongs to
   other inputs. Use another run_dir, or delete the stage folder to make it again.
3. Otherwise a folder holding `manifest.json` and every output is finished: a re-run is a no-op
   and returns the manifest's counts; an unfinished one is made again (score, build: written in
   one go) or resumed (repair: appended chunk by chunk).

Why refuse rather than redo on changed inputs: it is the rule `check_same_config` applies to a
changed config in the same folder, and the only one that is safe for a resumable stage (repair
rows made from two different score files must not be mixed, and silently discarding finished
repairs would throw away model time). The pipeline (`autotraj run`) never meets the refusal: it
keys each stage on its config and upstream keys, and moves a stale folder to `<run_dir>/stale/`
before the stage runs again (pipeline.py). Before this module, score and build redid their work
on changed inputs while repair refused; now all three refuse (docs/data.md).

Also here: `require_file` (an input, or an error naming the stage to run first),
`StageIncomplete` (a stage stopped with work left; re-run it), and the readers of the record
files, each parsed with its one schema (records/): `load_synthesized`, `load_scores`,
`load_repairs`, `load_hard_cases`, `load_sft_records`, `load_preference_pairs`, and `RunFiles`
(every record of a run, by id: build, show and the report read it).

Not here: reading or writing a file (io.py), record schemas (records/), what a stage computes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from autotraj.config import ConfigError
from autotraj.io import DataError, file_sha256, load_records, read_jsonl, write_json_atomic
from autotraj.records import (
    PreferencePair,
    Query,
    RecordError,
    Repair,
    ScoreRow,
    SftRecord,
    Trajectory,
)

log = logging.getLogger(__name__)

Stage = Literal["synthesize", "score", "repair", "build", "sft", "rm", "rl", "eval"]
RecordFile = Literal[
    "queries", "trajectories", "scores", "repairs", "hard_cases", "sft", "preferences"
]
# Every record file a stage writes for another stage to read: (stage folder, file name).
RECORD_FILES: dict[RecordFile, tuple[Stage, str]] = {
    "queries": ("synthesize", "queries.jsonl"),
    "trajectories": ("synthesize", "trajectories.jsonl"),
    "scores": ("score", "scores.jsonl"),
    "repairs": ("repair", "repairs.jsonl"),
    "hard_cases": ("repair", "hard_cases.jsonl"),
    "sft": ("build", "sft.jsonl"),
    "preferences": ("build", "preferences.jsonl"),
}
MODEL = "model"  # the final model under sft/, rm/ and rl/
T = TypeVar("T")


class StageIncomplete(RuntimeError):
    """The stage stopped with work left (e.g. infrastructure failures); re-run it to resume."""


def stage_dir(run_dir: str | Path, stage: Stage) -> Path:
    """`<run_dir>/<stage>`."""
    return Path(run_dir) / stage


def record_path(run_dir: str | Path, name: RecordFile) -> Path:
    """Where a record file lives: `record_path(run, "scores")` is `<run>/score/scores.jsonl`."""
    stage, file = RECORD_FILES[name]
    return stage_dir(run_dir, stage) / file


def model_dir(run_dir: str | Path, stage: Literal["sft", "rm", "rl"]) -> Path:
    """The final model a training stage writes: `<run_dir>/<stage>/model`."""
    return stage_dir(run_dir, stage) / MODEL


def require_file(path: Path, stage: str) -> Path:
    """`path`, or a DataError saying which stage to run (or finish) first."""
    if path.is_file():
        return path
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        raise DataError(f"{path}: the {stage} stage is not finished; re-run `autotraj {stage}`")
    raise DataError(f"{path}: no such file; run `autotraj {stage}` first (same run_dir)")


def require_records(run_dir: str | Path, names: Iterable[RecordFile]) -> dict[str, Path]:
    """The paths of record files another stage must have finished, by name (`require_file`)."""
    return {name: require_file(record_path(run_dir, name), RECORD_FILES[name][0]) for name in names}


def load_synthesized(inputs: dict[str, Path]) -> tuple[dict[str, Query], list[Trajectory]]:
    """Queries by id and the trajectories in file order; every trajectory's query must exist."""
    queries = {q.id: q for q in load_records(inputs["queries"], Query.from_dict)}
    trajectories = load_records(inputs["trajectories"], Trajectory.from_dict)
    for t in trajectories:
        if t.query_id not in queries:
            raise DataError(
                f"{inputs['trajectories']}: trajectory {t.id} names query {t.query_id!r}, "
                f"which is not in {inputs['queries']}"
            )
    return queries, trajectories


# ---------------------------------------------------------------------------------------------
# The "finished and inputs unchanged?" rule


def input_hashes(inputs: Mapping[str, Path]) -> dict[str, str]:
    """sha256 of each input file that exists, by name, sorted (an absent optional input is left
    out, as in manifest.json)."""
    return {name: file_sha256(p) for name, p in sorted(inputs.items()) if Path(p).is_file()}


def _recorded_hashes(out_dir: Path) -> dict[str, str] | None:
    saved = out_dir / "inputs.json"
    if saved.is_file():
        return json.loads(saved.read_text(encoding="utf-8"))
    manifest = out_dir / "manifest.json"
    if manifest.is_file():  # a folder written before inputs.json
        entries = json.loads(manifest.read_text(encoding="utf-8")).get("inputs", {})
        return {name: entry["sha256"] for name, entry in sorted(entries.items())}
    return None


def check_same_inputs(out_dir: str | Path, inputs: Mapping[str, Path]) -> None:
    """Record the input files' hashes in `<out_dir>/inputs.json`, or raise `ConfigError` if the
    folder holds output made from other input files (the module docstring's rule).

    A folder holding no output (a run that failed on its input before writing anything) takes
    the new inputs, as `io.check_same_config` does for a config: there is nothing to mix.
    """
    out_dir = Path(out_dir)
    current = input_hashes(inputs)
    recorded = _recorded_hashes(out_dir)
    bookkeeping = {"config.resolved.yaml", "inputs.json"}
    output = out_dir.is_dir() and any(p.name not in bookkeeping for p in out_dir.iterdir())
    if output and recorded is not None and recorded != current:
        changed = sorted(n for n in {*recorded, *current} if recorded.get(n) != current.get(n))
        raise ConfigError(
            f"{out_dir} was made from different input files ({', '.join(changed)} changed); "
            f"use another run_dir or delete that folder (compare {out_dir / 'inputs.json'})"
        )
    write_json_atomic(out_dir / "inputs.json", current)


def finished_counts(out_dir: str | Path, outputs: Iterable[Path]) -> dict[str, Any] | None:
    """The manifest's counts if the stage is finished (`manifest.json` and every output exist),
    else None. Call `check_same_inputs` first: this does not look at the inputs."""
    manifest = Path(out_dir) / "manifest.json"
    if not manifest.is_file() or not all(Path(p).exists() for p in outputs):
        return None
    log.info("%s is finished and its inputs are unchanged; nothing to do", out_dir)
    return json.loads(manifest.read_text(encoding="utf-8"))["counts"]


# ---------------------------------------------------------------------------------------------
# Reading the records of a run directory


def load_keyed(
    path: str | Path, parse: Callable[[dict[str, Any]], T], key: Callable[[T], str], what: str
) -> dict[str, T]:
    """Records of a JSONL file by key, in file order; a bad row or a repeated key names file:line."""
    out: dict[str, T] = {}
    lines: dict[str, int] = {}
    for lineno, obj in read_jsonl(path):
        try:
            record = parse(obj)
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path}:{lineno}: {e}") from e
        k = key(record)
        if k in out:
            raise DataError(f"{path}:{lineno}: duplicate {what} {k!r} (first on line {lines[k]})")
        out[k], lines[k] = record, lineno
    return out


def load_scores(path: str | Path) -> dict[str, ScoreRow]:
    """score/scores.jsonl by trajectory id."""
    return load_keyed(path, ScoreRow.from_dict, lambda r: r.quality.trajectory_id, "trajectory_id")


def _accepted_repair(data: dict[str, Any]) -> Repair:
    repair = Repair.from_dict(data)
    if not repair.accepted:
        raise RecordError(
            f"repair of {repair.original_id}: not accepted (reason {repair.reason!r}); "
            f"a rejected repair belongs in hard_cases.jsonl"
        )
    if repair.repair_score is None:
        raise RecordError(f"repair of {repair.original_id}: accepted but 'repair_score' is null")
    return repair


def _hard_case(data: dict[str, Any]) -> Repair:
    repair = Repair.from_dict(data)
    if repair.accepted:
        raise RecordError(
            f"repair of {repair.original_id}: accepted (empty 'reason'); "
            f"an accepted repair belongs in repairs.jsonl"
        )
    return repair


def load_repairs(path: str | Path) -> dict[str, Repair]:
    """repair/repairs.jsonl (accepted `records.Repair` rows) by original id."""
    return load_keyed(path, _accepted_repair, lambda r: r.original_id, "original_id")


def load_hard_cases(path: str | Path) -> tuple[Repair, ...]:
    """repair/hard_cases.jsonl (rejected `records.Repair` rows, one per original), in order."""
    return tuple(load_keyed(path, _hard_case, lambda r: r.original_id, "original_id").values())


def check_unique_ids(ids: Iterable[str], where: str) -> None:
    """Raise `DataError` at the first id seen twice."""
    seen: set[str] = set()
    for i, record_id in enumerate(ids, start=1):
        if record_id in seen:
            raise DataError(f"{where}: record {i}: duplicate id {record_id!r}")
        seen.add(record_id)


def load_sft_records(path: str | Path) -> list[SftRecord]:
    """The SFT set the build stage writes (`<run_dir>/build/sft.jsonl`), checked."""
    records = load_records(path, SftRecord.from_dict)
    check_unique_ids((r.id for r in records), str(path))
    return records


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """The preference set the build stage writes (`<run_dir>/build/preferences.jsonl`), checked."""
    pairs = load_records(path, PreferencePair.from_dict)
    check_unique_ids((p.id for p in pairs), str(path))
    return pairs


@dataclass(frozen=True)
class RunFiles:
    """The stage files of a run directory, keyed by id, in file order (build and show read them)."""

    queries: dict[str, Query]
    trajectories: dict[str, Trajectory]
    scores: dict[str, ScoreRow]
    repairs: dict[str, Repair]  # accepted, by original id
    hard_cases: tuple[Repair, ...]  # not accepted, one per original

    def find(self, trajectory_id: str) -> Trajectory:
        """A candidate, an accepted repair or a rejected repair, by id."""
        if trajectory_id in self.trajectories:
            return self.trajectories[trajectory_id]
        for t in self._repair_trajectories():
            if t.id == trajectory_id:
                return t
        raise DataError(f"trajectory {trajectory_id!r} is not in this run")

    def _repair_trajectories(self) -> Iterable[Trajectory]:
        yield from (r.trajectory for r in self.repairs.values())
        yield from (c.trajectory for c in self.hard_cases)


def read_run_files(run_dir: str | Path, optional: frozenset[str]) -> RunFiles:
    """Read queries, trajectories, scores, repairs and hard cases; `optional` ones may be absent."""
    paths = {name: record_path(run_dir, name) for name in RECORD_FILES}
    present = {
        n: n not in optional or paths[n].is_file() for n in ("scores", "repairs", "hard_cases")
    }
    for name, here in present.items():
        if not here:
            log.info("%s not found: read as empty", paths[name])
    return RunFiles(
        queries=load_keyed(paths["queries"], Query.from_dict, lambda q: q.id, "query id"),
        trajectories=load_keyed(
            paths["trajectories"], Trajectory.from_dict, lambda t: t.id, "trajectory id"
        ),
        scores=load_scores(paths["scores"]) if present["scores"] else {},
        repairs=load_repairs(paths["repairs"]) if present["repairs"] else {},
        hard_cases=tuple(load_hard_cases(paths["hard_cases"])) if present["hard_cases"] else (),
    )
