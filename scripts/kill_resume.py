"""Kill an autotraj command at a random moment, re-run it, and check that nothing was lost or
duplicated: the same records, counts and final training step as an uninterrupted run.

    .venv/bin/python scripts/kill_resume.py --workdir /tmp/kr -- synthesize --config configs/cpu_synthesize.yaml limit=40
    .venv/bin/python scripts/kill_resume.py --workdir /tmp/kr --kill-at 20 -- run --config my_pipeline.yaml

Steps: (1) run the command to the end in `<workdir>/reference`, noting when it starts writing
results (S) and when it ends (T); (2) run it again in `<workdir>/killed` and send SIGKILL to its
whole process group (sandbox workers included) at a random moment while it works, uniform in
[S, S + 0.9 (T - S)] (or `--kill-at` seconds); (3) re-run that same command to the end;
(4) compare the two run directories. The run directory is given as the `run_dir=` override,
so the config must not set a stage's own run_dir.

What is compared: the records of every stage output (trajectories, scores, repairs, hard cases,
SFT records, preference pairs, RL rollouts, evaluation results) by id: none lost, none extra,
none twice; no `.partial` file left; every stage's manifest counts (less the counts that describe
one invocation: generated, resumed_from, train_loss); the steps of the training logs. The final
weights are compared too, as a note: they match on CPU, but other hardware may differ.

Exit status: 0 when the runs agree, 1 when they do not, 2 when a run failed. Library use:
`compare(reference_dir, resumed_dir)` returns the list of differences (tests/test_kill_resume.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autotraj.io import relocatable

# Output file name -> how a row names the record it holds.
RECORD_KEYS: dict[str, Callable[[dict[str, Any]], str]] = {
    "queries.jsonl": lambda row: row["id"],
    "trajectories.jsonl": lambda row: row["id"],
    "scores.jsonl": lambda row: row["trajectory_id"],
    "repairs.jsonl": lambda row: row["original_id"],
    "hard_cases.jsonl": lambda row: row["original_id"],
    "sft.jsonl": lambda row: row["id"],
    "preferences.jsonl": lambda row: row["id"],
    "results.jsonl": lambda row: row["id"],
    "rollouts.jsonl": lambda row: row["trajectory"]["id"],
}
# Manifest counts that describe one invocation, not the stage's output.
VOLATILE_COUNTS = frozenset({"generated", "resumed_from", "train_loss"})
# Training stage -> the metrics.jsonl key logged once per optimizer step (or logging step).
STEP_LOGS = {"sft": "sft/train/loss", "rm": "rm/train/loss", "rl": "rl/loss"}


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def records(run_dir: Path) -> dict[str, Counter[str]]:
    """{'<folder>/<file>': Counter of record keys} for every record file under `run_dir`, at any
    depth (evaluation writes eval/<model>/results.jsonl)."""
    out = {}
    for path in sorted(run_dir.glob("**/*.jsonl")):
        if path.name in RECORD_KEYS:
            key = RECORD_KEYS[path.name]
            out[str(path.relative_to(run_dir))] = Counter(key(row) for row in _rows(path))
    return out


def manifest_counts(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every stage's manifest counts, less the volatile ones; paths into `run_dir` relative."""
    out = {}
    for path in sorted(run_dir.glob("**/manifest.json")):
        counts = json.loads(path.read_text(encoding="utf-8"))["counts"]
        for prefix in (str(run_dir.resolve()), str(run_dir)):
            counts = relocatable(counts, prefix)
        stage = str(path.parent.relative_to(run_dir))
        out[stage] = {k: v for k, v in counts.items() if k not in VOLATILE_COUNTS}
    return out


def logged_steps(run_dir: Path) -> dict[str, list[int]]:
    out = {}
    for stage, key in STEP_LOGS.items():
        path = run_dir / stage / "metrics.jsonl"
        if path.is_file():
            out[stage] = [row["step"] for row in _rows(path) if key in row]
    return out


