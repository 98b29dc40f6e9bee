"""stage_process: a stage in a child process returns its result, re-raises its error as itself,
reports a killed child by its signal, logs as the parent does, and gives its memory back."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from autotraj.io import DataError
from autotraj.stage_process import StageProcessDied, run_in_child, run_stage

LEAK: list[bytearray] = []


def pid_and(config: dict) -> tuple[int, dict]:
    return os.getpid(), config


def fail(message: str) -> None:
    raise DataError(message)


def die(_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def logging_setup(_: object) -> tuple[int, str]:
    root = logging.getLogger()
    return root.level, root.handlers[0].formatter._fmt


def env_and_cwd(name: str) -> tuple[str | None, str]:
    return os.environ.get(name), os.getcwd()


def leak(megabytes: int) -> None:
    """A stage that keeps what it allocated (as a cache or a reference cycle would)."""
    block = bytearray(megabytes << 20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
    LEAK.append(block)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_the_stage_runs_in_another_process_and_returns_its_result():
    pid, config = run_in_child(pid_and, {"lr": 1e-5})
    assert pid != os.getpid() and config == {"lr": 1e-5}


def test_an_error_in_the_stage_is_raised_as_itself():
    with pytest.raises(DataError, match="queries.jsonl line 3: no field 'id'"):
        run_in_child(fail, "queries.jsonl line 3: no field 'id'")


def test_a_killed_stage_is_reported_with_its_signal():
    with pytest.raises(StageProcessDied, match=r"tests?\.?.*die: .*-9"):
        run_in_child(die, None)


def test_the_stage_logs_like_the_parent():
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    formats = [h.formatter._fmt for h in root.handlers if h.formatter is not None]
    level, fmt = run_in_child(logging_setup, None)
    assert level == logging.INFO and fmt in formats


def test_the_stage_sees_the_parents_environment_and_directory(monkeypatch, tmp_path):
    run_in_child(pid_and, {})  # the fork server exists before the change
    monkeypatch.setenv("AUTOTRAJ_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    env, cwd = run_in_child(env_and_cwd, "AUTOTRAJ_HOME")
    assert env == str(tmp_path / "home") and cwd == str(tmp_path)


def test_memory_a_stage_keeps_goes_back_with_its_process():
    before = rss_mb()
    run_stage(leak, 300, isolate=True)
    assert rss_mb() - before < 100
    # the same stage in-process keeps its 300 MB: what the isolation is for
    run_stage(leak, 300, isolate=False)
    assert rss_mb() - before > 250
    LEAK.clear()


def test_under_a_distributed_launch_the_stage_stays_in_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    pid, _ = run_stage(pid_and, {}, isolate=True)
    assert pid == os.getpid()
