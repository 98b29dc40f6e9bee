"""Write a "thin" model: the embedded model's layers, attention heads, KV cache and vocabulary,
with its weight products made ~20x smaller (random weights).

A decode step's time on CPU is the weights' products plus everything else (attention over the
cache, norms, rotary, the cache writes, the operations' dispatch). Run both engines on this
model (`bench/bench_engines.py --model DIR --settings forced`: random weights, so every row
writes the whole budget either way) and the comparison is of that "everything else" alone, the
part that does not get faster where the products do (bf16 on a CPU with bf16 kernels runs the
products ~6x faster than float32 here; docs/models.md, ninth round).

    .venv/bin/python bench/make_thin_model.py runs/thin-model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

from autotraj.models.embedded import embedded_model_dir


def make_thin_model(out: Path, hidden: int = 72, seed: int = 0) -> Path:
    """The embedded model's architecture with `hidden` as hidden and intermediate size (a
    multiple of its attention heads; the heads keep their own size), random weights, its
    tokenizer; saved to `out` (bf16, as the engines load the embedded model)."""
    source = embedded_model_dir()
    config = AutoConfig.from_pretrained(source)
    if hidden % config.num_attention_heads:
        raise ValueError(
            f"hidden size {hidden} is not a multiple of the {config.num_attention_heads} heads"
        )
    config.head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    config.hidden_size = config.intermediate_size = hidden
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hidden", type=int, default=72)
    args = parser.parse_args()
    path = make_thin_model(args.out, args.hidden)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
