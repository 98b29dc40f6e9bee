"""The Generator protocol: the one seam between the rollout engine and any model backend.

A backend takes a batch of `GenerationRequest`s (each a context to continue) and returns one
`Completion` per request, in order. Backends that work on token ids (local transformers, vLLM)
read `prompt_ids` and return the new `token_ids`; text-only backends (HTTP endpoints) read
`prompt_text` and return empty `token_ids`. Generation stops at the first of `stop` (the stop
string is kept in the text), at the end-of-turn token, or at `max_new_tokens`.

Errors: a backend raises `GeneratorError` for infrastructure failures (endpoint down after
retries, malformed response); it never returns an empty completion in their place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

StopReason = Literal["stop", "eos", "length"]


class GeneratorError(RuntimeError):
    """The generation backend failed (not the model's fault)."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_text: str
    prompt_ids: tuple[int, ...] = ()
    max_new_tokens: int = 1024
    temperature: float = 0.3
    top_p: float = 0.9
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Stop strings after which the caller will send this context again, extended (a tool call:
    # the rollout appends the result and continues). A backend may keep its state for such a
    # row (the transformers backend keeps its KV cache, models/kept_prefixes.py); a hint only,
    # it never changes what is generated.
    resume_after: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    stop_reason: StopReason
    logprobs: tuple[float, ...] | None = None


@runtime_checkable
class Generator(Protocol):
    """Anything that continues a batch of contexts. `name` is recorded in provenance."""

    name: str
    backend: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]: ...
