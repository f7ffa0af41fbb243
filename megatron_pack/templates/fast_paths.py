"""The token-level fast paths ``llama3`` and ``chatml``: the published templates they follow
(``builtin_templates.FAST_PATH_REFERENCES``), rendered by token instead of through Jinja, with
equal ids, masks and turns (tested).
"""

from __future__ import annotations

from megatron_pack.templates.base import ChatTemplate, Rendered, add_turn


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
            add_turn(out, i, m.role, (self.bos,) + header if i == 0 else header, m.content.strip(), self.eot)
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
            add_turn(out, i, m.role, self.headers[m.role], m.content, self.end, after=self.newline)
        return out
