"""The KV cache of finished rows, kept for the next call that continues them (a tool loop).

A rollout stops generating at each closed tool tag, runs the tool, appends its result and calls
`generate` again with the whole context: without this store, the decoder would prefill every
row's earlier turns again at each turn. `KeptPrefixes` keeps, per row that ended on a stop
string, the keys and values of the tokens it holds in the cache (its prompt and what it wrote,
all but the last token, which was sampled but never fed), keyed by those token ids. The next
prefill (decoding._prefill) looks up the longest kept sequence that starts each prompt and
forwards only the rest; a hit is consumed (the row's new, longer state replaces it).

- Memory: at most `budget_bytes` (least recently kept entries are dropped first); one token
  costs layers x 2 x kv_heads x head_dim x dtype bytes (23 KB for SmolLM2-135M in bf16, 12 KB
  for Qwen2.5-0.5B).
- Validity: the store belongs to one model; `check(weights)` empties it when any weight changed
  (an RL update, a weight push), so a kept cache never outlives the weights that computed it.
- Results: token-in/token-out, stop strings and seeds keep their meaning. The kept keys and
  values are those the decode steps computed, not a fresh prefill's, so a continued row's logits
  can differ from a recomputed one's in the last bits (as with vLLM's prefix cache); greedy
  outputs of the tiny test models are identical with and without the store
  (tests/test_kept_prefixes.py), and bench/bench_engines.py counts how often the embedded
  model's are.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Kept:
    """One kept row: per cache layer, keys and values of shape (kv_heads, length, head_dim)."""

    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


class KeptPrefixes:
    """Kept rows by token ids, within a byte budget (see the module docstring)."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the kept-prefix budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], Kept] = OrderedDict()
        self._lengths: Counter[int] = Counter()
        self._bytes = 0
        self._weights: Hashable = None
        self.hits = 0  # tokens not prefilled again thanks to the store (for benchmarks)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def check(self, weights: Hashable) -> None:
        """Empty the store when the model's weights are not those it was filled with."""
        if weights != self._weights:
            self.clear()
            self._weights = weights

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self._bytes = 0

    def longest(self, prompt: Sequence[int]) -> Kept | None:
        """The longest kept row whose ids start `prompt` and leave at least one token of it."""
        if not self._entries:
            return None
        prompt = tuple(prompt)
        for length in sorted(self._lengths, reverse=True):
            if length < len(prompt):
                found = self._entries.get(prompt[:length])
                if found is not None:
                    return found
        return None

    def consume(self, kept: Kept) -> None:
        """Drop `kept` (its row goes on from it; the continuation is kept in its place)."""
        if self._entries.pop(kept.ids, None) is not None:
            self._forget(kept)

    def keep(self, kept: Kept) -> None:
        """Add a row, dropping the oldest entries while the budget is exceeded."""
        size = kept.nbytes
        if size > self.budget_bytes:
            return
        old = self._entries.pop(kept.ids, None)
        if old is not None:
            self._forget(old)
        self._entries[kept.ids] = kept
        self._lengths[len(kept.ids)] += 1
        self._bytes += size
        while self._bytes > self.budget_bytes:
            _, oldest = self._entries.popitem(last=False)
            self._forget(oldest)

    def _forget(self, kept: Kept) -> None:
        self._bytes -= kept.nbytes
        self._lengths[len(kept.ids)] -= 1
        if not self._lengths[len(kept.ids)]:
            del self._lengths[len(kept.ids)]
