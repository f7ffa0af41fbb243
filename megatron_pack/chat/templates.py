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

Registry: the fast paths ``llama3`` and ``chatml`` (tested equal to the published templates),
and the Jinja path (:mod:`megatron_pack.chat.jinja_template`, exactly ``apply_chat_template``):
``jinja`` (the tokenizer's own ``chat_template``, the ``auto`` default when it has one) and the
published ``llama3.1``, ``llama2``, ``mistral`` (v0.3), ``qwen2.5`` templates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from megatron_pack.chat.schema import Message, RecordError
from megatron_pack.chat.tokenizer import BaseTokenizer, TokenizerError

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
            raise TokenizerError(f"{self.tok.path}: tokenizer has no {name!r} token, which the {self.name} template needs")
        return self.tok.token_id(name)

    def validate(self, messages: Sequence[Message]) -> None:
        for i, m in enumerate(messages):
            if m.extra:
                raise RecordError("tool_calls_unsupported", f"message {i} has {', '.join(m.extra)}; the built-in "
                                  f"{self.name} template renders text only (use the model's Jinja template)")

    def render(self, messages: Sequence[Message], tools=None) -> Rendered:
        raise NotImplementedError

    def finish(self, rendered: list) -> list:
        """Fill in the token parts of rendered conversations (batched); built-ins are done."""
        return rendered


class Llama3Template(ChatTemplate):
    """``<|begin_of_text|>`` then ``<|start_header_id|>role<|end_header_id|>\\n\\n content<|eot_id|>``
    per message; content is trimmed as in Meta's template. Tool results use the
    ``ipython`` role (Llama 3.1+)."""

    name = "llama3"

    def __init__(self, tokenizer, tool_role: str = "ipython"):
        super().__init__(tokenizer)
        self.bos = self._special("<|begin_of_text|>")
        self.eot = (self._special("<|eot_id|>"),)
        start, end = self._special("<|start_header_id|>"), self._special("<|end_header_id|>")
        names = {"system": "system", "user": "user", "assistant": "assistant", "tool": tool_role}
        self.headers = {
            role: (start,) + tokenizer.encode_cached(name) + (end,) + tokenizer.encode_cached("\n\n")
            for role, name in names.items()
        }

    def render(self, messages, tools=None):
        out = Rendered()
        for i, m in enumerate(messages):
            header = self.headers[m.role]
            out.add((self.bos,) + header if i == 0 else header, False, i)
            is_assistant = m.role == "assistant"
            out.add(m.content.strip(), is_assistant, i)
            out.add(self.eot, is_assistant, i)
        return out


class ChatMLTemplate(ChatTemplate):
    """``<|im_start|>role\\n content<|im_end|>\\n`` per message; no BOS. The newline after
    ``<|im_end|>`` is not trained: generation stops at ``<|im_end|>``."""

    name = "chatml"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        start = self._special("<|im_start|>")
        self.end = (self._special("<|im_end|>"),)
        self.headers = {r: (start,) + tokenizer.encode_cached(r + "\n") for r in ("system", "user", "assistant", "tool")}
        self.newline = tokenizer.encode_cached("\n")

    def render(self, messages, tools=None):
        out = Rendered()
        for i, m in enumerate(messages):
            is_assistant = m.role == "assistant"
            out.add(self.headers[m.role], False, i)
            out.add(m.content, is_assistant, i)
            out.add(self.end, is_assistant, i)
            out.add(self.newline, False, i)
        return out


def _jinja(source_name: Optional[str] = None):
    def build(tokenizer, **options):
        from megatron_pack.chat.builtin_templates import KNOWN_TEMPLATES
        from megatron_pack.chat.jinja_template import JinjaTemplate

        source = KNOWN_TEMPLATES[source_name] if source_name else None
        template = JinjaTemplate(tokenizer, source, **options)
        if source_name:
            template.name = source_name
        return template

    return build


#: Built-in fast paths (token-level, tested equal to the published templates they follow),
#: published templates rendered by the Jinja path, and ``jinja`` (the tokenizer's own).
TEMPLATES: dict[str, Callable[..., ChatTemplate]] = {
    "llama3": Llama3Template,
    "chatml": ChatMLTemplate,
    "llama3.1": _jinja("llama3.1"),
    "llama2": _jinja("llama2"),
    "mistral": _jinja("mistral"),
    "qwen2.5": _jinja("qwen2.5"),
    "jinja": _jinja(),
}
JINJA_OPTIONS = ("special_as_text", "time_limit_s", "max_chars", "date")


def auto_template_name(tokenizer: BaseTokenizer) -> str:
    """The tokenizer's own template when it has one, else guessed from its special tokens."""
    if tokenizer.chat_template:
        return "jinja"
    if tokenizer.has_token("<|start_header_id|>"):
        return "llama3"
    if tokenizer.has_token("<|im_start|>"):
        return "chatml"
    return "llama2"


def build_template(name: str, tokenizer: BaseTokenizer, **jinja_options) -> ChatTemplate:
    """``jinja_options`` (:data:`JINJA_OPTIONS`) apply to the Jinja-rendered templates only."""
    if name == "auto":
        name = auto_template_name(tokenizer)
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose from auto, {', '.join(TEMPLATES)}")
    if name in ("llama3", "chatml"):
        return TEMPLATES[name](tokenizer)
    return TEMPLATES[name](tokenizer, **jinja_options)
