"""A training stage under torchrun on CPU, for tests/test_distributed.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/stage_launch.py MODE STAGE CONFIG.yaml

STAGE: rl, sft or rm (the same entry points as `autotraj rl|sft|rm --config CONFIG.yaml`).
MODE: ddp (DDP over gloo), fsdp2 (accelerate's FSDP2 path; the test sets ACCELERATE_USE_FSDP),
zero2 / zero3 (DeepSpeed on its CPU accelerator; the test sets ACCELERATE_USE_DEEPSPEED). The
process group is set up here because accelerate only pairs FSDP and DeepSpeed with accelerator
devices; everything after that is the product's own code path.

RL_LAUNCH_DROP=1: process 1 trains on one sample fewer than process 0 every step (as when one
of its rollouts hit an infrastructure failure), so the processes have different numbers of
micro-batches to run.
"""

from __future__ import annotations

import logging
import os
import sys


def char_reward(text, query, trajectory):
    """A reward that differs between random completions (so advantages are not zero)."""
    return text.count("a") / 4


def drop_one_sample_on_process_1() -> None:
    from autotraj.train.grpo import GrpoRun

    update = GrpoRun.update

    def uneven(self, samples, step):
        if self.accelerator.process_index == 1:
            samples = samples[:-1]
        return update(self, samples, step)

    GrpoRun.update = uneven


def main() -> None:
    mode, stage, config = sys.argv[1:4]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    if mode != "ddp":  # ddp: ACCELERATE_USE_CPU=1, as a user would launch it
        state = PartialState(backend="gloo")
        if mode == "fsdp2":
            # accelerate turns FSDP on only for accelerator process groups; FSDP2 itself runs on
            # CPU over gloo, so let accelerate see a GPU-style group (the device stays the CPU)
            state.distributed_type = DistributedType.MULTI_GPU
    from autotraj.config import load_config

    if stage == "rl":
        from autotraj.train.grpo import RlConfig, run_rl

        if os.environ.get("RL_LAUNCH_DROP") == "1":
            drop_one_sample_on_process_1()
        run_rl(load_config(RlConfig, config))
    elif stage == "sft":
        from autotraj.train.sft import SftConfig, run_sft

        run_sft(load_config(SftConfig, config))
    elif stage == "rm":
        from autotraj.train.reward_model import RmConfig, run_rm

        run_rm(load_config(RmConfig, config))
    else:
        raise SystemExit(f"unknown stage {stage!r}")


if __name__ == "__main__":
    main()
