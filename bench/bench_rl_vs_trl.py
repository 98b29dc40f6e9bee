"""Seconds per GRPO step: autotraj's loop vs TRL 1.16's GRPOTrainer, in one process.

    .venv/bin/python bench/bench_rl_vs_trl.py --steps 4 --out runs/bench-rl-vs-trl
    .venv/bin/python bench/bench_rl_vs_trl.py --settings tools --steps 4

Both train the same embedded model (configs/cpu.yaml's `rl` section) on the same arithmetic
queries with the same prompts per step, group size, response-token budget, lr and clip
(autotraj keeps its entropy bonus, `entropy_coef` 0.001; TRL's `entropy_coef` stays at its
default, 0: a term of the loss, not of the step's time). Steps alternate: after each TRL step
(timed from its `on_step_begin` to `on_step_end`) a callback runs one autotraj step, so machine
load falls on both alike. The first step of each is a warm-up and is dropped. Settings:

- `plain`: single turn, no tools. TRL generates with its own `generate` (its plain setting)
  and scores with a check for the `\\boxed{answer}` string (its completions are text, not
  autotraj trajectories); autotraj's rollout runs with `max_tool_calls=0` and its own reward.
- `tools`: the demo's multi-turn Python tool use. TRL 1.16 has no tool loop of its own that runs
  our sandbox, so its `rollout_func` hook calls autotraj's `rollout()` on TRL's policy and
  returns `env_mask` (tool results out of the loss); reward, tools and sizes are the same. It is
  like-for-like in the rollout and differs only in the trainer (TRL's scoring and update).

Writes `<out>/<setting>/result.json` and prints a table per setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_grpo import MEASURED_RUN, write_queries  # noqa: E402

SETTINGS = {
    "plain": ("rollout.max_tool_calls=0", "rollout.demonstrations=0"),
    "tools": (),
}


def load_config(config: Path, setting: str, out: Path, overrides: list[str]):
    from autotraj.config import load_stage_config
    from autotraj.train.grpo import RlConfig

    queries = out / "arith.jsonl"
    write_queries(queries, 64, 0)
    fixed = [*MEASURED_RUN, *SETTINGS[setting], f"queries={queries}", "save_every=0"]
    fixed += [f"run_dir={out / 'autotraj'}", "steps=1000000", *overrides]
    return load_stage_config(RlConfig, "rl", config, fixed)


def run_setting(config: Path, setting: str, steps: int, out: Path, overrides: list[str]) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from autotraj.models.loading import GeneratorConfig, load_tokenizer, resolve_model_path
    from autotraj.records import Trajectory
    from autotraj.rewards import compute_rewards
    from autotraj.tools.toolbox import close_tools, open_tools
    from autotraj.train.grpo import GrpoRun, load_rl_queries, resolve_model

    cfg = load_config(config, setting, out, overrides)
    ours = GrpoRun(cfg)
    ref = resolve_model(cfg)
    tokenizer = load_tokenizer(GeneratorConfig(model=ref))
    queries = load_rl_queries(cfg, tokenizer)
    by_question = {q.question: q for q in queries}
    tools = open_tools(cfg.tools)
    ours_rows: list[dict[str, float]] = []
    trl_times: list[float] = []

    def reward(prompts, completions, **kwargs):
        qs = [by_question[_question(p)] for p in prompts]
        if "trajectory" not in kwargs:  # plain: TRL's completions are text; the boxed answer
            return [
                float(any(f"boxed{{{a}}}" in _text(c) for a in q.answers))
                for q, c in zip(qs, completions, strict=True)
            ]
        trajs = [Trajectory.from_dict(t) for t in kwargs["trajectory"]]
        return [b.reward for b in compute_rewards(trajs, qs, None, cfg.reward)]

    class Alternate(TrainerCallback):
        began = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            trl_times.append(time.perf_counter() - self.began)
            ours_rows.append(ours.step(len(ours_rows), tools))
            sys.stderr.write(
                f"{setting} step {len(ours_rows)}: TRL {trl_times[-1]:.1f} s, "
                f"autotraj {ours_rows[-1]['rl/time/step_s']:.1f} s\n"
            )

    args = GRPOConfig(
        output_dir=str(out / "trl"),
        max_steps=steps,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.rollouts_per_prompt,
        num_generations=cfg.rollouts_per_prompt,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        beta=cfg.kl_coef,
        epsilon=cfg.clip,
        temperature=cfg.rollout.temperature,
        max_completion_length=cfg.rollout.max_response_tokens,
        use_cpu=True,
        bf16=cfg.mixed_precision == "bf16",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=cfg.seed,
    )
    if setting == "plain":
        args.max_completion_length = cfg.rollout.max_new_tokens
    extra = {"rollout_func": _tool_rollout(cfg, tokenizer, by_question, tools)}
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(ref), dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": _prompt(cfg, q.question)} for q in queries]),
        processing_class=tokenizer,
        callbacks=[Alternate()],
        **(extra if setting == "tools" else {}),
    )
    try:
        trainer.train()
    finally:
        close_tools(tools)
    return summarize(setting, cfg, ours_rows, trl_times)


def _prompt(cfg, question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": cfg.rollout.system_prompt},
        {"role": "user", "content": question},
    ]


def _question(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _tool_rollout(cfg, tokenizer, by_question, tools):
    from autotraj.models.transformers_backend import TransformersGenerator
    from autotraj.render import render_trajectory
    from autotraj.rollout import rollout
    from autotraj.train.grpo import resolve_model

    counter = iter(range(1_000_000))

    def rollout_func(prompts, trainer):
        items = [(f"trl/{next(counter)}", by_question[_question(p)]) for p in prompts]
        policy = trainer.accelerator.unwrap_model(trainer.model)
        gen = TransformersGenerator(policy, tokenizer, resolve_model(cfg), cfg.generator.batch_size)
        trajectories = rollout(gen, tools, tokenizer, items, cfg.rollout)
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": []}
        out["trajectory"] = [t.to_dict() for t in trajectories]
        for (_, q), t in zip(items, trajectories, strict=True):
            r = render_trajectory(tokenizer, q.question, t, cfg.rollout.system_prompt)
            out["prompt_ids"].append(list(r.input_ids[: r.prompt_length]))
            out["completion_ids"].append(list(r.input_ids[r.prompt_length :]))
            out["env_mask"].append([int(m) for m in r.trainable[r.prompt_length :]])
        return out

    return rollout_func


def summarize(setting: str, cfg, ours_rows: list[dict], trl_times: list[float]) -> dict:
    kept = slice(1, None) if len(trl_times) > 1 else slice(None)  # drop the warm-up step
    ours = [r["rl/time/step_s"] for r in ours_rows][kept]
    gen = [r["rl/time/rollout_s"] + r.get("rl/time/sync_s", 0.0) for r in ours_rows][kept]
    upd = [r["rl/time/update_s"] for r in ours_rows][kept]
    ours_s, trl_s = statistics.mean(ours), statistics.mean(trl_times[kept])
    return {
        "setting": setting,
        "prompts_per_step": cfg.prompts_per_step,
        "rollouts_per_prompt": cfg.rollouts_per_prompt,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "autotraj_step_s": [round(x, 4) for x in ours],
        "trl_step_s": [round(x, 4) for x in trl_times[kept]],
        "autotraj_s_per_step": round(ours_s, 4),
        "trl_s_per_step": round(trl_s, 4),
        "ratio": round(ours_s / trl_s, 3),
        "autotraj_split_s": {
            "generation": round(statistics.mean(gen), 2),
            "update": round(statistics.mean(upd), 2),
            "scoring_and_rest": round(ours_s - statistics.mean(gen) - statistics.mean(upd), 2),
        },
    }


def print_table(results: list[dict]) -> None:
    sys.stdout.write(
        "| setting | autotraj s/step | TRL s/step | ratio | autotraj gen / score+rest / update |\n"
        "|---|---|---|---|---|\n"
    )
    for r in results:
        split = r["autotraj_split_s"]
        sys.stdout.write(
            f"| {r['setting']} | {r['autotraj_s_per_step']} | {r['trl_s_per_step']} | "
            f"{r['ratio']}x | {split['generation']} / {split['scoring_and_rest']} / "
            f"{split['update']} |\n"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/cpu.yaml"))
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["plain"])
    parser.add_argument("--steps", type=int, default=4, help="per trainer, the first dropped")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-rl-vs-trl"))
    parser.add_argument("overrides", nargs="*", help="rl config overrides, key=value")
    args = parser.parse_args()
    results = []
    for setting in args.settings:
        out = args.out / setting
        out.mkdir(parents=True, exist_ok=True)
        result = run_setting(args.config, setting, args.steps, out, args.overrides)
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print_table(results)


if __name__ == "__main__":
    main()
