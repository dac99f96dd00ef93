"""DeepSeek-MoE chat models (deepseek-ai/deepseek-moe-16b-chat and its family).

Format: BOS, optional system text + "\\n\\n", "User: {text}\\n\\n", "Assistant: {text}<eos>",
and the generation prompt "Assistant:". The tokenizer adds BOS itself, so prompts are
tokenized without special tokens and BOS is placed once, by id. Replies end at EOS, which
also pads batches. The context is clamped to 4096 (the tokenizer claims 16384).
Its generation_config.json names only BOS and EOS (so `generate` would stop at 20 tokens by
default): the engine always passes `max_new_tokens`. bf16 on GPUs (`dtype: auto`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from adapters.base import Message, Prompt, TransformersAdapter

CONTEXT_LENGTH = 4096


class DeepSeekMoEAdapter(TransformersAdapter):
    name: ClassVar[str] = "deepseek_moe"
    literal_text: ClassVar[bool] = True

    def chat_prompt(self, messages: Sequence[Message]) -> Prompt:
        ids = [self.bos_id()]
        text, pending = "", ""
        for message in messages:
            role, content = message["role"], message["content"]
            if role in ("system", "developer"):
                pending += f"{content}\n\n"
            elif role == "user":
                pending += f"User: {content}\n\n"
            else:  # an assistant turn closes with EOS, placed by id so text cannot forge it
                pending += f"Assistant: {content}"
                ids += [*self.encode(pending), self.eos_id()]
                text += pending + "<eos>"
                pending = ""
        pending += "Assistant:"
        ids += self.encode(pending)
        return Prompt(ids, "<bos>" + text + pending)

    def completion_prompt(self, text: str) -> Prompt:
        # The caller's own raw text: special tokens it spells stay special (see the base).
        return Prompt([self.bos_id(), *self.encode(text, literal=False)], text)

    def bos_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    def pad_token_id(self) -> int:
        return self.eos_id()

    def after_load(self) -> None:
        super().after_load()
        # As the model card says: pad with EOS (the model has no pad token).
        self.model.generation_config.pad_token_id = self.eos_id()

    def context_length(self) -> int:
        return min(super().context_length(), CONTEXT_LENGTH)
