"""The OpenAI-compatible path against a real server: llama.cpp's server on loopback.

The test starts `python -m llama_cpp.server` (from the `server` extra) serving the embedded
SmolLM2 GGUF on 127.0.0.1, then drives it through `OpenAIGenerator` and the rollout engine
with real tools. No mock: text, stop strings and finish reasons come from the server.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("llama_cpp", reason="install the server extra: pip install -e '.[server]'")

from autotraj.models.embedded import embedded_gguf_path, embedded_model_dir  # noqa: E402
from autotraj.models.generator import GenerationRequest  # noqa: E402
from autotraj.models.loading import GeneratorConfig, load_generator  # noqa: E402
from autotraj.records import Query  # noqa: E402
from autotraj.render import render_trajectory  # noqa: E402
from autotraj.rollout import RolloutConfig, rollout  # noqa: E402
from autotraj.tools.python_sandbox import PythonSandbox  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    gguf = embedded_gguf_path()
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "4096",
        "--n_threads",
        "2",
        "--verbose",
        "False",
        "--seed",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"llama.cpp server exited with code {proc.returncode} (negative: killed by "
                    f"that signal; -11 is a kernel this CPU cannot run, see "
                    f"tests/test_llama_build.py): {proc.stderr.read().decode()[-2000:]}"
                )
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama.cpp server did not start within 120 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def generator(server):
    cfg = GeneratorConfig(
        backend="openai",
        model="smollm2",
        base_url=server,
        tokenizer=str(embedded_model_dir()),
        batch_size=4,
        max_retries=1,
    )
    gen = load_generator(cfg)
    yield gen
    gen.close()


def test_completion_keeps_the_stop_string(generator):
    prompt = "<|im_start|>user\nWrite print(2+3) in a code tag.<|im_end|>\n<|im_start|>assistant\n<code>\nprint(2+3)\n"
    [out] = generator.generate(
        [
            GenerationRequest(
                prompt_text=prompt, max_new_tokens=32, temperature=0.0, stop=("</code>",)
            )
        ]
    )
    assert out.token_ids == ()  # a text-only backend
    # The model closes the tag at once; the server cuts the stop string and we put it back.
    assert (out.stop_reason, out.text) == ("stop", "</code>")


def test_budget_gives_length(generator):
    prompt = "<|im_start|>user\nCount from 1 to 100.<|im_end|>\n<|im_start|>assistant\n"
    [out] = generator.generate(
        [GenerationRequest(prompt_text=prompt, max_new_tokens=8, temperature=0.0)]
    )
    assert out.stop_reason == "length"
    assert 0 < len(generator.tokenizer.encode(out.text, add_special_tokens=False)) <= 10


def test_rollout_with_real_tools_through_the_server(generator):
    queries = [
        Query(id=f"q{i}", question=q, answers=(a,), kind="math")
        for i, (q, a) in enumerate([("What is 123 * 456?", "56088"), ("What is 2**10?", "1024")])
    ]
    cfg = RolloutConfig(
        temperature=0.0, demonstrations=2, max_new_tokens=96, max_response_tokens=256
    )
    with PythonSandbox(workers=1) as sandbox:
        trajs = rollout(
            generator, {"python": sandbox}, generator.tokenizer, [(q.id, q) for q in queries], cfg
        )
    # the worked examples make the model call the sandbox, which really runs what it wrote
    ran = [c for t in trajs for c in t.tool_calls if c.status == "ok"]
    assert ran and all(c.output.strip() for c in ran), [t.text for t in trajs]
    tokenizer = generator.tokenizer
    for traj, query in zip(trajs, queries, strict=True):
        assert traj.finish_reason in ("answer", "eos", "length", "tool_limit")
        assert traj.provenance.backend == "openai"
        for call in traj.tool_calls:  # a tool call is data: ok, an error or a timeout
            assert call.status in ("ok", "error", "timeout")
        results = [s for s in traj.segments if not s.trainable]
        answered = [c for c in traj.tool_calls if c.status != "rejected"]
        for call, result in zip(answered, results, strict=True):
            assert call.output in result.text  # the sandbox's output is what the model reads
        # the loss mask: the prompt and every tool result masked, every model segment trained
        rendered = render_trajectory(tokenizer, query.question, traj)
        assert not any(rendered.trainable[: rendered.prompt_length])
        pos = rendered.prompt_length
        for segment in traj.segments:
            ids = segment.token_ids or tuple(
                tokenizer.encode(segment.text, add_special_tokens=False)
            )
            assert tuple(rendered.input_ids[pos : pos + len(ids)]) == tuple(ids)
            assert set(rendered.trainable[pos : pos + len(ids)]) <= {segment.trainable}
            pos += len(ids)
