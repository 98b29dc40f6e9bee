"""A tiny randomly initialised chat model with a character-level ChatML tokenizer, for tests.

`build_tiny_model(out_dir)` writes a `LlamaForCausalLM` (hidden 64, 2 layers, 4 heads, 2 KV
heads, ffn 128; about 81K parameters) and a tokenizer built in code, both with `save_pretrained`,
so `AutoTokenizer.from_pretrained(out_dir)` and `AutoModelForCausalLM.from_pretrained(out_dir)`
load them like any checkpoint. A training step on it takes ~9 ms and an 8x64 sampled generation
~0.1 s on 2 CPU cores (CPU-MEASUREMENTS.md section 5).

The tokenizer has one token per character of `string.printable` plus the special tokens
`<|endoftext|>` (0, also pad), `<|im_start|>` (1, bos) and `<|im_end|>` (2, eos = end of turn),
mirroring SmolLM2's ids, and `<unk>` (3) for every other character (so non-ASCII text does not
survive a round trip). The chat template is ChatML without a default system prompt.

Weights are deterministic (fixed seed); the model's output is meaningless text. Not a model to
judge quality with: only to exercise code paths quickly.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")

# Same shape as SmolLM2's template, minus its default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_char_tokenizer(model_max_length: int = 8192):
    """A fast tokenizer with one token per printable ASCII character and ChatML specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate characters (the default joins with spaces)
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to `out_dir` (created) and return the path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        # Larger than the default 0.02 so that greedy output depends on the prompt instead of
        # collapsing to one repeated character: tests can tell sequences apart.
        initializer_range=0.2,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.debug("tiny model (%d parameters) written to %s", model.num_parameters(), out)
    return out
