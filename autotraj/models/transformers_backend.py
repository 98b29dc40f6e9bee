"""Local generation with Hugging Face transformers (CPU or GPU), token-in token-out.

`TransformersGenerator.generate(requests)` continues each request's `prompt_ids` (or, when a
request has none, its `prompt_text` tokenized without special tokens) and returns the new token
ids with `text == tokenizer.decode(token_ids)` exactly. Requests are grouped by sampling
parameters (temperature, top_p; greedy when temperature == 0), sorted by prompt length inside a
group to limit padding, cut into batches of `batch_size`, left-padded and passed to
`model.generate` (KV cache, under `torch.inference_mode`). Each sequence has its own stop
strings and its own `max_new_tokens`, enforced by a stopping criterion during generation and by
`truncate_at_stop` afterwards:
- a stop string: the ids end with the token that completes the first stop string (a token that
  runs past the stop string is kept whole, so the text may go on a few characters after it);
- the end-of-turn token (eos): excluded from the ids, stop reason "eos";
- the token budget: stop reason "length".

Seeds: one batch shares torch's random generator, so per-sequence seeds are impossible; the
first request's seed seeds each batch. Results are reproducible for the same requests, batch size
and hardware, not across batch compositions.

Decoding a continuation alone is exact for byte-level BPE tokenizers (SmolLM2, Qwen, Llama 3);
SentencePiece tokenizers may drop a leading space of the first new token.

Not here: log-probabilities (Completion.logprobs is None), chat templates (render.py).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from autotraj.models.generator import Completion, GenerationRequest, StopReason

if TYPE_CHECKING:
    from autotraj.models.loading import GeneratorConfig

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """The one decoding used for generated ids: special tokens kept, no space clean-up."""
    return tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )


def truncate_at_stop(
    token_ids: Sequence[int],
    tokenizer: Any,
    stops: Sequence[str],
    eos_id: int | Collection[int] | None,
) -> tuple[tuple[int, ...], StopReason]:
    """Cut generated ids at the first stop string, the first eos, or not at all ("length").

    The ids are kept up to and including the token that completes the first stop string (a
    token that overshoots it is kept whole); an eos id ends the text and is excluded; whatever
    follows (padding of a finished sequence) is dropped.
    """
    eos_ids = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    ids = list(token_ids)
    eos_pos = next((i for i, t in enumerate(ids) if t in eos_ids), None)
    if eos_pos is not None:
        ids = ids[:eos_pos]
    if stops and _has_stop(decode(tokenizer, ids), stops):
        lo, hi = 1, len(ids)  # smallest prefix length whose text contains a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if _has_stop(decode(tokenizer, ids[:mid]), stops):
                hi = mid
            else:
                lo = mid + 1
        return tuple(ids[:lo]), "stop"
    return tuple(ids), "eos" if eos_pos is not None else "length"


def _has_stop(text: str, stops: Sequence[str]) -> bool:
    return any(s in text for s in stops)


class _PerSequenceStop(StoppingCriteria):
    """Finishes each row at its own token budget or its own first stop string."""

    def __init__(
        self, tokenizer: Any, prompt_width: int, stops: list[tuple[str, ...]], budgets: list[int]
    ):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.stops = stops
        self.budgets = budgets
        # A stop string of L characters lies within the last L tokens; 2 more absorb the
        # decoding boundary effects at the start of the window.
        self.windows = [max((len(s) for s in row), default=0) + 2 for row in stops]
        self.done = [False] * len(stops)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_width :]
        for row in range(new.shape[0]):
            if self.done[row]:
                continue
            if new.shape[1] >= self.budgets[row]:
                self.done[row] = True
            elif self.stops[row]:
                tail = decode(self.tokenizer, new[row, -self.windows[row] :].tolist())
                self.done[row] = _has_stop(tail, self.stops[row])
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float

    @classmethod
    def of(cls, request: GenerationRequest) -> _Sampling:
        if request.temperature <= 0:
            return cls(0.0, 1.0)
        return cls(float(request.temperature), float(request.top_p))

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        # top_k=0 disables transformers' default top-k of 50: plain temperature + nucleus,
        # as in vLLM and OpenAI-compatible servers.
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": 0}


class TransformersGenerator:
    """A local model and its tokenizer behind the Generator protocol."""

    backend = "transformers"

    def __init__(self, model: Any, tokenizer: Any, name: str, batch_size: int = 16):
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{name}: the tokenizer has no eos (end-of-turn) token")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size

    @classmethod
    def from_config(cls, cfg: GeneratorConfig) -> TransformersGenerator:
        from transformers import AutoModelForCausalLM

        from autotraj.models.loading import load_tokenizer, resolve_model_path

        device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        path = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(cfg)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        log.info("loaded %s on %s (%s)", cfg.model, device, model.dtype)
        return cls(model, tokenizer, name=cfg.model, batch_size=cfg.batch_size)

    @property
    def eos_token_id(self) -> int:
        """The end-of-turn token id (what the renderer appends when a turn ends)."""
        return int(self.tokenizer.eos_token_id)

    @property
    def end_of_turn(self) -> str:
        return str(self.tokenizer.eos_token)

    def stop_token_ids(self) -> set[int]:
        """Ids that end a turn: the tokenizer's eos and the model's generation eos ids."""
        ids = {self.eos_token_id}
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(int(i) for i in configured)
        return ids

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        results: list[Completion | None] = [None] * len(requests)
        for batch in self._plan(requests):
            outputs = self._generate_batch([requests[i] for i in batch])
            for i, completion in zip(batch, outputs, strict=True):
                results[i] = completion
        return [c for c in results if c is not None]

    def _plan(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Batches of request indices: same sampling params, similar prompt lengths."""
        groups: dict[_Sampling, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(_Sampling.of(request), []).append(i)
        batches = []
        for indices in groups.values():
            indices.sort(key=lambda i: len(requests[i].prompt_ids) or len(requests[i].prompt_text))
            for start in range(0, len(indices), self.batch_size):
                batches.append(indices[start : start + self.batch_size])
        return batches

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        ids = list(request.prompt_ids) or self.tokenizer.encode(
            request.prompt_text, add_special_tokens=False
        )
        if not ids:
            raise ValueError("a generation request has neither prompt_ids nor prompt_text")
        return ids

    def _generate_batch(self, requests: list[GenerationRequest]) -> list[Completion]:
        prompts = [self._prompt_ids(r) for r in requests]
        budgets = [max(0, r.max_new_tokens) for r in requests]
        if max(budgets) == 0:
            return [Completion(text="", token_ids=(), stop_reason="length") for _ in requests]
        pad_id = self.tokenizer.pad_token_id
        pad_id = self.eos_token_id if pad_id is None else int(pad_id)
        input_ids, attention_mask = left_pad(prompts, pad_id, self.model.device)
        width = input_ids.shape[1]
        criterion = _PerSequenceStop(self.tokenizer, width, [r.stop for r in requests], budgets)
        eos_ids = self.stop_token_ids()
        if requests[0].seed is not None:
            torch.manual_seed(requests[0].seed)  # one generator per batch: see module docstring
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max(budgets),
                    stopping_criteria=StoppingCriteriaList([criterion]),
                    eos_token_id=sorted(eos_ids),
                    pad_token_id=pad_id,
                    repetition_penalty=1.0,
                    **_Sampling.of(requests[0]).generate_kwargs(),
                )
        finally:
            self.model.train(was_training)
        completions = []
        for row, request in enumerate(requests):
            new = output[row, width:].tolist()[: budgets[row]]
            ids, reason = truncate_at_stop(new, self.tokenizer, request.stop, eos_ids)
            text = decode(self.tokenizer, ids)
            completions.append(Completion(text=text, token_ids=ids, stop_reason=reason))
        return completions


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input ids and their attention mask (1 on real tokens)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype | str:
    """auto: bfloat16 on CPU (~1.6x faster generation, CPU-MEASUREMENTS.md section 3), else the
    checkpoint's own dtype."""
    if dtype == "auto":
        return torch.bfloat16 if device == "cpu" else "auto"
    return _DTYPES[dtype]
