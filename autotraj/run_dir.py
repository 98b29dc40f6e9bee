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

Also here: `require_file` (an input, or an error naming the stage to run first) and
`StageIncomplete` (a stage stopped with work left; re-run it).

Not here: reading or writing a file (io.py), record schemas (records.py), what a stage computes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from autotraj.config import ConfigError
from autotraj.io import DataError, file_sha256, load_records, write_json_atomic
from autotraj.records import Query, Trajectory

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
