"""TransNormerLLM (OpenNLPLab/TransNormerLLM-*): a linear-attention base model with remote code.

- Prompt format is its fine-tuning format, `Human:\\n{input}\\nAssistant:\\n`; a system prompt
  and earlier turns are folded in front. The slow sentencepiece tokenizer adds no BOS/EOS.
- Its modeling code imports triton unconditionally and reads `use_triton` with `eval()` at
  import time: without a GPU kernel to run, `use_triton=False` must be in the environment.
- `NormLinearAttention.offset` survives from one `generate` to the next and changes the
  results, so it is reset (on every module that has one) before every call. With it reset,
  a left-padded row gives what it gives alone (the mask zeroes padded keys and values, and
  positions enter only as differences), so whole `generate` calls are batched; the engine
  never splices rows into a running batch, which would need no reset in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from adapters.base import Message, Prompt, TransformersAdapter


class TransNormerAdapter(TransformersAdapter):
    name: ClassVar[str] = "transnormer"
    literal_text: ClassVar[bool] = True

    def environment(self) -> dict[str, str]:
        return {} if self.spec.gpus > 0 else {"use_triton": "False"}

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            str(self.spec.path),
            trust_remote_code=self.spec.trust_remote_code,
            revision=self.spec.revision,
            use_fast=False,
        )

    def chat_prompt(self, messages: Sequence[Message]) -> Prompt:
        text = ""
        for message in messages:
            role, content = message["role"], message["content"]
            if role in ("system", "developer"):
                text += f"{content}\n"
            elif role == "user":
                text += f"Human:\n{content}\n"
            else:
                text += f"Assistant:\n{content}\n"
        text += "Assistant:\n"
        return Prompt(self.encode(text), text)

    def before_generate(self) -> None:
        for module in self.model.modules():
            if hasattr(module, "offset"):
                module.offset = 0
