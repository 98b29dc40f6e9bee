"""autotraj.audit (CI's demo check) on real tiny runs: it passes a sound run and fails each way
the method can be broken (flawed data, re-solving repairs, an untrained reward model or one no
better than random heads, no RL, an RL update that ignores or flips the advantages)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_jsonl, write_tiny_ablation_config

from autotraj import audit
from autotraj.ablate import AblateConfig
from autotraj.config import load_config
from autotraj.models import reference, reference_repairer
from autotraj.pipeline import run_pipeline
from autotraj.records import Trajectory

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_demo.py"


def pipeline(tmp_path: Path, tiny: Path, *overrides: str) -> AblateConfig:
    """The tiny config as a pipeline (an AblateConfig is a PipelineConfig; its ablation section
    is not read by `run_pipeline`)."""
    path = write_tiny_ablation_config(tmp_path, tiny)
    base = [
        f"eval.generator.model={tiny}",
        f"sft.model={tiny}",
        "synthesize.limit=100",
        "sft.max_steps=4",
        "rm.max_steps=40",
        "rm.learning_rate=0.001",
        "rl.steps=2",
        "rl.lr=0.001",
        # four rollouts a group (a within-group permutation test needs them), and a reward that
        # varies: the tiny model's rollouts never have a valid format, so the release reward is
        # -1 for all of them and every advantage 0
        "rl.rollouts_per_prompt=4",
        "rl.reward.components=[{name: 'test_audit:character_variety', weight: 1.0}]",
    ]
    cfg = load_config(AblateConfig, path, [*base, *overrides])
    return dataclasses.replace(cfg, run_dir=str(tmp_path / "run"))


def character_variety(text: str, query, trajectory) -> float:
    """A reward for the tiny runs' RL (in [0, 1]): distinct characters per character."""
    return len(set(text)) / max(len(text), 1)


@pytest.fixture(scope="module")
def sound_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("audit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AUTOTRAJ_HOME", str(tmp / "home"))
        cfg = pipeline(tmp, tiny_model_dir)
        run_pipeline(cfg)
    return Path(cfg.run_dir)


def test_binomial_p_value():
    assert audit.binomial_p_value(10, 10) == pytest.approx(2**-10)
    assert audit.binomial_p_value(0, 10) == 1.0
    assert audit.binomial_p_value(5, 10) > 0.5


def test_random_heads_see_pairs_that_share_one_difference():
    """Pairs whose chosen side differs from the rejected one by the same vector: a coin would
    call 20/20 wins p = 1e-6, but a random head ranks them all right half the time, so the
    untrained-RM null gives them p ~ 0.5. Independent differences give binomial-like counts."""
    import torch

    rejected = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    shared = audit.random_head_wins(rejected + torch.ones(16), rejected, 1000, seed=0)
    assert set(shared) == {0, 20} and 400 < shared.count(20) < 600
    independent = rejected + torch.randn(20, 16, generator=torch.Generator().manual_seed(2))
    wins = audit.random_head_wins(independent, rejected, 1000, seed=0)
    assert 9 < sum(wins) / len(wins) < 11 and sum(w == 20 for w in wins) < 5
    assert audit.random_head_wins(independent, rejected, 1000, seed=0) == wins


def test_a_sound_run_passes_every_check(sound_run):
    checks = audit.audit_run(sound_run)
    assert [c.name for c in checks] == [
        "training data is clean",
        "repairs are verified edits of their originals",
        "reward model above chance",
        "RL changed the policy",
        "RL followed the reward",
    ]
    assert all(c.ok for c in checks), checks


def test_a_flawed_record_fails_the_data_check(sound_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sound_run / "build", run / "build")
    path = run / "build" / "sft.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    t = Trajectory.from_dict(rows[0]["trajectory"])
    broken = "<think>It fine, I so I will go with it.</think>" + t.segments[-1].text
    segments = [*rows[0]["trajectory"]["segments"][:-1], {"text": broken, "trainable": True}]
    rows[0]["trajectory"]["segments"] = segments
    rows[0]["messages"][-1]["content"] = "".join(s["text"] for s in segments)
    write_jsonl(path, rows)
    check = audit.check_training_data(run)
    assert not check.ok and "fragment" in check.detail


