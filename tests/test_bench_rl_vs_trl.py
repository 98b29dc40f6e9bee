"""Smoke test of bench/bench_rl_vs_trl.py: the tiny model, alternating steps, a result row."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("setting", ["plain"])
def test_bench_runs_both_trainers_and_writes_the_ratio(tmp_path, tiny_model_dir, setting):
    pytest.importorskip("trl")
    out = tmp_path / "bench"
    overrides = [
        f"model={tiny_model_dir}",
        "prompts_per_step=1",
        "rollouts_per_prompt=2",
        "micro_batch_size=2",
        "rollout.max_new_tokens=8",
        "rollout.max_response_tokens=16",
        "generator.batch_size=2",
        "mixed_precision='no'",
        "tools.python.workers=1",
    ]
    cmd = [sys.executable, str(ROOT / "bench/bench_rl_vs_trl.py"), "--steps", "2"]
    cmd += ["--settings", setting, "--out", str(out), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    [row] = json.loads((out / "result.json").read_text())
    assert row["setting"] == setting
    assert len(row["autotraj_step_s"]) == len(row["trl_step_s"]) == 1  # warm-up dropped
    assert row["ratio"] == pytest.approx(row["autotraj_s_per_step"] / row["trl_s_per_step"], 0.02)
    assert "| plain |" in done.stdout
