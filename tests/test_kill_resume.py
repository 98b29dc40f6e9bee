"""Faults survived: a real `autotraj` process is killed with SIGKILL (its whole process group,
sandbox workers included) in the middle of its work, the same command is run again, and the
result must equal an uninterrupted run of the same config: no record lost, none twice, the same
counts, and for training the same final step, reached by resuming from the last checkpoint.

Each test polls the output files until some but not all of the work is on disk, then kills.
Models: the tiny random model (autotraj/models/tiny.py); the repairer and the pipeline's teacher
are a scripted OpenAI-compatible server in this process, so their replies (and everything
downstream of them) are the same in both runs. Comparison: `compare` of scripts/kill_resume.py,
the user-facing version of these tests (run here too, in the slow tier).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import write_jsonl
from test_repair import HEDGING, WRONG, make_run
from test_train_batches import write_sft_file

AUTOTRAJ = Path(sys.executable).parent / "autotraj"
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume.py"


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("kill_resume", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


kill_resume = _load_script()


# --- running and killing the CLI ----------------------------------------------------------------


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def run_to_end(args: list[str], log: Path) -> dict[str, Any]:
    """`autotraj args...` to the end; its printed result."""
    with log.open("a") as err:
        done = subprocess.run(
            [str(AUTOTRAJ), *args], stdout=subprocess.PIPE, stderr=err, env=ENV, timeout=600
        )
    assert done.returncode == 0, tail(log)
    printed = done.stdout.decode().splitlines()  # the Trainer prints its log dicts there too
    return json.loads("\n".join(printed[printed.index("{") :]))


def kill_when(args: list[str], ready: Callable[[], bool], log: Path) -> None:
    """Start `autotraj args...` and SIGKILL its process group as soon as `ready()`."""
    with log.open("a") as err:
        proc = subprocess.Popen(
            [str(AUTOTRAJ), *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=ENV,
            start_new_session=True,
        )
    deadline = time.monotonic() + 300
    try:
        while not ready():
            assert proc.poll() is None, (
                f"it ended (rc {proc.returncode}) before the kill:\n{tail(log)}"
            )
            assert time.monotonic() < deadline, "the kill condition never came"
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def lines(path: Path) -> int:
    """Complete lines of a file being appended to (0 when absent)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def complete_checkpoints(folder: Path, marker: str) -> list[int]:
    """Steps of the checkpoints in `folder` whose last-written file `marker` exists."""
    steps = [int(re.sub(r"\D", "", p.parent.name)) for p in folder.glob(f"*/{marker}")]
    return sorted(steps)


def same_result(reference: Path, resumed: Path) -> None:
    assert kill_resume.compare(reference, resumed) == []


def same_rows(reference: Path, resumed: Path, file: str, key: str) -> None:
    """The rows of `file` in both runs, by `key`, are equal in content, not only in ids: a
    resumed stage that redid its unfinished work with other seeds or inputs fails here."""

    def rows(run: Path) -> dict[str, Any]:
        found = {}
        for line in (run / file).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            found[row[key]] = row
        return found

    assert rows(resumed) == rows(reference)


def weights(model_dir: Path) -> str:
    return hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()


# --- a scripted OpenAI-compatible teacher and repairer --------------------------------------------


def reply_for(prompt: str) -> tuple[str, str | None]:
    """Deterministic replies: a*b with a tool call (HQ), hedging (AC-LQ) or a wrong answer
    (AW) by the first factor; a repair request gets a clean answer for even cases."""
    if "=== TRAJECTORY START ===" in prompt:
        case = re.findall(r"\(case (\w+)\)", prompt)[:1]
        a, b = re.findall(r"What is (\d+)\*(\d+)\?", prompt)[0]
        good = not case or int(re.sub(r"\D", "", case[0]) or 0) % 2 == 0
        value = int(a) * int(b) if good else -1
        return f"<think>{a} times {b}.</think>\n<answer>\\boxed{{{value}}}</answer>", "</answer>"
    a, b = (int(x) for x in re.findall(r"What is (\d+)\*(\d+)\?", prompt)[-1])
    turn = prompt.rsplit("<|im_start|>assistant", 1)[-1]
    if a % 3 == 0:
        return f"<think>Roughly.</think>\n<answer>\\boxed{{{a * b + 1}}}</answer>", "</answer>"
    if "<result>" not in turn:
        return f"<think>Multiply.</think>\n<code>\nprint({a}*{b})\n</code>", "</code>"
    think = "It is probably, maybe, perhaps the value" if a % 3 == 1 else "The product"
    return f"<think>{think}.</think>\n<answer>\\boxed{{{a * b}}}</answer>", "</answer>"


