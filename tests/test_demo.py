"""The README's main command, shrunk: `autotraj run --config configs/cpu.yaml` with small sizes
on the real embedded model, every stage from synthesis to the final table (slow tier, ~4 min).

The full-size run and its numbers are in docs/demo.md; this checks that the shipped config
runs end to end from a clean run directory and ends with the comparison table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_demo_config_runs_every_stage_and_prints_the_table(tmp_path):
    run_dir = tmp_path / "demo"
    overrides = [
        f"run_dir={run_dir}",
        "synthesize.limit=8",
        "sft.max_steps=2",
        "rm.max_steps=1",
        "rl.steps=1",
        "rl.rollout.max_new_tokens=32",
        "rl.rollout.max_response_tokens=64",
        "eval.benchmarks=[{name: arithmetic, path: 'builtin:arithmetic:test', limit: 2},"
        " {name: multihop, path: 'builtin:multihop:test', limit: 2}]",
        "eval.rollout.max_new_tokens=48",
        "eval.rollout.max_response_tokens=96",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-m", "autotraj.cli", "run", "--config", "configs/cpu.yaml", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.rstrip().splitlines()[-4:]
    assert table[0].split() == [
        "model",
        "arithmetic",
        "multihop",
        "average",
        "tokens",
        "tool",
        "calls",
    ]
    assert [line.split()[0] for line in table[1:]] == ["base", "sft", "rl"]
    for stage in ("synthesize", "score", "repair", "build", "sft", "rm", "rl"):
        assert (run_dir / stage / "manifest.json").is_file(), stage
    for model in ("base", "sft", "rl"):
        summary = json.loads((run_dir / "eval" / model / "summary.json").read_text())
        assert summary["average"]["n"] == 4
    build = json.loads((run_dir / "build" / "manifest.json").read_text())["counts"]
    assert build["sft"]["total"] > 0 and build["preference_pairs"] > 0
