"""Remote endpoints that fail on purpose: retried with exponential backoff, then reported; their
rollouts end as `infra_error` and are never scored as wrong.

Every endpoint is a real HTTP server on 127.0.0.1 (an ephemeral port, one thread per request)
that sleeps past the client's timeout, answers 500, sends garbage (not JSON, truncated JSON, the
wrong schema) or resets the connection. The generator (OpenAI-compatible) and the retriever
(RemoteSearch) are the remote endpoints autotraj has; the trajectory reward model only runs
in-process (train/reward_model.py), so there is no remote RM to test.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import write_jsonl
from test_repair import WRONG, make_run

from autotraj.io import read_jsonl
from autotraj.models.generator import GenerationRequest, GeneratorError
from autotraj.models.loading import GeneratorConfig
from autotraj.models.openai_backend import OpenAIGenerator
from autotraj.models.scripted import ScriptedGenerator
from autotraj.records import Query, ToolCall
from autotraj.repair import RepairConfig, run_repair
from autotraj.rewards import RewardConfig, compute_rewards
from autotraj.rollout import GENERATOR_FAILURE, RolloutConfig, generator_failed, rollout
from autotraj.run_dir import StageIncomplete
from autotraj.synthesize import SynthesizeConfig, run_synthesize
from autotraj.tools.search import RemoteSearch
from autotraj.tools.tool import ToolInfraError
from autotraj.tools.toolbox import PythonToolConfig, SearchToolConfig, ToolsConfig

TIMEOUT_S = 0.2  # client timeout; a "slow" endpoint sleeps SLOW_S, far past it
SLOW_S = 1.0
BACKOFF_S = 0.01
STOPS = ("</code>", "</python>", "</search>", "</answer>")

# --- the misbehaving endpoint -----------------------------------------------------------------

# A behaviour returns one of these fault names, or a JSON-able object to answer 200 with.
FAULTS = ("slow", "http_500", "not_json", "truncated", "wrong_schema", "reset")
Behave = Callable[[str, dict[str, Any]], Any]


class Endpoint:
    """An HTTP server on 127.0.0.1 whose `behave(path, body)` picks each reply; it records the
    arrival time and body of every request (so a test counts the client's attempts)."""

    def __init__(self, behave: Behave, wrong_schema: Any = None):
        self.behave = behave
        self.wrong_schema = wrong_schema  # the body a "wrong_schema" fault sends
        self.requests: list[tuple[float, dict[str, Any]]] = []
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint._lock:
                    endpoint.requests.append((time.monotonic(), body))
                endpoint._reply(self, endpoint.behave(self.path, body))

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a reset or a client that gave up waiting is the point of these tests

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    @property
    def attempts(self) -> int:
        return len(self.requests)

    def gaps(self) -> list[float]:
        times = [t for t, _ in self.requests]
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def _reply(self, handler: BaseHTTPRequestHandler, action: Any) -> None:
        if action == "reset":  # RST instead of a response: SO_LINGER 0, then close
            handler.connection.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            handler.connection.close()
            handler.close_connection = True
            return
        if action == "slow":
            time.sleep(SLOW_S)
            status, body = 200, b"{}"
        elif action == "http_500":
            status, body = 500, b"internal error"
        elif action == "not_json":
            status, body = 200, b"<html>Bad Gateway</html>"
        elif action == "truncated":
            status, body = 200, b'{"choices": [{"text": "half an answ'
        elif action == "wrong_schema":
            status, body = 200, json.dumps(self.wrong_schema).encode()
        else:
            status, body = 200, json.dumps(action).encode()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def endpoints() -> Iterator[Callable[..., Endpoint]]:
    started: list[Endpoint] = []

    def start(behave: Behave, wrong_schema: Any = None) -> Endpoint:
        started.append(Endpoint(behave, wrong_schema))
        return started[-1]

    yield start
    for endpoint in started:
        endpoint.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- OpenAI-compatible generator ----------------------------------------------------------------

PROMPT = "<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n"


def completion(text: str, stop: str | None = None) -> dict[str, Any]:
    return {"choices": [{"text": text, "finish_reason": "stop", "stop_reason": stop}]}


def generator(endpoint: Endpoint, tokenizer: Any = None, max_retries: int = 2) -> OpenAIGenerator:
    cfg = GeneratorConfig(
        backend="openai",
        model="remote-test",
        base_url=endpoint.url + "/v1",
        request_timeout_s=TIMEOUT_S,
        max_retries=max_retries,
        retry_backoff_s=BACKOFF_S,
    )
    return OpenAIGenerator(cfg, tokenizer=tokenizer)


GENERATOR_FAULTS = {  # fault -> what the GeneratorError says about the last attempt
    "slow": "timed out after 0.2 s",
    "http_500": "HTTP 500: internal error",
    "not_json": "malformed response: not JSON",
    "truncated": "malformed response: not JSON",
    "wrong_schema": "malformed response: no choices",
    "reset": "connection error (",  # httpx: ReadError or RemoteProtocolError, by timing
}


@pytest.mark.parametrize("fault", FAULTS)
def test_generator_fault_is_retried_then_reported(endpoints, fault):
    endpoint = endpoints(lambda path, body: fault, wrong_schema={"choices": {"0": "x"}})
    with generator(endpoint, max_retries=2) as gen, pytest.raises(GeneratorError) as err:
        gen.generate([GenerationRequest(prompt_text=PROMPT, stop=STOPS)])
    message = str(err.value)
    assert f"{endpoint.url}/v1/completions failed after 3 attempts" in message
    assert GENERATOR_FAULTS[fault] in message
    assert endpoint.attempts == 3


@pytest.mark.parametrize("fault", FAULTS)
def test_generator_recovers_when_the_fault_clears(endpoints, fault):
    def behave(path, body):
        return fault if len(endpoint.requests) <= 2 else completion("<answer>ok</answer>")

    endpoint = endpoints(behave, wrong_schema={"choices": [{"message": "not an object"}]})
    with generator(endpoint, max_retries=3) as gen:
        [done] = gen.generate([GenerationRequest(prompt_text=PROMPT, stop=STOPS)])
    assert done.text == "<answer>ok</answer>" and endpoint.attempts == 3


def test_generator_backoff_doubles(endpoints):
    endpoint = endpoints(lambda path, body: "http_500")
    cfg = GeneratorConfig(
        backend="openai", base_url=endpoint.url + "/v1", max_retries=3, retry_backoff_s=0.1
    )
    with OpenAIGenerator(cfg) as gen, pytest.raises(GeneratorError, match="4 attempts"):
        gen.generate([GenerationRequest(prompt_text=PROMPT)])
    gaps = endpoint.gaps()
    assert len(gaps) == 3
    assert all(gap >= wait for gap, wait in zip(gaps, (0.1, 0.2, 0.4), strict=True)), gaps
    assert gaps[2] < 2.0  # bounded: no runaway waits


def test_lone_surrogates_from_the_server_become_replacement_characters(endpoints):
    body = b'{"choices": [{"text": "a\\ud800b\\udfffc", "finish_reason": "length"}]}'
    endpoint = endpoints(lambda path, request: json.loads(body))
    with generator(endpoint) as gen:
        [done] = gen.generate([GenerationRequest(prompt_text=PROMPT)])
    assert done.text == "a\ufffdb\ufffdc"
    done.text.encode("utf-8")  # writable to JSONL and tokenizable


# --- generator failures inside a rollout and a stage ------------------------------------------


def factors(prompt: str) -> tuple[int, int]:
    a, b = re.findall(r"What is (\d+)\*(\d+)\?", prompt)[-1]
    return int(a), int(b)


def after_tool(prompt: str) -> bool:
    return "<result>" in prompt.rsplit("<|im_start|>assistant", 1)[-1]


def arithmetic_reply(prompt: str) -> dict[str, Any]:
    """Odd first factor: call the python tool first; even: answer at once."""
    a, b = factors(prompt)
    if a % 2 and not after_tool(prompt):
        return completion(f"<think>use code</think>\n<code>\nprint({a}*{b})\n</code>", "</code>")
    return completion(f"<think>done</think>\n<answer>\\boxed{{{a * b}}}</answer>", "</answer>")


class Multiply:
    """A python tool stand-in that multiplies `print(a*b)`."""

    name = "python"

    def run_batch(self, inputs):
        return [
            ToolCall("python", text, str(eval(text.strip()[6:-1])), "ok", 0.0) for text in inputs
        ]

    def close(self):
        pass


def test_a_generator_failure_marks_only_the_still_active_trajectories(endpoints, tokenizer):
    """Round 1 finishes q2 (an answer) and sends q3 to the tool; round 2 fails: q3 alone is an
    infrastructure failure, and the reward excludes it instead of scoring it wrong."""

    def behave(path, body):
        return "http_500" if after_tool(body["prompt"]) else arithmetic_reply(body["prompt"])

    endpoint = endpoints(behave)
    queries = [
        Query(id=f"q{a}", question=f"What is {a}*7?", answers=(str(7 * a),), kind="math")
        for a in (2, 3)
    ]
    with generator(endpoint, tokenizer) as gen:
        answered, failed = rollout(
            gen, {"python": Multiply()}, tokenizer, [(q.id, q) for q in queries], RolloutConfig()
        )
    assert answered.finish_reason == "answer" and not generator_failed(answered)
    assert failed.finish_reason == "infra_error" and generator_failed(failed)
    assert failed.error.startswith(GENERATOR_FAILURE)
    assert f"{endpoint.url}/v1/completions failed after 3 attempts: HTTP 500" in failed.error
    assert [c.status for c in failed.tool_calls] == ["ok"]  # its work so far is kept
    ok, excluded = compute_rewards([answered, failed], queries, None, RewardConfig(rm_weight=0))
    assert ok.reward == 1.0 and not ok.excluded
    assert excluded.excluded and excluded.reward is None  # never scored as a wrong answer


def write_queries(path: Path, firsts: list[int]) -> Path:
    rows = [{"id": f"q{a}", "question": f"What is {a}*7?", "answer": str(7 * a)} for a in firsts]
    return write_jsonl(path, rows)


def written_ids(stage_dir: Path, name: str) -> list[str]:
    path = stage_dir / name
    path = path if path.exists() else stage_dir / f"{name}.partial"
    return [row["id"] for _, row in read_jsonl(path)] if path.exists() else []


def test_synthesize_writes_what_finished_stops_at_a_generator_failure_and_resumes(
    endpoints, tokenizer, tmp_path
):
    down = {"on": True}

    def behave(path, body):
        a, _ = factors(body["prompt"])
        if down["on"] and a in (3, 4) and after_tool(body["prompt"]):
            return "http_500"  # the endpoint dies during the second chunk's second round
        return arithmetic_reply(body["prompt"])

    endpoint = endpoints(behave)
    queries = write_queries(tmp_path / "q.jsonl", [0, 1, 2, 3, 4, 5])  # 3 chunks of 2
    cfg = SynthesizeConfig(
        queries=str(queries),
        run_dir=str(tmp_path / "run"),
        n=1,
        chunk_queries=2,
        tools=ToolsConfig(python=PythonToolConfig(workers=1)),
    )
    with generator(endpoint, tokenizer) as gen, pytest.raises(StageIncomplete) as err:
        run_synthesize(cfg, gen)
    assert "1 trajectories hit infrastructure failures" in str(err.value)
    assert "2 more not started" in str(err.value)  # the third chunk was never sent
    assert f"{endpoint.url}/v1/completions failed after 3 attempts: HTTP 500" in str(err.value)
    stage = tmp_path / "run" / "synthesize"
    assert written_ids(stage, "trajectories.jsonl") == ["q0/s0", "q1/s0", "q2/s0"]
    assert {factors(body["prompt"])[0] for _, body in endpoint.requests} == {0, 1, 2, 3}
    down["on"] = False
    with generator(endpoint, tokenizer) as gen:
        counts = run_synthesize(cfg, gen)
    ids = written_ids(stage, "trajectories.jsonl")
    assert counts["generated"] == 3 and len(ids) == len(set(ids)) == 6


def test_repair_keeps_no_verdict_for_a_repairer_failure_and_resumes(endpoints, tokenizer, tmp_path):
    """A repairer that fails is not a hard case: the chunk is not written, the stage raises
    and the next run repairs it."""
    down = {"on": True}

    def behave(path, body):
        case = re.findall(r"\(case (\w+)\)", body["prompt"])[0]
        if down["on"] and case in ("aw2", "aw3"):
            return "not_json"
        return completion("<think>Six times seven is 42.</think>\n<answer>\\boxed{42}</answer>")

    endpoint = endpoints(behave)
    make_run(tmp_path, {f"aw{i}": [WRONG] for i in range(6)})
    cfg = RepairConfig(run_dir=str(tmp_path), chunk=2, first_pass=False)
    with generator(endpoint, tokenizer) as gen, pytest.raises(StageIncomplete) as err:
        run_repair(cfg, gen, tools={})
    assert "the repairer failed on 2 trajectories" in str(err.value)
    assert "2 more not started" in str(err.value)
    assert "malformed response" in str(err.value) and "3 attempts" in str(err.value)
    stage = tmp_path / "repair"
    original = [row["original_id"] for _, row in read_jsonl(stage / "repairs.jsonl.partial")]
    assert original == ["aw0/s0", "aw1/s0"]
    assert not [row for _, row in read_jsonl(stage / "hard_cases.jsonl.partial")]
    down["on"] = False
    with generator(endpoint, tokenizer) as gen:
        counts = run_repair(cfg, gen, tools={})
    assert counts["accepted"]["AW"] == 6 and counts["hard_cases"] == 0
    assert counts["infra_errors"] == 0  # the failed attempts left no record


# --- remote retrieval -------------------------------------------------------------------------


def passages(body: dict[str, Any]) -> dict[str, Any]:
    doc = {"id": "d1", "contents": '"Paris"\nParis is the capital of France.'}
    return {"result": [[{"document": doc, "score": 1.0}] for _ in body["queries"]]}


SEARCH_FAULTS = {
    "slow": "timed out after 0.2 s",
    "http_500": "HTTP 500: internal error",
    "not_json": "malformed response",
    "truncated": "malformed response",
    "wrong_schema": "malformed response",
    "reset": "connection error",
}


@pytest.mark.parametrize("fault", FAULTS)
def test_search_fault_is_retried_then_reported(endpoints, fault):
    endpoint = endpoints(lambda path, body: fault, wrong_schema={"result": "not a list"})
    client = RemoteSearch(
        endpoint.url + "/retrieve", timeout_s=TIMEOUT_S, max_retries=2, backoff_s=BACKOFF_S
    )
    with pytest.raises(ToolInfraError) as err:
        client.run_batch(["capital of France"])
    client.close()
    message = str(err.value)
    assert f"search server {endpoint.url}/retrieve failed after 3 attempts" in message
    assert SEARCH_FAULTS[fault] in message
    assert endpoint.attempts == client.attempts == 3


@pytest.mark.parametrize("fault", ["truncated", "reset", "wrong_schema"])
def test_search_recovers_when_the_fault_clears(endpoints, fault):
    def behave(path, body):
        return fault if len(endpoint.requests) <= 1 else passages(body)

    endpoint = endpoints(behave, wrong_schema={"result": [[{"document": {"id": 3}}]]})
    client = RemoteSearch(endpoint.url + "/retrieve", max_retries=1, backoff_s=BACKOFF_S)
    [call] = client.run_batch(["capital of France"])
    client.close()
    assert call.status == "ok" and "capital of France" in call.output
    assert endpoint.attempts == 2


def search_then_answer(request: GenerationRequest) -> str:
    """Odd first factor: search first (the failing tool); even: answer at once."""
    a, _ = factors(request.prompt_text)
    if a % 2 and not after_tool(request.prompt_text):
        return "<think>look it up</think>\n<search>seven times</search>"
    return f"<think>done</think>\n<answer>\\boxed{{{7 * a}}}</answer>"


def test_search_failures_end_only_their_trajectories_and_synthesis_goes_on(
    endpoints, tokenizer, tmp_path
):
    """A tool outage affects single calls: the stage writes every other trajectory of every
    chunk, raises at the end, and the next run retries only the failed ones."""
    down = {"on": True}
    endpoint = endpoints(lambda path, body: "http_500" if down["on"] else passages(body))
    queries = write_queries(tmp_path / "q.jsonl", [0, 1, 2, 3])
    search = SearchToolConfig(
        backend="remote", url=endpoint.url + "/retrieve", timeout_s=TIMEOUT_S, max_retries=1
    )
    cfg = SynthesizeConfig(
        queries=str(queries),
        run_dir=str(tmp_path / "run"),
        n=1,
        chunk_queries=2,
        tools=ToolsConfig(python=PythonToolConfig(workers=1), search=search),
    )
    with pytest.raises(StageIncomplete, match="2 trajectories hit infrastructure failures"):
        run_synthesize(cfg, ScriptedGenerator(search_then_answer, tokenizer))
    stage = tmp_path / "run" / "synthesize"
    assert written_ids(stage, "trajectories.jsonl") == ["q0/s0", "q2/s0"]
    assert endpoint.attempts == 4  # each chunk's one search call, tried twice
    down["on"] = False
    counts = run_synthesize(cfg, ScriptedGenerator(search_then_answer, tokenizer))
    ids = written_ids(stage, "trajectories.jsonl")
    assert counts["generated"] == 2 and sorted(ids) == ["q0/s0", "q1/s0", "q2/s0", "q3/s0"]
    rows = {row["id"]: row for _, row in read_jsonl(stage / "trajectories.jsonl")}
    assert rows["q1/s0"]["tool_calls"][0]["status"] == "ok"


def test_rl_step_with_every_rollout_failed_is_not_counted(endpoints, tiny_model_dir, tmp_path):
    import torch
    from accelerate.state import AcceleratorState, GradientState

    from autotraj.config import build
    from autotraj.train import grpo

    endpoint = endpoints(lambda path, body: "http_500")
    queries = write_queries(tmp_path / "q.jsonl", [1, 3])
    cfg = build(
        grpo.RlConfig,
        {
            "run_dir": str(tmp_path / "run"),
            "model": str(tiny_model_dir),
            "queries": str(queries),
            "steps": 2,
            "prompts_per_step": 2,
            "rollouts_per_prompt": 2,
            "mixed_precision": "no",
            "reward": {"rm_weight": 0.0},
            "tools": {
                "python": {"workers": 1},
                "search": {"backend": "remote", "url": endpoint.url, "max_retries": 1},
            },
        },
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    run = grpo.GrpoRun(cfg)
    run._generator = lambda: ScriptedGenerator(search_then_answer, run.tokenizer)
    try:
        with pytest.raises(StageIncomplete, match="rl step 1: every rollout hit an infra"):
            run.train()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.set_num_threads(threads)
    out = tmp_path / "run" / "rl"
    assert run.progress.step == 0 and not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists() and not (out / "rollouts.jsonl").exists()