class ScriptedServer:
    """POST /v1/completions answered by `reply_for`, after `delay_s` (to pace the job)."""

    def __init__(self, delay_s: float):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(delay_s)
                text, stop = reply_for(payload["prompt"])
                body = {"choices": [{"text": text, "finish_reason": "stop", "stop_reason": stop}]}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def generator(self, tokenizer: Path) -> list[str]:
        return [
            "generator.backend=openai",
            "generator.model=scripted",
            f"generator.base_url={self.base_url}",
            f"generator.tokenizer={tokenizer}",
            "generator.batch_size=4",
        ]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer(delay_s=0.03)
    yield s
    s.close()


def write_queries(path: Path, count: int) -> Path:
    rows = [
        {"id": f"q{i}", "question": f"What is {i + 2}*{i + 3}?", "answer": str((i + 2) * (i + 3))}
        for i in range(count)
    ]
    return write_jsonl(path, rows)


# --- the comparison itself ------------------------------------------------------------------------


def test_compare_reads_nested_stage_folders(tmp_path):
    """Evaluation writes eval/<model>/: its records, manifest and partial files are compared
    like a top-level stage's."""
    for name, ids in (("reference", ["a", "b"]), ("resumed", ["a"])):
        folder = tmp_path / name / "eval" / "base"
        folder.mkdir(parents=True)
        write_jsonl(folder / "results.jsonl", [{"id": i} for i in ids])
        counts = {"results": len(ids), "generated": 1}
        (folder / "manifest.json").write_text(json.dumps({"counts": counts}))
    (tmp_path / "resumed" / "eval" / "base" / "results.jsonl.partial").write_text("")
    problems = kill_resume.compare(tmp_path / "reference", tmp_path / "resumed")
    assert problems == [
        "eval/base/results.jsonl: 1 records lost, e.g. ['b']",
        "eval/base/results.jsonl.partial: left unfinished",
        "eval/base/manifest.json counts: {'results': 1} != reference {'results': 2}",
    ]
    assert kill_resume.compare(tmp_path / "reference", tmp_path / "reference") == []


# --- synthesize ---------------------------------------------------------------------------------


def test_synthesize_killed_mid_run(tmp_path, tiny_model_dir):
    queries = write_queries(tmp_path / "queries.jsonl", 100)
    args = [
        "synthesize",
        f"queries={queries}",
        f"generator.model={tiny_model_dir}",
        "generator.dtype=float32",
        "n=2",
        "chunk_queries=2",
        "decontaminate=false",
        "rollout.max_new_tokens=32",
        "rollout.max_response_tokens=64",
        "tools.python.workers=1",
    ]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_to_end([*args, f"run_dir={reference}"], tmp_path / "log.txt")
    out = resumed / "synthesize" / "trajectories.jsonl"
    partial = out.with_name(out.name + ".partial")
    kill_when([*args, f"run_dir={resumed}"], lambda: lines(partial) >= 8, tmp_path / "log.txt")
    assert not out.exists() and 8 <= lines(partial) < 200  # some, not all
    result = run_to_end([*args, f"run_dir={resumed}"], tmp_path / "log.txt")
    assert 0 < result["generated"] <= 200 - 8
    same_result(reference, resumed)
    same_rows(reference, resumed, "synthesize/trajectories.jsonl", "id")
    assert sum(kill_resume.records(resumed)["synthesize/trajectories.jsonl"].values()) == 200


# --- sft ----------------------------------------------------------------------------------------


def sft_args(data: Path, model: Path) -> list[str]:
    return [
        "sft",
        f"data={data}",
        f"model={model}",
        "max_steps=40",
        "save_steps=5",
        "per_device_batch_size=4",
        "effective_batch_size=4",
        "logging_steps=1",
        "learning_rate=1e-3",
        "warmup_ratio=0.0",
        "max_length=256",
        "use_cpu=true",
        "bf16=false",
        "gradient_checkpointing=false",
    ]


