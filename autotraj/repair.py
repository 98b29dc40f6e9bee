"""Stage 3: LLM-as-Repairer. Low-quality trajectories -> verified repairs + hard cases.

Takes the synthesize outputs and `score/scores.jsonl`; every AC-LQ and AW trajectory gets a
repair (METHOD.md section 6):

1. First pass (`first_pass=True`, AC-LQ only): a deterministic edit by whole units
   (edits.edit): hedging sentences and clauses out, a step that repeats an earlier tool call
   out (its reasoning, call and result together). It never deletes a word from inside a clause
   (an earlier version did, and left "It fine, I so I will go with 12"); where a reasoning block
   would be left empty the edit does not apply and the repairer model gets the trajectory. The
   candidate keeps the original's other tool calls, which are re-executed and must give the
   same outputs.
2. The repairer model (attempts 1..k, release k = 1, greedy): it sees its instructions
   (prompts/repair_aclq.txt or repair_aw.txt) + the protocol system prompt, and the question with
   the whole low-quality trajectory, tool results included, never the gold answer. Its reply is a
   real rollout: tools execute. All repairs of a chunk go through one batched rollout call.
   For small repairers (opt-in): `examples` worked repairs of the label as earlier turns
   (prompts/repair_examples.jsonl), a `prefill` that starts the turn ("<think>"), and
   `strip_preamble` (prose before the first protocol tag dropped).
   Strategy "continue" (or "rewrite+continue": after the rewrite attempts): the original is cut
   right after a tool result, latest cut first, the prefix cleaned by the first pass's edit if it
   has a flaw (skipped if the edit cannot clean it), and `continue_samples` continuations of it
   are sampled with the standard prompt; the first one accepted is kept.
3. Every candidate is verified the same way (`judge`): checked for flaws (flaws.flaws: a
   hedging phrase, a fragment left by a deletion, a repeated identical tool call, a `<result>`
   the model wrote itself: any one rejects it, whatever its score; METHOD.md section 6), graded
   against the gold answer and scored. AC-LQ: accepted iff correct, S > 0.86 and S > the
   original's S, both scored with L* = the shorter of the two. AW: accepted iff correct and
   S > 0.8 with L* = itself. Attempts stop at the first acceptance; an original with no accepted
   attempt is a hard case.

A repaired trajectory is stored as a trajectory of the ORIGINAL question (standard prompt): id
`<original id>/r<attempt>` (r0 = first pass), `parent_id` = original id, provenance role
"repairer", `prompt_ids` empty and segment `token_ids` dropped: the repairer's ids were generated
after a different prompt, possibly by another tokenizer, so the renderer re-tokenizes them per
segment (tool-result spans stay separate and masked).

Output under `<run_dir>/repair/`: `repairs.jsonl` (accepted) and `hard_cases.jsonl` (not
accepted), one `records.Repair` row per original in exactly one of the two; `metrics.jsonl`,
`inputs.json`, `config.resolved.yaml`, `manifest.json` (its counts say, per label, how much of
the originals the accepted repairs keep: `edits.calls_kept` and `edits.similarity`). Resumable: both files are appended chunk
by chunk and share one done-set keyed by the original id, so a kill loses at most one chunk,
which is redone without duplicates.

Infrastructure failures: a candidate whose tools failed is rejected unscored ("infra error: ...")
and counts as an attempt, as in the release. A repairer (generator) failure is no verdict at
all: the originals whose last attempt it ended are not written, the stage stops after that
chunk and raises `StageIncomplete`, and the next run repairs them again.

Not here: scoring the candidates of a query (score.py), building SFT or preference sets.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm import tqdm

from autotraj.config import ConfigError, to_dict
from autotraj.edits import edit
from autotraj.flaws import flaws
from autotraj.grading import Checker
from autotraj.io import (
    DataError,
    ResumableJsonl,
    check_same_config,
    load_records,
    write_manifest,
)
from autotraj.metrics import MetricsLog
from autotraj.models.generator import Generator
from autotraj.models.loading import GeneratorConfig, load_generator
from autotraj.quality import QualityConfig
from autotraj.records import (
    Provenance,
    QualityScore,
    Query,
    Repair,
    RepairAttempt,
    RepairLabel,
    Segment,
    ToolCall,
    ToolName,
    Trajectory,
)
from autotraj.repair_counts import chunk_metrics, summarize
from autotraj.repair_prefix import cut_prefixes, prefix_of  # noqa: F401 (public here too)
from autotraj.repair_prompts import (  # noqa: F401 (public here too)
    PROMPT_FILES,
    repair_examples,
    repair_instructions,
    repair_messages,
)
from autotraj.repair_verify import judge, rejection_reason, unscored  # noqa: F401
from autotraj.rollout import RolloutConfig, generator_failed, rollout
from autotraj.run_dir import (
    RECORD_FILES,
    StageIncomplete,
    check_same_inputs,
    finished_counts,
    load_synthesized,
    record_path,
    require_records,
)
from autotraj.tools.tool import Tool, ToolInfraError
from autotraj.tools.toolbox import ToolsConfig, close_tools, open_tools

log = logging.getLogger(__name__)

# The protocol's opening tags: what a repair may begin with (anything before is a preamble).
_FIRST_TAG = re.compile(r"<(think|code|python|search|answer)>")
Strategy = Literal["rewrite", "continue", "rewrite+continue"]


@dataclass(frozen=True)
class RepairConfig:
    run_dir: str = "runs/default"
    # The repairer, configured independently of the policy (a hosted model may repair for a
    # small local policy). Default: the embedded model.
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    attempts: int = 1  # release: 1 model attempt per trajectory
    # release: greedy decoding for repairs
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(temperature=0.0))
    # Model attempts after the first sample at this temperature (greedy would repeat the reply).
    retry_temperature: float = 0.7
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    checker: Checker = "default"
    chunk: int = 16  # repairs issued together (one batched rollout), and written together
    first_pass: bool = True  # deterministic edit before calling the model (AC-LQ): edits.edit
    accept_ac_lq: float = 0.86  # release: AC-LQ repair needs S > 0.86 (and > the original's)
    accept_aw: float = 0.8  # release: AW repair needs S > 0.8
    # "rewrite": the repairer writes a whole new trajectory (up to `attempts`, the release);
    # "continue": the original cut after a tool result (latest first) is continued by the
    # repairer, `continue_samples` samples per cut; "rewrite+continue": rewrite attempts first,
    # then continuations for what they left unrepaired.
    strategy: Strategy = "rewrite"
    continue_samples: int = 4  # k: continuations sampled per cut point
    continue_temperature: float = 0.7  # sampling temperature of the continuations
    # Rewrite prompt for small models (all off = the release prompt):
    examples: int = (
        0  # worked repairs of the same label shown first (prompts/repair_examples.jsonl)
    )
    prefill: str = ""  # text the repairer's turn starts with, e.g. "<think>" (part of the repair)
    strip_preamble: bool = False  # drop prose the repairer wrote before its first protocol tag


@dataclass(frozen=True)
class Target:
    """A low-quality trajectory to repair, with its query and its score-stage verdict."""

    original: Trajectory
    query: Query
    label: RepairLabel
    score: QualityScore


def stage_dir(cfg: RepairConfig) -> Path:
    return record_path(cfg.run_dir, "repairs").parent


# ---------------------------------------------------------------------------------------------
# Prompts


# ---------------------------------------------------------------------------------------------
# Verification: the one acceptance rule for every candidate


# ---------------------------------------------------------------------------------------------
# First pass: a deterministic edit of a correct trajectory (edits.edit)

FIRST_PASS_PROVENANCE = Provenance(
    model="autotraj:first-pass",
    backend="rule",
    temperature=0.0,
    top_p=1.0,
    max_new_tokens=0,
    role="repairer",
)


def first_pass_candidate(target: Target, cfg: QualityConfig) -> Trajectory | None:
    """The whole-unit edit of an AC-LQ trajectory (hedging sentences and repeated steps out), or
    None if it does not apply: not AC-LQ, nothing to edit, a reasoning block that would be left
    empty, or flaws the edit cannot remove (then the repairer model gets it)."""
    if target.label != "AC-LQ":
        return None
    edited = edit(target.original, cfg.hedging_words)
    if edited is None or flaws(edited, cfg.hedging_words):
        return None
    return dataclasses.replace(
        edited,
        id=f"{target.original.id}/r0",
        provenance=FIRST_PASS_PROVENANCE,
        prompt_ids=(),
        parent_id=target.original.id,
        extra=(),
    )


def reexecute(
    candidates: Sequence[Trajectory], tools: Mapping[ToolName, Tool]
) -> list[tuple[Trajectory, str]]:
    """Re-run every candidate's tool calls (one batch per tool) and compare the outputs.

    Returns (candidate with the re-executed calls, "" or why the replay differs), in order.
    """
    by_tool: dict[ToolName, list[tuple[int, int]]] = {}
    for i, t in enumerate(candidates):
        for j, call in enumerate(t.tool_calls):
            by_tool.setdefault(call.tool, []).append((i, j))
    fresh: dict[tuple[int, int], ToolCall] = {}
    problems: dict[int, str] = {}
    for name, slots in by_tool.items():
        if name not in tools:
            problems.update(
                {i: f"the {name} tool is not configured: cannot re-run" for i, _ in slots}
            )
            continue
        try:
            calls = tools[name].run_batch([candidates[i].tool_calls[j].input for i, j in slots])
        except ToolInfraError as e:
            log.warning("first pass: re-running %d %s calls failed: %s", len(slots), name, e)
            problems.update({i: f"infra error: {name}: {e}" for i, _ in slots})
            continue
        fresh.update(zip(slots, calls, strict=True))
    out = []
    for i, t in enumerate(candidates):
        calls = tuple(fresh.get((i, j), c) for j, c in enumerate(t.tool_calls))
        reason = problems.get(i, "")
        for j, (old, new) in enumerate(zip(t.tool_calls, calls, strict=True)):
            if not reason and (old.output, old.status) != (new.output, new.status):
                reason = f"tool call {j} gave a different output when re-run"
        out.append((dataclasses.replace(t, tool_calls=calls), reason))
    return out


def run_first_pass(
    targets: Sequence[Target], tools: Mapping[ToolName, Tool], cfg: RepairConfig
) -> dict[str, RepairAttempt]:
    """First-pass attempts (attempt 0) by original id, for the targets the edit applies to."""
    chosen = [(t, c) for t in targets if (c := first_pass_candidate(t, cfg.quality)) is not None]
    replayed = reexecute([c for _, c in chosen], tools)
    attempts = {}
    for (target, _), (candidate, problem) in zip(chosen, replayed, strict=True):
        if problem:
            attempts[target.original.id] = unscored(target, candidate, 0, "first_pass", problem)
        else:
            attempts[target.original.id] = judge(target, candidate, 0, "first_pass", cfg)
    return attempts


# ---------------------------------------------------------------------------------------------
# Model attempts


def as_repair(
    trajectory: Trajectory, original: Trajectory, strip_preamble: bool = False
) -> Trajectory:
    """A repairer rollout as a trajectory of the original question (token ids dropped).

    `strip_preamble`: prose before the first protocol tag of the first segment ("Here's the
    correct, clean trajectory:") is dropped; a reply with no protocol tag is left as it is.
    """
    segments = [Segment(s.text, s.trainable) for s in trajectory.segments]
    if strip_preamble and segments and segments[0].trainable:
        first = _FIRST_TAG.search(segments[0].text)
        if first is not None and first.start() > 0:
            segments[0] = Segment(segments[0].text[first.start() :], True)
    return dataclasses.replace(
        trajectory, segments=tuple(segments), prompt_ids=(), parent_id=original.id
    )


def run_model_attempt(
    targets: Sequence[Target],
    attempt: int,
    generator: Generator,
    tools: Mapping[ToolName, Tool],
    cfg: RepairConfig,
) -> list[RepairAttempt]:
    """One repair per target, all in one batched rollout; judged, in order."""
    settings = cfg.rollout
    if attempt > 1:
        settings = dataclasses.replace(settings, temperature=cfg.retry_temperature)
    items = [(f"{t.original.id}/r{attempt}", t.query) for t in targets]
    conversations = [
        repair_messages(
            t.query.question, t.original.text, t.label, settings.system_prompt, cfg.examples
        )
        for t in targets
    ]
    starts = None
    if cfg.prefill:
        starts = [((Segment(cfg.prefill, True),), ()) for _ in targets]
    rolled = rollout(
        generator,
        tools,
        generator.tokenizer,
        items,
        settings,
        role="repairer",
        messages=conversations,
        starts=starts,
    )
    return [
        judge(t, as_repair(r, t.original, cfg.strip_preamble), attempt, "model", cfg)
        for t, r in zip(targets, rolled, strict=True)
    ]


def run_continue_round(
    jobs: Sequence[tuple[Target, Trajectory, int]],
    generator: Generator,
    tools: Mapping[ToolName, Tool],
    cfg: RepairConfig,
) -> list[list[RepairAttempt]]:
    """For each (target, prefix of its original, first attempt number): `continue_samples`
    continuations of the prefix, all in one batched rollout; judged, in order.

    The continuation sees the standard prompt (or the teacher's demonstrations, when
    `rollout.demonstrations` is set) and the prefix as its own turn so far: it only has to
    continue a trajectory. The prefix keeps its recorded tool results.
    """
    k = cfg.continue_samples
    settings = dataclasses.replace(cfg.rollout, temperature=cfg.continue_temperature)
    items, starts = [], []
    for target, prefix, first in jobs:
        start = (tuple(Segment(s.text, s.trainable) for s in prefix.segments), prefix.tool_calls)
        for j in range(k):
            items.append((f"{target.original.id}/r{first + j}", target.query))
            starts.append(start)
    rolled = rollout(
        generator, tools, generator.tokenizer, items, settings, role="repairer", starts=starts
    )
    out = []
    for n, (target, _, first) in enumerate(jobs):
        mine = rolled[n * k : (n + 1) * k]
        out.append(
            [
                judge(target, as_repair(r, target.original), first + j, "continue", cfg)
                for j, r in enumerate(mine)
            ]
        )
    return out


def repair_chunk(
    targets: Sequence[Target],
    get_generator: Callable[[], Generator],
    tools: Mapping[ToolName, Tool],
    cfg: RepairConfig,
) -> list[Repair]:
    """Repair every target of a chunk: first pass, then up to k model attempts for the rest."""
    history: dict[str, list[RepairAttempt]] = {t.original.id: [] for t in targets}

    def pending() -> list[Target]:
        return [t for t in targets if not any(a.accepted for a in history[t.original.id])]

    if cfg.first_pass:
        for original_id, attempt in run_first_pass(targets, tools, cfg).items():
            history[original_id].append(attempt)
    if cfg.strategy in ("rewrite", "rewrite+continue"):
        for k in range(1, cfg.attempts + 1):
            if not (todo := pending()):
                break
            for target, attempt in zip(
                todo, run_model_attempt(todo, k, get_generator(), tools, cfg), strict=True
            ):
                history[target.original.id].append(attempt)
    if cfg.strategy in ("continue", "rewrite+continue"):
        cuts = {t.original.id: cut_prefixes(t.original, cfg.quality.hedging_words) for t in targets}
        round_ = 0
        while todo := [t for t in pending() if len(cuts[t.original.id]) > round_]:
            jobs = [
                (t, cuts[t.original.id][round_], _next_attempt(history[t.original.id], cfg))
                for t in todo
            ]
            for target, samples in zip(
                todo, run_continue_round(jobs, get_generator(), tools, cfg), strict=True
            ):
                # samples in order up to the first accepted one; later samples are dropped
                for attempt in samples:
                    history[target.original.id].append(attempt)
                    if attempt.accepted:
                        break
            round_ += 1
    repairs = []
    for t in targets:
        attempts = history[t.original.id]
        if not attempts:  # "continue" on an original with no usable cut point: nothing generated
            attempts = [unscored(t, _nothing(t.original), 1, "continue", NO_CUT)]
        repairs.append(
            Repair(
                original_id=t.original.id,
                query_id=t.original.query_id,
                label=t.label,
                original_score=t.score.score,
                final=attempts[-1],
                rejected=tuple(attempts[:-1]),
            )
        )
    return repairs


NO_CUT = "no cut point after a tool result"


def _nothing(original: Trajectory) -> Trajectory:
    """The empty attempt recorded for an original the "continue" strategy cannot cut."""
    return dataclasses.replace(
        original,
        id=f"{original.id}/r1",
        segments=(),
        tool_calls=(),
        finish_reason="length",
        prompt_ids=(),
        parent_id=original.id,
        extra=(),
    )


def _next_attempt(attempts: Sequence[RepairAttempt], cfg: RepairConfig) -> int:
    """The first attempt number of the next continuation round (after the rewrite attempts)."""
    base = cfg.attempts if cfg.strategy == "rewrite+continue" else 0
    return max([base, *(a.attempt for a in attempts)]) + 1


# ---------------------------------------------------------------------------------------------
# The stage


def load_targets(run_dir: str | Path) -> tuple[list[Target], dict[str, Path]]:
    """Every AC-LQ and AW trajectory, in the order of scores.jsonl, and the input files."""
    inputs = require_records(run_dir, ("queries", "trajectories", "scores"))
    queries, trajectories = load_synthesized(inputs)
    by_id = {t.id: t for t in trajectories}
    targets = []
    for score in load_records(inputs["scores"], QualityScore.from_dict):
        if score.label == "HQ":
            continue
        if score.trajectory_id not in by_id:
            raise DataError(
                f"{inputs['scores']}: trajectory {score.trajectory_id} is not in "
                f"{inputs['trajectories']}; re-run `autotraj score`"
            )
        original = by_id[score.trajectory_id]
        targets.append(Target(original, queries[original.query_id], score.label, score))
    return targets, inputs


def run_repair(
    cfg: RepairConfig,
    generator: Generator | None = None,
    tools: Mapping[ToolName, Tool] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the stage and return its counts.

    `generator` replaces the configured repairer (it needs a `tokenizer`); `tools` replaces the
    configured tools (the caller then closes them). The repairer is only loaded if a chunk needs
    it (the first pass may repair everything).
    """
    if cfg.attempts < 1 or cfg.chunk < 1 or cfg.continue_samples < 1:
        raise ConfigError(
            f"repair: attempts, chunk and continue_samples must be >= 1, got {cfg.attempts}, "
            f"{cfg.chunk} and {cfg.continue_samples}"
        )
    if cfg.strategy not in ("rewrite", "continue", "rewrite+continue"):
        raise ConfigError(
            f"repair.strategy: {cfg.strategy!r} is not rewrite, continue or rewrite+continue"
        )
    if cfg.generator.backend == "reference" and (cfg.prefill or cfg.strategy != "rewrite"):
        raise ConfigError(
            "repair.generator.backend 'reference' (the built-in tasks' stand-in solver) only "
            "rewrites from the repair prompt: it continues neither a prefill nor a prefix; use "
            f"repair.prefill='' and repair.strategy=rewrite with it (got prefill={cfg.prefill!r}, "
            f"strategy={cfg.strategy!r})"
        )
    if cfg.examples < 0 or cfg.examples > min(len(repair_examples(lb)) for lb in PROMPT_FILES):
        raise ConfigError(
            f"repair.examples: {cfg.examples} worked repairs asked; prompts/repair_examples.jsonl "
            f"has {min(len(repair_examples(lb)) for lb in PROMPT_FILES)} per label"
        )
    out_dir = stage_dir(cfg)
    targets, inputs = load_targets(cfg.run_dir)
    check_same_config(out_dir, yaml.safe_dump(to_dict(cfg), sort_keys=True))
    check_same_inputs(out_dir, inputs)
    repairs = ResumableJsonl(
        record_path(cfg.run_dir, "repairs"), key=lambda row: row["original_id"]
    )
    hard = ResumableJsonl(
        record_path(cfg.run_dir, "hard_cases"), key=lambda row: row["original_id"]
    )
    if (done := finished_counts(out_dir, [repairs.path, hard.path])) is not None:
        return done
    done = set(repairs.done) | set(hard.done)
    todo = [t for t in targets if t.original.id not in done]
    log.info("%d trajectories to repair: %d done, %d to go", len(targets), len(done), len(todo))
    if todo:
        own_tools = tools is None
        active_tools = open_tools(cfg.tools) if tools is None else tools
        try:
            _repair_all(cfg, todo, generator, active_tools, repairs, hard)
        finally:
            if own_tools:
                close_tools(dict(active_tools))
    repairs.finish()
    hard.finish()
    counts = summarize(
        load_records(out_dir / RECORD_FILES["repairs"][1], Repair.from_dict),
        load_records(out_dir / RECORD_FILES["hard_cases"][1], Repair.from_dict),
        [(t.label, t.original) for t in targets],
    )
    write_manifest(out_dir, stage="repair", config=to_dict(cfg), inputs=inputs, counts=counts)
    return counts


def _repair_all(
    cfg: RepairConfig,
    todo: list[Target],
    generator: Generator | None,
    tools: Mapping[ToolName, Tool],
    repairs: ResumableJsonl,
    hard: ResumableJsonl,
) -> None:
    loaded: list[Generator] = [generator] if generator is not None else []

    def get_generator() -> Generator:
        if not loaded:
            loaded.append(load_generator(cfg.generator, role="repairer"))
        return loaded[0]

    metrics = MetricsLog(stage_dir(cfg) / "metrics.jsonl")
    with tqdm(total=len(todo), desc="repair", unit="traj") as bar:
        for start in range(0, len(todo), cfg.chunk):
            began = time.perf_counter()
            results = repair_chunk(todo[start : start + cfg.chunk], get_generator, tools, cfg)
            unfinished = [r for r in results if generator_failed(r.final.trajectory)]
            results = [r for r in results if not generator_failed(r.final.trajectory)]
            # Each original lands in exactly one file; the done-set is the union of both, so a
            # kill between these two appends only redoes the rows of the second one.
            repairs.append([r.to_dict() for r in results if r.accepted])
            hard.append([r.to_dict() for r in results if not r.accepted])
            metrics.write(start // cfg.chunk, chunk_metrics(results, time.perf_counter() - began))
            bar.update(len(results))
            if unfinished:
                raise StageIncomplete(
                    f"the repairer failed on {len(unfinished)} trajectories, not written "
                    f"({len(todo) - start - len(results) - len(unfinished)} more not started); "
                    f"re-run the same command to retry them. {unfinished[0].final.reason}"
                )
