"""`autotraj ablate` end to end on the tiny model: every variant trained and evaluated on the same
items, the comparison written, a re-run a no-op. (The shrunk ablation on the embedded model is
the slow test `test_the_ablation_config_runs_shrunk`; the full one is docs/ablation.md.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from autotraj.ablate import AblateConfig, run_ablation, variant_names
from autotraj.compare import compare, paired_difference
from autotraj.config import ConfigError, load_config
from autotraj.eval_summary import EvalResult
from autotraj.records import Provenance, Trajectory
from autotraj.report import render_report

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))


def test_every_variant_is_trained_evaluated_and_compared(
    tmp_path, tiny_model_dir, tiny_ablation_yaml, home
):
    path = tiny_ablation_yaml(tmp_path)
    cfg = load_config(AblateConfig, path, [f"eval.generator.model={tiny_model_dir}"])
    result = run_ablation(cfg)
    root = Path(cfg.run_dir)
    names = variant_names(cfg)
    assert names == [
        "base+demos",
        "sft-all",
        "sft-hq",
        "sft-autotraj",
        "rl-autotraj-outcome_format",
        "rl-autotraj-outcome_format_rm",
    ]
    assert result["variants"] == names
    for data, name in (("all", "sft_all"), ("hq", "sft_hq")):
        assert (root / "build" / f"{name}.jsonl").is_file(), data
    for name in names[1:]:
        stage = "sft" if name.startswith("sft") else "rl"
        assert (root / "variants" / name / stage / "model").is_dir(), name
    # the RM is trained once, only the RM arm reads it
    rl_cfgs = {
        n: yaml.safe_load((root / "variants" / n / "rl" / "config.resolved.yaml").read_text())
        for n in names[-2:]
    }
    assert rl_cfgs["rl-autotraj-outcome_format"]["reward"]["rm_weight"] == 0.0
    assert rl_cfgs["rl-autotraj-outcome_format_rm"]["reward"]["rm_weight"] == 0.2
    summary = json.loads((root / "eval" / "base+demos" / "summary.json").read_text())
    assert summary["decoding"]["demonstrations"] == 1
    comparison = json.loads((root / "ablation" / "comparison.json").read_text())["rows"]
    assert {(r["model"], r["benchmark"]) for r in comparison} == {
        (n, b) for n in names for b in ("arithmetic", "multihop", "all")
    }
    sft = json.loads((root / "ablation" / "sft.json").read_text())
    assert all(v["steps"] == 2 and len(v["losses"]) == 2 for v in sft.values())
    assert "| sft-hq | all | 6 |" in (root / "ablation" / "table.md").read_text()
    page = render_report(root)
    assert '<section id="ablation">' in page and "rl-autotraj-outcome_format_rm" in page
    # a re-run trains and evaluates nothing again
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("variants/*/*/model/*.safetensors")}
    run_ablation(cfg)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert not (root / "stale").exists()


def test_a_reference_that_is_not_a_variant_is_refused(tmp_path, tiny_ablation_yaml):
    path = tiny_ablation_yaml(tmp_path)
    with pytest.raises(ConfigError, match="rl_starts"):
        run_ablation(load_config(AblateConfig, path, ["ablation.rl_starts=[correct]"]))
    with pytest.raises(ConfigError, match="reference"):
        run_ablation(load_config(AblateConfig, path, ["ablation.reference=sft-correct"]))


PROV = Provenance(model="m", backend="scripted", temperature=0.0, top_p=1.0, max_new_tokens=0)


def _result(i: int, correct: bool, bench: str = "b") -> EvalResult:
    t = Trajectory(f"t{i}", f"q{i}", (), (), "answer", PROV)
    return EvalResult(
        f"{bench}/q{i}/s0", bench, f"q{i}", 0, "?", ("1",), "math", "1", correct,
        None, None, 10, 10, 3, 0, 0, 0, 0, True, "answer", t,
    )  # fmt: skip


def test_the_shipped_ablation_configs_name_their_variants():
    """The budget config has the RL start the full one adds; both share one run directory."""
    budget = load_config(AblateConfig, ROOT / "configs" / "ablation_cpu.yaml", [])
    full = load_config(AblateConfig, ROOT / "configs" / "ablation_cpu_full.yaml", [])
    extra = set(variant_names(full)) - set(variant_names(budget))
    assert extra == {"rl-all-outcome_format", "rl-all-outcome_format_rm"}
    assert set(variant_names(budget)) < set(variant_names(full))
    assert budget.run_dir == full.run_dir and budget.eval == full.eval


def test_paired_intervals_separate_a_real_difference_from_noise():
    better = [_result(i, i % 10 != 0) for i in range(200)]  # 90%
    worse = [_result(i, i % 2 == 0) for i in range(200)]  # 50%
    rows = compare({"a": better, "b": worse}, {"b": "a"}, samples=1000)
    row = next(r for r in rows if r.model == "b" and r.benchmark == "all")
    assert row.diff == pytest.approx(-0.4) and row.significant and row.diff_high < 0
    same = [_result(i, i % 2 == 1) for i in range(200)]  # 50% on other items
    rows = compare({"b": worse, "c": same}, {"c": "b"}, samples=1000)
    row = next(r for r in rows if r.model == "c" and r.benchmark == "all")
    assert row.diff == 0.0 and not row.significant


def test_paired_difference_needs_the_same_items():
    with pytest.raises(ValueError):
        paired_difference([1, 0], [1], 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="different items"):
        compare({"a": [_result(0, True)], "b": [_result(1, True)]}, {"b": "a"})


@pytest.mark.slow
def test_the_ablation_config_runs_shrunk(tmp_path):
    """configs/ablation_cpu_full.yaml (every variant) on the embedded model, shrunk to minutes."""
    overrides = [
        f"run_dir={tmp_path / 'ablation'}",
        "synthesize.limit=8",
        "ablation.sft_steps=2",
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
        [sys.executable, "-m", "autotraj.cli", "ablate", "--config", "configs/ablation_cpu_full.yaml",
         *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "ablation" / "ablation" / "table.md").read_text()
    assert "| sft-autotraj | all | 4 |" in table and "rl-all-outcome_format_rm" in table
