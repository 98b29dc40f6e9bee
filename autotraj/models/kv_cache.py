"""A KV cache layer that decodes without copying the cache at every step.

transformers' `DynamicLayer` appends each new token with `torch.cat`, which copies every key
and value of the layer at every decoding step: at 64 rows x ~400 tokens that is ~0.6 GB per step
for SmolLM2-135M, 28% of the decoder's time on CPU (docs/models.md, "Generation speed on CPU").
`BufferedLayer` keeps the same interface and semantics (keys/values of shape
[batch, heads, length, head_dim], the length only what was written) but stores them in a buffer
with spare room: a step writes its token in place and the layer hands out views. The buffer
grows geometrically (amortised O(1) copies per token), and `trim_front` drops leading columns
(padding every row has) without a copy. Removing finished rows (`batch_select_indices`) copies
only the written part.

The fast decode step (decode_step.py) reads the cache in place. In float32 its batched attention
products (`torch.bmm`, MKL) take the strided batch of the written columns (these views; torch
2.13: no copy, the time follows the columns read). In bf16 oneDNN takes a batch in place only
when its matrices lie back to back, which the written columns of a buffer with room do not:
given them, torch copies them first, element by element for the keys. So in bf16 the step reads
each layer's whole buffer (`buffers()`), the trimmed columns and the room masked, and the
decoder keeps that room small (decoding._GROW_ROOM_READ). A buffer may grow by a fixed `grow`
instead of doubling, which holds less memory as room at large batches.

`buffered_cache(config, capacity)` builds a `DynamicCache` whose plain layers are buffered
(sliding-window or other special layers are kept as transformers builds them).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class BufferedLayer(DynamicLayer):
    """A `DynamicLayer` backed by a buffer with room for `capacity` positions (it grows beyond
    that when needed); `keys` / `values` are views of the written columns."""

    def __init__(self, capacity: int = 0, grow: int = 0):
        super().__init__()
        self.capacity = capacity
        self.grow = grow  # columns added when full (0: double)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._start = 0  # first live column of the buffer
        self._end = 0  # one past the last written column

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._k is None or self._end + n > self._k.shape[-2]:
            self._reallocate(self._end - self._start + n, key_states)
        self._k[:, :, self._end : self._end + n].copy_(key_states)
        self._v[:, :, self._end : self._end + n].copy_(value_states)
        self._end += n
        self._refresh()
        return self.keys, self.values

    def _reallocate(self, need: int, like: torch.Tensor) -> None:
        """Move the live columns to a new buffer with room for at least `need` columns (the
        first buffer is shaped like `like`)."""
        old = 0 if self._k is None else self._k.shape[-2]
        size = max(need, self.capacity, old + self.grow if self.grow else 2 * old)
        if self._k is None:
            self._store(like[:, :, :0], like[:, :, :0], size)
        else:
            self._store(self.keys, self.values, size)

    def _refresh(self) -> None:
        self.keys = self._k[:, :, self._start : self._end]
        self.values = self._v[:, :, self._start : self._end]

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """The whole key and value buffers (rows x heads x room x head_dim: the written columns,
        any trimmed off the front, and the free room) with the first and one past the last
        written column. Columns outside the written ones hold zeros or earlier values, never
        anything non-finite; a reader masks them."""
        if self._k is None:
            raise RuntimeError("the layer holds no buffer before its first update")
        return self._k, self._v, self._start, self._end

    def drop_trimmed(self) -> None:
        """Move the written columns to the front of a new buffer with the same free room after
        them, dropping the columns trimmed off the front (one copy of the written columns). The
        buffer's `capacity` shrinks to it, so that it grows from there by `grow`, not back to a
        size that held the dropped columns."""
        if self._k is None or not self._start:
            return
        size = self._k.shape[-2] - self._start  # the written columns and the free room
        self.capacity = min(self.capacity, size)
        self._store(self.keys, self.values, size)

    @property
    def room(self) -> int:
        """Columns of the buffer (written, trimmed and free); 0 before the first update."""
        return 0 if self._k is None else self._k.shape[-2]

    def get_seq_length(self) -> int:
        return self._end - self._start if self.is_initialized else 0

    def trim_front(self, columns: int) -> None:
        """Drop the first `columns` positions of every row (no copy)."""
        if self.get_seq_length() and columns:
            self._start += columns
            self._refresh()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens, got {tokens_to_remove}")
        if tokens_to_remove and self.is_initialized:
            self._end = max(self._start, self._end + tokens_to_remove)
            self._refresh()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows `indices`: only the written columns are copied, the room is kept."""
        if not self.get_seq_length():
            return
        room = self._k.shape[-2]
        keys = self._k[indices, :, self._start : self._end]
        values = self._v[indices, :, self._start : self._end]
        self._store(keys, values, room)

    def compact(self, order: list[int]) -> None:
        """Rearrange the rows so that new row j is old row `order[j]` and keep len(order) rows,
        copying only the rows whose slot changes (`fill_holes` orders them so that few do)."""
        moved = [(j, src) for j, src in enumerate(order) if j != src]
        if self.get_seq_length() and moved:
            device = self._k.device
            dst = torch.tensor([j for j, _ in moved], dtype=torch.long, device=device)
            src = torch.tensor([i for _, i in moved], dtype=torch.long, device=device)
            cols = slice(self._start, self._end)
            self._k[dst, :, cols] = self._k[src, :, cols]
            self._v[dst, :, cols] = self._v[src, :, cols]
        if self._k is not None:
            self._k, self._v = self._k[: len(order)], self._v[: len(order)]
            self._refresh()

    def gather_columns(self, order: torch.Tensor) -> None:
        """Reorder each row's written columns in place: new column c of row j is old column
        `order[j, c]` (`order`: rows x written columns, long; a permutation per row)."""
        if not self.get_seq_length():
            return
        index = order[:, None, :, None].expand(-1, self._k.shape[1], -1, self._k.shape[3])
        keys, values = self.keys.gather(2, index), self.values.gather(2, index)
        self.keys.copy_(keys)
        self.values.copy_(values)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length():
            room = self._k.shape[-2]
            keys = self.keys.repeat_interleave(repeats, dim=0)
            self._store(keys, self.values.repeat_interleave(repeats, dim=0), room)

    def _store(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """Replace the contents with `keys` / `values` in a new buffer of `room` columns."""
        length = keys.shape[-2]
        shape = (keys.shape[0], keys.shape[1], max(room, length), keys.shape[3])
        self._k, self._v = keys.new_zeros(shape), values.new_zeros(shape)
        self._k[:, :, :length].copy_(keys)
        self._v[:, :, :length].copy_(values)
        self._start, self._end = 0, length
        self._refresh()

    def reset(self) -> None:
        self._k = self._v = None
        self._start = self._end = 0
        super().reset()


def buffered_cache(config: Any, capacity: int, grow: int = 0) -> DynamicCache:
    """A `DynamicCache` for `config` whose plain layers are `BufferedLayer(capacity, grow)`."""
    cache = DynamicCache(config=config)
    cache.layers = [
        BufferedLayer(capacity, grow) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache


def fill_holes(keep: list[int], rows: int) -> list[int]:
    """An order of the kept slots (`keep`, ascending, out of `rows`) that leaves each kept slot
    below len(keep) where it is and moves the kept slots above it into the freed slots.

    >>> fill_holes([0, 2, 3, 5], 6)
    [0, 5, 2, 3]
    """
    live = len(keep)
    movers = iter([k for k in keep if k >= live])
    kept = set(keep)
    return [j if j in kept else next(movers) for j in range(live)]


def compact_cache(cache: DynamicCache, order: list[int]) -> None:
    """Apply `order` (new row j = old row order[j]) to every layer of `cache`."""
    if all(isinstance(layer, BufferedLayer) for layer in cache.layers):
        for layer in cache.layers:
            layer.compact(order)
        return
    device = next((layer.keys.device for layer in cache.layers if layer.get_seq_length()), "cpu")
    cache.batch_select_indices(torch.tensor(order, dtype=torch.long, device=device))
