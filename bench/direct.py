"""The baseline: the same model and prompt, `generate` called directly in this process."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.clients import PROMPT
from bench.common import peer_threads, use_bench_env


class Direct:
    def __init__(self, path: Path) -> None:
        use_bench_env()
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(peer_threads())
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def inputs(self) -> Any:
        messages = [{"role": "user", "content": PROMPT}]
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )

    def complete(self, max_tokens: int) -> int:
        """Template, tokenize, generate greedily, decode: what one request costs in-process."""
        inputs = self.inputs()
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        new = out[0][inputs["input_ids"].shape[1] :]
        self.tokenizer.decode(new, skip_special_tokens=True)
        return len(new)

    def batch_rate(self, batch: int, max_tokens: int, repeats: int = 3) -> float:
        """Tokens/s of one `generate` over `batch` copies of the prompt, exactly
        `max_tokens` each (best of `repeats`): what batching can give at best."""
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
        )
        self.tokenizer.padding_side = "left"
        inputs = self.tokenizer(
            [text] * batch, return_tensors="pt", add_special_tokens=False, padding=True
        )
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            with self.torch.inference_mode():
                self.model.generate(
                    **inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
                )
            best = min(best, time.perf_counter() - started)
        return batch * max_tokens / best

    def first_new_token(self) -> list[int]:
        inputs = self.inputs()
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=1, do_sample=False)
        return [int(out[0][-1])]

    def first_token(self, max_tokens: int) -> float:
        """Seconds from the start of a request to `generate` handing out its first new token."""
        streamer = _FirstToken()
        started = time.perf_counter()
        inputs = self.inputs()
        with self.torch.inference_mode():
            self.model.generate(
                **inputs, max_new_tokens=max_tokens, do_sample=False, streamer=streamer
            )
        assert streamer.first is not None
        return streamer.first - started


class _FirstToken:
    """A generate streamer that notes when the first new token arrives (the first `put`
    carries the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass
