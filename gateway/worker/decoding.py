"""Continuous batching: rows join and leave a running batch between decoding steps.

`generate` runs a batch from its first token to its last: a request that arrives a step
after it started waits for the whole batch, and a row that finished early is still
computed as padding. Here the engine owns the decoding loop instead. A `RunningBatch`
holds the rows being decoded, one key/value cache for all of them (rows right-aligned,
padding on the left, masked out) and the token each row feeds next. New rows are
prefilled on their own, then spliced into the running cache; finished rows are cut out of
it after every step, and columns that only padding still uses are trimmed away.

Splicing caches needs a cache made of plain full-attention layers, which transformers'
own decoder-only models use; `supports_continuous` says whether a model qualifies. Others
(remote code with its own cache, sliding windows, recurrent state) batch whole `generate`
calls instead.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from gateway.worker.rows import Row
from gateway.worker.sampling import RowSampler


def supports_continuous(model: Any) -> bool:
    """True if the engine may splice this model's cache (see the module docstring)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # transformers too old for per-layer caches
        return False
    if not type(model).__module__.startswith("transformers."):
        return False  # remote code brings its own attention and cache handling
    if _cache_keyword(model) is None:
        return False
    if getattr(model, "_is_stateful", False) or getattr(model.config, "is_encoder_decoder", False):
        return False
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(kind != "full_attention" for kind in layer_types):
            return False
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def _cache_keyword(model: Any) -> str | None:
    """The name `forward` takes the cache under: transformers renamed `past_key_values`."""
    parameters = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in parameters:
        return None  # too old to compute only the last position's logits
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    return None


class RunningBatch:
    """Rows being decoded together, with their shared cache (see the module docstring)."""

    def __init__(
        self, rows: list[Row], cache: Any, cache_keyword: str, mask: torch.Tensor, device: Any
    ) -> None:
        self.rows = rows
        self.cache = cache
        self.cache_keyword = cache_keyword  # what `forward` calls the cache
        self.mask = mask  # [rows, width]: 1 where a row has a real token in the cache
        # The same as the mask's row sums, kept on the host: reading them from the mask
        # would wait for the device at every step.
        self.lengths = [len(row.prompt_ids) for row in rows]
        self.device = device  # the input device: where the mask and the fed tokens live
        self.next_tokens = torch.zeros(len(rows), 1, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def prefill(cls, model: Any, rows: list[Row], pad: int, device: Any) -> RunningBatch:
        """Run the rows' prompts (left-padded together) and give each its first token."""
        from transformers.cache_utils import DynamicCache

        keyword = _cache_keyword(model)
        assert keyword is not None, "supports_continuous(model) was checked first"
        ids, mask = left_pad([row.prompt_ids for row in rows], pad)
        ids, mask = ids.to(device), mask.to(device)
        batch = cls(rows, DynamicCache(), keyword, mask, device)
        batch._forward(model, ids)
        return batch

    def step(self, model: Any) -> None:
        """One decoding step: every row feeds its latest token and gets the next."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.lengths = [length + 1 for length in self.lengths]
        self._forward(model, self.next_tokens)

    def _forward(self, model: Any, ids: torch.Tensor) -> None:
        # Positions count each row's real tokens, so padding never shifts them.
        positions = (self.mask.cumsum(dim=1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        # The cache is updated in place, so the output's reference to it is not needed.
        output = model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_keyword: self.cache},
        )
        logits = output.logits[:, -1, :].float()
        chosen = RowSampler(self.rows)(ids, logits).argmax(dim=-1)
        # The logits come from the last layer's device, which a model split over GPUs
        # does not share with the input.
        self.next_tokens = chosen[:, None].to(self.device)
        for row, token in zip(self.rows, chosen.tolist(), strict=True):
            row.push(int(token))

    def drop_finished(self) -> None:
        """Cut finished rows out of the batch, then the padding columns nobody needs."""
        if not self.rows:
            return
        keep = [index for index, row in enumerate(self.rows) if not row.done]
        if len(keep) < len(self.rows):
            self.rows = [self.rows[index] for index in keep]
            self.lengths = [self.lengths[index] for index in keep]
            if not keep:
                return
            pick = _RowPicker(keep)
            self.mask, self.next_tokens = pick(self.mask), pick(self.next_tokens)
            for layer in self.cache.layers:
                layer.keys, layer.values = pick(layer.keys), pick(layer.values)
        unused = self.mask.shape[1] - max(self.lengths)  # leading all-padding columns
        if unused:
            self.mask = self.mask[:, unused:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, unused:]
                layer.values = layer.values[:, :, unused:]

    def absorb(self, other: RunningBatch) -> None:
        """Take in another batch's rows: left-pad both caches to one width, then stack.
        Each layer's cache stays on that layer's device (both batches ran the same model)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.rows = self.rows + other.rows
        self.lengths = self.lengths + other.lengths
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask, width)])
        self.next_tokens = torch.cat([self.next_tokens, other.next_tokens])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
            )


class _RowPicker:
    """Selects rows of tensors that live on different devices: a model split over GPUs
    keeps each layer's cache on its own, and an index must be on the indexed tensor's."""

    def __init__(self, keep: list[int]) -> None:
        self._on_host = torch.tensor(keep, dtype=torch.long)
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        device = tensor.device
        if device not in self._by_device:
            self._by_device[device] = self._on_host.to(device)
        return tensor[self._by_device[device]]


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of prompts right-aligned in one tensor."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for index, prompt in enumerate(prompts):
        input_ids[index, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention[index, width - len(prompt) :] = 1
    return input_ids, attention


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the sequence axis (dim 1 of a mask, dim 2 of keys/values) on the left."""
    missing = width - (tensor.shape[1] if tensor.dim() == 2 else tensor.shape[2])
    if not missing:
        return tensor
    if tensor.dim() == 2:
        return F.pad(tensor, (missing, 0))
    return F.pad(tensor, (0, 0, missing, 0))
