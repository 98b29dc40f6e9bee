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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from autotraj.config import to_dict
from autotraj.flaws import flaws
from autotraj.io import (
    DataError,
    check_same_config,
    load_records,
    read_jsonl,
    write_jsonl_atomic,
    write_manifest,
)
from autotraj.quality import QualityScore
from autotraj.records import (
    Query,
    RecordError,
    RepairHow,
    RepairLabel,
    Trajectory,
    _literal,
    _optional,
    _require,
)
from autotraj.render import chat_messages
from autotraj.run_dir import (
    RecordFile,
    check_same_inputs,
    finished_counts,
    record_path,
    require_records,
)

log = logging.getLogger(__name__)

# HQ candidates and accepted repairs form the SFT set; "AC-LQ" and "AW" (candidates as they
# were sampled) appear only in the ablation's baseline sets (`BuildConfig.extra_sets`).
SftSource = Literal["HQ", "repair:AC-LQ", "repair:AW", "AC-LQ", "AW"]
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
Role = Literal["system", "user", "assistant"]
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


def stage_dir(cfg: BuildConfig) -> Path:
    return record_path(cfg.run_dir, "sft").parent


def input_paths(run_dir: str | Path) -> dict[str, Path]:
    """The record files the build reads (run_dir.RECORD_FILES); hard_cases.jsonl may be absent."""
    names: tuple[RecordFile, ...] = ("queries", "trajectories", "scores", "repairs", "hard_cases")
    return {name: record_path(run_dir, name) for name in names}


# ---------------------------------------------------------------------------------------------
# Input rows written by the score and repair stages


@dataclass(frozen=True)
class ScoreRow:
    """One row of score/scores.jsonl: the quality score and the answer's grade."""

    quality: QualityScore
    em: float | None = None
    f1: float | None = None
    extracted: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreRow:
        where = f"score {data.get('trajectory_id', '?')}"
        em, f1 = (
            _optional(data, "em", (int, float), where),
            _optional(data, "f1", (int, float), where),
        )
        return cls(
            quality=QualityScore.from_dict(data),
            em=None if em is None else float(em),
            f1=None if f1 is None else float(f1),
            extracted=_optional(data, "extracted", str, where),
        )


@dataclass(frozen=True)
class AcceptedRepair:
    """One row of repair/repairs.jsonl: a verified repair of a low-quality trajectory."""

    original_id: str
    label: RepairLabel  # the original's partition label
    original_score: float
    repair_score: float
    how: RepairHow
    trajectory: Trajectory  # the repair; parent_id = original_id

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AcceptedRepair:
        where = f"repair of {data.get('original_id', '?')}"
        return cls(
            original_id=str(_require(data, "original_id", (str, int), where)),
            label=_literal(_require(data, "label", str, where), RepairLabel, "label", where),
            original_score=float(_require(data, "original_score", (int, float), where)),
            repair_score=float(_require(data, "repair_score", (int, float), where)),
            how=_literal(_require(data, "how", str, where), RepairHow, "how", where),
            trajectory=Trajectory.from_dict(_require(data, "trajectory", dict, where)),
        )


@dataclass(frozen=True)
class HardCase:
    """One row of repair/hard_cases.jsonl: a rejected repair (no trajectory on infra errors)."""

    original_id: str
    reason: str
    trajectory: Trajectory | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardCase:
        where = f"hard case of {data.get('original_id', '?')}"
        traj = _optional(data, "trajectory", dict, where)
        return cls(
            original_id=str(_require(data, "original_id", (str, int), where)),
            reason=_require(data, "reason", str, where),
            trajectory=None if traj is None else Trajectory.from_dict(traj),
        )


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
    return load_keyed(path, ScoreRow.from_dict, lambda r: r.quality.trajectory_id, "trajectory_id")


def load_repairs(path: str | Path) -> dict[str, AcceptedRepair]:
    """Accepted repairs by original id (one per original: the repair stage keeps the best)."""
    return load_keyed(path, AcceptedRepair.from_dict, lambda r: r.original_id, "original_id")


def load_hard_cases(path: str | Path) -> list[HardCase]:
    return load_records(path, HardCase.from_dict)


# ---------------------------------------------------------------------------------------------
# Output records


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "message") -> Message:
        role = _literal(_require(data, "role", str, where), Role, "role", where)
        return cls(role=role, content=_require(data, "content", str, where))


def _messages(
    data: dict[str, Any], key: str, roles: tuple[str, ...], where: str
) -> tuple[Message, ...]:
    raw = _require(data, key, list, where)
    messages = tuple(Message.from_dict(m, f"{where} {key}[{i}]") for i, m in enumerate(raw))
    if tuple(m.role for m in messages) != roles:
        raise RecordError(f"{where}: field '{key}' must hold roles {list(roles)}")
    return messages


@dataclass(frozen=True)
class SftRecord:
    """One SFT example: [system, user, assistant] and the trajectory behind the assistant turn.

    Train on `render.render_trajectory(tokenizer, record.question, record.trajectory)`, which
    keeps the generated token ids and masks tool results; `messages` is the same conversation
    as text, for tools that read chat records.
    """

    id: str
    query_id: str
    source: SftSource
    messages: tuple[Message, ...]
    trajectory: Trajectory

    @property
    def question(self) -> str:
        return self.messages[1].content

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "query_id": self.query_id,
            "source": self.source,
            "messages": [m.to_dict() for m in self.messages],
            "trajectory": self.trajectory.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SftRecord:
        where = f"sft record {data.get('id', '?') if isinstance(data, dict) else '?'}"
        messages = _messages(data, "messages", ("system", "user", "assistant"), where)
        trajectory = Trajectory.from_dict(_require(data, "trajectory", dict, where))
        if messages[-1].content != trajectory.text:
            raise RecordError(f"{where}: the assistant message is not the trajectory's text")
        return cls(
            id=_require(data, "id", str, where),
            query_id=_require(data, "query_id", str, where),
            source=_literal(_require(data, "source", str, where), SftSource, "source", where),
            messages=messages,
            trajectory=trajectory,
        )


