"""The Jinja chat-template path: render with transformers' environment, tokenize the whole
chat the way transformers does, mask from character spans through token offsets.

ids equal ``tokenizer.apply_chat_template(messages, tools=tools, tokenize=True)``. One
deliberate difference, on by default: message text that spells a control token
(``"<|eot_id|>"`` typed by a user) stays text, as ``apply_chat_template(...,
sanitize_control_tokens=True)`` encodes it; ``special_as_text=False`` gives HF's default
(the text becomes the control token).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Optional

import numpy as np

from megatron_pack.templates.base import ChatTemplate, Rendered
from megatron_pack.templates.jinja_env import (
    DEFAULT_MAX_CHARS,
    DEFAULT_TIME_LIMIT_S,
    TemplateLimitError,
    bounded_environment,
    compile_template,
    render_bounded,
)
from megatron_pack.templates.jinja_render import Placeholders, RenderReject, TextRender, derive_spans, token_flags
from megatron_pack.templates.messages import RecordError
from megatron_pack.tokenization.base import TokenizerError

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class JinjaRendered(Rendered):
    """Rendered before tokenization: ``text`` is filled, ``parts`` after ``finish``."""

    def __init__(self, text_render: TextRender):
        super().__init__()
        self.tr = text_render


def token_alternation(tokens) -> Optional[re.Pattern]:
    """One regex matching any of ``tokens``, longest first (None for none)."""
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _outside(spans: list, slots: list) -> list:
    """The (start, end) spans that overlap no slot; both lists sorted by start."""
    import bisect

    if not spans or not slots:
        return spans
    starts = [s for s, _, _ in slots]
    keep = []
    for a, b in spans:
        i = bisect.bisect_left(starts, b) - 1  # last slot starting before b
        if i >= 0 and slots[i][1] > a:
            continue
        keep.append((a, b))
    return keep


class JinjaTemplate(ChatTemplate):
    name = "jinja"

    def __init__(self, tokenizer, source: Optional[str] = None, special_as_text: bool = True,
                 time_limit_s: float = DEFAULT_TIME_LIMIT_S, max_chars: int = DEFAULT_MAX_CHARS,
                 date: Optional[datetime] = None, verify: Optional[bool] = None):
        super().__init__(tokenizer)
        source = source or tokenizer.chat_template
        if not source:
            raise TokenizerError(f"{tokenizer.path}: tokenizer has no chat_template for the jinja template")
        self.source = source
        from megatron_pack.templates.builtin_templates import PRINT_ONLY

        # verify: render the real chat too and check it against the placeholder render. Off only
        # for published templates known to print message text and nothing else.
        self._unverified_roles = None if verify or source not in PRINT_ONLY else (PRINT_ONLY[source] or ())
        self.special_as_text = special_as_text
        self.time_limit_s, self.max_chars = time_limit_s, max_chars
        self.date = date or datetime.now()
        try:
            env = bounded_environment(max_chars, self.date)
        except ImportError as exc:  # transformers missing, or without the environment we render in
            raise TokenizerError(f"{tokenizer.path}: the Jinja path needs transformers' chat-template "
                                 f"environment: {exc}") from None
        try:
            self.template = compile_template(source, env, time_limit_s)
        except ValueError as exc:
            raise TokenizerError(f"{tokenizer.path}: {exc}") from None
        self.has_generation = bool(_GENERATION_TAG.search(source))
        self.kwargs = dict(tokenizer.template_tokens)
        added = tokenizer.added_tokens()
        self._added_re = token_alternation(t for t, _ in added)
        self._special_re = token_alternation(t for t, special in added if special)
        literal = self._literal_text(env, source)
        control = [t for t, special in added if special or (t in literal and not t.isspace())]
        self._control_re = token_alternation(control)
        self.gen_prompt = self._generation_prompt()

    @staticmethod
    def _literal_text(env, source) -> str:
        """Template text and string constants (transformers' rule for control tokens)."""
        import jinja2

        ast = env.parse(source)
        parts = [n.data for n in ast.find_all(jinja2.nodes.TemplateData)]
        parts += [n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)]
        return "\0".join(parts)

    def _render_text(self, messages, tools, add_generation_prompt=False, tracker=None) -> str:
        return render_bounded(self.template, self.max_chars, self.time_limit_s, tracker=tracker,
                              messages=messages, tools=tools, documents=None,
                              add_generation_prompt=add_generation_prompt, **self.kwargs)

    def _generation_prompt(self) -> str:
        """What ``add_generation_prompt`` appends (the assistant header), from probe chats; ""
        for templates without one (Llama-2, Mistral) or that refuse every probe."""
        probes = ([{"role": "user", "content": "x"}],
                  [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
                  [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "z"}])
        for probe in probes:
            try:
                with_prompt = self._render_text(probe, None, True)
                without = self._render_text(probe, None, False)
            except TemplateLimitError as exc:
                raise TokenizerError(f"{self.tok.path}: chat template {exc} on a short probe chat") from None
            except Exception:
                continue
            return with_prompt[len(without):] if with_prompt.startswith(without) else ""
        return ""

    # -- rendering ---------------------------------------------------------------------
    def validate(self, messages):
        pass

    def render(self, messages, tools=None) -> Rendered:
        import jinja2

        dicts = [m.as_dict() for m in messages]
        ph = Placeholders()
        try:
            masked = [ph.message(d, i) for i, d in enumerate(dicts)]
            masked_tools = ph.strings(tools, None) if tools else tools
            tracker = ([], []) if self.has_generation else None
            rendered = self._render_text(masked, masked_tools, tracker=tracker)
            # Tool schemas and call arguments are usually JSON-encoded by the template: only the
            # verifying render tells which form each string took.
            check = (self._unverified_roles is None or bool(tools)
                     or any(m.role in self._unverified_roles or m.extra for m in messages))
            real = self._render_text(dicts, tools) if check else None
        except RenderReject as exc:
            raise RecordError(exc.reason, exc.detail) from None
        except TemplateLimitError as exc:
            raise RecordError("template_limit", str(exc)) from None
        except jinja2.TemplateError as exc:
            # raise_exception(...) in the template: quote the template's own message.
            raise RecordError("template_error", f"chat_template: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as exc:
            raise RecordError("template_error", f"chat_template failed: {type(exc).__name__}: {exc}") from None
        except MemoryError:
            raise RecordError("template_limit", "rendering the chat template ran out of memory") from None
        if check:
            aligned = ph.align(rendered, real)
            if aligned is None:
                raise RecordError("template_mask_unknown",
                                  "the chat template reads message text (not only prints it), so the assistant spans "
                                  "cannot be located; add {% generation %} markers to the template")
            text, (slots, to_text) = real, aligned
        else:
            text, slots, to_text = ph.substitute(rendered)
        if self.has_generation:
            trained = []
            for s, e in tracker[1]:
                trained.append((to_text(s), to_text(e), -1))
        else:
            trained = None
        specials = ([(m.start(), m.end()) for m in self._special_re.finditer(text)]
                    if self._special_re else [])
        # Occurrences inside message text are not template structure.
        specials = _outside(specials, slots)
        roles = [m.role for m in messages]
        derived, regions = derive_spans(text, slots, specials, self.gen_prompt, roles)
        if trained is None:
            trained = derived
        protect = []
        if self.special_as_text and self._control_re:
            for s, e, _ in slots:
                protect.extend((m.start(), m.end()) for m in self._control_re.finditer(text, s, e))
        return JinjaRendered(TextRender(text, slots, trained, regions, protect))

    # -- tokenization --------------------------------------------------------------------
    def finish(self, rendered):
        todo = [r for r in rendered if isinstance(r, JinjaRendered) and not r.parts]
        if not todo:
            return rendered
        encoded = self.tok.encode_chats([r.tr.text for r in todo], [r.tr.protect for r in todo],
                                        self._added_re, self._control_re)
        for r, (ids, starts, ends) in zip(todo, encoded):
            trained, msg = token_flags(starts, ends, r.tr.trained, r.tr.regions)
            ids = np.asarray(ids, dtype=np.int64)
            if len(ids) == 0:
                continue
            change = np.flatnonzero((trained[1:] != trained[:-1]) | (msg[1:] != msg[:-1])) + 1
            bounds = np.concatenate([[0], change, [len(ids)]])
            for a, b in zip(bounds[:-1], bounds[1:]):
                r.add(tuple(ids[a:b].tolist()), bool(trained[a]), int(msg[a]))
        return rendered
