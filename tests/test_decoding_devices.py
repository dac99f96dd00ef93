"""Continuous batching on a model split over devices, checked without a GPU.

A `device_map` over two GPUs keeps the embeddings (the input), each layer's keys and values,
and the head (the logits) on different devices, and CUDA refuses an index, a concatenation
or an operation that mixes devices. Here a fake model splits the same way between `meta`
(the input and the first layer, like `cuda:0`) and `cpu` (the second layer and the logits,
like `cuda:1`), and a torch function mode applies CUDA's rules, which neither `cpu` nor
`meta` enforce on their own.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from gateway.worker.decoding import RunningBatch
from gateway.worker.rows import Event, Row, SamplingParams

VOCAB = 11


class CudaDeviceRules(TorchFunctionMode):  # type: ignore[misc]
    """Raises where CUDA would: tensors of one operation on different devices, except an
    index tensor on the CPU (which CUDA accepts)."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            tensor, index = args
            if isinstance(index, torch.Tensor) and index.device.type != "cpu":
                _same_device(func, [tensor, index])
        elif func not in (torch.Tensor.to, torch.Tensor.__setitem__):
            _same_device(func, [*_tensors(args), *_tensors(kwargs.values())])
        return func(*args, **kwargs)


def _tensors(values: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(_tensors(value))
    return found


def _same_device(func: Any, tensors: list[torch.Tensor]) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise RuntimeError(
            f"{getattr(func, '__name__', func)}: tensors on {sorted(map(str, devices))}"
        )


class SplitModel:
    """Stands in for a transformers model placed by a `device_map`: its input on one
    device, one cache layer per device, logits from another. Row r's next token is
    (the token it was fed + r + 1) mod VOCAB, so a row that reads another row's cache or
    token would say so."""

    def __init__(self, input_device: str, layers: list[str], output: str) -> None:
        self.input = torch.device(input_device)
        self.layers = [torch.device(device) for device in layers]
        self.output = torch.device(output)
        self.fed: list[int] = []  # what each row is fed (input_ids may be on `meta`)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        use_cache: bool,
        logits_to_keep: int,
        past_key_values: Any,
    ) -> Any:
        rows, width = input_ids.shape
        assert input_ids.device == attention_mask.device == position_ids.device == self.input
        assert attention_mask.shape[1] == past_key_values.get_seq_length() + width
        for index, device in enumerate(self.layers):
            states = torch.zeros(rows, 2, width, 4, device=device)
            past_key_values.update(states, states.clone(), index)
        logits = torch.zeros(rows, 1, VOCAB, device=self.output)
        for row, token in enumerate(self.fed):
            logits[row, 0, (token + row + 1) % VOCAB] = 1.0
        return SimpleNamespace(logits=logits)

    __call__ = forward

    def feed(self, rows: list[Row]) -> None:
        self.fed = [row.output_ids[-1] if row.output_ids else row.prompt_ids[-1] for row in rows]


def make_row(prompt: list[int], tokens: int) -> Row:
    events: list[Event] = []
    return Row(
        prompt_ids=prompt,
        params=SamplingParams(max_new_tokens=tokens),
        stop_ids=frozenset(),
        decode=lambda ids: "".join(chr(97 + i) for i in ids),
        emit=events.append,
    )


def decode_joining_and_leaving(model: SplitModel) -> list[list[int]]:
    """Two rows, a third joins, the first leaves after a step, the others later."""
    first = [make_row([1, 2, 3], tokens=2), make_row([4], tokens=6)]
    model.feed(first)
    batch = RunningBatch.prefill(model, first, 0, model.input)
    late = [make_row([5, 6, 7, 8, 9], tokens=3)]
    model.feed(late)
    batch.absorb(RunningBatch.prefill(model, late, 0, model.input))
    while len(batch):
        model.feed(batch.rows)
        batch.step(model)
        batch.drop_finished()
        assert batch.mask.device == batch.next_tokens.device == model.input
        assert [layer.keys.device for layer in batch.cache.layers] == model.layers
        if len(batch):
            width = batch.mask.shape[1]
            assert all(
                layer.keys.shape[:3] == (len(batch), 2, width) for layer in batch.cache.layers
            )
            # No column of padding only: as wide as the longest row's prompt and fed tokens.
            assert width == max(len(r.prompt_ids) + len(r.output_ids) - 1 for r in batch.rows)
    return [row.output_ids for row in first + late]


def test_rows_join_and_leave_a_batch_whose_cache_spans_two_devices() -> None:
    alone = decode_joining_and_leaving(SplitModel("cpu", ["cpu", "cpu"], "cpu"))
    with CudaDeviceRules():
        split = decode_joining_and_leaving(SplitModel("meta", ["meta", "cpu"], "cpu"))
    assert split == alone
    assert [len(tokens) for tokens in alone] == [2, 6, 3]


def test_the_device_rules_catch_an_index_on_the_wrong_device() -> None:
    keys = torch.zeros(3, 2, 5, 4)
    with CudaDeviceRules(), pytest.raises(RuntimeError, match="tensors on"):
        keys[torch.tensor([0, 2], device="meta")]
    with CudaDeviceRules():
        assert keys[torch.tensor([0, 2])].shape[0] == 2  # CUDA takes an index on the CPU
