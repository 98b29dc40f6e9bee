"""A generator that replays scripted replies: for tests, dry runs and deterministic demos.

`ScriptedGenerator(reply)` calls `reply(request)` for each request and returns the text cut at
the first stop string (kept, as real backends do), like a model that wrote exactly that. With a
tokenizer it returns token ids too (token-in, token-out), otherwise it behaves like a text-only
HTTP backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from autotraj.models.generator import Completion, GenerationRequest
from autotraj.render import Tokenizer


class ScriptedGenerator:
    def __init__(
        self,
        reply: Callable[[GenerationRequest], str],
        tokenizer: Tokenizer | None = None,
        name: str = "scripted",
    ):
        self.reply = reply
        self.tokenizer = tokenizer
        self.backend = "scripted" if tokenizer is not None else "scripted-text"
        self.name = name
        self.calls: list[int] = []  # batch sizes seen, for tests of batching

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        self.calls.append(len(requests))
        return [self._complete(r) for r in requests]

    def _complete(self, request: GenerationRequest) -> Completion:
        text = self.reply(request)
        cut = min((text.find(s) + len(s) for s in request.stop if s in text), default=-1)
        reason = "stop" if cut >= 0 else "eos"
        if cut >= 0:
            text = text[:cut]
        ids: tuple[int, ...] = ()
        if self.tokenizer is not None:
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            if len(ids) > request.max_new_tokens:
                ids = ids[: request.max_new_tokens]
                text, reason = self.tokenizer.decode(list(ids)), "length"
        return Completion(text=text, token_ids=ids, stop_reason=reason)
