"""The rm stage on the tiny model: query-level split, Bradley-Terry training reaches high held-out
accuracy, batched scores equal one-at-a-time scores, and a model without its trained head is
refused. Slow tier: a few steps on the embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_batches import SYSTEM, make_trajectory, question, write_preference_file

from autotraj.config import load_stage_config
from autotraj.render import render_trajectory
from autotraj.train.batches import PreferenceExample
from autotraj.train.reward_model import (
    RewardModelError,
    RmConfig,
    TrajectoryRewardModel,
    head_inputs,
    run_rm,
    split_by_query,
)
from autotraj.train.sft import LoraSettings

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny model's matrices are far too small for two threads: with other jobs on the
    machine, OpenMP synchronisation makes 2 threads up to 30x slower than 1 (measured)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(tmp_path: Path, model_dir: Path, **overrides) -> RmConfig:
    write_preference_file(tmp_path / "build" / "preferences.jsonl", 15)
    values = dict(
        run_dir=str(tmp_path),
        model=str(model_dir),
        lora=None,
        learning_rate=3e-3,
        max_steps=10,
        per_device_batch_size=4,
        effective_batch_size=4,
        max_length=1024,
        bf16=False,
        gradient_checkpointing=False,
        logging_steps=1,
        save_steps=100,
        use_cpu=True,
    )
    values.update(overrides)
    return RmConfig(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("rm-run")
    summary = run_rm(tiny_config(run_dir, tiny_model_dir))
    return run_dir, summary


def test_split_keeps_queries_apart():
    pairs = [PreferenceExample(f"p{i}", f"q{i % 5}", (1,), (2,)) for i in range(20)]
    train, held = split_by_query(pairs, 0.2, seed=0)
    assert len(held) == 4 and len(train) == 16
    assert not {p.query_id for p in train} & {p.query_id for p in held}
    assert split_by_query(pairs, 0.2, seed=0) == (train, held)
    assert split_by_query(pairs, 0.0, seed=0) == (pairs, [])


def test_training_separates_clean_from_noisy(trained):
    run_dir, summary = trained
    assert summary["heldout_pairs"] == 3 and summary["train_pairs"] == 12
    stats = json.loads((run_dir / "rm" / "stats.json").read_text())
    assert stats["source"] == "heldout" and stats["pairwise_accuracy"] == 1.0
    assert stats["chosen_mean"] > stats["rejected_mean"] and stats["std"] > 0
    rows = [json.loads(x) for x in (run_dir / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert any("rm/train/loss" in r for r in rows) and "rm/heldout/accuracy" in rows[-1]


def test_batched_scores_equal_single_scores(trained):
    run_dir, _ = trained
    rm = TrajectoryRewardModel.load(run_dir / "rm" / "model")
    assert rm.system_prompt == SYSTEM
    items = [(question(i), make_trajectory(i, noisy=i % 2 == 1)) for i in range(7)]
    batched = rm.score(items, batch_size=4)
    single = [rm.score([item], batch_size=1)[0] for item in items]
    assert batched == pytest.approx(single, abs=1e-4)
    assert all(batched[i] > batched[i + 1] for i in range(0, 6, 2))  # clean > noisy
    z = rm.normalized(items, batch_size=3)
    mean, std = rm.stats["mean"], rm.stats["std"]
    assert z == pytest.approx([(s - mean) / std for s in batched], abs=1e-4)
    half = TrajectoryRewardModel.load(run_dir / "rm" / "model", dtype="bfloat16")  # same head check
    assert half.score(items[:2]) == pytest.approx(batched[:2], abs=0.5)


def test_head_inputs_times_the_head_are_the_scores(trained):
    """head_inputs pools where scoring pools: the trained head applied to them gives the scores
    (rows of different lengths, right-padded in one batch)."""
    from safetensors.torch import load_file

    run_dir, _ = trained
    rm = TrajectoryRewardModel.load(run_dir / "rm" / "model")
    items = [(question(i), make_trajectory(i, noisy=i % 2 == 1)) for i in range(5)]
    ids = [render_trajectory(rm.tokenizer, q, t, rm.system_prompt).input_ids for q, t in items]
    assert len({len(x) for x in ids}) > 1
    features = head_inputs(str(run_dir / "rm" / "model"), rm.tokenizer.pad_token_id, ids, 4)
    weights = {}
    for f in (run_dir / "rm" / "model").glob("*.safetensors"):
        weights.update(load_file(str(f)))
    head = weights["score.weight"].float()
    assert features.shape == (5, head.shape[1])
    assert (features @ head.T)[:, 0].tolist() == pytest.approx(rm.score_ids(ids), abs=1e-4)


def test_refuses_model_without_trained_head(trained, tiny_model_dir, tmp_path):
    import shutil

    run_dir, _ = trained
    marker = (run_dir / "rm" / "model" / "autotraj-rm.json").read_text()
    with pytest.raises(RewardModelError, match="autotraj-rm.json"):
        TrajectoryRewardModel.load(tiny_model_dir)  # a causal LM: no head at all
    fake = tmp_path / "no-head"
    shutil.copytree(tiny_model_dir, fake)
    (fake / "autotraj-rm.json").write_text(marker)
    with pytest.raises(RewardModelError, match="score head is missing"):
        TrajectoryRewardModel.load(fake)
    from transformers import AutoModelForSequenceClassification

    random_head = tmp_path / "random-head"
    AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=1
    ).save_pretrained(random_head)
    shutil.copy(tiny_model_dir / "tokenizer.json", random_head)
    shutil.copy(tiny_model_dir / "tokenizer_config.json", random_head)
    (random_head / "autotraj-rm.json").write_text(marker)
    with pytest.raises(RewardModelError, match="not the trained one"):
        TrajectoryRewardModel.load(random_head)


def test_score_without_stats_cannot_normalize(trained, tmp_path):
    run_dir, _ = trained
    rm = TrajectoryRewardModel.load(run_dir / "rm" / "model", stats_path=tmp_path / "none.json")
    with pytest.raises(RewardModelError, match="stats"):
        rm.normalized([(question(0), make_trajectory(0))])


def test_lora_reward_model_saves_trained_head(tmp_path, tiny_model_dir, monkeypatch):
    """The saved `score.weight` is the head the LoRA run trained (peft keeps it in
    `modules_to_save`), not the freshly initialised one: `load` alone would accept either, as
    its sha256 is written at save time."""
    import torch
    from safetensors.torch import load_file

    import autotraj.train.reward_model as rm_module

    heads: dict[str, torch.Tensor] = {}
    load_classifier, save = rm_module.load_sequence_classifier, rm_module.save_reward_model

    def load_spy(*args, **kwargs):
        model, info = load_classifier(*args, **kwargs)
        heads.setdefault("initial", model.score.weight.detach().clone())  # the trainer's model
        return model, info

    def save_spy(trainer, *args, **kwargs):
        trained = [
            p for n, p in trainer.model.named_parameters() if "score" in n and p.requires_grad
        ]
        assert len(trained) == 1, "the LoRA run trains exactly one score head"
        heads["trained"] = trained[0].detach().clone()
        return save(trainer, *args, **kwargs)

    monkeypatch.setattr(rm_module, "load_sequence_classifier", load_spy)
    monkeypatch.setattr(rm_module, "save_reward_model", save_spy)
    cfg = tiny_config(tmp_path, tiny_model_dir, lora=LoraSettings(rank=8, alpha=16), max_steps=3)
    summary = run_rm(cfg)
    assert summary["steps"] == 3
    saved = load_file(str(tmp_path / "rm" / "model" / "model.safetensors"))["score.weight"]
    assert torch.equal(saved, heads["trained"])
    assert not torch.equal(heads["trained"], heads["initial"])
    rm = TrajectoryRewardModel.load(tmp_path / "rm" / "model")  # head sha256 checked
    assert len(rm.score([(question(0), make_trajectory(0))])) == 1


@pytest.mark.parametrize("name", ["cpu.yaml", "paper.yaml"])
def test_shipped_batches_divide(name):
    # (that every shipped config loads: tests/test_config.py)
    cfg = load_stage_config(RmConfig, "rm", CONFIGS / name)
    assert cfg.effective_batch_size % cfg.per_device_batch_size == 0


def test_paper_defaults():
    cfg = load_stage_config(RmConfig, "rm", CONFIGS / "paper.yaml")
    assert (cfg.learning_rate, cfg.epochs, cfg.effective_batch_size) == (1e-5, 2, 32)
    assert cfg.lora.rank == 8 and cfg.lora.target_modules == ("all-linear",)


@pytest.mark.slow
def test_embedded_model_few_steps(tmp_path):
    cfg = load_stage_config(
        RmConfig,
        "rm",
        CONFIGS / "cpu.yaml",
        [f"run_dir={tmp_path}", "max_steps=2", "model=embedded:smollm2-135m-instruct"],
    )
    write_preference_file(tmp_path / "build" / "preferences.jsonl", 10)
    summary = run_rm(cfg)
    assert summary["steps"] == 2 and summary["heldout_pairs"] == 2