def weight_hashes(run_dir: Path) -> dict[str, str]:
    out = {}
    for path in sorted(run_dir.glob("*/model/*.safetensors")):
        out[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def compare(reference: Path, resumed: Path) -> list[str]:
    """Differences between an uninterrupted run and a killed-then-resumed one ([] if none)."""
    problems = []
    ref, res = records(reference), records(resumed)
    for name in sorted(set(ref) | set(res)):
        a, b = ref.get(name, Counter()), res.get(name, Counter())
        twice = sorted(k for k, n in b.items() if n > 1)
        lost, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if twice:
            problems.append(f"{name}: {len(twice)} records twice, e.g. {twice[:3]}")
        if lost:
            problems.append(f"{name}: {len(lost)} records lost, e.g. {lost[:3]}")
        if extra:
            problems.append(f"{name}: {len(extra)} records not in the reference, e.g. {extra[:3]}")
    for partial in sorted(resumed.glob("**/*.partial")):
        problems.append(f"{partial.relative_to(resumed)}: left unfinished")
    ref_counts, res_counts = manifest_counts(reference), manifest_counts(resumed)
    for stage in sorted(set(ref_counts) | set(res_counts)):
        if ref_counts.get(stage) != res_counts.get(stage):
            problems.append(
                f"{stage}/manifest.json counts: {res_counts.get(stage)} != reference "
                f"{ref_counts.get(stage)}"
            )
    ref_steps, res_steps = logged_steps(reference), logged_steps(resumed)
    for stage in sorted(set(ref_steps) | set(res_steps)):
        if ref_steps.get(stage) != res_steps.get(stage):
            problems.append(
                f"{stage}/metrics.jsonl logged steps {res_steps.get(stage)} != reference "
                f"{ref_steps.get(stage)}"
            )
    return problems


def weight_notes(reference: Path, resumed: Path) -> list[str]:
    ref, res = weight_hashes(reference), weight_hashes(resumed)
    return [
        f"{name}: weights differ from the reference" for name in ref if ref[name] != res.get(name)
    ]


def command(argv: Sequence[str], run_dir: Path) -> list[str]:
    autotraj = Path(sys.executable).parent / "autotraj"
    return [str(autotraj), *argv, f"run_dir={run_dir}"]


def working(run_dir: Path) -> bool:
    """True once a run has started writing results (not only its config and queries)."""
    return any(
        next(run_dir.glob(pattern), None) is not None
        for pattern in ("*/*.partial", "*/checkpoints/*", "*/manifest.json")
    )


def run_to_end(argv: Sequence[str], run_dir: Path, log: Path) -> tuple[float, float]:
    """Run the command in `run_dir` to its end: (seconds until it started writing results,
    seconds in all)."""
    start = time.monotonic()
    first = None
    with log.open("a") as err:
        proc = subprocess.Popen(command(argv, run_dir), stdout=err, stderr=err)
        while proc.poll() is None:
            if first is None and working(run_dir):
                first = time.monotonic() - start
            time.sleep(0.02)
    if proc.returncode != 0:
        fail(f"{' '.join(command(argv, run_dir))} failed ({proc.returncode}); see {log}")
    total = time.monotonic() - start
    return (total if first is None else first), total


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def run_and_kill(argv: Sequence[str], run_dir: Path, log: Path, after_s: float) -> bool:
    """Start the command and SIGKILL its process group after `after_s`; False if it finished
    first."""
    with log.open("a") as err:
        proc = subprocess.Popen(
            command(argv, run_dir), stdout=err, stderr=err, start_new_session=True
        )
        try:
            proc.wait(timeout=after_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
    if proc.returncode != 0:
        fail(f"the run to be killed failed by itself ({proc.returncode}); see {log}")
    return False


def on_disk(run_dir: Path) -> str:
    """What a killed run left: records per file, unfinished files, checkpoints."""
    parts = [f"{name} {sum(c.values())}" for name, c in records(run_dir).items()]
    for partial in sorted(run_dir.glob("*/*.partial")):
        parts.append(f"{partial.relative_to(run_dir)} {len(partial.read_bytes().splitlines())}")
    parts += [str(p.relative_to(run_dir)) for p in sorted(run_dir.glob("*/checkpoints/*"))]
    return ", ".join(parts) or "nothing"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random kill time")
    parser.add_argument("--kill-at", type=float, default=None, help="seconds after the start")
    parser.add_argument("autotraj_args", nargs="+", help="the autotraj command, after --")
    args = parser.parse_args(argv)
    if args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"{args.workdir} is not empty")
    reference, killed = args.workdir / "reference", args.workdir / "killed"
    log = args.workdir / "log.txt"
    args.workdir.mkdir(parents=True, exist_ok=True)
    started, seconds = run_to_end(args.autotraj_args, reference, log)
    kill_at = args.kill_at or random.Random(args.seed).uniform(
        started, started + 0.9 * (seconds - started)
    )
    print(
        f"reference run: {seconds:.1f} s, writing results from {started:.1f} s; "
        f"killing the second run at {kill_at:.1f} s"
    )
    if not run_and_kill(args.autotraj_args, killed, log, kill_at):
        print("the run finished before the kill: nothing was interrupted (choose --kill-at)")
        return 0
    print(f"left on disk by the killed run: {on_disk(killed)}")
    run_to_end(args.autotraj_args, killed, log)
    problems = compare(reference, killed)
    for line in [*problems, *(f"note: {n}" for n in weight_notes(reference, killed))]:
        print(line)
    print("resumed run matches the reference" if not problems else "MISMATCH")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
