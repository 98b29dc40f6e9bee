"""GRPO: advantages, loss pieces, the loss mask, short real runs on the tiny model, resume."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from conftest import write_jsonl

from autotraj.config import ConfigError, build
from autotraj.models.scripted import ScriptedGenerator
from autotraj.records import Query, ToolCall
from autotraj.render import render_trajectory
from autotraj.rollout import RolloutConfig, rollout
from autotraj.tools.tool import ToolInfraError
from autotraj.train import grpo
from autotraj.train.advantages import (
    collate,
    group_advantages,
    kl_k3,
    policy_loss,
    prompt_indices,
    token_logprobs,
)
from autotraj.train.grpo import GrpoRun, RlConfig, run_rl

REQUIRED_METRICS = {
    "rl/reward/mean",
    "rl/reward/format_valid",
    "rl/reward/outcome",
    "rl/accuracy",
    "rl/format_rate",
    "rl/tools/calls_per_trajectory",
    "rl/tools/error_rate",
    "rl/tools/timeout_rate",
    "rl/response_length",
    "rl/kl",
    "rl/entropy",
    "rl/clip_fraction",
    "rl/infra_excluded",
    "rl/loss",
}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each run builds its own Accelerator: reset accelerate's process-wide singletons. One
    torch thread: the tiny model gains nothing from more, and on shared cores a second thread
    made these tests ~20x slower (docs/rl.md, CPU speed)."""
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- advantages and loss pieces ---------------------------------------------------------------


def test_group_advantages_normalize_per_group():
    rewards = [1.0, 0.0, -1.0, 0.5, 0.5]
    adv = group_advantages(rewards, ["a", "a", "a", "b", "b"])
    t = torch.tensor(rewards[:3])
    expected = ((t - t.mean()) / (t.std() + 1e-6)).tolist()
    assert adv[:3] == pytest.approx(expected)
    assert adv[3:] == [0.0, 0.0]  # identical rewards: no signal


def test_excluded_rollouts_take_no_part_in_their_group():
    adv = group_advantages([1.0, None, 0.0, None], ["g"] * 3 + ["h"])
    assert adv[1] is None and adv[3] is None
    assert adv[0] == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6))
    assert adv[0] == pytest.approx(-adv[2])
    assert group_advantages([1.0, None], ["g", "g"]) == [0.0, None]  # one survivor: no baseline
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages([math.nan, 1.0], ["g", "g"])


def test_token_logprobs_are_aligned_with_the_tokens():
    torch.manual_seed(0)
    logits, ids = torch.randn(1, 4, 7), torch.tensor([[3, 1, 4, 1]])
    logp, entropy = token_logprobs(logits, ids, with_entropy=True)
    assert logp[0, 0] == 0 and entropy[0, 0] == 0
    for t in range(1, 4):
        dist = torch.log_softmax(logits[0, t - 1], -1)
        assert logp[0, t] == pytest.approx(float(dist[ids[0, t]]), abs=1e-6)
        assert entropy[0, t] == pytest.approx(float(-(dist.exp() * dist).sum()), abs=1e-5)


def _naive_token_logprobs(logits, ids):
    """The full-vocabulary fp32 log-softmax that `token_logprobs` avoids materializing."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return torch.nn.functional.pad(picked, (1, 0)), torch.nn.functional.pad(entropy, (1, 0))


def test_chunked_token_logprobs_equal_the_naive_ones_with_gradients(tiny_model_dir):
    """On the tiny model's real logits: values and gradients (through log-probs and entropy,
    down to the weights) equal the plain log-softmax, for chunks that do not divide B x T."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    weights = torch.randn(3, 11)
    results = []
    for chunk in (None, 1, 7, 1000):
        model.zero_grad()
        logits = model(input_ids=ids).logits
        if chunk is None:
            logp, entropy = _naive_token_logprobs(logits, ids)
        else:
            logp, entropy = token_logprobs(logits, ids, with_entropy=True, chunk=chunk)
        ((logp * weights).sum() + 0.3 * (entropy * weights).sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((logp.detach(), entropy.detach(), grads))
    (ref_logp, ref_entropy, ref_grads) = results[0]
    for logp, entropy, grads in results[1:]:
        torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, ref_entropy, atol=1e-5, rtol=1e-5)
        for g, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)
    logp, entropy = token_logprobs(model(input_ids=ids).logits, ids, chunk=4)
    assert entropy is None and torch.allclose(logp, ref_logp, atol=1e-5)