def test_a_repairer_that_re_solves_fails_the_repair_check(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))

    def re_solve(question, original, wrong, style, results):
        return reference.write(question, "clean", results)  # the original is never read

    monkeypatch.setattr(reference_repairer, "repair_piece", re_solve)
    monkeypatch.setattr(reference, "repair_piece", re_solve)
    cfg = pipeline(tmp_path, tiny_model_dir, "repair.first_pass=false")
    run_pipeline(dataclasses.replace(cfg, stages=("synthesize", "score", "repair")))
    check = audit.check_repairs(Path(cfg.run_dir))
    assert not check.ok and "AC-LQ repairs (model) take" in check.detail


def _repair_copy(sound_run: Path, run: Path) -> list[dict]:
    for stage in ("synthesize", "repair"):
        shutil.copytree(sound_run / stage, run / stage)
    path = run / "repair" / "repairs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_label_with_no_accepted_repair_fails(sound_run, tmp_path):
    """No AC-LQ repair accepted though the stage had correct originals to repair: not a vacuous
    pass of the words check."""
    rows = _repair_copy(sound_run, tmp_path / "run")
    assert any(r["label"] == "AC-LQ" for r in rows)
    write_jsonl(tmp_path / "run/repair/repairs.jsonl", [r for r in rows if r["label"] != "AC-LQ"])
    check = audit.check_repairs(tmp_path / "run")
    assert not check.ok and "no AC-LQ repair accepted" in check.detail


def test_one_re_solved_model_repair_is_not_hidden_by_first_pass_edits(sound_run, tmp_path):
    """A model-written AC-LQ repair that does not use its original's words fails the model-only
    share, whatever the first-pass edits beside it (which keep every word) add to the mean."""
    rows = _repair_copy(sound_run, tmp_path / "run")
    aclq = [r for r in rows if r["label"] == "AC-LQ"]
    assert len(aclq) >= 2
    solved = aclq[0]
    solved["how"] = "model"
    for segment in solved["trajectory"]["segments"]:
        if segment["trainable"]:
            segment["text"] = " ".join(f"word{i}" for i in range(len(segment["text"].split())))
            segment.pop("token_ids", None)
    write_jsonl(tmp_path / "run/repair/repairs.jsonl", rows)
    check = audit.check_repairs(tmp_path / "run")
    assert not check.ok and "AC-LQ repairs (model) take 0.00" in check.detail
    assert "AC-LQ repairs by the model: 1 of" in check.detail


def test_an_untrained_reward_model_fails(sound_run, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))
    run = Path(tmp_path / "run")
    for stage in ("synthesize", "score", "repair", "build", "sft"):
        shutil.copytree(sound_run / stage, run / stage)
    cfg = pipeline(tmp_path, tiny_model_dir, "rm.learning_rate=0.0", "rm.max_steps=1")
    run_pipeline(dataclasses.replace(cfg, stages=("rm",)))
    check = audit.check_reward_model(run)
    assert not check.ok and "p =" in check.detail and "untrained-RM control" in check.detail


def test_a_reward_model_no_better_than_random_heads_fails(sound_run, monkeypatch):
    """The RM check needs both nulls: with random heads that all rank every held-out pair
    right (pairs sharing one difference, in the extreme), the same RM fails."""
    assert audit.check_reward_model(sound_run).ok
    monkeypatch.setattr(audit, "random_head_wins", lambda c, r, heads, seed: [len(c)] * heads)
    check = audit.check_reward_model(sound_run)
    assert not check.ok and "p = 1" in check.detail.split("untrained-RM control")[1]


def test_rl_with_no_steps_fails(sound_run, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))
    run = Path(tmp_path / "run")
    for stage in ("synthesize", "score", "repair", "build", "sft", "rm", "eval"):
        shutil.copytree(sound_run / stage, run / stage)
    shutil.rmtree(run / "eval" / "rl")
    cfg = pipeline(tmp_path, tiny_model_dir, "rl.steps=0")
    run_pipeline(dataclasses.replace(cfg, stages=("rl", "eval")))
    check = audit.check_rl_changed_policy(run)
    assert not check.ok and "changed on 0/" in check.detail


