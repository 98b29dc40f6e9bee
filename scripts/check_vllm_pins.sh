#!/usr/bin/env bash
# Does `pip install '.[train,vllm]'` resolve, and does autotraj run on the versions it picks?
#   1. pip's resolver, dry run, in a throwaway venv (it reads metadata and fetches a few wheels;
#      nothing is installed): prints the vLLM, torch, transformers and numpy it would install.
#   2. The model, training, search and evaluation tests on .venv with transformers and numpy
#      replaced by those versions (installed with --target into an overlay that PYTHONPATH puts
#      first). torch stays .venv's CPU build: the 2.14.0 that vLLM pins is a CUDA build.
# Needs .venv (bash scripts/setup.sh dev). 6.6 min on 2 shared cores; .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
work=runs/vllm-pins
rm -rf "$work" && mkdir -p "$work"
.venv/bin/python -m venv "$work/resolve"
"$work/resolve/bin/python" -m pip install -q --upgrade pip
"$work/resolve/bin/python" -m pip install --dry-run --ignore-installed --quiet \
  --report "$work/report.json" ".[train,vllm]"
read -r transformers numpy < <(.venv/bin/python - "$work/report.json" <<'PY'
import json, sys
picked = {p["metadata"]["name"].lower(): p["metadata"]["version"]
          for p in json.load(open(sys.argv[1]))["install"]}
print("vllm-pins: autotraj[train,vllm] resolves to " + ", ".join(
    f"{n} {picked[n]}" for n in ("vllm", "torch", "transformers", "numpy", "trl")), file=sys.stderr)
print(picked["transformers"], picked["numpy"])
PY
)
.venv/bin/python -m pip install -q --no-deps --target "$work/overlay" \
  "transformers==$transformers" "numpy==$numpy"
export PYTHONPATH="$PWD/$work/overlay:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -c "import numpy, transformers; print('vllm-pins: testing with transformers',
  transformers.__version__, 'numpy', numpy.__version__)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_render.py \
  tests/test_grpo.py tests/test_reward_model.py tests/test_sft.py tests/test_policy_weights.py \
  tests/test_train_batches.py tests/test_search.py tests/test_grading.py tests/test_evaluate.py