def test_token_logprobs_never_hold_the_full_vocabulary_in_fp32():
    """Under bf16 logits (autocast), the largest fp32 tensor made in the forward and backward
    pass has `chunk` rows, not B x T: the 7 GB of a 4 x 2816 x 152064 micro-batch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFp32(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.numel = max(self.numel, t.numel())
            return out

    batch, length, vocab, chunk = 2, 40, 300, 8
    logits = torch.randn(batch, length, vocab, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, length))
    for compute, most in (
        (lambda: token_logprobs(logits, ids, with_entropy=True, chunk=chunk), chunk * vocab),
        (lambda: _naive_token_logprobs(logits, ids), batch * (length - 1) * vocab),
    ):
        with LargestFp32() as seen:
            logp, entropy = compute()
            (logp.sum() + entropy.sum()).backward()
        assert seen.numel == most
    assert logits.grad.dtype == torch.bfloat16


def test_policy_loss_clips_the_ratio_and_adds_entropy_and_kl():
    mask = torch.tensor([[1.0, 1.0]])
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.5, 0.0]], requires_grad=True)  # ratio e^0.5 > 1.2 on token 0
    loss, stats = policy_loss(new, old, torch.tensor([1.0]), mask, normalizer=2.0, clip=0.2)
    loss.backward()
    assert stats.clipped == 1.0 and stats.tokens == 2.0
    assert new.grad[0, 0] == 0  # clipped: no gradient
    assert new.grad[0, 1] == pytest.approx(-0.5)  # -A * ratio / normalizer
    ent = torch.tensor([[2.0, 2.0]])
    plain, _ = policy_loss(old, old, torch.tensor([0.0]), mask, 2.0)
    bonus, _ = policy_loss(old, old, torch.tensor([0.0]), mask, 2.0, entropy=ent, entropy_coef=0.1)
    assert float(bonus) == pytest.approx(float(plain) - 0.2)
    ref = torch.tensor([[-1.0, 0.0]])
    with_kl, stats = policy_loss(
        old, old, torch.tensor([0.0]), mask, 2.0, ref_logprobs=ref, kl_coef=1.0
    )
    assert float(with_kl) == pytest.approx(float(kl_k3(old, ref).sum()) / 2)
    assert stats.kl == pytest.approx(math.exp(-1) + 1 - 1)


def test_prompt_indices_cover_each_epoch_and_are_reproducible():
    first = [i for s in range(3) for i in prompt_indices(6, s, 2, seed=1)]
    assert sorted(first) == list(range(6))
    assert prompt_indices(6, 4, 2, seed=1) == prompt_indices(6, 4, 2, seed=1)


# --- the loss mask is the rollout's own trainable flags ------------------------------------------


class StubPython:
    """Evaluates `print(expr)`; raises an infrastructure error for input 'crash'."""

    name = "python"

    def run_batch(self, inputs):
        if any(i == "crash" for i in inputs):
            raise ToolInfraError("sandbox pool died")
        out = []
        for text in inputs:
            value = eval(text.removeprefix("print(").removesuffix(")"))
            out.append(ToolCall(tool="python", input=text, output=str(value), status="ok"))
        return out

    def close(self):
        pass


def tool_then_answer(request):
    if "<result>" not in request.prompt_text.split("<|im_start|>assistant")[-1]:
        return "<think>add</think>\n<code>\nprint(1+1)\n</code>"
    return "<think>done</think>\n<answer>\\boxed{2}</answer>"


def test_loss_mask_equals_rollout_trainable_flags(tokenizer):
    query = Query(id="q", question="What is 1+1?", answers=("2",), kind="math")
    gen = ScriptedGenerator(tool_then_answer, tokenizer)
    cfg = RolloutConfig(system_prompt="Use tags.", max_new_tokens=64)
    [traj] = rollout(gen, {"python": StubPython()}, tokenizer, [("t", query)], cfg)
    assert [s.trainable for s in traj.segments] == [True, False, True]
    rendered = render_trajectory(tokenizer, query.question, traj, "Use tags.")
    ids, attention, mask = collate([rendered, rendered], pad_id=tokenizer.pad_token_id)
    flags = [False] * len(traj.prompt_ids)
    for segment in traj.segments:
        flags += [segment.trainable] * len(segment.token_ids)
    flags.append(True)  # the end-of-turn token the model produced
    n = len(flags)
    assert mask[0, :n].bool().tolist() == flags
    assert ids[0, :n].tolist() == list(traj.prompt_ids) + [
        t for s in traj.segments for t in s.token_ids
    ] + [tokenizer.eos_token_id]
    masked_text = tokenizer.decode(ids[0, :n][mask[0, :n] == 0].tolist())
    assert "<result>\n2\n</result>" in masked_text and "<code>" not in masked_text
    assert attention[0].sum() == n


# --- real runs on the tiny model --------------------------------------------------------------


def char_reward(text, query, trajectory):
    """A test reward that differs between random completions (so advantages are not zero)."""
    return text.count("a") / 4


def distinct_char_reward(text, query, trajectory):
    """A test reward that almost surely differs between random completions of the tiny model."""
    return len(set(text)) / 10


def write_queries(path, n=3):
    rows = [
        {"id": f"q{i}", "question": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(n)
    ]
    return write_jsonl(path, rows)


def tiny_config(tmp_path, model_dir, **overrides):
    data = {
        "run_dir": str(tmp_path / "run"),
        "model": str(model_dir),
        "queries": str(write_queries(tmp_path / "queries.jsonl")),
        "steps": 2,
        "prompts_per_step": 2,
        "rollouts_per_prompt": 2,
        "micro_batch_size": 2,
        "mixed_precision": "no",
        "lr": 1e-2,
        "save_every": 1,
        "generator": {"batch_size": 4},
        "tools": {"python": {"workers": 1}},
        "reward": {
            "rm_weight": 0.0,
            "components": [{"name": "test_grpo:char_reward", "weight": 1.0}],
        },
        "rollout": {"max_new_tokens": 32, "max_response_tokens": 32, "system_prompt": "Use tags."},
    }
    data.update(overrides)
    return build(RlConfig, data)


def load_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_grpo_run_changes_weights_and_writes_metrics(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path, tiny_model_dir)
    result = run_rl(cfg)
    out = tmp_path / "run" / "rl"
    assert result["steps"] == 2
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    rows = load_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row) >= REQUIRED_METRICS, REQUIRED_METRICS - set(row)
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
        assert "rl/reward/test_grpo:char_reward" in row
    rollouts = load_rows(out / "rollouts.jsonl")
    assert len(rollouts) == 2 * 2 * 2
    assert (out / "manifest.json").exists() and (out / "config.resolved.yaml").exists()
    saved = (out / "model" / "model.safetensors").stat().st_mtime_ns
    assert run_rl(cfg)["steps"] == 2  # a finished run is a no-op
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == saved


def test_resume_restores_step_and_optimizer(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(grpo, "open_tools", lambda cfg: {"python": StubPython()})
    run_rl(tiny_config(tmp_path, tiny_model_dir, steps=1))
    ckpt = tmp_path / "run" / "rl" / "checkpoints" / "step-000001"
    saved = torch.load(ckpt / "optimizer.bin", weights_only=False)
    run = GrpoRun(tiny_config(tmp_path, tiny_model_dir, steps=2))
    assert run.progress.step == 0 and not run.optimizer.state_dict()["state"]
    assert run.restore() == 1
    state = run.optimizer.state_dict()["state"]
    assert state and all(
        torch.equal(state[k]["exp_avg"], saved["state"][k]["exp_avg"]) for k in saved["state"]
    )
    run.train()
    rows = load_rows(tmp_path / "run" / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    changed = tiny_config(tmp_path, tiny_model_dir, steps=3, lr=0.5)
    with pytest.raises(ConfigError, match="different config"):
        run_rl(changed)


class ScriptedScorer:
    """A reward model stand-in: every trajectory scores 1.0 (normalized); records batch sizes."""

    def __init__(self):
        self.calls = []

    def score(self, items, batch_size):
        raise AssertionError("the default config asks for normalized scores")

    def normalized(self, items, batch_size):
        self.calls.append(len(items))
        return [1.0] * len(items)


def test_infra_failed_rollout_is_excluded_from_its_group(tmp_path, tiny_model_dir, monkeypatch):
    replies = iter(
        [
            "<think>x</think>\n<code>crash</code>",  # the sandbox dies: infra_error
            "<think>x</think>\n<answer>\\boxed{2}</answer>",  # correct
            "<think>x</think>\n<answer>\\boxed{3}</answer>",  # wrong
            "no format at all",  # format gate
        ]
    )
    monkeypatch.setattr(grpo, "open_tools", lambda cfg: {"python": StubPython()})
    monkeypatch.setattr(
        GrpoRun,
        "_generator",
        lambda self: ScriptedGenerator(lambda r: next(replies), self.tokenizer),
    )
    queries = tmp_path / "one.jsonl"
    queries.write_text(json.dumps({"id": "q1", "question": "What is 1+1?", "answer": "2"}) + "\n")
    cfg = tiny_config(
        tmp_path,
        tiny_model_dir,
        steps=1,
        prompts_per_step=1,
        rollouts_per_prompt=4,
        queries=str(queries),
        reward={"rm_weight": 0.2},
        rollout={"max_new_tokens": 64, "max_response_tokens": 128, "system_prompt": "Use tags."},
    )
    scorer = ScriptedScorer()
    run_rl(cfg, scorer=scorer)
    assert scorer.calls == [3]  # the infra-failed rollout is never sent to the reward model
    out = tmp_path / "run" / "rl"
    rows = load_rows(out / "rollouts.jsonl")
    assert [r["reward"]["reward"] for r in rows] == pytest.approx([None, 1.2, 0.0, -1.0])
    assert [r["reward"]["rm"] for r in rows] == [None, 1.0, 1.0, 1.0]
    assert rows[0]["advantage"] is None and rows[0]["reward"]["excluded"]
    assert sum(r["advantage"] for r in rows[1:]) == pytest.approx(0.0, abs=1e-6)
    [metrics] = load_rows(out / "metrics.jsonl")
    assert metrics["rl/infra_excluded"] == 1.0
    assert metrics["rl/accuracy"] == pytest.approx(1 / 3)
    assert metrics["rl/format_rate"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", ["cpu.yaml", "paper.yaml"])
def test_shipped_configs_keep_the_release_objective(name):
    # (that every shipped config loads: tests/test_config.py)
    from pathlib import Path

    from autotraj.config import load_stage_config

    cfg = load_stage_config(RlConfig, "rl", Path(__file__).parent.parent / "configs" / name)
    assert cfg.clip == 0.2 and cfg.entropy_coef == 0.001 and cfg.kl_coef == 0.0
    assert cfg.rollout.temperature == 1.0 and cfg.rollouts_per_prompt == 4


def test_release_defaults():
    cfg = RlConfig()
    assert (cfg.prompts_per_step, cfg.rollouts_per_prompt, cfg.lr) == (12, 4, 1e-6)
    assert (cfg.max_prompt_tokens, cfg.rollout.max_response_tokens) == (768, 2048)
    assert (cfg.reward.rm_weight, cfg.reward.clip, cfg.reward.f1_on_math) == (0.2, 3.0, False)


# --- rl.loss and rl.sampling options in a run -------------------------------------------------


def scripted_run(tmp_path, tiny_model_dir, monkeypatch, reply, **overrides):
    """One step on the tiny model's tokenizer and weights with `reply` generating the rollouts."""
    monkeypatch.setattr(grpo, "open_tools", lambda cfg: {"python": StubPython()})
    monkeypatch.setattr(
        GrpoRun, "_generator", lambda self: ScriptedGenerator(reply, self.tokenizer)
    )
    cfg = tiny_config(tmp_path, tiny_model_dir, steps=1, **overrides)
    run_rl(cfg)
    out = tmp_path / "run" / "rl"
    [metrics] = load_rows(out / "metrics.jsonl")
    return metrics, load_rows(out / "rollouts.jsonl")


