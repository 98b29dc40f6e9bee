#!/usr/bin/env bash
# Download the wheels scripts/gpu_smoke.sh installs on a CUDA machine whose Python (3.12 here; set
# PYVER) already has torch, accelerate, numpy, pyarrow, pandas, sympy, pyyaml, tqdm, requests,
# safetensors, hf-xet, anyio, h11, idna and typing-extensions: the project's other dependencies, at
# the versions of constraints/cpu.txt (transformers, tokenizers and huggingface_hub too, since
# such images often ship older ones than pyproject.toml's ranges; peft to be inside its range).
#   bash scripts/gpu_wheels.sh DIR        # ~21 MB
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_wheels.sh DIR}
names=(transformers tokenizers huggingface_hub httpx2 httpcore2 truststore httpx trl datasets dill
  multiprocess gguf math-verify latex2sympy2_extended antlr4-python3-runtime bm25s peft)
pins=()
for name in "${names[@]}"; do
  pin=$(grep -i -E "^${name}==" constraints/cpu.txt) || { echo "no pin for $name" >&2; exit 1; }
  pins+=("$pin")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$out" "${pins[@]}"
