"""Generator configuration and the one function that turns it into a backend.

`GeneratorConfig` is shared by the policy, the teacher and the repairer: each is configured on
its own, so a large hosted repairer can serve a small local policy.

`resolve_model_path` maps a model reference to something `from_pretrained` accepts:
"embedded:<name>" -> the converted embedded model (models/embedded.py), a local directory -> its
path, a Hub id pinned to a GGUF file (`embedded.PINNED_GGUF`: Qwen/Qwen2.5-Coder-0.5B-Instruct)
-> its converted checkpoint when that file is present, anything else -> passed through unchanged as a Hugging Face Hub name (so
`Qwen/Qwen2.5-7B-Instruct` keeps working where the Hub is reachable). `load_tokenizer` and
`load_generator` build the tokenizer and the backend; backends are imported lazily, so the
openai backend never imports torch and vLLM is only imported when asked for.

Not here: generation itself (the backend modules) or the rollout loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from autotraj.models.generator import Generator

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_PREFIX = "embedded:"


@dataclass(frozen=True)
class GeneratorConfig:
    # transformers: local weights (CPU/GPU); openai: any OpenAI-compatible HTTP endpoint;
    # vllm: in-process vLLM (GPU extra); reference: the scripted solver of the built-in tasks
    # (models/reference.py; no model, `model` only names the tokenizer).
    backend: Literal["transformers", "openai", "vllm", "reference"] = "transformers"
    # "embedded:smollm2-135m-instruct" (offline default), a local directory, or a Hub name.
    # For the openai backend: the model name the server expects.
    model: str = EMBEDDED_MODEL
    # Tokenizer to use when `model` has none (or for the openai backend's token counts).
    tokenizer: str | None = None
    # auto: bfloat16 on a CPU with bf16 kernels (~1.6x faster generation than fp32,
    # CPU-MEASUREMENTS.md section 3), float32 on one without (models/cpu_bf16.py); the
    # checkpoint's own dtype on GPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 16  # sequences per forward pass (transformers) or requests in flight (openai)
    # transformers: MB of KV cache kept for rows a tool loop will continue (their next turn
    # prefills only the tool's result; models/kept_prefixes.py); 0 turns it off.
    kept_prefix_mb: int = 2048
    # transformers on CPU, where the fast step decodes: a prefix of >= 64 tokens that every row
    # shares (a rollout's system prompt and worked examples) is held once, not in every row, its
    # attention merged with each row's own (9% faster at 64 tool-loop rollouts; its rounding
    # depends on where the shared prefix ends, so runs that batch prompts differently can sample
    # other tokens at near-ties, as with the padded prefill: docs/models.md); false: every row
    # holds it.
    held_prefix: bool = True
    # transformers, wherever the fast step decodes (CPU, bf16 or float32): prefill the prompts
    # unpadded, every row's tokens in one sequence and each row attending only to its own
    # (FastStep.prefill); false: the left-padded transformers prefill (docs/models.md).
    unpadded_prefill: bool = True
    # openai backend
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    api_mode: Literal["completions", "chat"] = "completions"
    request_timeout_s: float = 120.0
    max_retries: int = 3
    # openai backend, api_mode "chat": how the rendered prompt text becomes chat messages.
    # chatml: parse the ChatML turns back into messages and continue a partial assistant turn
    # (`continue_final_message`, a vLLM/SGLang extension); single_user: send the whole prompt
    # text as one user message (any chat API; a partial assistant turn is not continued).
    chat_template_mode: Literal["chatml", "single_user"] = "chatml"
    retry_backoff_s: float = 0.5  # first retry delay; doubles at each retry (openai backend)
    # vllm backend: fraction of GPU memory vLLM may take (leave room for a trainer beside it);
    # the longest context (None: the model's own; a prompt that reaches it ends its trajectory
    # with finish reason `length`); eager mode (no CUDA graphs: less memory, slower decoding);
    # GPUs per engine (tensor parallelism: a model too big for one GPU, or more KV cache).
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1


def resolve_model_path(model: str) -> str:
    """What `from_pretrained` should receive for `model` (see the module docstring).

    >>> resolve_model_path("Qwen/Qwen2.5-7B-Instruct")
    'Qwen/Qwen2.5-7B-Instruct'
    """
    if model.startswith(EMBEDDED_PREFIX):
        from autotraj.models.embedded import embedded_model_dir

        return str(embedded_model_dir(model.removeprefix(EMBEDDED_PREFIX)))
    from autotraj.models.embedded import pinned_model_dir

    pinned = pinned_model_dir(model)
    if pinned is not None:
        return str(pinned)
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if model.startswith(("./", "../", "/", "~")) or path.exists():
        raise FileNotFoundError(
            f"model path {model!r} is not a directory holding a checkpoint "
            f"(resolved to {path.resolve()})"
        )
    return model


def load_tokenizer(cfg: GeneratorConfig) -> Any:
    """The tokenizer of `cfg.tokenizer` (or of `cfg.model`), with a pad token distinct from eos.

    A tokenizer whose pad is missing or equal to eos gets `<|endoftext|>` as pad when its
    vocabulary has it; otherwise pad is left as it is (the transformers backend cuts every
    sequence at its first eos, so a pad equal to eos is harmless there).
    """
    from transformers import AutoTokenizer

    source = resolve_model_path(cfg.tokenizer or cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidate = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        usable = isinstance(candidate, int) and candidate != tokenizer.unk_token_id
        if usable and candidate != tokenizer.eos_token_id:
            tokenizer.pad_token = "<|endoftext|>"
        elif tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_generator(cfg: GeneratorConfig, role: str = "policy") -> Generator:
    """Build the backend `cfg.backend` names; `role` is only used in log lines."""
    log.info("loading %s generator: backend=%s model=%s", role, cfg.backend, cfg.model)
    if cfg.backend == "transformers":
        from autotraj.models.transformers_backend import TransformersGenerator

        return TransformersGenerator.from_config(cfg)
    if cfg.backend == "openai":
        from autotraj.models.openai_backend import OpenAIGenerator

        tokenizer = load_tokenizer(cfg) if cfg.tokenizer is not None else None
        return OpenAIGenerator(cfg, tokenizer=tokenizer)
    if cfg.backend == "vllm":
        from autotraj.models.vllm_backend import VllmGenerator

        return VllmGenerator.from_config(cfg)
    if cfg.backend == "reference":
        from autotraj.models.reference import reference_generator

        return reference_generator(load_tokenizer(cfg))
    raise ValueError(
        f"unknown generator backend {cfg.backend!r}: transformers, openai, vllm or reference"
    )