def test_sft_killed_mid_training_resumes_from_its_last_complete_checkpoint(
    tmp_path, tiny_model_dir
):
    """Killed after two checkpoints; then the newest one is cut short, as a kill while the
    Trainer writes it leaves it (trainer_state.json is written last), and metrics.jsonl ends in
    half a line. The re-run resumes from the last complete checkpoint and ends with the same
    weights and the same 40 logged losses as the uninterrupted run."""
    args = sft_args(write_sft_file(tmp_path / "sft.jsonl", 64), tiny_model_dir)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_to_end([*args, f"run_dir={reference}"], tmp_path / "log.txt")
    checkpoints = resumed / "sft" / "checkpoints"
    kill_when(
        [*args, f"run_dir={resumed}"],
        lambda: len(complete_checkpoints(checkpoints, "trainer_state.json")) >= 2,
        tmp_path / "log.txt",
    )
    saved = complete_checkpoints(checkpoints, "trainer_state.json")
    assert len(saved) >= 2 and saved[-1] < 40 and not (resumed / "sft" / "model").exists()
    (checkpoints / f"checkpoint-{saved[-1]}" / "trainer_state.json").write_text('{"global_st')
    with (resumed / "sft" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "sft/tr')
    result = run_to_end([*args, f"run_dir={resumed}"], tmp_path / "log.txt")
    assert result["steps"] == 40
    assert result["resumed_from"] == str(checkpoints / f"checkpoint-{saved[-2]}")
    same_result(reference, resumed)
    assert kill_resume.logged_steps(resumed)["sft"] == list(range(1, 41))  # each loss once
    assert weights(resumed / "sft" / "model") == weights(reference / "sft" / "model")


# --- repair -------------------------------------------------------------------------------------


def test_repair_killed_mid_run(tmp_path, server, tiny_model_dir):
    base = tmp_path / "base"
    make_run(base, {f"c{i}": [WRONG if i % 3 else HEDGING] for i in range(40)})
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for run in (reference, resumed):
        shutil.copytree(base, run)
    args = ["repair", "chunk=2", "tools.python.workers=1", *server.generator(tiny_model_dir)]
    run_to_end([*args, f"run_dir={reference}"], tmp_path / "log.txt")
    stage = resumed / "repair"

    def written() -> int:
        return sum(lines(stage / f"{name}.jsonl.partial") for name in ("repairs", "hard_cases"))

    kill_when([*args, f"run_dir={resumed}"], lambda: written() >= 6, tmp_path / "log.txt")
    assert 6 <= written() < 40 and not (stage / "repairs.jsonl").exists()
    run_to_end([*args, f"run_dir={resumed}"], tmp_path / "log.txt")
    same_result(reference, resumed)
    for name in ("repairs", "hard_cases"):
        same_rows(reference, resumed, f"repair/{name}.jsonl", "original_id")
    done = kill_resume.records(resumed)
    assert (
        sum(done["repair/repairs.jsonl"].values()) + sum(done["repair/hard_cases.jsonl"].values())
        == 40
    )


# --- rl -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rl_killed_mid_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir):
    args = [
        "rl",
        f"queries={write_queries(tmp_path / 'queries.jsonl', 12)}",
        f"model={tiny_model_dir}",
        "steps=10",
        "save_every=2",
        "prompts_per_step=2",
        "rollouts_per_prompt=2",
        "micro_batch_size=2",
        "mixed_precision='no'",
        "lr=1e-2",
        "reward.rm_weight=0",
        "tools.python.workers=1",
        "rollout.max_new_tokens=32",
        "rollout.max_response_tokens=32",
        "generator.batch_size=4",
    ]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_to_end([*args, f"run_dir={reference}"], tmp_path / "log.txt")
    out = resumed / "rl"

    def past_a_checkpoint() -> bool:  # a step done after the last checkpoint: it is redone
        saved = complete_checkpoints(out / "checkpoints", "complete")
        return bool(saved) and lines(out / "rollouts.jsonl") >= 4 * (saved[-1] + 1)

    kill_when([*args, f"run_dir={resumed}"], past_a_checkpoint, tmp_path / "log.txt")
    saved = complete_checkpoints(out / "checkpoints", "complete")
    assert saved[-1] < 10 and not (out / "model").exists()
    assert lines(out / "rollouts.jsonl") > 4 * saved[-1]  # rows of steps to be redone
    result = run_to_end([*args, f"run_dir={resumed}"], tmp_path / "log.txt")
    assert result["steps"] == 10
    same_result(reference, resumed)
    assert kill_resume.logged_steps(resumed)["rl"] == list(range(1, 11))
    assert sum(kill_resume.records(resumed)["rl/rollouts.jsonl"].values()) == 40
    assert weights(out / "model") == weights(reference / "rl" / "model")


# --- the pipeline -------------------------------------------------------------------------------


SHORT_SYSTEM = "Think in <think></think>, run Python in <code></code>, answer in \\boxed{}."


def pipeline_config(path: Path, queries: Path, tiny: Path, server: ScriptedServer) -> Path:
    openai = {
        "backend": "openai",
        "model": "scripted",
        "base_url": server.base_url,
        "tokenizer": str(tiny),
        "batch_size": 4,
    }
    config = {
        "stages": ["synthesize", "score", "repair", "build", "sft"],
        "synthesize": {
            "queries": str(queries),
            "n": 2,
            "chunk_queries": 2,
            "decontaminate": False,
            "generator": openai,
            "rollout": {"system_prompt": SHORT_SYSTEM},
            "tools": {"python": {"workers": 1}},
        },
        "repair": {
            "generator": openai,
            "chunk": 2,
            "rollout": {"system_prompt": SHORT_SYSTEM, "temperature": 0.0},
            "tools": {"python": {"workers": 1}},
        },
        "build": {"save_hf": False},
        "sft": {
            "model": str(tiny),
            "max_steps": 30,
            "save_steps": 5,
            "per_device_batch_size": 2,
            "effective_batch_size": 2,
            "logging_steps": 1,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "max_length": 512,
            "use_cpu": True,
            "bf16": False,
            "gradient_checkpointing": False,
        },
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory, tiny_model_dir, server) -> tuple[list[str], Path]:
    root = tmp_path_factory.mktemp("pipeline")
    queries = write_queries(root / "queries.jsonl", 24)
    config = pipeline_config(root / "pipeline.yaml", queries, tiny_model_dir, server)
    args = ["run", "--config", str(config)]
    run_to_end([*args, f"run_dir={root / 'reference'}"], root / "log.txt")
    labels = kill_resume.records(root / "reference")
    assert sum(labels["build/sft.jsonl"].values()) > 0 and labels["repair/repairs.jsonl"]
    return args, root / "reference"


@pytest.mark.slow
def test_pipeline_killed_during_synthesis(tmp_path, pipeline_reference):
    args, reference = pipeline_reference
    resumed = tmp_path / "resumed"
    partial = resumed / "synthesize" / "trajectories.jsonl.partial"
    kill_when([*args, f"run_dir={resumed}"], lambda: lines(partial) >= 8, tmp_path / "log.txt")
    assert 8 <= lines(partial) < 48 and not (resumed / "score").exists()
    run_to_end([*args, f"run_dir={resumed}"], tmp_path / "log.txt")
    same_result(reference, resumed)
    assert weights(resumed / "sft" / "model") == weights(reference / "sft" / "model")


@pytest.mark.slow
def test_pipeline_killed_during_sft(tmp_path, pipeline_reference):
    args, reference = pipeline_reference
    resumed = tmp_path / "resumed"
    checkpoints = resumed / "sft" / "checkpoints"
    kill_when(
        [*args, f"run_dir={resumed}"],
        lambda: len(complete_checkpoints(checkpoints, "trainer_state.json")) >= 2,
        tmp_path / "log.txt",
    )
    assert max(complete_checkpoints(checkpoints, "trainer_state.json")) < 30
    assert (resumed / "build" / "manifest.json").exists() and not (
        resumed / "sft" / "model"
    ).exists()
    result = run_to_end([*args, f"run_dir={resumed}"], tmp_path / "log.txt")
    assert result["sft"]["steps"] == 30 and result["sft"]["resumed_from"]
    same_result(reference, resumed)
    assert weights(resumed / "sft" / "model") == weights(reference / "sft" / "model")


# --- the script for users -----------------------------------------------------------------------


@pytest.mark.slow
def test_the_script_kills_resumes_and_compares(tmp_path, tiny_model_dir):
    queries = write_queries(tmp_path / "queries.jsonl", 60)
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--workdir",
            str(tmp_path / "work"),
            "--seed",
            "1",
            "--",
            "synthesize",
            f"queries={queries}",
            f"generator.model={tiny_model_dir}",
            "generator.dtype=float32",
            "chunk_queries=2",
            "decontaminate=false",
            "rollout.max_new_tokens=32",
            "tools.python.workers=1",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trajectories.jsonl.partial" in done.stdout  # killed while it was writing them
    assert done.stdout.rstrip().endswith("resumed run matches the reference"), done.stdout


@pytest.mark.slow
def test_a_finished_run_directory_moved_elsewhere_is_still_finished(tmp_path, pipeline_reference):
    args, reference = pipeline_reference
    moved = tmp_path / "moved"
    shutil.copytree(reference, moved)
    model = moved / "sft" / "model" / "model.safetensors"
    written = model.stat().st_mtime_ns
    run_to_end([*args, f"run_dir={moved}"], tmp_path / "log.txt")
    assert not (moved / "stale").exists()  # every stage kept its key: nothing recomputed
    assert model.stat().st_mtime_ns == written
    assert kill_resume.records(moved) == kill_resume.records(reference)