def test_permutation_p_value_follows_the_advantages_within_groups():
    groups = [g for g in range(6) for _ in range(4)]
    advantages = [a for _ in range(6) for a in (1.5, 0.5, -0.5, -1.5)]
    assert audit.permutation_p_value(advantages, advantages, groups, 2000, 0) < 0.01
    flipped = [-a for a in advantages]
    assert audit.permutation_p_value(advantages, flipped, groups, 2000, 0) > 0.99
    # a change shared by a whole group carries no within-group signal: every shuffle ties
    per_group = [float(g) for g in groups]
    assert audit.permutation_p_value(advantages, per_group, groups, 500, 0) == 1.0


@pytest.mark.parametrize("broken", ["ignored", "flipped"])
def test_an_update_that_does_not_follow_the_advantages_fails(
    broken, sound_run, tmp_path, tiny_model_dir, monkeypatch
):
    """The same RL run with the loss's advantages zeroed (entropy bonus and AdamW still move
    the weights) or negated fails the reward check; the sound run passes it."""
    from autotraj.train import grpo_update

    real = grpo_update.policy_loss
    factor = 0.0 if broken == "ignored" else -1.0

    def broken_loss(logprobs, old, advantages, *args, **kwargs):
        return real(logprobs, old, advantages * factor, *args, **kwargs)

    monkeypatch.setattr(grpo_update, "policy_loss", broken_loss)
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))
    run = Path(tmp_path / "run")
    for stage in ("synthesize", "score", "repair", "build", "sft", "rm"):
        shutil.copytree(sound_run / stage, run / stage)
    cfg = pipeline(tmp_path, tiny_model_dir)
    run_pipeline(dataclasses.replace(cfg, stages=("rl",)))
    assert (
        audit.weight_change(run / "sft" / "model", run / "rl" / "model") > audit.MIN_WEIGHT_CHANGE
    )
    check = audit.check_rl_followed_reward(run)
    assert not check.ok and "permutation p =" in check.detail, check.detail
    assert audit.check_rl_followed_reward(sound_run).ok


def test_a_long_runs_reward_check_scores_a_sample_of_whole_groups(sound_run, monkeypatch):
    rows = [
        {"step": s, "trajectory": {"query_id": q}, "i": i}
        for i, (s, q) in enumerate((s, q) for s in range(1, 11) for q in "abc" for _ in range(4))
    ]
    kept = audit.sample_groups(rows, 5, seed=0)
    groups = {audit.rollout_group(r) for r in kept}
    assert len(groups) == 5 and len(kept) == 20  # whole groups of 4
    assert [r["i"] for r in kept] == sorted(r["i"] for r in kept)  # in the file's order
    assert audit.sample_groups(rows, 5, seed=0) == kept != audit.sample_groups(rows, 5, seed=1)
    monkeypatch.setattr(audit, "MAX_GROUPS", 2)
    check = audit.check_rl_followed_reward(sound_run)
    assert check.detail.startswith("8 rollouts in 2 groups (a seeded sample of 4);")


def test_rl_from_another_model_is_named_not_compared(sound_run, tmp_path):
    """The RL checks compare the RL model with this run's SFT model; an RL stage configured to
    start elsewhere (rl.model) fails them with that reason instead of a wrong comparison."""
    import yaml

    run = tmp_path / "run"
    for stage in ("sft", "rl"):
        shutil.copytree(sound_run / stage, run / stage)
    resolved = run / "rl" / "config.resolved.yaml"
    cfg = yaml.safe_load(resolved.read_text())
    cfg["model"] = "embedded:smollm2-135m-instruct"
    resolved.write_text(yaml.safe_dump(cfg))
    for check in (audit.check_rl_changed_policy(run), audit.check_rl_followed_reward(run)):
        assert not check.ok and "rl.model" in check.detail
    # this run's SFT model named explicitly, as recorded where the stage ran: not a problem
    cfg.update(run_dir="elsewhere/run", model="elsewhere/run/sft/model")
    resolved.write_text(yaml.safe_dump(cfg))
    assert audit._rl_start_problem(run) is None


def test_the_script_prints_the_table_and_every_check(sound_run):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(sound_run)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[0] == "model"
    assert sum(line.startswith("check_demo: ok") for line in lines) == 5
