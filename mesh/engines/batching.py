"""The running batch's KV cache: left-padded rows that requests join and leave between steps.

Layout: for every layer, keys and values of shape [rows, kv_heads, T, head_dim],
each row's tokens right-aligned (left padding), a 2D attention mask [rows, T]
with 0 on padding, and each row's own next position. Every decode step then
appends one column for all rows at once, so the whole batch is one forward
pass, while explicit position ids keep each row's rotary positions what they
would be if it ran alone.

The requests that join at one step are prefilled together, left-padded to the
longest prompt, with explicit positions (`prefill_inputs`), then merged into
the running batch: the shorter side is padded on the left with zeros and the
rows are concatenated. A finished request's row is dropped, and leading
columns that only padding still uses are trimmed, so the batch's T follows the
longest live request rather than the history of the batch.

Memory grows in preallocated chunks (GROW_TOKENS columns at a time) so a decode
step writes one column in place instead of copying the whole cache, which is
what transformers' DynamicCache does on every step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

#: Columns reserved ahead of the current length when a layer's buffer grows.
GROW_TOKENS = 64


class GrowingLayer(DynamicLayer):
    """A DynamicLayer over a preallocated buffer: appends write in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self.length = keys.shape[-2]
        self._k = _with_room(keys, self.length + GROW_TOKENS)
        self._v = _with_room(values, self.length + GROW_TOKENS)
        self._publish()

    def _publish(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):  # type: ignore[override]
        n = key_states.shape[-2]
        if self.length + n > self._k.shape[-2]:
            self._k = _with_room(self.keys, self.length + n + GROW_TOKENS)
            self._v = _with_room(self.values, self.length + n + GROW_TOKENS)
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._publish()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


def _with_room(tensor: torch.Tensor, capacity: int) -> torch.Tensor:
    rows, heads, length, dim = tensor.shape
    buffer = tensor.new_zeros(rows, heads, capacity, dim)
    buffer[:, :, :length] = tensor
    return buffer


def growing_cache(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = [GrowingLayer(k, v) for k, v in layers]
    return cache


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[misc]


class BatchState:
    """The rows of one decode batch: cache, attention mask, next positions."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # [rows, T] long
        self.positions = positions  # [rows] long: each row's next position

    @classmethod
    def from_prefill(cls, cache: DynamicCache, mask: torch.Tensor) -> BatchState:
        """The batch a prefill made: `mask` [rows, T] is the (left-padded) mask it ran with."""
        positions = mask.sum(dim=1)
        return cls(growing_cache(cache_tensors(cache)), mask, positions)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention mask [rows, T+1], position ids [rows, 1]) for one decode step."""
        ones = torch.ones(self.rows, 1, dtype=self.mask.dtype, device=self.mask.device)
        return torch.cat([self.mask, ones], dim=1), self.positions.unsqueeze(1)

    def advance(self, step_mask: torch.Tensor) -> None:
        """After a decode step: the mask that step used is now the batch's, positions move on."""
        self.mask = step_mask
        self.positions = self.positions + 1

    def merge(self, other: BatchState) -> None:
        """Appends other's rows after ours, left-padding whichever side is shorter."""
        length = max(self.mask.shape[1], other.mask.shape[1])
        layers = []
        for (k1, v1), (k2, v2) in zip(cache_tensors(self.cache), cache_tensors(other.cache), strict=True):
            layers.append(
                (
                    torch.cat([_pad_left(k1, length, 2), _pad_left(k2, length, 2)], dim=0),
                    torch.cat([_pad_left(v1, length, 2), _pad_left(v2, length, 2)], dim=0),
                )
            )
        self.cache = growing_cache(layers)
        self.mask = torch.cat([_pad_left(self.mask, length, 1), _pad_left(other.mask, length, 1)], dim=0)
        self.positions = torch.cat([self.positions, other.positions])

    def keep(self, rows: list[int]) -> None:
        """Keeps only these rows (in this order), then trims columns no kept row uses."""
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        self.cache = growing_cache(
            [
                (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                for k, v in cache_tensors(self.cache)
            ]
        )


def prefill_inputs(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(input ids, attention mask, position ids), each [rows, longest prompt], prompts left-padded.

    Each row's positions start at 0 at its first real token, as if it ran alone;
    padding gets position 0 and is masked out.
    """
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, length - len(prompt) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
