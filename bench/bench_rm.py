"""Reward-model scoring speed on the embedded model: batched (batch 16) vs one at a time.

Builds a SmolLM2-135M sequence classifier (num_labels=1, pad `<|endoftext|>`) and scores the
same realistic tool trajectories (~300 tokens, bench_sft.trajectory) through
`TrajectoryRewardModel.score` with `--batch` and with batch 1. Prints trajectories/s for both,
the speed-up, and the largest difference between batched and single scores.

The head is untrained here (speed only), so the model is wrapped directly instead of going
through `TrajectoryRewardModel.load`, which refuses such a head.

    .venv/bin/python bench/bench_rm.py --items 32 --batch 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_sft import trajectory  # noqa: E402

from autotraj.models.loading import EMBEDDED_MODEL, GeneratorConfig, load_tokenizer  # noqa: E402
from autotraj.train.reward_model import (  # noqa: E402
    TrajectoryRewardModel,
    load_sequence_classifier,
)


def timed(rm: TrajectoryRewardModel, items, batch: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    scores = rm.score(items, batch_size=batch)
    return time.perf_counter() - start, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()}")
    tokenizer = load_tokenizer(GeneratorConfig(model=EMBEDDED_MODEL))
    model, _ = load_sequence_classifier(EMBEDDED_MODEL, tokenizer.pad_token_id, args.dtype)
    rm = TrajectoryRewardModel(model, tokenizer)
    items = [trajectory(i) for i in range(args.items)]
    timed(rm, items[:2], 2)  # warm-up
    batched_s, batched = timed(rm, items, args.batch)
    single_s, single = timed(rm, items, 1)
    diff = max(abs(a - b) for a, b in zip(batched, single, strict=True))
    print(f"{args.items} trajectories, dtype {args.dtype}, {args.threads} threads")
    print(f"batch {args.batch}: {batched_s:.2f} s ({args.items / batched_s:.1f} traj/s)")
    print(f"batch 1:  {single_s:.2f} s ({args.items / single_s:.1f} traj/s)")
    print(f"speed-up batched / single: {single_s / batched_s:.2f}x; max |diff| {diff:.2e}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
