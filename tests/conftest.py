"""Shared fixtures: offline environment and the tiny random model (autotraj/models/tiny.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding the tiny LlamaForCausalLM and its char-level ChatML tokenizer."""
    from autotraj.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


# A whole pipeline on the tiny model, every section set (tests/test_ablate.py, test_audit.py):
# the reference solver as teacher and repairer, the real sandbox and the built-in BM25 index.
PROMPT = "Think in <think></think>, run Python in <code></code>, search in <search></search>."
TOOLS = {
    "python": {"workers": 1},
    "search": {"backend": "bm25", "index_dir": "builtin:multihop", "top_k": 1},
}


def write_tiny_ablation_config(tmp_path: Path, tiny: Path) -> Path:
    gen = {"backend": "reference", "tokenizer": str(tiny)}
    train = {
        "model": str(tiny),
        "per_device_batch_size": 4,
        "effective_batch_size": 4,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
        "max_length": 4096,  # the tiny model's tokenizer has one token per character
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "save_steps": 100,
    }
    rollout = {"system_prompt": PROMPT, "max_new_tokens": 24, "max_response_tokens": 48}
    config = {
        "run_dir": str(tmp_path / "ablation"),
        "synthesize": {
            "queries": "builtin:mixed:train",
            "limit": 12,
            "generator": gen,
            "tools": TOOLS,
            "rollout": {"system_prompt": PROMPT},
        },
        "repair": {"generator": gen, "tools": TOOLS, "rollout": {"system_prompt": PROMPT}},
        "build": {"save_hf": False},
        "sft": train,
        "rm": {k: v for k, v in train.items() if k != "model"} | {"max_steps": 1},
        "rl": {
            "steps": 1,
            "prompts_per_step": 2,
            "rollouts_per_prompt": 2,
            "micro_batch_size": 4,
            "mixed_precision": "no",
            "save_every": 0,
            "generator": {"dtype": "policy", "batch_size": 4},
            "tools": TOOLS,
            "rollout": rollout,
        },
        "eval": {
            "benchmarks": [
                {"name": "arithmetic", "path": "builtin:arithmetic:test", "limit": 3},
                {"name": "multihop", "path": "builtin:multihop:test", "limit": 3},
            ],
            "generator": {"dtype": "float32", "batch_size": 6},
            "tools": TOOLS,
            "rollout": rollout,
        },
        "ablation": {
            "sft_data": ["all", "hq", "autotraj"],
            "sft_steps": 2,
            "rl_starts": ["autotraj"],
            "base_demonstrations": 1,
            "bootstrap_samples": 200,
        },
    }
    path = tmp_path / "ablation.yaml"  # JSON is YAML
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def tiny_ablation_yaml(tiny_model_dir):
    """A function writing the tiny pipeline + ablation config into a folder; returns its path."""
    return lambda folder: write_tiny_ablation_config(folder, tiny_model_dir)
