"""The measured CPU GRPO run of docs/rl.md: write arithmetic queries, print the per-step curves.

    .venv/bin/python bench/bench_grpo.py queries runs/rl-cpu/arith.jsonl --n 64
    .venv/bin/python -m autotraj.cli rl --config configs/cpu.yaml MEASURED_RUN (below, written out)
    .venv/bin/python bench/bench_grpo.py table runs/rl-cpu
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_grpo.py compare --steps 3

The questions are word problems of the kind the two built-in demonstrations show (products and
differences that a one-line `print(...)` answers), with seeded random numbers, so a 135M model
that copies the demonstrated tool use can get some right and RL has a signal to follow.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# The measured run: `configs/cpu.yaml`'s rl section with these overrides (until 2026-12-03 the
# file configs/rl_cpu.yaml, equal field by field; docs/rl.md "Commands").
MEASURED_RUN = (
    "run_dir=runs/rl-cpu",
    "queries=runs/rl-cpu/arith.jsonl",
    "steps=20",
    "save_every=10",
    "keep_checkpoints=2",
    "reward.rm_weight=0",
    "rollout.demonstrations=2",
    "rollout.max_new_tokens=64",
    "rollout.max_response_tokens=128",
    "tools.search.backend=none",
    "tools.search.index_dir=",
    "tools.python.workers=2",
    "rollout.system_prompt=Solve the problem. Think inside <think> </think>. Run Python inside "
    "<code> </code> and print the value; the result comes back inside <result> </result>. "
    "End with <answer>\\boxed{final answer}</answer>.",
)

TEMPLATES = (
    ("A crate holds {a} bottles. How many bottles are in {b} crates?", lambda a, b, c: a * b),
    (
        "Sam has {a} dollars and spends {b} dollars. How many dollars are left?",
        lambda a, b, c: a - b,
    ),
    (
        "A farm has {a} cows and buys {b} more, then sells {c}. How many cows now?",
        lambda a, b, c: a + b - c,
    ),
    ("What is {a} times {b}?", lambda a, b, c: a * b),
)


def write_queries(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text, answer = TEMPLATES[i % len(TEMPLATES)]
        a, b = rng.randint(12, 99), rng.randint(2, 11)
        c = rng.randint(1, b)
        question = text.format(a=a, b=b, c=c)
        rows.append({"id": f"arith-{i}", "question": question, "answer": str(answer(a, b, c))})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def print_table(run_dir: Path) -> None:
    cols = (
        ("rl/reward/mean", "reward"),
        ("rl/accuracy", "acc"),
        ("rl/format_rate", "format"),
        ("rl/tools/calls_per_trajectory", "calls"),
        ("rl/response_length", "resp_tok"),
        ("rl/entropy", "entropy"),
        ("rl/clip_fraction", "clip"),
        ("rl/time/step_s", "step_s"),
    )
    rows = [
        json.loads(line) for line in (run_dir / "rl" / "metrics.jsonl").read_text().splitlines()
    ]
    sys.stdout.write("| step | " + " | ".join(name for _, name in cols) + " |\n")
    sys.stdout.write("|---" * (len(cols) + 1) + "|\n")
    for row in rows:
        cells = [f"{row.get(key, float('nan')):.3f}" for key, _ in cols]
        sys.stdout.write(f"| {row['step']} | " + " | ".join(cells) + " |\n")


def compare(config: Path, steps: int, out: Path) -> None:
    """Seconds per step of autotraj's loop vs TRL's GRPOTrainer(rollout_func, env_mask) driving
    the same rollout engine, tools, rendering and reward on the same queries and sizes."""
    import dataclasses
    import time

    from autotraj.config import load_stage_config
    from autotraj.train.grpo import RlConfig, run_rl

    overrides = [*MEASURED_RUN, f"steps={steps}", f"run_dir={out / 'ours'}"]
    cfg = load_stage_config(RlConfig, "rl", config, overrides)
    began = time.perf_counter()
    run_rl(cfg)
    ours = time.perf_counter() - began
    rows = [json.loads(x) for x in (out / "ours" / "rl" / "metrics.jsonl").read_text().splitlines()]
    trl_s, trl_steps = _run_trl(dataclasses.replace(cfg, run_dir=str(out / "trl")), steps)
    sys.stdout.write(
        json.dumps(
            {
                "ours_total_s": round(ours, 1),
                "ours_step_s": [round(r["rl/time/step_s"], 1) for r in rows],
                "trl_total_s": round(trl_s, 1),
                "trl_step_s": trl_steps,
            }
        )
        + "\n"
    )


def _run_trl(cfg, steps: int) -> tuple[float, list[float]]:
    """TRL 1.16 GRPOTrainer with our rollout() as rollout_func and our mask as env_mask."""
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from autotraj.models.loading import GeneratorConfig, load_tokenizer, resolve_model_path
    from autotraj.models.transformers_backend import TransformersGenerator
    from autotraj.records import Trajectory
    from autotraj.render import render_trajectory
    from autotraj.rewards import compute_rewards
    from autotraj.rollout import rollout
    from autotraj.tools.toolbox import close_tools, open_tools
    from autotraj.train.grpo import load_rl_queries, resolve_model

    ref = resolve_model(cfg)
    tokenizer = load_tokenizer(GeneratorConfig(model=ref))
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(ref), dtype=torch.float32)
    queries = load_rl_queries(cfg, tokenizer)
    by_question = {q.question: q for q in queries}
    tools = open_tools(cfg.tools)
    system = cfg.rollout.system_prompt
    counter = iter(range(1_000_000))

    def rollout_func(prompts, trainer):
        items = [(f"trl/{next(counter)}", by_question[p]) for p in prompts]
        policy = trainer.accelerator.unwrap_model(trainer.model)
        gen = TransformersGenerator(policy, tokenizer, ref, cfg.generator.batch_size)
        trajectories = rollout(gen, tools, tokenizer, items, cfg.rollout)
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": []}
        out["trajectory"] = [t.to_dict() for t in trajectories]
        for (_, q), t in zip(items, trajectories, strict=True):
            r = render_trajectory(tokenizer, q.question, t, system)
            out["prompt_ids"].append(list(r.input_ids[: r.prompt_length]))
            out["completion_ids"].append(list(r.input_ids[r.prompt_length :]))
            out["env_mask"].append([int(m) for m in r.trainable[r.prompt_length :]])
        return out

    def reward(prompts, completions, trajectory, **kwargs):
        trajs = [Trajectory.from_dict(t) for t in trajectory]
        qs = [by_question[p] for p in prompts]
        return [b.reward for b in compute_rewards(trajs, qs, None, cfg.reward)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.began = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(round(time.perf_counter() - self.began, 1))

    args = GRPOConfig(
        output_dir=cfg.run_dir,
        max_steps=steps,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.rollouts_per_prompt,
        num_generations=cfg.rollouts_per_prompt,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        beta=cfg.kl_coef,
        epsilon=cfg.clip,
        entropy_coef=cfg.entropy_coef,
        temperature=cfg.rollout.temperature,
        max_completion_length=cfg.rollout.max_response_tokens + 1,
        use_cpu=True,
        bf16=cfg.mixed_precision == "bf16",
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=cfg.seed,
    )
    data = Dataset.from_list([{"prompt": q.question} for q in queries])
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        rollout_func=rollout_func,
        callbacks=[timer],
    )
    began = time.perf_counter()
    try:
        trainer.train()
    finally:
        close_tools(tools)
    return time.perf_counter() - began, timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queries", help="write seeded arithmetic word problems as JSONL")
    q.add_argument("path", type=Path)
    q.add_argument("--n", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("table", help="print the per-step curves of an RL run as a Markdown table")
    t.add_argument("run_dir", type=Path)
    c = sub.add_parser("compare", help="s/step: autotraj's loop vs TRL GRPOTrainer(rollout_func)")
    c.add_argument("--config", type=Path, default=Path("configs/cpu.yaml"))
    c.add_argument("--steps", type=int, default=3)
    c.add_argument("--out", type=Path, default=Path("runs/bench-grpo"))
    args = parser.parse_args()
    if args.command == "queries":
        write_queries(args.path, args.n, args.seed)
    elif args.command == "compare":
        compare(args.config, args.steps, args.out)
    else:
        print_table(args.run_dir)


if __name__ == "__main__":
    main()
