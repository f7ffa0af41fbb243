"""``--chat-template`` names -> templates, and the ``auto`` rule.

The fast paths ``llama3`` and ``chatml`` (:mod:`~megatron_pack.templates.fast_paths`, tested equal
to the published templates), and the Jinja path (:mod:`~megatron_pack.templates.jinja_template`,
exactly ``apply_chat_template``): ``jinja`` (the tokenizer's own ``chat_template``, the ``auto``
default when it has one) and the published ``llama3.1``, ``llama2``, ``mistral`` (v0.3),
``qwen2.5`` templates.
"""

from __future__ import annotations

from typing import Callable, Optional

from megatron_pack.templates.base import ChatTemplate
from megatron_pack.templates.fast_paths import ChatMLTemplate, Llama3Template
from megatron_pack.tokenization.base import BaseTokenizer


def _jinja(source_name: Optional[str] = None):
    def build(tokenizer, **options):
        from megatron_pack.templates.builtin_templates import KNOWN_TEMPLATES
        from megatron_pack.templates.jinja_template import JinjaTemplate

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
    """``jinja_options`` (:data:`JINJA_OPTIONS`) apply to the Jinja path, and to the fast paths for
    the chats they hand to it."""
    if name == "auto":
        name = auto_template_name(tokenizer)
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; choose from auto, {', '.join(TEMPLATES)}")
    return TEMPLATES[name](tokenizer, **jinja_options)
