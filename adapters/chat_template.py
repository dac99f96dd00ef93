"""Any model whose tokenizer ships a chat template (most modern instruct models), and the
registry's own `chat_template:` over any adapter (`TemplatePrompts`).

Message content is text, never markup: content that spells one of the tokenizer's special
tokens (`<|end|>`, `<|system|>`) is tokenized as the characters it is, while the template's
own markup keeps its special tokens. Such content is rendered around: the template is
rendered with a placeholder for each message's content, its markup split at its special
tokens (placed by id), and the text between them, content included, tokenized with special
tokens split. Content that spells no special token takes the plain path (render, then
tokenize), which is what the model was trained on, token for token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from adapters.base import Message, Prompt, TransformersAdapter

# Private-use characters: no template writes them, so they mark where each content goes.
_SLOT = re.compile("\ue000([0-9]+)\ue001")


class TemplatePrompts:
    """Chat prompts rendered by a Jinja chat template over an adapter's tokenizer: the
    tokenizer's own (`template=None`) or one given by the registry. Everything else (stop
    tokens, decoding, loading) stays the adapter's."""

    def __init__(self, adapter: TransformersAdapter, template: str | None = None) -> None:
        self.adapter = adapter
        self.template = template
        self._specials: re.Pattern[str] | None = None

    def chat_prompt(self, messages: Sequence[Message]) -> Prompt:
        if self.template is None and not getattr(self.adapter.tokenizer, "chat_template", None):
            raise ValueError(
                "this model's tokenizer has no chat template; use /v1/completions, "
                "or pick the adapter of its model family in models.yaml"
            )
        specials = self.special_tokens()
        if not any(specials.search(m["content"]) for m in messages):
            text = self.render(messages)
            # Only the template's markup can spell special tokens here, and they are meant.
            # Templates already carry BOS; tokenizing with special tokens added would double it.
            return Prompt(self.adapter.encode(text, add_special_tokens=False, literal=False), text)
        return self.literal_prompt(messages)

    def render(self, messages: Sequence[Message]) -> str:
        from jinja2 import TemplateError

        try:
            text = self.adapter.tokenizer.apply_chat_template(
                [dict(m) for m in messages],
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=True,
            )
        except TemplateError as exc:  # the template refuses the conversation (raise_exception)
            raise ValueError(f"the chat template refused these messages: {exc}") from exc
        return str(text)

    def literal_prompt(self, messages: Sequence[Message]) -> Prompt:
        """The prompt with every message's content tokenized as literal text."""
        slots = [{**m, "content": f"\ue000{i}\ue001"} for i, m in enumerate(messages)]
        pieces = _SLOT.split(self.render(slots))
        if len(pieces) // 2 < sum(1 for m in messages if m["content"]):
            raise ValueError(
                "this model's chat template rewrites message content, so content that "
                "spells a special token cannot be kept as text; remove the special token"
            )
        encode = self.adapter.encode
        ids: list[int] = []
        text, pending = "", ""
        for index, piece in enumerate(pieces):
            if index % 2:  # a slot: the content, all text
                content = messages[int(piece)]["content"]
                pending += content
                text += content
                continue
            text += piece
            for place, part in enumerate(self.special_tokens().split(piece)):
                if place % 2:  # the template's own special token, placed by id
                    ids += [*encode(pending, literal=True), self.token_id(part)]
                    pending = ""
                else:
                    pending += part
        ids += encode(pending, literal=True)
        return Prompt(ids, text)

    def special_tokens(self) -> re.Pattern[str]:
        """A pattern matching any special token of the tokenizer (longest first), captured."""
        if self._specials is None:
            tokenizer = self.adapter.tokenizer
            tokens = {str(t) for t in tokenizer.all_special_tokens}
            decoder: dict[int, Any] = getattr(tokenizer, "added_tokens_decoder", {})
            tokens |= {str(t.content) for t in decoder.values() if getattr(t, "special", False)}
            ordered = sorted((t for t in tokens if t), key=len, reverse=True)
            alternatives = "|".join(map(re.escape, ordered)) or "(?!)"  # none: never matches
            self._specials = re.compile(f"({alternatives})")
        return self._specials

    def token_id(self, token: str) -> int:
        return int(self.adapter.tokenizer.convert_tokens_to_ids(token))


class ChatTemplateAdapter(TransformersAdapter):
    name: ClassVar[str] = "chat_template"
    _prompts: TemplatePrompts | None = None

    def chat_prompt(self, messages: Sequence[Message]) -> Prompt:
        return self.prompts.chat_prompt(messages)

    @property
    def prompts(self) -> TemplatePrompts:
        if self._prompts is None:
            self._prompts = TemplatePrompts(self)
        return self._prompts

    def literal_prompt(self, messages: Sequence[Message]) -> Prompt:
        return self.prompts.literal_prompt(messages)

    def token_id(self, token: str) -> int:
        return self.prompts.token_id(token)
