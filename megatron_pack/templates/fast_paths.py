"""The token-level fast paths ``llama3`` and ``chatml``: the published templates they follow
(``builtin_templates.FAST_PATH_REFERENCES``), rendered by token instead of through Jinja, with
equal ids, masks and turns (tested against transformers).

Rendering by token encodes each message text on its own. That equals tokenizing the whole
rendered chat only where the text cannot merge with what surrounds it, so a chat is handed to the
Jinja path with the reference template (same options) when a message

- spells an added token (``"<|eot_id|>"`` typed by a user): where transformers cuts such text is
  its rule (``sanitize_control_tokens``), implemented once, in the Jinja path; or
- (``chatml``) starts with whitespace or a combining mark, which would join the header's newline
  (``"user\\n" + "\\n12345"`` is one ``"\\n\\n"`` piece in the whole chat). ``llama3`` trims.

Ordinary chats never pay for Jinja: the reference template is compiled on first need.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

from megatron_pack.templates.base import ChatTemplate, Rendered, add_turn
from megatron_pack.templates.jinja_template import JinjaTemplate, token_alternation
from megatron_pack.templates.messages import Message


class FastPath(ChatTemplate):
    """Shared: the check that sends a chat to the Jinja path, and that path built on first use."""

    def __init__(self, tokenizer, **jinja_options):
        super().__init__(tokenizer)
        self.jinja_options = jinja_options
        self._added_re = token_alternation(t for t, _ in tokenizer.added_tokens())
        self._jinja = None

    def needs_jinja(self, messages: Sequence[Message]) -> bool:
        added = self._added_re
        return added is not None and any(added.search(m.content) for m in messages)

    def render(self, messages, tools=None) -> Rendered:
        if self.needs_jinja(messages):
            return self.jinja().render(self.jinja_messages(messages), tools=tools)
        return self.render_tokens(messages)

    def render_tokens(self, messages) -> Rendered:
        raise NotImplementedError

    def jinja_messages(self, messages):
        return messages

    def jinja(self) -> JinjaTemplate:
        """The reference template on the Jinja path, with this template's options."""
        if self._jinja is None:
            from megatron_pack.templates.builtin_templates import FAST_PATH_REFERENCES

            self._jinja = JinjaTemplate(self.tok, FAST_PATH_REFERENCES[self.name], **self.jinja_options)
        return self._jinja

    def finish(self, rendered: list) -> list:
        return self._jinja.finish(rendered) if self._jinja is not None else rendered


class Llama3Template(FastPath):
    """``<|begin_of_text|>`` then ``<|start_header_id|>role<|end_header_id|>\\n\\n content<|eot_id|>``
    per message; content is trimmed as in Meta's template. Tool results use the
    ``ipython`` role (Llama 3.1+)."""

    name = "llama3"

    def __init__(self, tokenizer, tool_role: str = "ipython", **jinja_options):
        super().__init__(tokenizer, **jinja_options)
        self.tool_role = tool_role
        self.bos = self._special("<|begin_of_text|>")
        self.eot = (self._special("<|eot_id|>"),)
        start, end = self._special("<|start_header_id|>"), self._special("<|end_header_id|>")
        names = {"system": "system", "user": "user", "assistant": "assistant", "tool": tool_role}
        self.headers = {
            role: (start,) + tokenizer.encode_cached(name) + (end,) + tokenizer.encode_cached("\n\n")
            for role, name in names.items()
        }

    def render_tokens(self, messages):
        out = Rendered()
        for i, m in enumerate(messages):
            header = self.headers[m.role]
            add_turn(out, i, m.role, (self.bos,) + header if i == 0 else header, m.content.strip(), self.eot)
        return out

    def jinja_messages(self, messages):
        # Meta's 3.0 template prints the role as given: name tool results as this path does.
        return [Message(self.tool_role, m.content, m.extra) if m.role == "tool" else m for m in messages]

    def jinja(self):
        template = super().jinja()
        template.kwargs["bos_token"] = "<|begin_of_text|>"  # this path's BOS, whatever the config names
        return template


class ChatMLTemplate(FastPath):
    """``<|im_start|>role\\n content<|im_end|>\\n`` per message; no BOS. The newline after
    ``<|im_end|>`` is not trained: generation stops at ``<|im_end|>``."""

    name = "chatml"

    def __init__(self, tokenizer, **jinja_options):
        super().__init__(tokenizer, **jinja_options)
        start = self._special("<|im_start|>")
        self.end = (self._special("<|im_end|>"),)
        self.headers = {
            r: (start,) + tokenizer.encode_cached(r + "\n") for r in ("system", "user", "assistant", "tool")
        }
        self.newline = tokenizer.encode_cached("\n")

    def needs_jinja(self, messages):
        for m in messages:
            first = m.content[:1]
            if first and (first.isspace() or unicodedata.combining(first)):
                return True
        return super().needs_jinja(messages)

    def render_tokens(self, messages):
        out = Rendered()
        for i, m in enumerate(messages):
            add_turn(out, i, m.role, self.headers[m.role], m.content, self.end, after=self.newline)
        return out
