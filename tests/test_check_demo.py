"""scripts/check_demo.py: passes only when RL beats the base model on accuracy and length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_demo.py"


def write_summaries(run_dir: Path, numbers: dict[str, tuple[float, float]]) -> None:
    for name, (accuracy, tokens) in numbers.items():
        out = run_dir / "eval" / name
        out.mkdir(parents=True)
        average = {"accuracy": accuracy, "mean_tokens": tokens, "tool_calls_per_trajectory": 1.0}
        summary = {"name": name, "benchmarks": {"arith": average}, "average": average}
        (out / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize(
    ("rl", "code", "complaint"),
    [
        ((0.9, 135.0), 0, ""),
        ((0.0, 135.0), 1, "accuracy"),
        ((0.9, 300.0), 1, "mean tokens"),
    ],
)
def test_check_demo(tmp_path, rl, code, complaint):
    write_summaries(tmp_path, {"base": (0.0, 244.0), "sft": (0.92, 135.0), "rl": rl})
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == code, done.stderr
    assert done.stdout.splitlines()[0].split()[0] == "model"
    assert complaint in done.stderr
