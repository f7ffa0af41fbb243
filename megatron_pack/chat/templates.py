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

Registry: ``llama3``, ``llama2`` (``[INST]``), ``chatml`` and ``jinja`` (the tokenizer
directory's own ``chat_template``, rendered incrementally so masks stay exact).
"""

from __future__ import annotations

import re
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
        pass

    def render(self, messages: Sequence[Message]) -> Rendered:
        raise NotImplementedError


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

    def render(self, messages):
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

    def render(self, messages):
        out = Rendered()
        for i, m in enumerate(messages):
            is_assistant = m.role == "assistant"
            out.add(self.headers[m.role], False, i)
            out.add(m.content, is_assistant, i)
            out.add(self.end, is_assistant, i)
            out.add(self.newline, False, i)
        return out


class Llama2Template(ChatTemplate):
    """Meta's Llama-2 chat format, one ``<s>[INST] user [/INST] answer </s>`` per exchange;
    the system prompt goes inside the first ``[INST]`` between ``<<SYS>>`` markers. Needs
    strict user/assistant alternation and has no tool role."""

    name = "llama2"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise TokenizerError(f"{tokenizer.path}: the llama2 template needs BOS and EOS tokens")
        self.bos, self.eos = (tokenizer.bos_id,), (tokenizer.eos_id,)
        # SentencePiece puts a word-start marker on every encoded text, which stands for the
        # space in "[/INST] answer"; byte-level BPE needs the space spelled out.
        self.answer_prefix = "" if tokenizer.adds_prefix_space else " "

    def validate(self, messages):
        body = messages[1:] if messages[0].role == "system" else messages
        for i, m in enumerate(body):
            if m.role == "tool":
                raise RecordError("tool_unsupported", "the llama2 template has no tool role")
            want = "user" if i % 2 == 0 else "assistant"
            if m.role != want:
                raise RecordError(
                    "not_alternating", f"llama2 needs user/assistant alternation; turn {i} is {m.role}, expected {want}"
                )

    def render(self, messages):
        out = Rendered()
        offset = 1 if messages[0].role == "system" else 0
        system = messages[0].content.strip() if offset else None
        for i in range(offset, len(messages)):
            m = messages[i]
            if m.role == "user":
                text = m.content.strip()
                if system is not None and i == offset:
                    text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text}"
                out.add(self.bos, False, i)
                out.add(f"[INST] {text} [/INST]", False, i)
            else:
                out.add(self.answer_prefix + m.content.strip(), True, i)
                out.add(self.eos, True, i)
        return out


class JinjaTemplate(ChatTemplate):
    """The tokenizer's own Jinja ``chat_template``, applied so the mask is exact.

    Rendering is incremental: the string for messages[:k] must be a prefix of the one for
    messages[:k+1]; each difference is one message turn. For an assistant turn the prompt
    part comes from rendering messages[:k] with ``add_generation_prompt=True``; everything
    after it (content and end-of-turn tokens) is trained. Template text is split on the
    tokenizer's special-token strings so those become single ids; the message content is
    located in its turn and kept as plain text, so content that merely looks like a
    special token is never turned into one.
    """

    name = "jinja"

    def __init__(self, tokenizer, source: Optional[str] = None):
        super().__init__(tokenizer)
        source = source or tokenizer.chat_template
        if not source:
            raise TokenizerError(f"{tokenizer.path}: tokenizer has no chat_template for the jinja template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise RecordError("template_error", str(message))

        def strftime_now(fmt):
            # Fixed date: output must not depend on when preprocessing ran.
            import datetime

            return datetime.date(2024, 7, 26).strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
        self.template = env.from_string(source)
        specials = [s for s in tokenizer.special_tokens if s]
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def _render(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.tok.bos_token or "",
                eos_token=self.tok.eos_token or "",
                date_string="26 Jul 2024",
            )
        except RecordError:
            raise
        except Exception as exc:
            raise RecordError("template_error", f"chat_template failed: {exc}") from None

    def _template_text(self, text: str, out: Rendered, trained: bool, msg: int):
        pieces = self._special_re.split(text) if self._special_re else [text]
        for j, piece in enumerate(pieces):
            if j % 2:  # odd positions are the captured special tokens
                out.add((self.tok.token_id(piece),), trained, msg)
            elif piece:
                out.add(self.tok.encode_cached(piece), trained, msg)

    def _turn(self, text: str, content: str, out: Rendered, trained: bool, msg: int):
        """Template text around the message content, content kept as plain text."""
        for needle in (content, content.strip()):
            # rfind: the content follows any header text that might repeat it.
            at = text.rfind(needle)
            if needle and at >= 0:
                self._template_text(text[:at], out, trained, msg)
                out.add(needle, trained, msg)
                self._template_text(text[at + len(needle):], out, trained, msg)
                return
        raise RecordError("template_error", f"message {msg}: content not found in the rendered chat_template")

    def _check_prefix(self, longer: str, prefix: str, k: int):
        if not longer.startswith(prefix):
            raise RecordError(
                "template_not_incremental", f"chat_template rewrites earlier turns when message {k} is added"
            )

    def render(self, messages):
        out = Rendered()
        done = ""
        for k, m in enumerate(messages):
            if m.role == "assistant":
                prompt = self._render(messages[:k], True)
                self._check_prefix(prompt, done, k)
                self._template_text(prompt[len(done):], out, False, k)
                done = prompt
            full = self._render(messages[: k + 1], False)
            self._check_prefix(full, done, k)
            start = len(out.parts)
            self._turn(full[len(done):], m.content, out, m.role == "assistant", k)
            if m.role == "assistant":
                # Whitespace the template puts after the end-of-turn token is not predicted.
                j = len(out.parts) - 1
                while j >= start and isinstance(out.parts[j], tuple) and all(
                    not self.tok.id_to_piece(t).strip(" \nĠĊ▁") for t in out.parts[j]
                ):
                    out.trained[j] = False
                    j -= 1
            done = full
        return out


TEMPLATES: dict[str, Callable[[BaseTokenizer], ChatTemplate]] = {
    "llama3": Llama3Template,
    "llama2": Llama2Template,
    "chatml": ChatMLTemplate,
    "jinja": JinjaTemplate,
}


def auto_template_name(tokenizer: BaseTokenizer) -> str:
    """The tokenizer's own template when it has one, else guessed from its special tokens."""
    if tokenizer.chat_template:
        return "jinja"
    if tokenizer.has_token("<|start_header_id|>"):
        return "llama3"
    if tokenizer.has_token("<|im_start|>"):
        return "chatml"
    return "llama2"


def build_template(name: str, tokenizer: BaseTokenizer) -> ChatTemplate:
    if name == "auto":
        name = auto_template_name(tokenizer)
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose from auto, {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer)