def rambling(request):
    """Never stops on its own: every rollout ends at the token budget (finish_reason length)."""
    return "<think>" + "a" * (request.seed % 7 + 40) + " and so on"


@pytest.mark.parametrize("mask", [False, True])
def test_overlong_mask_takes_truncated_rollouts_out_of_the_loss(
    tmp_path, tiny_model_dir, monkeypatch, mask
):
    metrics, rows = scripted_run(
        tmp_path,
        tiny_model_dir,
        monkeypatch,
        rambling,
        loss={"overlong_mask": mask},
        rollout={"max_new_tokens": 16, "max_response_tokens": 16, "system_prompt": "Use tags."},
    )
    assert all(r["trajectory"]["finish_reason"] == "length" for r in rows)
    if mask:
        assert metrics["rl/trainable_tokens"] == 0 and metrics["rl/overlong_masked"] == len(rows)
    else:
        assert metrics["rl/trainable_tokens"] == 16 * len(rows)
        assert metrics["rl/overlong_masked"] == 0


def test_soft_overlong_penalty_lowers_the_reward_of_long_rollouts(
    tmp_path, tiny_model_dir, monkeypatch
):
    def short_or_long(request):
        filler = "a" if request.seed % 2 else "a " * 40  # ~40 or ~120 tokens (char-level)
        return f"<think>{filler}</think>\n<answer>\\boxed{{0}}</answer>"

    _, rows = scripted_run(
        tmp_path,
        tiny_model_dir,
        monkeypatch,
        short_or_long,
        loss={"overlong_buffer": 100},
        rollout={"max_new_tokens": 200, "max_response_tokens": 200, "system_prompt": "Use tags."},
    )
    penalties = [r["reward"]["components"]["overlong_penalty"] for r in rows]
    assert min(penalties) < 0 and max(penalties) == 0.0
    for r in rows:
        c = r["reward"]["components"]
        base = 1.0 * c["test_grpo:char_reward"] + r["reward"]["outcome"]
        assert r["reward"]["reward"] == pytest.approx(base + c["overlong_penalty"])


