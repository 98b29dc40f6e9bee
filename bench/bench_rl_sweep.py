"""GRPO settings for the embedded 135M policy, chosen by measurement: a sweep from one SFT model.

    .venv/bin/python bench/bench_rl_sweep.py runs/cpu --out runs/rl-sweep \\
        --setting lr=1e-6 --setting lr=1e-5 --setting lr=3e-5 --setting lr=1e-5,rollouts=8

Takes a finished `autotraj run --config configs/cpu.yaml` directory (its SFT model, reward model
and synthesized queries) and, for each `--setting` (comma-separated overrides of the demo's `rl`
section: `lr`, `steps`, `prompts` = prompts_per_step, `rollouts` = rollouts_per_prompt), runs
GRPO from the same SFT model and evaluates it greedily on a development set: training questions
the run never used (`builtin:<task>:train` items 500-549 of each task; the test split is left for
the reported numbers). Per setting it prints: seconds, the reward of the first and last two
steps, dev accuracy, mean tokens, tool calls, how many dev trajectories differ from the SFT
model's (greedy), and the relative L2 change of the weights. The SFT model is evaluated once as
the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from autotraj.audit import changed_items, weight_change
from autotraj.config import load_config
from autotraj.evaluate import BenchmarkConfig, run_eval
from autotraj.io import write_jsonl_atomic
from autotraj.pipeline import PipelineConfig
from autotraj.querysets import load_queries
from autotraj.train.grpo import RlConfig, run_rl

KEYS = {
    "lr": "lr",
    "steps": "steps",
    "prompts": "prompts_per_step",
    "rollouts": "rollouts_per_prompt",
}


def dev_set(out: Path) -> Path:
    """Items 500-549 of each built-in training split (arithmetic's, then multihop's), as a
    JSONL file."""
    rows = []
    for task in ("arithmetic", "multihop"):
        rows += [q.to_dict() for q in load_queries(f"builtin:{task}:train")[500:550]]
    path = out / "dev.jsonl"
    write_jsonl_atomic(path, rows)
    return path


def parse(setting: str, base: RlConfig) -> RlConfig:
    values: dict = {}
    for part in setting.split(","):
        key, _, raw = part.partition("=")
        field = KEYS[key.strip()]
        values[field] = float(raw) if field == "lr" else int(raw)
    return dataclasses.replace(base, **values)


def evaluate(cfg: PipelineConfig, model: str, out: Path, name: str, dev: Path) -> dict:
    ecfg = dataclasses.replace(
        cfg.eval,
        run_dir=str(out),
        name=name,
        benchmarks=(BenchmarkConfig(name="dev", path=str(dev)),),
        generator=dataclasses.replace(cfg.eval.generator, model=model),
    )
    return run_eval(ecfg)["average"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="configs/cpu.yaml")
    parser.add_argument("--setting", action="append", required=True)
    args = parser.parse_args()
    cfg = load_config(PipelineConfig, args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    dev = dev_set(args.out)
    sft_model = args.run_dir / "sft" / "model"
    ref = evaluate(cfg, str(sft_model), args.out, "sft", dev)
    print(f"sft: dev accuracy {ref['accuracy']:.3f}, tokens {ref['mean_tokens']:.0f}", flush=True)
    rows = []
    for setting in args.setting:
        name = setting.replace("=", "").replace(",", "_")
        rcfg = parse(setting, cfg.rl)
        rcfg = dataclasses.replace(
            rcfg,
            run_dir=str(args.out / name),
            model=str(sft_model),
            rm=str(args.run_dir / "rm" / "model"),
            queries=str(args.run_dir / "synthesize" / "queries.jsonl"),
        )
        start = time.perf_counter()
        run_rl(rcfg)
        seconds = time.perf_counter() - start
        model = args.out / name / "rl" / "model"
        avg = evaluate(cfg, str(model), args.out, name, dev)
        metrics = [
            json.loads(line)
            for line in (args.out / name / "rl" / "metrics.jsonl").read_text().splitlines()
        ]
        rewards = [m["rl/reward/mean"] for m in metrics if "rl/reward/mean" in m]
        changed, n = changed_items(
            args.out / "eval" / "sft" / "results.jsonl", args.out / "eval" / name / "results.jsonl"
        )
        row = {
            "setting": setting,
            "seconds": round(seconds),
            "reward_first2": sum(rewards[:2]) / 2,
            "reward_last2": sum(rewards[-2:]) / 2,
            "dev_accuracy": avg["accuracy"],
            "dev_tokens": avg["mean_tokens"],
            "tool_calls": avg["tool_calls_per_trajectory"],
            "changed": f"{changed}/{n}",
            "weight_change": weight_change(sft_model, model),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        "\n| setting | s | reward first 2 / last 2 steps | dev acc. | tokens | calls | changed vs SFT | weight change |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| SFT (reference) | - | - | {100 * ref['accuracy']:.1f} | {ref['mean_tokens']:.0f} | "
        f"{ref['tool_calls_per_trajectory']:.2f} | - | - |"
    )
    for r in rows:
        print(
            f"| {r['setting']} | {r['seconds']} | {r['reward_first2']:.2f} / {r['reward_last2']:.2f} "
            f"| {100 * r['dev_accuracy']:.1f} | {r['dev_tokens']:.0f} | {r['tool_calls']:.2f} | "
            f"{r['changed']} | {r['weight_change']:.1e} |"
        )


if __name__ == "__main__":
    main()
