"""The llama.cpp build the tests and the server extra use: portable, and it really generates.

A `-march=native` build of llama-cpp-python segfaulted on an Intel Xeon with AMX at the first
completion while the server still started, so a start-up check was not enough. These tests run
scripts/llama_check.py, which setup.sh uses too: the build's compiled-in CPU features must be
the portable set, and a greedy completion of the embedded GGUF must return tokens, in a child
process so that a crash fails this test with its signal instead of killing pytest.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="install the server extra (bash scripts/setup.sh dev builds it)",
)
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "llama_check.py"


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180
    )


def test_build_holds_no_host_specific_kernels():
    proc = _check()
    assert proc.returncode == 0, proc.stderr.strip()
    assert "AMX" not in proc.stdout and "AVX512" not in proc.stdout


def test_embedded_gguf_generates_tokens():
    proc = _check("--generate")
    assert proc.returncode == 0, proc.stderr.strip()
    assert "completion of 16 tokens works" in proc.stdout


def test_a_crash_is_reported_with_its_signal(tmp_path):
    spec = importlib.util.spec_from_file_location("llama_check", SCRIPT)
    llama_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(llama_check)
    # A child killed by SIGSEGV, the way a kernel the CPU cannot run ends it.
    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    message = llama_check.generate(str(tmp_path / "unused.gguf"), program=crash)
    assert "SIGSEGV" in message and "setup.sh dev" in message