def uniform_or_not(request):
    """Query q0's rollouts all earn the same reward; the others' differ with the seed."""
    k = 4 if "0+0" in request.prompt_text else request.seed % 5
    return f"<think>{'a' * k}</think>\n<answer>\\boxed{{1}}</answer>"


def group_of(row):
    return row["trajectory"]["id"].rsplit("/r", 1)[0]


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_sampling_drops_uniform_groups_and_refills(
    tmp_path, tiny_model_dir, monkeypatch, dynamic
):
    metrics, rows = scripted_run(
        tmp_path,
        tiny_model_dir,
        monkeypatch,
        uniform_or_not,
        prompts_per_step=3,
        rollouts_per_prompt=3,
        sampling={"dynamic": dynamic, "max_rounds": 3},
    )
    advantages = {}
    for r in rows:
        advantages.setdefault(group_of(r), []).append(r["advantage"])
    uniform = [g for g, a in advantages.items() if not any(a)]
    assert any("/q0" in g for g in uniform)  # the all-equal group exists in both runs
    if not dynamic:
        assert len(advantages) == 3 and "rl/dynamic/dropped_groups" not in metrics
        assert metrics["rl/advantage/zero_fraction"] >= 1 / 3
        return
    # every generated group is saved; the uniform ones were dropped and refilled
    assert metrics["rl/dynamic/dropped_groups"] == len(uniform) >= 1
    assert metrics["rl/dynamic/rounds"] >= 1
    assert metrics["rl/dynamic/kept_groups"] == len(advantages) - len(uniform)
    assert any("/f1p" in g for g in advantages)  # a refill round's group
    if metrics["rl/dynamic/kept_groups"] == 3:
        assert metrics["rl/advantage/zero_fraction"] < 1 / 3  # the trained batch has signal


