"""Generation through any OpenAI-compatible HTTP endpoint (vLLM serve, SGLang, llama.cpp server,
hosted APIs), text-in text-out.

`OpenAIGenerator.generate(requests)` sends every request concurrently (at most
`cfg.batch_size` in flight) from an asyncio loop that runs in a background thread, so it works
the same whether or not the calling thread already runs an event loop. Completions come back in
request order with `token_ids == ()`: the caller tokenizes the text (render.py).

api_mode "completions": POST {base_url}/completions with the rendered prompt text. This is the
exact, preferred mode: the prompt is the chat template already applied, and a partial assistant
turn (after a tool result) simply continues.
api_mode "chat": POST {base_url}/chat/completions. `cfg.chat_template_mode` says how the prompt
text becomes messages: "chatml" parses ChatML turns (`<|im_start|>role\\n...<|im_end|>`) back into
messages and sends a trailing partial assistant turn with `continue_final_message: true,
add_generation_prompt: false` (a vLLM/SGLang extension; hosted APIs reject or ignore it);
"single_user" sends the whole prompt text as one user message (any chat API, lossy).

Stop strings: OpenAI-style servers cut the matched stop string from the text; it is put back,
because the rollout needs the closing tag. The matched stop is read from the choice's
`stop_reason` (vLLM) or `matched_stop` (SGLang); a server that reports neither gets a heuristic:
with finish_reason "stop", the stop string whose opening tag (`<code>` for `</code>`) is open last
in the text is appended; if no such tag is open, the turn is taken as ended (eos). Stop strings
that are not closing tags can only be recovered from servers that report them.

Failures: connection errors, timeouts, HTTP 429 and 5xx and malformed responses (not JSON,
truncated, no `choices` list, a choice without text) are retried with exponential backoff
(`retry_backoff_s`, doubling); after `max_retries` retries a `GeneratorError` names the URL, the
number of attempts and the last error (status and body, timeout, connection error). Other HTTP
4xx fail at once. One failed request fails the whole `generate` call; the rollout then ends the
trajectories of that call as `infra_error` (rollout.py). Lone surrogate escapes in a reply's text
(no encoder can write them) become U+FFFD.

Not here: token ids or log-probabilities of the generated text, and chat templates.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import httpx

from autotraj.models.generator import Completion, GenerationRequest, GeneratorError
from autotraj.models.loading import GeneratorConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

_CHATML_TURN = re.compile(r"<\|im_start\|>([^\n]+)\n(.*?)<\|im_end\|>\n?", re.DOTALL)
_CHATML_OPEN = "<|im_start|>assistant\n"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads joins valid pairs: any left is lone


class _Malformed(ValueError):
    """The server answered 200 with a body we cannot read (retried)."""


def completions_payload(model: str, request: GenerationRequest) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt_text,
        "max_tokens": request.max_new_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
    }
    if request.stop:
        payload["stop"] = list(request.stop)
    if request.seed is not None:
        payload["seed"] = request.seed
    return payload


def chat_payload(model: str, request: GenerationRequest, mode: str) -> dict[str, Any]:
    """The chat request body; see the module docstring for the two modes."""
    payload = completions_payload(model, request)
    del payload["prompt"]
    if mode == "single_user":
        payload["messages"] = [{"role": "user", "content": request.prompt_text}]
        return payload
    messages, partial = parse_chatml(request.prompt_text)
    if partial:
        messages.append({"role": "assistant", "content": partial})
        payload["continue_final_message"] = True  # vLLM / SGLang extension
        payload["add_generation_prompt"] = False
    payload["messages"] = messages
    return payload


def parse_chatml(text: str) -> tuple[list[dict[str, str]], str]:
    """ChatML prompt text -> (complete messages, partial assistant reply after the open turn).

    >>> parse_chatml("<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n<think>")
    ([{'role': 'user', 'content': 'hi'}], '<think>')
    """
    messages: list[dict[str, str]] = []
    pos = 0
    while match := _CHATML_TURN.match(text, pos):
        messages.append({"role": match.group(1), "content": match.group(2)})
        pos = match.end()
    rest = text[pos:]
    if not messages or not rest.startswith(_CHATML_OPEN):
        raise ValueError(
            "chat_template_mode 'chatml' needs a ChatML prompt ending in an open assistant turn "
            f"(got ...{text[-80:]!r}); use api_mode 'completions' or chat_template_mode "
            "'single_user'"
        )
    return messages, rest[len(_CHATML_OPEN) :]


def infer_stop(text: str, stops: Sequence[str]) -> str | None:
    """The closing-tag stop whose opening tag is open last in `text`, if any.

    >>> infer_stop("<think>x</think>\\n<code>\\nprint(1)\\n", ["</code>", "</answer>"])
    '</code>'
    >>> infer_stop("<answer>\\\\boxed{1}</answer>", ["</code>", "</answer>"]) is None
    True
    """
    best: tuple[int, str] | None = None
    for stop in stops:
        if not (stop.startswith("</") and stop.endswith(">")):
            continue
        opening = "<" + stop[2:]
        pos = text.rfind(opening)
        if pos > text.rfind(stop) and (best is None or pos > best[0]):
            best = (pos, stop)
    return best[1] if best else None


def completion_from_choice(choice: dict[str, Any], request: GenerationRequest) -> Completion:
    """Map one OpenAI choice to a Completion, putting back the stop string the server cut."""
    message = choice.get("message")
    if "text" in choice:
        text = choice["text"]
    else:
        text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise _Malformed(f"choice has no text: {str(choice)[:200]}")
    # JSON may carry lone surrogate escapes ("\\ud800"): no encoder can write those, so they
    # become U+FFFD here, at the boundary, as undecodable bytes would.
    text = _LONE_SURROGATE.sub("\ufffd", text)
    finish = choice.get("finish_reason")
    if finish == "length":
        return Completion(text=text, token_ids=(), stop_reason="length")
    stop = (
        _matched_stop(choice, request.prompt_text, text, request.stop) if finish == "stop" else None
    )
    if stop is None:
        return Completion(text=text, token_ids=(), stop_reason="eos")
    if not text.endswith(stop):  # servers told to include it (include_stop_str_in_output) did
        text += stop
    return Completion(text=text, token_ids=(), stop_reason="stop")


def _matched_stop(
    choice: dict[str, Any], context: str, text: str, stops: Sequence[str]
) -> str | None:
    for key in ("stop_reason", "matched_stop"):  # vLLM, SGLang
        if key in choice:
            value = choice[key]
            return value if isinstance(value, str) and value in stops else None
    for stop in stops:
        if text.endswith(stop):
            return stop
    # The tag may have been opened in the context (e.g. the completion is only the closing tag).
    return infer_stop(context + text, stops) if stops else None


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="autotraj-openai", daemon=True
        )
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class OpenAIGenerator:
    """An OpenAI-compatible endpoint behind the Generator protocol (text only)."""

    backend = "openai"

    def __init__(self, cfg: GeneratorConfig, tokenizer: Any | None = None):
        if cfg.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
        self.cfg = cfg
        self.name = cfg.model
        self._tokenizer = tokenizer
        path = "/chat/completions" if cfg.api_mode == "chat" else "/completions"
        self.url = cfg.base_url.rstrip("/") + path
        self._runner: _LoopThread | None = None
        self._client: httpx.AsyncClient | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """The local tokenizer that renders prompts for this endpoint (GeneratorConfig.tokenizer)."""
        if self._tokenizer is None:
            raise AttributeError(
                f"generator {self.name!r} (openai backend) has no tokenizer: set "
                "GeneratorConfig.tokenizer to the model's tokenizer (a local dir or Hub name)"
            )
        return self._tokenizer

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        if not requests:
            return []
        with self._lock:
            if self._runner is None:
                self._runner = _LoopThread()
        return self._runner.run(self._generate_all(list(requests)))

    def close(self) -> None:
        """Close the HTTP client and stop the background loop (generate() starts them again)."""
        with self._lock:
            if self._runner is None:
                return
            if self._client is not None:
                self._runner.run(self._client.aclose())
                self._client = None
            self._runner.stop()
            self._runner = None

    def __enter__(self) -> OpenAIGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def _generate_all(self, requests: list[GenerationRequest]) -> list[Completion]:
        if self._client is None:
            self._client = self._new_client()
        client = self._client
        semaphore = asyncio.Semaphore(self.cfg.batch_size)
        results = await asyncio.gather(
            *(self._generate_one(client, r, semaphore) for r in requests), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)  # type: ignore[arg-type]

    def _new_client(self) -> httpx.AsyncClient:
        headers = {}
        key = os.environ.get(self.cfg.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=self.cfg.batch_size)
        timeout = httpx.Timeout(self.cfg.request_timeout_s)
        return httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout)

    async def _generate_one(
        self, client: httpx.AsyncClient, request: GenerationRequest, semaphore: asyncio.Semaphore
    ) -> Completion:
        if self.cfg.api_mode == "chat":
            try:
                payload = chat_payload(self.cfg.model, request, self.cfg.chat_template_mode)
            except ValueError as e:
                raise GeneratorError(f"{self.url}: {e}") from e
        else:
            payload = completions_payload(self.cfg.model, request)
        async with semaphore:
            return await self._post(client, payload, request)

    async def _post(
        self, client: httpx.AsyncClient, payload: dict[str, Any], request: GenerationRequest
    ) -> Completion:
        """POST with retries; see the module docstring for what is retried."""
        last_error = ""
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            delay = self.cfg.retry_backoff_s * 2**attempt
            try:
                response = await client.post(self.url, json=payload)
                if response.status_code == 429 or response.status_code >= 500:
                    last_error = f"HTTP {response.status_code}: {response.text[:300]}"
                    delay = max(delay, _retry_after(response))
                elif response.status_code >= 400:
                    raise GeneratorError(
                        f"{self.url}: HTTP {response.status_code}: {response.text[:500]}"
                    )
                else:
                    return completion_from_choice(_first_choice(response), request)
            except httpx.TimeoutException as e:
                last_error = f"timed out after {self.cfg.request_timeout_s} s ({type(e).__name__})"
            except httpx.TransportError as e:
                detail = f": {e}" if str(e) else ""
                last_error = f"connection error ({type(e).__name__}{detail})"
            except _Malformed as e:
                last_error = f"malformed response: {e}"
            if attempt + 1 < attempts:
                log.warning("%s: %s; retry %d in %.2fs", self.url, last_error, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise GeneratorError(f"{self.url} failed after {attempts} attempts: {last_error}")


def _first_choice(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError as e:
        raise _Malformed(f"not JSON: {response.text[:200]!r}") from e
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Malformed(f"no choices in {str(data)[:200]}")
    return choices[0]


def _retry_after(response: httpx.Response) -> float:
    """Seconds the server asked us to wait (Retry-After), capped at 60; 0 when absent."""
    try:
        return min(60.0, float(response.headers.get("retry-after", 0)))
    except ValueError:
        return 0.0
