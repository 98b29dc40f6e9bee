"""OpenAIGenerator against a real HTTP server on 127.0.0.1 (scripted replies or the tiny model)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from autotraj.models.generator import GenerationRequest, GeneratorError
from autotraj.models.loading import GeneratorConfig, load_generator
from autotraj.models.openai_backend import (
    OpenAIGenerator,
    completion_from_choice,
    infer_stop,
    parse_chatml,
)

STOPS = ("</code>", "</python>", "</search>", "</answer>")
REPLY = "<think>add</think>\n<code>\nprint(1+1)\n</code>\nnever returned"
PROMPT = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


def openai_cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    """What an OpenAI-style server does: cut before the first stop and drop it."""
    hits = [(text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, None
    pos, stop = min(hits)
    return text[:pos], stop


class FakeServer:
    """Scripted OpenAI-compatible endpoint; `handler(path, payload)` -> (status, body)."""

    def __init__(self) -> None:
        self.payloads: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.delay = 0.0
        self.inflight = 0
        self.max_inflight = 0
        self.reply = REPLY
        self.report_stop = True  # vLLM reports which stop matched; OpenAI does not
        self.handler: Callable[[str, dict[str, Any]], tuple[int, Any]] = self.echo
        self._lock = threading.Lock()

    def echo(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        text, stop = openai_cut(self.reply, payload.get("stop", []))
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if self.report_stop:
            choice["stop_reason"] = stop
        if path.endswith("/chat/completions"):
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return 200, {"id": "x", "choices": [choice]}

    def serve(self, path: str, payload: dict[str, Any], headers: dict[str, str]) -> tuple[int, Any]:
        with self._lock:
            self.payloads.append(payload)
            self.headers.append(headers)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            time.sleep(self.delay)
            return self.handler(path, payload)
        finally:
            with self._lock:
                self.inflight -= 1


@pytest.fixture
def server():
    fake = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, reply = fake.serve(self.path, body, dict(self.headers))
            data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout tests)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


def make(server: FakeServer, **kwargs: Any) -> OpenAIGenerator:
    defaults = {"retry_backoff_s": 0.01, "request_timeout_s": 5.0}
    cfg = GeneratorConfig(
        backend="openai", model="m", base_url=server.base_url, **(defaults | kwargs)
    )
    return OpenAIGenerator(cfg)


def request(prompt: str = PROMPT, **kwargs: Any) -> GenerationRequest:
    return GenerationRequest(prompt_text=prompt, stop=STOPS, **kwargs)


def test_completions_payload_and_stop_put_back(server):
    with make(server) as gen:
        [done] = gen.generate([request(max_new_tokens=77, temperature=0.5, top_p=0.8, seed=3)])
    assert done.text == "<think>add</think>\n<code>\nprint(1+1)\n</code>"
    assert done.stop_reason == "stop" and done.token_ids == ()
    payload = server.payloads[0]
    assert payload == {
        "model": "m",
        "prompt": PROMPT,
        "max_tokens": 77,
        "temperature": 0.5,
        "top_p": 0.8,
        "stop": list(STOPS),
        "seed": 3,
    }


@pytest.mark.parametrize("report_stop", [True, False])
@pytest.mark.parametrize(
    ("reply", "text", "reason"),
    [
        (REPLY, REPLY.split("\nnever")[0], "stop"),
        ("<answer>\\boxed{2}</answer> more", "<answer>\\boxed{2}</answer>", "stop"),
        ("<search>capital of France</search>", "<search>capital of France</search>", "stop"),
        ("<think>done</think> plain end", "<think>done</think> plain end", "eos"),
    ],
)
def test_stop_string_recovered_with_or_without_stop_reason(
    server, report_stop, reply, text, reason
):
    server.reply, server.report_stop = reply, report_stop
    with make(server) as gen:
        [done] = gen.generate([request()])
    assert (done.text, done.stop_reason) == (text, reason)


@pytest.mark.parametrize(
    ("choice", "text", "reason"),
    [
        ({"text": "abc", "finish_reason": "length"}, "abc", "length"),
        ({"text": "<code>x", "finish_reason": "length"}, "<code>x", "length"),
        ({"text": "<code>x", "finish_reason": "stop", "stop_reason": None}, "<code>x", "eos"),
        ({"text": "<code>x", "finish_reason": "stop", "stop_reason": 2}, "<code>x", "eos"),
        (
            {"text": "<code>x", "finish_reason": "stop", "matched_stop": "</code>"},
            "<code>x</code>",
            "stop",
        ),
        ({"text": "<code>x</code>", "finish_reason": "stop"}, "<code>x</code>", "stop"),
        ({"message": {"content": "<code>x"}, "finish_reason": "stop"}, "<code>x</code>", "stop"),
        ({"text": "<code>a</code> b", "finish_reason": "stop"}, "<code>a</code> b", "eos"),
    ],
)
def test_completion_from_choice(choice, text, reason):
    done = completion_from_choice(choice, request())
    assert (done.text, done.stop_reason) == (text, reason)


def test_infer_stop_picks_the_tag_opened_last():
    text = "<code>\nprint(1)\n</code><result>\n1\n</result><search>q"
    assert infer_stop(text, STOPS) == "</search>"
    assert infer_stop("no tags", STOPS) is None
    assert infer_stop("<code>x", ["\n\n"]) is None


def test_chat_mode_continues_a_partial_assistant_turn(server):
    partial = "<think>a</think>\n<code>\nprint(1)\n</code>\n<result>\n1\n</result>\n"
    with make(server, api_mode="chat") as gen:
        first, second = gen.generate([request(), request(PROMPT + partial)])
    assert first.text.endswith("</code>") and second.text.endswith("</code>")
    fresh, cont = sorted(server.payloads, key=lambda p: len(p["messages"]))
    assert fresh["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
    ]
    assert "continue_final_message" not in fresh
    assert cont["messages"][-1] == {"role": "assistant", "content": partial}
    assert cont["continue_final_message"] is True and cont["add_generation_prompt"] is False


def test_chat_mode_single_user(server):
    with make(server, api_mode="chat", chat_template_mode="single_user") as gen:
        gen.generate([request("plain question")])
    assert server.payloads[0]["messages"] == [{"role": "user", "content": "plain question"}]


def test_chat_mode_rejects_a_prompt_that_is_not_chatml(server):
    with make(server, api_mode="chat") as gen, pytest.raises(GeneratorError, match="ChatML"):
        gen.generate([request("plain question")])
    assert server.payloads == []


def test_parse_chatml():
    messages, partial = parse_chatml(PROMPT + "<think>")
    assert [m["role"] for m in messages] == ["system", "user"] and partial == "<think>"
    closed = "<|im_start|>user\nQ<|im_end|>\n"  # no open assistant turn
    message = f"needs a ChatML prompt ending in an open assistant turn (got ...{closed!r})"
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_chatml(closed)
    with pytest.raises(ValueError, match="needs a ChatML prompt"):
        parse_chatml("<|im_start|>assistant\n")  # an open turn, but no message before it


def test_requests_run_concurrently_up_to_batch_size(server):
    server.delay = 0.2
    with make(server, batch_size=4) as gen:
        start = time.perf_counter()
        done = gen.generate([request(seed=i) for i in range(8)])
        elapsed = time.perf_counter() - start
    assert len(done) == 8 and all(d.stop_reason == "stop" for d in done)
    assert server.max_inflight == 4
    assert 0.38 < elapsed < 1.2  # 2 waves of 0.2 s; one at a time would take 1.6 s


def test_results_keep_request_order(server):
    def reply(path, payload):
        return 200, {"choices": [{"text": f"#{payload['seed']}", "finish_reason": "length"}]}

    server.handler = reply
    with make(server, batch_size=3) as gen:
        done = gen.generate([request(seed=i) for i in range(7)])
    assert [d.text for d in done] == [f"#{i}" for i in range(7)]


def failing(times: int, status: int = 500, body: Any = b"boom") -> Callable:
    calls = {"n": 0}

    def handler(path, payload):
        calls["n"] += 1
        return (status, body) if calls["n"] <= times else (200, ok_body())

    return handler


def ok_body() -> dict[str, Any]:
    return {"choices": [{"text": "fine", "finish_reason": "length"}]}


@pytest.mark.parametrize(
    ("status", "body"), [(500, b"boom"), (503, b""), (429, b"slow down"), (200, b"not json")]
)
def test_retries_then_success(server, status, body):
    server.handler = failing(2, status, body)
    with make(server, max_retries=3) as gen:
        [done] = gen.generate([request()])
    assert done.text == "fine" and len(server.payloads) == 3


@pytest.mark.parametrize(
    ("body", "match"),
    [(b"boom", "HTTP 500"), ({"choices": []}, "malformed"), ({"choices": [{}]}, "malformed")],
)
def test_persistent_failure_raises_with_url(server, body, match):
    status = 500 if body == b"boom" else 200
    server.handler = failing(100, status, body)
    with make(server, max_retries=2) as gen, pytest.raises(GeneratorError, match=match) as err:
        gen.generate([request()])
    assert server.base_url in str(err.value) and "3 attempts" in str(err.value)
    assert len(server.payloads) == 3


def test_client_errors_are_not_retried(server):
    server.handler = failing(100, 400, b"bad request")
    with make(server, max_retries=3) as gen, pytest.raises(GeneratorError, match="HTTP 400"):
        gen.generate([request()])
    assert len(server.payloads) == 1


def test_timeout_is_retried_then_raises(server):
    server.delay = 1.0
    with make(server, request_timeout_s=0.2, max_retries=1) as gen:
        start = time.perf_counter()
        with pytest.raises(GeneratorError, match="Timeout"):
            gen.generate([request()])
    assert time.perf_counter() - start < 1.0 and len(server.payloads) == 2


def test_connection_refused_raises():
    cfg = GeneratorConfig(
        backend="openai", base_url="http://127.0.0.1:9/v1", max_retries=1, retry_backoff_s=0.01
    )
    with OpenAIGenerator(cfg) as gen, pytest.raises(GeneratorError, match="127.0.0.1:9"):
        gen.generate([request()])


def test_works_inside_a_running_event_loop_and_sends_the_api_key(server, monkeypatch):
    monkeypatch.setenv("AUTOTRAJ_TEST_KEY", "sekret")
    gen = make(server, api_key_env="AUTOTRAJ_TEST_KEY")

    async def caller():
        return gen.generate([request()])

    [done] = asyncio.run(caller())
    gen.close()
    assert done.stop_reason == "stop"
    assert server.headers[0]["Authorization"] == "Bearer sekret"


def test_load_generator_builds_the_openai_backend_without_a_tokenizer():
    gen = load_generator(GeneratorConfig(backend="openai", model="m"))
    assert isinstance(gen, OpenAIGenerator) and gen.backend == "openai" and gen.name == "m"
    with pytest.raises(AttributeError, match="GeneratorConfig.tokenizer"):
        _ = gen.tokenizer


def two_char_stop(tokenizer, ids) -> str:
    """Two characters of a greedy output whose first occurrence is two plain one-char tokens."""
    for k in range(3, len(ids) - 1):
        pieces = [tokenizer.decode([i]) for i in ids[k : k + 2]]
        prefix = tokenizer.decode(list(ids[:k]))
        stop = "".join(pieces)
        if all(len(p) == 1 for p in pieces) and (prefix + stop).find(stop) == len(prefix):
            return stop
    raise AssertionError("the greedy output has no usable stop string")


def test_server_running_the_tiny_model_matches_local_generation(server, tiny_model_dir):
    """A vLLM-like server (stop cut, stop_reason reported) around the tiny model."""
    from autotraj.models.transformers_backend import TransformersGenerator

    local = TransformersGenerator.from_config(
        GeneratorConfig(model=str(tiny_model_dir), dtype="float32")
    )
    lock = threading.Lock()

    def serve_model(path, payload):
        req = GenerationRequest(
            prompt_text=payload["prompt"],
            max_new_tokens=payload["max_tokens"],
            temperature=payload["temperature"],
            stop=tuple(payload.get("stop", ())),
        )
        with lock:
            [done] = local.generate([req])
        text, stop = openai_cut(done.text, list(req.stop))
        finish = "length" if done.stop_reason == "length" else "stop"
        return 200, {"choices": [{"text": text, "finish_reason": finish, "stop_reason": stop}]}

    server.handler = serve_model
    free = local.generate([GenerationRequest(prompt_text=PROMPT, max_new_tokens=30, temperature=0)])
    stop = two_char_stop(local.tokenizer, free[0].token_ids)  # generation must stop there
    requests = [
        GenerationRequest(prompt_text=PROMPT, max_new_tokens=30, temperature=0, stop=(stop,)),
        GenerationRequest(prompt_text=PROMPT + "x", max_new_tokens=12, temperature=0),
    ]
    expected = local.generate(requests)
    with make(server) as gen:
        remote = gen.generate(requests)
    assert expected[0].stop_reason == "stop" and expected[0].text.endswith(stop)
    assert [(c.text, c.stop_reason) for c in remote] == [(c.text, c.stop_reason) for c in expected]