def test_dry_run_shows_the_objective_and_sampling_options(capsys):
    from autotraj.cli import main

    main(["rl", "--dry-run", "loss.aggregation=gspo", "sampling.dynamic=true"])
    printed = capsys.readouterr().out
    for key in ("aggregation: gspo", "clip_high:", "overlong_buffer:", "tis_cap:", "dynamic: true"):
        assert key in printed


def test_sampler_trainer_mismatch_is_logged_and_tis_changes_the_update(
    tmp_path, tiny_model_dir, cpu_bf16
):
    """Rollouts from the fp32 policy itself: the sampler's log-probs equal the trainer's. From
    the bf16 rollout copy they differ, the metrics say so, and truncated importance sampling
    (cap 1.0: every ratio above 1 is cut) changes the update from the same rollouts."""
    from transformers import AutoModelForCausalLM

    # the test reward alone, not gated by the format (which the random tiny model rarely
    # meets): the update must not vanish with all-zero advantages
    reward = {
        "formula": "none",
        "rm_weight": 0.0,
        "components": [{"name": "test_grpo:distinct_char_reward", "weight": 1.0}],
    }

    def run(name, **overrides):
        cfg = tiny_config(
            tmp_path / name,
            tiny_model_dir,
            steps=1,
            tools={"python": {"workers": 1}},
            reward=reward,
            **overrides,
        )
        run_rl(cfg)
        out = tmp_path / name / "run" / "rl"
        [metrics] = load_rows(out / "metrics.jsonl")
        return metrics, AutoModelForCausalLM.from_pretrained(out / "model").state_dict()

    same, _ = run("policy", sampling={"sampler_logprobs": True})
    assert same["rl/mismatch/tokens"] > 0
    assert same["rl/mismatch/abs_logprob_diff"] < 1e-4
    bf16 = {"sampler_logprobs": True}
    copy, plain = run("bf16", generator={"batch_size": 4, "dtype": "bfloat16"}, sampling=bf16)
    assert copy["rl/mismatch/abs_logprob_diff"] > 1e-3
    assert copy["rl/advantage/zero_fraction"] < 1.0  # the premise: something to update
    assert copy["rl/mismatch/ratio_max"] > 1.0  # and ratios for the cap to cut
    _, tis = run(
        "tis",
        generator={"batch_size": 4, "dtype": "bfloat16"},
        sampling=bf16,
        loss={"tis_cap": 1.0},
    )
    assert any(not torch.equal(plain[k], tis[k]) for k in plain)
    _, again = run("bf16-again", generator={"batch_size": 4, "dtype": "bfloat16"}, sampling=bf16)
    assert all(torch.equal(plain[k], again[k]) for k in plain)  # the difference is the TIS
    off, _ = run("off")
    assert not any(k.startswith("rl/mismatch/") for k in off)


def test_tis_needs_the_sampler_logprobs(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="sampling.sampler_logprobs"):
        run_rl(tiny_config(tmp_path, tiny_model_dir, loss={"tis_cap": 2.0}))


def test_tis_with_the_vllm_backend_is_accepted(tmp_path, tiny_model_dir):
    """vLLM returns the sampled tokens' log-probs (the run itself: tests/vllm_cpu/)."""
    from autotraj.train.rl_config import check_rl_config

    cfg = tiny_config(
        tmp_path,
        tiny_model_dir,
        generator={"backend": "vllm"},
        sampling={"sampler_logprobs": True},
        loss={"tis_cap": 2.0},
    )
    check_rl_config(cfg)


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        ("rollout", {"max_consecutive_invalid_calls": -1}, "rollout.max_consecutive_invalid_calls"),
        ("sampling", {"max_rounds": -1}, "sampling.max_rounds"),
        ("loss", {"clip_high": -0.1}, "loss.clip_high"),
    ],
)
def test_bad_option_values_name_the_field(tmp_path, tiny_model_dir, section, values, field):
    with pytest.raises(ConfigError, match=field):
        run_rl(tiny_config(tmp_path, tiny_model_dir, **{section: values}))


# --- LoRA RL ----------------------------------------------------------------------------------


