"""GRPO on the embedded model under each distributed layout, two CPU processes, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_rl_layouts.py --steps 3 --out runs/rl-layouts

Runs `autotraj rl` (the measured run's sizes: bench_grpo.MEASURED_RUN, SmolLM2-135M, bf16 rollout copy) under DDP,
FSDP2 and DeepSpeed ZeRO-2/ZeRO-3 through tests/stage_launch.py (torchrun with a gloo process
group: accelerate pairs FSDP and DeepSpeed with GPU groups only), each from the same seed, and
prints per layout: seconds per step and its parts (weight sync into the rollout copy, rollout,
update), the reward, how many rollouts of each step are token for token those of the DDP run,
and the dtype of the saved model. (that run trains under bf16 mixed precision, so the layouts
round differently; sampling at temperature 1 turns the first differing bit into a different
trajectory. tests/test_distributed.py checks exact agreement in fp32.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_grpo import MEASURED_RUN, write_queries  # noqa: E402
from test_distributed import MODE_ENV  # noqa: E402

LAYOUTS = ("ddp", "fsdp2", "zero2", "zero3")


def run_layout(mode: str, out: Path, steps: int, queries: Path) -> float:
    from autotraj.config import load_stage_config, to_dict
    from autotraj.train.grpo import RlConfig

    measured = load_stage_config(RlConfig, "rl", ROOT / "configs" / "cpu.yaml", MEASURED_RUN)
    base = to_dict(measured)
    base.update(run_dir=str(out / mode), queries=str(queries), steps=steps, save_every=0, seed=0)
    base["tools"] = {"python": {"workers": 1}}  # one sandbox worker per process
    config = out / f"{mode}.yaml"
    config.write_text(yaml.safe_dump(base))
    env = {**os.environ, **MODE_ENV[mode], "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [
        "--nproc_per_node",
        "2",
        str(ROOT / "tests" / "stage_launch.py"),
        mode,
        "rl",
        str(config),
    ]
    began = time.perf_counter()
    with (out / f"{mode}.log").open("w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=log, check=True)
    return time.perf_counter() - began


def same_rollouts(run: Path, reference: Path, steps: int) -> str:
    """Per step: how many rollouts equal the reference run's, token for token."""

    def load(path: Path) -> list[dict]:
        return [json.loads(x) for x in (path / "rl" / "rollouts.jsonl").open()]

    counts = [0] * steps
    for a, b in zip(load(run), load(reference), strict=True):
        counts[a["step"] - 1] += a["trajectory"]["segments"] == b["trajectory"]["segments"]
    return ", ".join(map(str, counts))


def saved_dtype(run: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(run / "rl" / "model" / "model.safetensors"), "pt") as f:
        return str(f.get_tensor(next(iter(f.keys()))).dtype).removeprefix("torch.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/rl-layouts"))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    queries = args.out / "arith.jsonl"
    write_queries(queries, n=64, seed=0)
    print(
        "| layout | wall s | s/step | sync s | rollout s | update s | reward (mean) "
        "| rollouts = DDP's, per step (of 8) | saved dtype |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.layouts:
        wall = run_layout(mode, args.out, args.steps, queries)
        rows = [json.loads(x) for x in (args.out / mode / "rl" / "metrics.jsonl").open()]

        def mean(key: str, rows: list[dict] = rows) -> float:
            return sum(r[key] for r in rows) / len(rows)

        same = same_rollouts(args.out / mode, args.out / "ddp", args.steps)
        print(
            f"| {mode} | {wall:.0f} | {mean('rl/time/step_s'):.1f} | {mean('rl/time/sync_s'):.2f} "
            f"| {mean('rl/time/rollout_s'):.1f} | {mean('rl/time/update_s'):.1f} "
            f"| {mean('rl/reward/mean'):.3f} | {same} | {saved_dtype(args.out / mode)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
