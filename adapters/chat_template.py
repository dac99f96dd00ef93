"""Any model whose tokenizer ships a chat template (most modern instruct models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from adapters.base import Message, Prompt, TransformersAdapter


class ChatTemplateAdapter(TransformersAdapter):
    name: ClassVar[str] = "chat_template"

    def chat_prompt(self, messages: Sequence[Message]) -> Prompt:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "this model's tokenizer has no chat template; use /v1/completions, "
                "or pick the adapter of its model family in models.yaml"
            )
        # Render to text, then tokenize without special tokens: templates already carry BOS,
        # and tokenizing rendered text with special tokens would double it.
        text = self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
        )
        return Prompt(self.encode(str(text), add_special_tokens=False), str(text))
