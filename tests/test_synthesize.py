"""The synthesize stage: real sandbox, scripted generator, resume after a crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CrashOnRound, write_jsonl

from autotraj.config import ConfigError
from autotraj.io import read_jsonl
from autotraj.models.scripted import ScriptedGenerator
from autotraj.synthesize import SynthesizeConfig, run_synthesize

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def reply(request):
    if "<result>" not in request.prompt_text.split("<|im_start|>assistant")[-1]:
        a, b = request.prompt_text.rsplit("What is ", 1)[1].split("?")[0].split("*")
        return f"<think>multiply</think>\n<code>\nprint({a}*{b})\n</code>"
    value = request.prompt_text.rsplit("<result>\n", 1)[1].split("\n", 1)[0]
    return f"<think>ok</think>\n<answer>\\boxed{{{value}}}</answer>"


@pytest.fixture
def queries_file(tmp_path):
    path = tmp_path / "queries.jsonl"
    rows = [
        {"id": f"q{i}", "question": f"What is {i + 2}*{i + 3}?", "answer": str((i + 2) * (i + 3))}
        for i in range(10)
    ]
    return write_jsonl(path, rows)


def config(tmp_path, queries_file, **kw):
    return SynthesizeConfig(
        queries=str(queries_file), run_dir=str(tmp_path / "run"), n=2, chunk_queries=3, **kw
    )


def ids_on_disk(cfg):
    return [row["id"] for _, row in read_jsonl(f"{cfg.run_dir}/synthesize/trajectories.jsonl")]


def test_synthesize_runs_real_tools_and_is_a_no_op_when_finished(tmp_path, queries_file, tokenizer):
    cfg = config(tmp_path, queries_file)
    counts = run_synthesize(cfg, ScriptedGenerator(reply, tokenizer))
    assert counts["trajectories"] == 20 and counts["queries"] == 10
    rows = [row for _, row in read_jsonl(f"{cfg.run_dir}/synthesize/trajectories.jsonl")]
    assert rows[0]["tool_calls"][0]["status"] == "ok"
    assert rows[0]["tool_calls"][0]["output"] == "6"  # 2*3 computed by the sandbox
    assert (tmp_path / "run/synthesize/manifest.json").exists()
    idle = ScriptedGenerator(reply, tokenizer)
    assert run_synthesize(cfg, idle)["generated"] == 0 and idle.calls == []


def test_resume_after_crash_has_no_duplicates_or_losses(tmp_path, queries_file, tokenizer):
    cfg = config(tmp_path, queries_file)
    with pytest.raises(RuntimeError, match="killed"):  # in the second chunk's first round
        run_synthesize(cfg, CrashOnRound(reply, tokenizer, crash_round=3))
    assert len(ids_on_disk_partial(cfg)) == 6  # the first chunk (3 queries x 2) survived
    resumed = ScriptedGenerator(reply, tokenizer)
    counts = run_synthesize(cfg, resumed)
    assert counts["generated"] == 14 and sum(resumed.calls) == 28  # only the missing ones, 2 rounds
    ids = ids_on_disk(cfg)
    assert len(ids) == len(set(ids)) == 20


def ids_on_disk_partial(cfg):
    return [
        row["id"] for _, row in read_jsonl(f"{cfg.run_dir}/synthesize/trajectories.jsonl.partial")
    ]


def test_changed_config_is_refused(tmp_path, queries_file, tokenizer):
    run_synthesize(config(tmp_path, queries_file), ScriptedGenerator(reply, tokenizer))
    with pytest.raises(ConfigError, match="different config"):
        run_synthesize(config(tmp_path, queries_file, limit=3), ScriptedGenerator(reply, tokenizer))


def test_evaluation_questions_are_removed(tmp_path, tokenizer):
    gsm8k_test = json.loads((SHARED_DATA / "benchmarks/gsm8k_test.jsonl").open().readline())
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"id": "leak", "question": gsm8k_test["question"], "answer": "1"})
        + "\n"
        + json.dumps({"id": "ok", "question": "What is 2*3?", "answer": "6"})
        + "\n"
    )
    counts = run_synthesize(config(tmp_path, path), ScriptedGenerator(reply, tokenizer))
    assert counts["decontaminated"] == 1 and counts["queries"] == 1
