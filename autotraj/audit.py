"""Checks that a finished pipeline run did what the method says, from its files.

`audit_run(run_dir)` returns one `Check` per property; scripts/check_demo.py prints them after
CI's demo run and fails on any that does not hold. Each check is built to fail when the method
is broken, and none asserts a research outcome that could legitimately be null (that a trained
model is more accurate, say):

- clean training data: no SFT record and no preferred side of a pair has a flaw (flaws.py: a
  hedging phrase, a fragment left by a deletion, a repeated identical tool call, a `<result>`
  the model wrote); fails on the word-deleting first pass this project once had;
- repairs exist and are edits: some repairs were accepted; accepted repairs make the original's
  tool calls (mean share >= 0.9 per label) and a correct original's repair is made of its
  original's words (mean share >= 0.97: fails for a repairer that re-solves from the question);
- a reward model above chance: the saved model, reloaded, scores the held-out preference pairs
  (the RM stage's own seeded split) again; its pairwise accuracy must beat a coin (one-sided
  binomial p < 0.05) and the untrained reward model: fewer than 5% of 2,000 random score heads
  on the starting model's features may rank as many pairs right. The second null is needed
  because held-out pairs are not independent: on the CI demo's SFT model 10.7% of random heads
  pass the binomial test alone (fails for an untrained or randomly initialised head);
- RL changed the policy: the RL model's weights differ from the SFT model's (relative L2 change
  above 1e-5) and its greedy held-out trajectories differ from the SFT model's on at least 5% of
  the items (fails with `rl.steps=0` or a learning rate too small to matter);
- RL followed the reward: scored by the SFT and the RL model, RL's own recorded rollouts gained
  log-probability (per trainable token) in step with their advantages, beyond within-group
  shuffles of the advantages (permutation p < 0.05; fails for an update that ignores or flips
  them, which the entropy bonus and AdamW would still let move the weights).

Not here: computing any of these during the stages (they write what is read here).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from autotraj.flaws import flaws
from autotraj.records import Repair
from autotraj.repair_counts import kept_measures
from autotraj.run_dir import load_preference_pairs, load_sft_records, read_run_files

MIN_CALLS_KEPT = 0.9
MIN_FROM_ORIGINAL = 0.97
MAX_P_VALUE = 0.05
RANDOM_HEADS = 2000
PERMUTATIONS = 2000
MAX_GROUPS = 64  # RL groups the reward check scores (a seeded sample of a longer run's)
MIN_WEIGHT_CHANGE = 1e-5
MIN_CHANGED_ITEMS = 0.05


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def binomial_p_value(wins: int, n: int) -> float:
    """P(X >= wins) for X ~ Binomial(n, 1/2): the one-sided p-value of beating a coin.

    >>> round(binomial_p_value(15, 20), 4)
    0.0207
    """
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def check_training_data(run_dir: Path) -> Check:
    sft = load_sft_records(run_dir / "build" / "sft.jsonl")
    pairs = load_preference_pairs(run_dir / "build" / "preferences.jsonl")
    bad = [(r.id, flaws(r.trajectory)) for r in sft]
    bad += [(f"pair {p.id} (chosen)", flaws(p.chosen_trajectory)) for p in pairs]
    bad = [(i, f) for i, f in bad if f]
    detail = f"{len(sft)} SFT records, {len(pairs)} pairs"
    if bad:
        detail += f"; {len(bad)} flawed, e.g. {bad[0][0]}: {'; '.join(bad[0][1][:3])}"
    return Check("training data is clean", not bad and bool(sft), detail)


def check_repairs(run_dir: Path) -> Check:
    """Recomputed from the files (repairs.jsonl against synthesize's originals), not the stage's
    manifest: every label sent to repair has accepted repairs, they keep their originals' tool
    calls, and correct originals' repairs are made of their words. The words are checked over
    all AC-LQ repairs and, separately, over those the repairer model wrote (so first-pass edits,
    which keep every word, cannot hide one that re-solves); the detail says how many the model
    wrote, as a run whose first pass takes every correct original leaves none to check."""
    manifest = json.loads((run_dir / "repair" / "manifest.json").read_text(encoding="utf-8"))
    to_repair = manifest["counts"]["to_repair"]
    run = read_run_files(run_dir, optional=frozenset({"scores", "hard_cases"}))
    repairs = list(run.repairs.values())

    def measures(chosen: list[Repair]) -> dict[str, float | None]:
        return kept_measures([(run.trajectories[r.original_id], r.trajectory) for r in chosen])

    problems = []
    if not repairs:
        problems.append("no repair accepted")
    kept = {}
    for label in sorted(to_repair):
        mine = [r for r in repairs if r.label == label]
        if to_repair[label] and not mine:
            problems.append(f"no {label} repair accepted of {to_repair[label]}")
        kept[label] = measures(mine)
        if kept[label]["calls_kept"] is not None and kept[label]["calls_kept"] < MIN_CALLS_KEPT:
            problems.append(f"{label} repairs keep {kept[label]['calls_kept']:.2f} of the calls")
    aclq = [r for r in repairs if r.label == "AC-LQ"]
    by_model = [r for r in aclq if r.final.how != "first_pass"]
    words = {
        "all": kept.get("AC-LQ", {}).get("from_original"),
        "model": measures(by_model)["from_original"],
    }
    for which, share in words.items():
        if share is not None and share < MIN_FROM_ORIGINAL:
            problems.append(f"AC-LQ repairs ({which}) take {share:.2f} of their words from it")
    detail = f"{len(repairs)} accepted; " + ", ".join(
        f"{label}: calls kept {_fmt(m['calls_kept'])}, words from the original "
        f"{_fmt(m['from_original'])}, similarity {_fmt(m['similarity'])}"
        for label, m in kept.items()
    )
    detail += (
        f"; AC-LQ repairs by the model: {len(by_model)} of {len(aclq)}, words from the original "
        f"{_fmt(words['model'])}"
    )
    if problems:
        detail += "; " + "; ".join(problems)
    return Check("repairs are verified edits of their originals", not problems, detail)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def random_head_wins(chosen: Any, rejected: Any, heads: int, seed: int) -> list[int]:
    """For `heads` seeded random score heads (isotropic Gaussian directions, as a fresh head is
    initialised), how many pairs each ranks right: rows of `chosen` above the same rows of
    `rejected` ([pairs, hidden] head inputs). Pairs that share one direction of difference are
    ranked alike by every head, which is what a binomial test cannot see."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(chosen.shape[1], heads, generator=generator, dtype=torch.float64)
    margins = (chosen.double() - rejected.double()) @ directions
    return (margins > 0).sum(dim=0).tolist()


def _in_run(run_dir: Path, cfg: dict[str, Any], path: str) -> str:
    """A model path a stage recorded; one inside the run directory the stage wrote (often
    relative to where it ran) is re-rooted at `run_dir`."""
    try:
        return str(run_dir / Path(path).relative_to(cfg["run_dir"]))
    except (KeyError, TypeError, ValueError):
        return path


def check_reward_model(run_dir: Path) -> Check:
    """Re-score the held-out pairs with the saved reward model (not the stage's own number) and
    compare with two nulls: a coin (one-sided binomial p) and the untrained reward model, whose
    head is a random direction on the starting model's features (the share of RANDOM_HEADS such
    heads that rank as many pairs right: pairs with one shared difference defeat the coin)."""
    from autotraj.models.loading import GeneratorConfig, load_tokenizer
    from autotraj.train.batches import preference_examples_from_file
    from autotraj.train.reward_model import (
        MARKER,
        TrajectoryRewardModel,
        head_inputs,
        split_by_query,
    )

    rm_dir = run_dir / "rm"
    cfg = yaml.safe_load((rm_dir / "config.resolved.yaml").read_text(encoding="utf-8"))
    marker = json.loads((rm_dir / "model" / MARKER).read_text(encoding="utf-8"))
    model = TrajectoryRewardModel.load(rm_dir / "model")
    data = Path(cfg["data"]) if cfg.get("data") else run_dir / "build" / "preferences.jsonl"
    tokenizer = load_tokenizer(GeneratorConfig(model=str(rm_dir / "model")))
    examples, _, _ = preference_examples_from_file(tokenizer, data, cfg["max_length"])
    _, heldout = split_by_query(examples, cfg["heldout_fraction"], cfg["seed"])
    if not heldout:
        return Check("reward model above chance", False, "no held-out preference pair")
    n = len(heldout)
    chosen_ids = [e.chosen_ids for e in heldout]
    rejected_ids = [e.rejected_ids for e in heldout]
    both = chosen_ids + rejected_ids  # one batched pass (and one model load) per model
    scores = model.score_ids(both)
    wins = sum(c > r for c, r in zip(scores[:n], scores[n:], strict=True))
    p = binomial_p_value(wins, n)
    base = _in_run(run_dir, cfg, marker["base_model"])
    features = head_inputs(base, tokenizer.pad_token_id, both)
    null = random_head_wins(features[:n], features[n:], RANDOM_HEADS, 0)
    p_null = (1 + sum(w >= wins for w in null)) / (1 + len(null))
    shorter = sum(len(c) < len(r) for c, r in zip(chosen_ids, rejected_ids, strict=True))
    detail = (
        f"{wins}/{n} held-out pairs ranked right, one-sided p = {p:.2g}; untrained-RM control "
        f"({len(null)} random heads on {base}): median {statistics.median(null):g}/{n}, "
        f"p = {p_null:.2g}; the chosen side is the shorter in {shorter}/{n}"
    )
    ok = p < MAX_P_VALUE and p_null < MAX_P_VALUE
    return Check("reward model above chance", ok, detail)


def weight_change(a: Path, b: Path) -> float:
    """||W_b - W_a|| / ||W_a|| over every tensor of two saved models (safetensors files)."""
    import torch
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    wa, wb = tensors(a), tensors(b)
    if set(wa) != set(wb):
        raise ValueError(f"{a} and {b} hold different tensors")
    num = sum(float((wb[k].float() - wa[k].float()).pow(2).sum()) for k in wa)
    den = sum(float(wa[k].float().pow(2).sum()) for k in wa)
    return math.sqrt(num / max(den, 1e-30))


def changed_items(a: Path, b: Path) -> tuple[int, int]:
    """How many items two evaluations (results.jsonl, same items) answered with other text."""

    def texts(path: Path) -> dict[str, str]:
        rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
        return {
            r["id"]: "".join(s["text"] for s in r["trajectory"]["segments"] if s["trainable"])
            for r in rows
        }

    ta, tb = texts(a), texts(b)
    if set(ta) != set(tb):
        raise ValueError(f"{a} and {b} hold different items")
    return sum(ta[i] != tb[i] for i in ta), len(ta)


def _rl_start_problem(run_dir: Path) -> str | None:
    """Why the RL checks cannot compare with this run's SFT model, or None: the RL stage was
    configured to start from another model (`rl.model`)."""
    cfg = yaml.safe_load((run_dir / "rl" / "config.resolved.yaml").read_text(encoding="utf-8"))
    start = cfg.get("model") or ""
    if (
        start
        and Path(_in_run(run_dir, cfg, start)).resolve() != (run_dir / "sft" / "model").resolve()
    ):
        return f"RL started from {start} (rl.model), not this run's SFT model"
    return None


def check_rl_changed_policy(run_dir: Path) -> Check:
    if problem := _rl_start_problem(run_dir):
        return Check("RL changed the policy", False, problem)
    change = weight_change(run_dir / "sft" / "model", run_dir / "rl" / "model")
    changed, n = changed_items(
        run_dir / "eval" / "sft" / "results.jsonl", run_dir / "eval" / "rl" / "results.jsonl"
    )
    ok = change > MIN_WEIGHT_CHANGE and changed >= MIN_CHANGED_ITEMS * n
    detail = (
        f"weights moved {change:.2e} (relative L2); greedy held-out trajectories changed on "
        f"{changed}/{n} items (need >= {MIN_CHANGED_ITEMS:.0%})"
    )
    return Check("RL changed the policy", ok, detail)


def rollout_group(row: dict[str, Any]) -> tuple[int, str]:
    """The GRPO group of a recorded rollout: its step and query."""
    return row["step"], row["trajectory"]["query_id"]


def sample_groups(rows: Sequence[dict[str, Any]], most: int, seed: int) -> list[dict[str, Any]]:
    """The rollouts of at most `most` groups: all of them, or a seeded sample of whole groups
    (a long run's check then costs what `most` groups cost), in the file's order.

    >>> rows = [{"step": s, "trajectory": {"query_id": q}} for s in (1, 2) for q in "ab"]
    >>> len(sample_groups(rows, 8, 0)), len(sample_groups(rows, 3, 0))
    (4, 3)
    """
    import random

    groups = sorted({rollout_group(r) for r in rows})
    if len(groups) <= most:
        return list(rows)
    kept = set(random.Random(seed).sample(groups, most))
    return [r for r in rows if rollout_group(r) in kept]


def rollout_logprob_change(run_dir: Path) -> tuple[list[dict[str, Any]], list[float], int]:
    """RL's recorded rollouts that took part in an update (advantage not None; those of at most
    MAX_GROUPS groups) and, for each, the mean change per trainable token of log pi(token) from
    the SFT model to the RL model: the rollout's own token ids (prompt_ids and segment
    token_ids), scored by both models; and how many groups took part in all."""
    import torch

    from autotraj.models.loading import GeneratorConfig, load_tokenizer
    from autotraj.records import Trajectory
    from autotraj.render import render_trajectory
    from autotraj.train.advantages import collate, token_logprobs
    from autotraj.train.sft import load_causal_lm

    path = run_dir / "rl" / "rollouts.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    rows = [r for r in rows if r["advantage"] is not None]
    total = len({rollout_group(r) for r in rows})
    rows = sample_groups(rows, MAX_GROUPS, seed=0)
    if not rows:
        return [], [], 0
    tokenizer = load_tokenizer(GeneratorConfig(model=str(run_dir / "sft" / "model")))
    rendered = []
    for r in rows:
        trajectory = Trajectory.from_dict(r["trajectory"])
        if not trajectory.prompt_ids:
            raise ValueError(f"{path}: rollout {trajectory.id} has no prompt_ids")
        rendered.append(render_trajectory(tokenizer, "", trajectory))
    ids, attention, mask = collate(rendered, tokenizer.pad_token_id)

    def logprobs(model_dir: Path) -> torch.Tensor:
        model = load_causal_lm(str(model_dir), tokenizer.pad_token_id).eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(rows), 8):
                part = slice(start, start + 8)
                logits = model(input_ids=ids[part], attention_mask=attention[part]).logits
                out.append(token_logprobs(logits, ids[part])[0])
        return torch.cat(out)

    before, after = logprobs(run_dir / "sft" / "model"), logprobs(run_dir / "rl" / "model")
    change = ((after - before) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    return rows, change.tolist(), total


def permutation_p_value(
    advantages: Sequence[float],
    change: Sequence[float],
    groups: Sequence[Any],
    permutations: int,
    seed: int,
) -> float:
    """One-sided p-value of sum(A_i * change_i) against the same sum with the advantages shuffled
    within each group (GRPO compares rollouts only inside their group): (1 + #{shuffled >=
    observed}) / (1 + permutations)."""
    import random

    def statistic(order: Sequence[int]) -> float:
        return sum(advantages[j] * c for j, c in zip(order, change, strict=True))

    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    observed = statistic(range(len(change)))
    rng = random.Random(seed)
    at_least = 0
    for _ in range(permutations):
        order = list(range(len(change)))
        for idx in members.values():
            shuffled = idx[:]
            rng.shuffle(shuffled)
            for i, j in zip(idx, shuffled, strict=True):
                order[i] = j
        at_least += statistic(order) >= observed - 1e-12 * abs(observed)
    return (1 + at_least) / (1 + permutations)


def check_rl_followed_reward(run_dir: Path) -> Check:
    """The update moved the policy toward its better rollouts: over RL's recorded rollouts, the
    per-token log-prob change (SFT -> RL model) rises with the rollout's advantage more than
    under PERMUTATIONS within-group shuffles of the advantages (p < 0.05). Fails for an update
    that ignores or flips the advantages (entropy bonus and optimizer alone move the weights
    too, which "RL changed the policy" cannot tell apart)."""
    if problem := _rl_start_problem(run_dir):
        return Check("RL followed the reward", False, problem)
    rows, change, total = rollout_logprob_change(run_dir)
    if not rows:
        return Check("RL followed the reward", False, "no rollout took part in an update")
    advantages = [float(r["advantage"]) for r in rows]
    groups = [rollout_group(r) for r in rows]
    p = permutation_p_value(advantages, change, groups, PERMUTATIONS, seed=0)
    up = [c for a, c in zip(advantages, change, strict=True) if a > 0]
    down = [c for a, c in zip(advantages, change, strict=True) if a < 0]
    detail = (
        f"{len(rows)} rollouts in {len(set(groups))} groups"
        + (f" (a seeded sample of {total})" if total > len(set(groups)) else "")
        + "; mean log-prob change per token "
        f"{_mean(up):+.3f} on the {len(up)} with advantage > 0, {_mean(down):+.3f} on the "
        f"{len(down)} below 0; within-group permutation p = {p:.2g}"
    )
    return Check("RL followed the reward", p < MAX_P_VALUE, detail)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def audit_run(run_dir: str | Path, skip: Sequence[str] = ()) -> list[Check]:
    """Every check on a finished `autotraj run` directory (names in `skip` left out)."""
    run = Path(run_dir)
    checks = {
        "data": check_training_data,
        "repairs": check_repairs,
        "rm": check_reward_model,
        "rl": check_rl_changed_policy,
        "rl_reward": check_rl_followed_reward,
    }
    return [fn(run) for name, fn in checks.items() if name not in skip]