@dataclass(frozen=True)
class PreferencePair:
    """chosen = an accepted repair, rejected = its original, for the same prompt."""

    id: str
    query_id: str
    prompt: tuple[Message, ...]  # [system, user]
    chosen_trajectory: Trajectory
    rejected_trajectory: Trajectory
    label: RepairLabel  # the original's partition label
    chosen_score: float
    rejected_score: float

    @property
    def question(self) -> str:
        return self.prompt[1].content

    @property
    def chosen(self) -> str:
        return self.chosen_trajectory.text

    @property
    def rejected(self) -> str:
        return self.rejected_trajectory.text

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "query_id": self.query_id,
            "prompt": [m.to_dict() for m in self.prompt],
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_trajectory": self.chosen_trajectory.to_dict(),
            "rejected_trajectory": self.rejected_trajectory.to_dict(),
            "label": self.label,
            "chosen_score": self.chosen_score,
            "rejected_score": self.rejected_score,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreferencePair:
        where = f"preference pair {data.get('id', '?') if isinstance(data, dict) else '?'}"
        pair = cls(
            id=_require(data, "id", str, where),
            query_id=_require(data, "query_id", str, where),
            prompt=_messages(data, "prompt", ("system", "user"), where),
            chosen_trajectory=Trajectory.from_dict(
                _require(data, "chosen_trajectory", dict, where)
            ),
            rejected_trajectory=Trajectory.from_dict(
                _require(data, "rejected_trajectory", dict, where)
            ),
            label=_literal(_require(data, "label", str, where), RepairLabel, "label", where),
            chosen_score=float(_require(data, "chosen_score", (int, float), where)),
            rejected_score=float(_require(data, "rejected_score", (int, float), where)),
        )
        for side in ("chosen", "rejected"):
            if _require(data, side, str, where) != getattr(pair, side):
                raise RecordError(f"{where}: field '{side}' is not the {side} trajectory's text")
        return pair


def check_unique_ids(ids: Iterable[str], where: str) -> None:
    seen: set[str] = set()
    for i, record_id in enumerate(ids, start=1):
        if record_id in seen:
            raise DataError(f"{where}: record {i}: duplicate id {record_id!r}")
        seen.add(record_id)


def load_sft_records(path: str | Path) -> list[SftRecord]:
    """The SFT set written by this stage (`<run_dir>/build/sft.jsonl`), checked."""
    records = load_records(path, SftRecord.from_dict)
    check_unique_ids((r.id for r in records), str(path))
    return records


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """The preference set written by this stage (`<run_dir>/build/preferences.jsonl`), checked."""
    pairs = load_records(path, PreferencePair.from_dict)
    check_unique_ids((p.id for p in pairs), str(path))
    return pairs


# ---------------------------------------------------------------------------------------------
# Reading and checking the inputs


@dataclass(frozen=True)
class RunFiles:
    """The stage files of a run directory, keyed by id, in file order (build and show read them)."""

    queries: dict[str, Query]
    trajectories: dict[str, Trajectory]
    scores: dict[str, ScoreRow]
    repairs: dict[str, AcceptedRepair]  # by original id
    hard_cases: tuple[HardCase, ...]

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
        yield from (c.trajectory for c in self.hard_cases if c.trajectory is not None)


def read_run_files(run_dir: str | Path, optional: frozenset[str]) -> RunFiles:
    """Read queries, trajectories, scores, repairs and hard cases; `optional` ones may be absent."""
    paths = input_paths(run_dir)
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


def _check_repair(repair: AcceptedRepair, inputs: RunFiles, path: Path) -> None:
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
    inputs: RunFiles, system_prompt: str | None = None, data: SftData = "autotraj"
) -> list[SftRecord]:
    """The records of one SFT set. "autotraj": HQ trajectories (file order), then accepted
    repairs (file order); nothing else. "hq": the HQ ones only. "correct": every candidate with
    a correct answer, as sampled. "all": every scored candidate, as sampled."""
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
                trajectory=trajectory,
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


def preference_pairs(inputs: RunFiles, system_prompt: str | None = None) -> list[PreferencePair]:
    """One pair per accepted repair: chosen = the repair, rejected = its original."""
    pairs = []
    for repair in inputs.repairs.values():
        original = inputs.trajectories[repair.original_id]
        check_same_prompt(original, repair.trajectory, f"repair of {repair.original_id}")
        question = inputs.queries[original.query_id].question
        pairs.append(
            PreferencePair(
                id=repair.trajectory.id,
                query_id=original.query_id,
                prompt=prompt_messages(question, system_prompt),
                chosen_trajectory=repair.trajectory,
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
    all_sft = sft_records(inputs, system_prompt)
    all_pairs = preference_pairs(inputs, system_prompt)
    sft = drop_flawed(all_sft, lambda r: r.trajectory, "SFT record")
    pairs = drop_flawed(all_pairs, lambda p: p.chosen_trajectory, "preference pair")
    write_jsonl_atomic(out_dir / "sft.jsonl", (r.to_dict() for r in sft))
    write_jsonl_atomic(out_dir / "preferences.jsonl", (p.to_dict() for p in pairs))
    extra: dict[str, int] = {}
    for name in cfg.extra_sets:
        records = sft_records(inputs, system_prompt, name)
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