def test_lora_rollouts_come_from_the_updated_policy(tmp_path, tiny_model_dir):
    """Adapters train, the base weights do not, and the bf16 rollout engine samples from base +
    adapters (not the base: the silent failure users report); the saved model is merged."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(
        tmp_path,
        tiny_model_dir,
        lr=5e-2,
        lora={"rank": 4, "alpha": 8, "dropout": 0.0},
        generator={"batch_size": 4, "dtype": "bfloat16"},
    )
    run = GrpoRun(cfg)
    for step in range(2):
        run.step(step, {"python": StubPython()})
    policy = run.accelerator.unwrap_model(run.model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    base_state = base.state_dict()
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapters moved
    frozen = {n: p for n, p in policy.get_base_model().named_parameters() if "lora_" not in n}
    for name, param in frozen.items():  # ... and nothing else did
        assert torch.equal(param, base_state[name.replace(".base_layer.", ".")]), name
    run._generator()  # what every step does before its rollouts: sync the engine
    engine = run.rollout_engine.model
    ids = torch.tensor([list(range(5, 40))])
    policy.eval()
    with torch.no_grad():
        updated = policy(input_ids=ids).logits
        sampled = engine(input_ids=ids).logits.float()
        original = base(input_ids=ids).logits
    moved = (original - updated).abs().max()
    assert moved > 0.5  # the update is large enough to tell the two apart
    assert (sampled - updated).abs().max() < 0.1 * moved  # the engine has the update
    run.save_final()
    out = tmp_path / "run" / "rl"
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, updated, atol=1e-4)
    assert (out / "adapter" / "adapter_config.json").exists()


def test_lora_trains_in_a_run_with_rollouts_from_the_policy_itself(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, lora={"rank": 4, "alpha": 8, "dropout": 0.0})
    assert run_rl(cfg)["steps"] == 2
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "rl" / "model").state_dict()
    assert set(before) == set(after)  # a plain checkpoint, no adapter names
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("proj" in k for k in changed)  # only LoRA-targeted linears moved


def test_lora_run_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(grpo, "open_tools", lambda cfg: {"python": StubPython()})
    lora = {"rank": 4, "alpha": 8, "dropout": 0.0}
    run_rl(tiny_config(tmp_path, tiny_model_dir, steps=1, lora=lora))
    run = GrpoRun(tiny_config(tmp_path, tiny_model_dir, steps=2, lora=lora))
    policy = run.accelerator.unwrap_model(run.model)
    fresh = {n: p.clone() for n, p in policy.named_parameters() if "lora_B" in n}
    assert all(p.abs().sum() == 0 for p in fresh.values())  # B starts at zero
    assert run.restore() == 1
    restored = {n: p for n, p in policy.named_parameters() if "lora_B" in n}
    assert any(p.abs().sum() > 0 for p in restored.values())  # the trained adapters are back
    run.train()
    rows = load_rows(tmp_path / "run" / "rl" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]


def test_frozen_models_load_in_the_configured_dtype(
    tmp_path, tiny_model_dir, monkeypatch, cpu_bf16
):
    """The KL reference and the reward model: bf16 when asked (auto does so on a GPU), so that
    two extra whole 7B models are not 30 GB each in fp32 on every process."""
    assert grpo.frozen_dtype("auto", torch.device("cuda", 3)) == torch.bfloat16
    assert grpo.frozen_dtype("auto", torch.device("cpu")) == torch.float32
    run = GrpoRun(tiny_config(tmp_path, tiny_model_dir, kl_coef=0.1, frozen_dtype="bfloat16"))
    assert run.ref_model.dtype == torch.bfloat16
    assert next(run.model.parameters()).dtype == torch.float32  # the policy trains in fp32
    default = GrpoRun(tiny_config(tmp_path / "cpu", tiny_model_dir, kl_coef=0.1))
    assert default.ref_model.dtype == torch.float32
    from autotraj.train import reward_model

    loads = []
    monkeypatch.setattr(grpo, "resolve_rm", lambda cfg: "rm-dir")
    monkeypatch.setattr(
        reward_model.TrajectoryRewardModel, "load", lambda path, **kw: loads.append(kw)
    )
    with pytest.raises(AttributeError):  # the recorded stand-in returns None, not a model
        run._load_scorer()
    assert loads == [{"device": "cpu", "dtype": "bfloat16"}]


def test_documented_multi_gpu_rl_commands_divide_the_prompts_among_the_processes():
    """Every `accelerate launch ... rl --config configs/paper.yaml` in the docs and configs:
    its process count (`--num_processes`, else the accelerate file's) must divide
    prompts_per_step, or the stage refuses to start (the configs' 8 GPUs do not divide 12)."""
    import re
    from pathlib import Path

    import yaml

    from autotraj.config import load_stage_config

    root = Path(__file__).parent.parent
    per_step = load_stage_config(RlConfig, "rl", root / "configs" / "paper.yaml").prompts_per_step
    found = []
    for doc in ("README.md", "docs/rl.md", "docs/training.md", "configs/paper.yaml"):
        text = re.sub(r"\\\n[#\s]*", " ", (root / doc).read_text(encoding="utf-8"))
        for line in text.splitlines():
            if "accelerate launch" not in line or " rl " not in line or "paper.yaml" not in line:
                continue
            if count := re.search(r"--num_processes (\d+)", line):
                processes = int(count.group(1))
            else:
                launch = re.search(r"--config_file (\S+)", line).group(1)
                processes = yaml.safe_load((root / launch).read_text())["num_processes"]
            override = re.search(r"prompts_per_step=(\d+)", line)
            prompts = int(override.group(1)) if override else per_step
            found.append((doc, processes))
            assert prompts % processes == 0, f"{doc}: {prompts} prompts on {processes}: {line}"
    assert len(found) >= 4, found


def test_on_policy_update_skips_the_old_logprob_pass_with_the_same_result(
    tmp_path, tiny_model_dir, monkeypatch
):
    """One optimizer step per batch: the update uses the current log-probs, detached, as the
    old ones (no second forward pass) and ends at the weights, loss and mismatch metrics of the
    path that runs the separate pass."""
    from transformers import AutoModelForCausalLM

    from autotraj.train.grpo_update import PolicyUpdate

    passes = []
    fixed = PolicyUpdate._fixed_logprobs

    def counting(self, model, samples, collective):
        passes.append(len(samples))
        return fixed(self, model, samples, collective)

    monkeypatch.setattr(PolicyUpdate, "_fixed_logprobs", counting)

    def run(name):
        cfg = tiny_config(
            tmp_path / name,
            tiny_model_dir,
            steps=1,
            tools={"python": {"workers": 1}},
            sampling={"sampler_logprobs": True},
            # whole rows in both runs: the separate pass sees other micro-batches than the
            # update, and a shared-prompt forward over another grouping rounds differently,
            # which Adam's first step (~lr * sign(gradient)) turns into lr-sized differences
            shared_prompt_forward=False,
        )
        run_rl(cfg)
        out = tmp_path / name / "run" / "rl"
        [metrics] = load_rows(out / "metrics.jsonl")
        return metrics, AutoModelForCausalLM.from_pretrained(out / "model").state_dict()

    fast, fast_weights = run("fast")
    assert passes == []
    monkeypatch.setattr(PolicyUpdate, "on_policy", lambda self: False)
    slow, slow_weights = run("slow")
    assert passes
    for key in ("rl/loss", "rl/entropy", "rl/mismatch/abs_logprob_diff", "rl/mismatch/tokens"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-4, abs=1e-6), key
    assert fast["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    for key, value in slow_weights.items():
        torch.testing.assert_close(fast_weights[key], value, rtol=1e-4, atol=1e-6)


def test_logits_from_the_first_trainable_position_equal_the_full_ones(tiny_model_dir, tokenizer):
    """The update asks the model for logits from the position before the first trainable token
    only; on every trainable token the log-probs, entropies and gradients equal those of the
    full logits."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from autotraj.render import RenderedTrajectory
    from autotraj.train.advantages import token_logprobs
    from autotraj.train.grpo_update import PolicyUpdate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    update = PolicyUpdate.__new__(PolicyUpdate)
    update.accelerator, update.tokenizer = Accelerator(cpu=True), tokenizer
    update._share_prompts, update._rows = False, Counter()
    batch = [
        RenderedTrajectory(tuple(range(5, 17)), (False,) * 7 + (True,) * 5, 7),
        RenderedTrajectory(tuple(range(20, 29)), (False,) * 5 + (True,) * 3 + (False,), 5),
    ]
    logp, entropy, mask, ids = update._forward_logprobs(model, batch, with_entropy=True)
    (logp * mask).sum().backward()
    fast_grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    attention = torch.tensor([[1] * 12, [1] * 9 + [0] * 3])  # collate pads on the right
    full = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    ref_logp, ref_entropy = token_logprobs(full, ids, with_entropy=True)
    (ref_logp * mask).sum().backward()
    on = mask.bool()
    torch.testing.assert_close(logp[on], ref_logp[on])
    torch.testing.assert_close(entropy[on], ref_entropy[on])
    torch.testing.assert_close(fast_grad, model.lm_head.weight.grad)


def _rendered(prompt: tuple[int, ...], reply: tuple[int, ...], masked: int = 0):
    """A rendering of `prompt` + `reply`, the reply trainable except its last `masked` ids (a
    tool result's place)."""
    from autotraj.render import RenderedTrajectory

    flags = (True,) * (len(reply) - masked) + (False,) * masked
    return RenderedTrajectory(prompt + reply, (False,) * len(prompt) + flags, len(prompt))


def test_a_shared_prompt_forwarded_once_gives_the_whole_rows_logprobs_and_gradients(
    tiny_model_dir, tokenizer
):
    """Rollouts of one group share their prompt: the update forwards it once and reuses its KV
    cache for every row. Log-probs, entropies and every parameter's gradient equal those of
    whole rows, with groups of different prompt lengths, replies of different lengths, masked
    ids inside replies and a row alone in its group, in one micro-batch; and fewer tokens are
    forwarded."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from autotraj.train.grpo_update import PolicyUpdate, prompt_groups

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    a, b, c = tuple(range(5, 19)), tuple(range(30, 39)), tuple(range(50, 61))
    batch = [
        _rendered(a, (70, 71, 72, 73, 74)),
        _rendered(b, (80, 81, 82)),
        _rendered(a, (75, 76), masked=1),
        _rendered(c, (90, 91, 92, 93)),  # alone
        _rendered(a, (77, 78, 79, 60, 61, 62, 63), masked=2),
        _rendered(b, (84, 85, 86, 87, 88, 89)),
    ]
    assert prompt_groups(batch) == [(14, [0, 2, 4]), (9, [1, 5]), (11, [3])]
    update = PolicyUpdate.__new__(PolicyUpdate)
    update.accelerator, update.tokenizer = Accelerator(cpu=True), tokenizer
    update._rows = Counter()
    forwarded: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda _m, args, _out: forwarded.append(args[0].numel())
    )
    results = {}
    for share in (False, True):
        update._share_prompts = share
        forwarded.clear()
        logp, entropy, mask, _ = update._forward_logprobs(model, batch, with_entropy=True)
        ((logp + 0.1 * entropy) * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        results[share] = (logp, entropy, mask, grads, sum(forwarded))
    hook.remove()
    (logp0, ent0, mask0, grads0, tokens0), (logp1, ent1, mask1, grads1, tokens1) = (
        results[False],
        results[True],
    )
    on = mask0.bool()
    assert torch.equal(mask0, mask1) and int(on.sum()) == 24
    torch.testing.assert_close(logp1[on], logp0[on], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent1[on], ent0[on], rtol=1e-5, atol=1e-5)
    for name, grad in grads0.items():
        scale = float(grad.abs().max())  # float rounding: sums in another order
        assert scale > 0, name
        torch.testing.assert_close(grads1[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    # whole rows: 6 x 21 padded ids; shared: 3 prompts once, then each group's replies
    assert tokens0 == 6 * 21
    assert tokens1 == (14 + 9 + 11) + 3 * 7 + 2 * 6 + 1 * 4


def test_the_update_forwards_whole_rows_where_collectives_or_checkpointing_need_it(
    tiny_model_dir, tokenizer
):
    """The shared-prompt forward is on by default in one process and off with gradient
    checkpointing, when switched off, or under several processes."""
    from accelerate import Accelerator

    from autotraj.train.grpo_update import PolicyUpdate

    class Several:
        num_processes = 2
        state = None

    def share(accelerator, **changes):
        cfg = RlConfig(**changes)
        return PolicyUpdate(cfg, accelerator, None, None, None, tokenizer)._share_prompts

    one = Accelerator(cpu=True)
    assert share(one)
    assert not share(one, gradient_checkpointing=True)
    assert not share(one, shared_prompt_forward=False)
    assert not share(Several())


def test_a_run_reports_the_rows_forwarded_after_a_shared_prompt(tmp_path, tiny_model_dir):
    """In a real run with both groups in one micro-batch every row follows its group's shared
    prompt (metric 1.0), the loss is that of whole rows, and switched off the metric is 0."""
    rows = {}
    for share in (True, False):
        cfg = tiny_config(
            tmp_path / str(share),
            tiny_model_dir,
            steps=1,
            micro_batch_size=4,
            shared_prompt_forward=share,
        )
        run_rl(cfg)
        [rows[share]] = load_rows(tmp_path / str(share) / "run" / "rl" / "metrics.jsonl")
    assert rows[True]["rl/update/shared_prompt_rows"] == 1.0
    assert rows[False]["rl/update/shared_prompt_rows"] == 0.0
    assert rows[True]["rl/loss"] == pytest.approx(rows[False]["rl/loss"], rel=1e-4, abs=1e-6)
    assert rows[True]["rl/entropy"] == pytest.approx(rows[False]["rl/entropy"], rel=1e-4)


def test_a_group_with_nothing_after_its_prompt_scores_nothing(tiny_model_dir, tokenizer):
    """Rows that hold only their shared prompt forward nothing and get zero log-probs, beside a
    group that has replies."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from autotraj.render import RenderedTrajectory
    from autotraj.train.grpo_update import PolicyUpdate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    update = PolicyUpdate.__new__(PolicyUpdate)
    update.accelerator, update.tokenizer = Accelerator(cpu=True), tokenizer
    update._share_prompts, update._rows = True, Counter()
    bare = RenderedTrajectory(tuple(range(5, 12)), (False,) * 7, 7)
    batch = [
        bare,
        _rendered(tuple(range(20, 26)), (30, 31)),
        bare,
        _rendered(tuple(range(20, 26)), (32,)),
    ]
    logp, entropy, mask, _ = update._forward_logprobs(model, batch, with_entropy=True)
    assert not logp[[0, 2]].any() and not entropy[[0, 2]].any()
    assert logp[1, 6:8].ne(0).all() and logp[3, 6].ne(0)
    assert int(mask.sum()) == 3
