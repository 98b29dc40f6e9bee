"""In-process vLLM generation (GPU extra: `pip install autotraj[vllm]`), token-in token-out.

`VllmGenerator.generate(requests)` sends every request's prompt ids as a `TokensPrompt` with its
own `SamplingParams` (temperature, top_p, max_tokens, stop strings kept in the output, and a
per-request seed, which vLLM supports), in one `LLM.generate` call. The returned ids are cut with
the same `truncate_at_stop` as the transformers backend, and the text is decoded from the ids,
so both backends give identical kinds of completions.

Not tested in the fast tier (no GPU there). Not here: syncing trained policy weights into the
engine (a trainer's job; the engine is exposed as `.llm`), log-probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from autotraj.models.generator import Completion, GenerationRequest
from autotraj.models.transformers_backend import decode, truncate_at_stop

if TYPE_CHECKING:
    from autotraj.models.loading import GeneratorConfig

log = logging.getLogger(__name__)


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "the vllm backend needs vLLM and a GPU: pip install autotraj[vllm]"
        ) from e
    return vllm


class VllmGenerator:
    """A vLLM engine and the model's tokenizer behind the Generator protocol."""

    backend = "vllm"

    def __init__(self, llm: Any, tokenizer: Any, name: str):
        self.llm = llm
        self.tokenizer = tokenizer
        self.name = name

    @classmethod
    def from_config(cls, cfg: GeneratorConfig) -> VllmGenerator:
        from autotraj.models.loading import load_tokenizer, resolve_model_path

        vllm = _import_vllm()
        path = resolve_model_path(cfg.model)
        tokenizer_path = resolve_model_path(cfg.tokenizer) if cfg.tokenizer else path
        llm = vllm.LLM(
            model=path,
            tokenizer=tokenizer_path,
            dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
        return cls(llm, load_tokenizer(cfg), name=cfg.model)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def end_of_turn(self) -> str:
        return str(self.tokenizer.eos_token)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        if not requests:
            return []
        vllm = _import_vllm()
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(self._prompt_ids(r))) for r in requests]
        params = [
            vllm.SamplingParams(
                temperature=r.temperature,
                top_p=r.top_p if r.temperature > 0 else 1.0,
                max_tokens=r.max_new_tokens,
                stop=list(r.stop),
                include_stop_str_in_output=True,
                skip_special_tokens=False,
                seed=r.seed,
            )
            for r in requests
        ]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        completions = []
        for request, output in zip(requests, outputs, strict=True):
            sample = output.outputs[0]
            new = list(sample.token_ids)
            eos_ids = {self.eos_token_id}
            if sample.finish_reason == "stop" and not isinstance(sample.stop_reason, str) and new:
                eos_ids.add(new[-1])  # vLLM stopped at an eos id of the model's generation config
            ids, reason = truncate_at_stop(new, self.tokenizer, request.stop, eos_ids)
            completions.append(
                Completion(text=decode(self.tokenizer, ids), token_ids=ids, stop_reason=reason)
            )
        return completions

    def _prompt_ids(self, request: GenerationRequest) -> Sequence[int]:
        if request.prompt_ids:
            return request.prompt_ids
        return self.tokenizer.encode(request.prompt_text, add_special_tokens=False)
