"""Shared fixtures and builders: offline environment, the tiny random model
(autotraj/models/tiny.py), hand-made trajectories and JSONL files, a generator that crashes.

`tests/` is not a package: test modules import the builders with `from conftest import ...`
(pytest puts this folder on sys.path), and use the fixtures by name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from autotraj.models.scripted import ScriptedGenerator
from autotraj.records import FinishReason, Provenance, Segment, ToolCall, Trajectory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


PROV = Provenance(model="test", backend="scripted", temperature=0.3, top_p=0.9, max_new_tokens=64)
RESULT_PREFIX = "\n<result>"  # how tags.result_text opens the tool results the rollout appends


def traj(
    *pieces: str | tuple[str, str],
    tid: str = "t",
    qid: str = "q",
    calls: Iterable[ToolCall] = (),
    finish: FinishReason = "answer",
    error: str = "",
    parent: str | None = None,
    token_ids: bool = False,
) -> Trajectory:
    """A trajectory made of `pieces`, in order: model text (trainable) or tool results (not).

    A piece is a tool result when it is a `("result", text)` pair or a string that starts like
    the rollout's results ("\\n<result>"); every other string is model text. With
    `token_ids=True` every whitespace-separated word of a piece gets one token id.
    """
    segments = []
    for piece in pieces:
        if isinstance(piece, tuple):
            kind, text = piece
            assert kind == "result", f"unknown piece kind {kind!r}"
            trainable = False
        else:
            text, trainable = piece, not piece.startswith(RESULT_PREFIX)
        ids = tuple(range(len(text.split()))) if token_ids else ()
        segments.append(Segment(text=text, trainable=trainable, token_ids=ids))
    return Trajectory(
        id=tid,
        query_id=qid,
        segments=tuple(segments),
        tool_calls=tuple(calls),
        finish_reason=finish,
        provenance=PROV,
        parent_id=parent,
        error=error,
    )


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    """Write `rows` (JSON values) one per line, creating the folder; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class CrashOnRound(ScriptedGenerator):
    """A scripted generator that raises RuntimeError("killed") on its `crash_round`-th batch:
    a process killed mid-stage, for the resume tests."""

    def __init__(self, reply: Any, tokenizer: Any = None, crash_round: int = 3):
        super().__init__(reply, tokenizer)
        self.crash_round = crash_round
        self.rounds = 0

    def generate(self, requests):
        self.rounds += 1
        if self.rounds == self.crash_round:
            raise RuntimeError("killed")
        return super().generate(requests)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding the tiny LlamaForCausalLM and its char-level ChatML tokenizer."""
    from autotraj.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def cpu_bf16(monkeypatch):
    """bf16 requests kept as bf16 on this CPU, also where it has no bf16 kernels (where bf16
    falls back to float32: models/cpu_bf16.py): for the tests of what bf16 itself does, on the
    tiny model (slow kernels are no matter there). Subprocesses inherit it."""
    monkeypatch.setenv("AUTOTRAJ_CPU_BF16", "1")


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
