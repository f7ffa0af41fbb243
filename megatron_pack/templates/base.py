"""Chat templates applied by token.

A template turns messages into *parts*: a tuple of token ids (special tokens and
constant template text, encoded once and cached) or a string of message text that the
tokenizer encodes later in one batch. Special tokens are therefore never produced by
splitting text, and mask boundaries always fall on token boundaries.

Each part carries ``trained`` (part of an assistant reply: its content and its end
token) and ``msg`` (index of the message it belongs to). llama3, a two-turn example::

    parts    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n | "Hi" | <|eot_id|> |
             <|start_header_id|>assistant<|end_header_id|>\\n\\n | "Hello!" | <|eot_id|>
    trained  0                                                        0      0
             0                                                 1        1
    msg      0 ...                                                               1 ...

Implementations: the token-level fast paths (:mod:`~megatron_pack.templates.fast_paths`) and the
Jinja path (:mod:`~megatron_pack.templates.jinja_template`); names in
:mod:`~megatron_pack.templates.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

from megatron_pack.templates.messages import Message, RecordError
from megatron_pack.tokenization.base import BaseTokenizer, TokenizerError

Part = Union[tuple, str]


@dataclass
class Rendered:
    """Template output before text encoding; three parallel lists."""

    parts: list = field(default_factory=list)
    trained: list = field(default_factory=list)
    msg: list = field(default_factory=list)

    def add(self, part: Part, trained: bool, msg: int):
        if isinstance(part, str) and not part:
            return
        if isinstance(part, tuple) and not part:
            return
        self.parts.append(part)
        self.trained.append(trained)
        self.msg.append(msg)


class ChatTemplate:
    """Base: ``validate`` rejects what the format cannot express, ``render`` emits parts."""

    name = "base"

    def __init__(self, tokenizer: BaseTokenizer):
        self.tok = tokenizer

    def _special(self, name: str) -> int:
        if not self.tok.has_token(name):
            raise TokenizerError(
                f"{self.tok.path}: tokenizer has no {name!r} token, which the {self.name} template needs"
            )
        return self.tok.token_id(name)

    def validate(self, messages: Sequence[Message]) -> None:
        for i, m in enumerate(messages):
            if m.extra:
                raise RecordError(
                    "tool_calls_unsupported",
                    f"message {i} has {', '.join(m.extra)}; the built-in "
                    f"{self.name} template renders text only (use the model's Jinja template)",
                )

    def render(self, messages: Sequence[Message], tools=None) -> Rendered:
        raise NotImplementedError

    def finish(self, rendered: list) -> list:
        """Fill in the token parts of rendered conversations (batched); built-ins are done."""
        return rendered


def add_turn(out: Rendered, msg: int, role: str, header: Part, content: Part, end: tuple, after: Part = ()):
    """One message, by the end-of-turn rule every template here follows (transformers' assistant
    mask; the Jinja path derives the same spans from the text in ``jinja_render.derive_spans``):
    the header is never trained; an assistant reply's content *and its end-of-turn token* are,
    so the model learns to stop; what follows the end token (ChatML's newline) is not."""
    trained = role == "assistant"
    out.add(header, False, msg)
    out.add(content, trained, msg)
    out.add(end, trained, msg)
    out.add(after, False, msg)
