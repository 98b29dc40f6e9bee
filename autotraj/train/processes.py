"""This process's place among the training processes: accelerate's process state, made once.

`process_state()` is the `PartialState` every stage asks first (which process is the main one,
how many there are). It passes `ACCELERATE_USE_CPU` on: `PartialState()` alone ignores it (only
`Accelerator` reads it), so under `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N` on a machine
without GPUs the state would be made single-process first and the N processes would run N
independent copies of the stage into one run directory.
"""

from __future__ import annotations

from typing import Any


def process_state() -> Any:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
