"""Run one stage in a fresh child process, so that the memory it used goes back when it ends.

A stage that trains or generates leaves a lot behind in its process: the allocator keeps freed
pages, library caches keep tensors, a model object may outlive its stage through a reference
cycle. Run one after another in one process, `autotraj ablate`'s fourteen stages grew a 135M
model's resident memory to 23.7 GB (docs/ablation.md). A child process per stage returns
everything to the system at its end, so the peak is the largest single stage's.

Children are forked from a fork server (multiprocessing's "forkserver"), a clean process that
imported torch, transformers and the training libraries once and never ran a kernel: each stage
starts in milliseconds instead of re-importing them (~5 s of CPU per stage with "spawn"), and is
still safe (forking the parent itself, whose OpenMP threads already ran, can deadlock the child).
The child takes the parent's environment, working directory and logging setup, runs `runner(config)`
and returns its (picklable) result. An exception in the stage is re-raised in the parent as
itself (ConfigError, DataError, TrainingIncomplete keep their type and message); a child that
dies without one (killed, out of memory, a crashing kernel) raises `StageProcessDied` naming the
stage and its exit cause.

Under a distributed launcher (WORLD_SIZE > 1) stages run in-process: every rank's child would
otherwise join the process group as that rank a second time.

Not here: which stages run (ablate.py, pipeline.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

log = logging.getLogger(__name__)

C = TypeVar("C")
# imported once by the fork server (a missing one is skipped, as multiprocessing does)
PRELOAD = ("torch", "transformers", "datasets", "peft", "trl", "autotraj.train.sft")
DEFAULT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StageProcessDied(RuntimeError):
    """The child process running a stage ended without a result or an exception."""


def _call(runner: Callable[[C], Any], config: C, context: dict[str, Any]) -> Any:
    """In the child: the parent's environment, working directory and logging, then the stage.
    (A forked child starts with the fork server's, which may be older than the parent's.)"""
    os.environ.clear()
    os.environ.update(context["env"])
    os.chdir(context["cwd"])
    logging.basicConfig(level=context["level"], format=context["format"], force=True)
    return runner(config)


def _parent_format() -> str:
    for handler in logging.getLogger().handlers:
        if handler.formatter is not None and handler.formatter._fmt:
            return handler.formatter._fmt
    return DEFAULT_FORMAT


def distributed() -> bool:
    """True inside a multi-process launch (torchrun, accelerate): stages must stay in-process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_in_child(runner: Callable[[C], Any], config: C) -> Any:
    """`runner(config)` in a fresh process forked from the fork server; its result, or its
    exception re-raised.

    `runner` must be importable by name (a module-level function) and `config` picklable.
    """
    name = f"{runner.__module__}.{runner.__qualname__}"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    context = {
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "level": logging.getLogger().getEffectiveLevel(),
        "format": _parent_format(),
    }
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        future = pool.submit(_call, runner, config, context)
        try:
            return future.result()
        except BrokenProcessPool as e:
            processes = getattr(pool, "_processes", None) or {}
            codes = [p.exitcode for p in processes.values()]
            raise StageProcessDied(
                f"{name}: its child process died without a result (exit codes {codes}; a "
                "negative code is the signal, e.g. -9: killed, often for memory)"
            ) from e


def run_stage(runner: Callable[[C], Any], config: C, isolate: bool) -> Any:
    """`runner(config)`, in a child process when `isolate` and not under a distributed launch."""
    if isolate and not distributed():
        return run_in_child(runner, config)
    return runner(config)
