"""One conversation through its Jinja chat template: the exact text, and where every message is.

``apply_chat_template`` gives a string; training also needs to know which characters are the
assistant's. We find out *without searching the text* for the message: the template is rendered
with each message string (content, tool-call names and argument strings, tool schema strings)
replaced by a unique placeholder (private-use characters around an
index, the string's leading/trailing whitespace kept outside so ``trim`` behaves the same), the
placeholders are replaced by the real strings, and the result is checked equal to a render of
the real conversation. Each string's character span is then known exactly. A template that
reads message text (``'</think>' in content``) fails the check; the record is rejected as
``template_mask_unknown`` rather than trained on a guessed mask.

Spans trained for an assistant message (when the template has no ``{% generation %}`` block;
with one, its spans are used, exactly as transformers' ``return_assistant_tokens_mask``)::

    ...user text<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n  Hello!<|eot_id|>
                 └ first special token after the previous message ┘└ generation prompt ┘
                                                                         [trained ........]
    from the end of the generation prompt (or, for templates without one, from the end of the
    first special token after the previous message) to the end of the first special token after
    the message's last string (its end-of-turn token).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

OPEN, CLOSE = "\U000f0000", "\U000f0001"  # supplementary private use: never in real text
_PH = re.compile(OPEN + r"(\d+)" + CLOSE)
_JSON_INERT = re.compile(r"^[A-Za-z0-9_.\-]+$")


class RenderReject(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class TextRender:
    """A rendered conversation before tokenization (character coordinates)."""

    text: str
    slots: list                       # (start, end, msg) of each message string in ``text``
    trained: list                     # (start, end, msg) spans the loss is computed on
    regions: list                     # (start, msg): where each message's turn begins, sorted
    protect: list = field(default_factory=list)  # (start, end) message text holding control-token strings


class Placeholders:
    """Message strings -> placeholders, and back."""

    def __init__(self):
        self.cores: list[str] = []
        self.msgs: list[int] = []

    def put(self, value: str, msg: int) -> str:
        if OPEN in value or CLOSE in value:
            raise RenderReject("reserved_character", "message text contains U+F0000/U+F0001")
        core = value.strip()
        if core:
            lead = value[: len(value) - len(value.lstrip())]
            trail = value[len(value.rstrip()):]
        else:
            lead, trail = value, ""
        self.cores.append(core)
        self.msgs.append(msg)
        return f"{lead}{OPEN}{len(self.cores) - 1}{CLOSE}{trail}"

    def message(self, m: dict, msg: int) -> dict:
        """A copy of message ``m`` with its content and tool-call names as placeholders."""
        out = dict(m)
        if isinstance(m.get("content"), str) and m["content"]:  # "" stays "": templates test it
            out["content"] = self.put(m["content"], msg)
        calls = m.get("tool_calls")
        if isinstance(calls, list):
            new_calls = []
            for call in calls:
                call = dict(call) if isinstance(call, dict) else call
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    fn = dict(fn)
                    if isinstance(fn.get("name"), str) and _JSON_INERT.match(fn["name"]):
                        fn["name"] = self.put(fn["name"], msg)
                    if "arguments" in fn:
                        fn["arguments"] = self.strings(fn["arguments"], msg)
                    call["function"] = fn
                new_calls.append(call)
            out["tool_calls"] = new_calls
        return out

    def strings(self, value, msg: Optional[int]):
        """Every non-empty string value inside ``value`` (dict values, list items) as a
        placeholder; keys and other types unchanged. ``msg`` None: not part of a message
        (the tool schemas), located only so typed control tokens in them stay text."""
        if isinstance(value, str):
            return self.put(value, msg) if value else value
        if isinstance(value, dict):
            return {k: self.strings(v, msg) for k, v in value.items()}
        if isinstance(value, list):
            return [self.strings(v, msg) for v in value]
        return value

    def substitute(self, rendered: str):
        """(text, slots, offset_map): every placeholder replaced by its string as printed. Exact
        for templates that only print message text (see ``builtin_templates.PRINT_ONLY``)."""
        pieces, slots, shift_at, shift_by = [], [], [], []
        pos = out = 0
        for m in _PH.finditer(rendered):
            pieces.append(rendered[pos:m.start()])
            out += m.start() - pos
            k = int(m.group(1))
            core = self.cores[k]
            pieces.append(core)
            slots.append((out, out + len(core), self.msgs[k]))
            out += len(core)
            shift_at.append(m.end())
            shift_by.append(len(core) - (m.end() - m.start()))
            pos = m.end()
        pieces.append(rendered[pos:])
        return "".join(pieces), slots, _offset_map(shift_at, shift_by)

    def align(self, rendered: str, real: str):
        """(slots, offset_map) locating each placeholder's string in ``real``, the render of the
        real conversation, or None when the two renders differ outside the strings.

        Walks both renders together: template text between placeholders must be identical, and
        at a placeholder ``real`` must continue with the string as printed (``core``) or as
        ``tojson`` prints it inside quotes. Positional checks only, no search.
        ``offset_map(x)`` maps a position of ``rendered`` to the same position of ``real``."""
        slots, shift_at, shift_by = [], [], []
        pos = out = 0
        found = list(_PH.finditer(rendered))
        for i, m in enumerate(found):
            seg = m.start() - pos
            if rendered[pos:m.start()] != real[out:out + seg]:
                return None
            out += seg
            core = self.cores[int(m.group(1))]
            # The template text after the placeholder decides between the two forms ("\\" is
            # the printed form of "\" and also starts its JSON form).
            after = rendered[m.end():found[i + 1].start() if i + 1 < len(found) else len(rendered)]
            forms = [core, json.dumps(core, ensure_ascii=False)[1:-1]]
            fits = [f for f in forms if real.startswith(f, out) and real.startswith(after, out + len(f))]
            if not fits:
                return None
            form = fits[0]
            slots.append((out, out + len(form), self.msgs[int(m.group(1))]))
            out += len(form)
            shift_at.append(m.end())
            shift_by.append(len(form) - (m.end() - m.start()))
            pos = m.end()
        if rendered[pos:] != real[out:]:
            return None
        return slots, _offset_map(shift_at, shift_by)


def _offset_map(shift_at, shift_by):
    """Position in the placeholder render -> position in the real one (built on first use:
    only templates with ``{% generation %}`` ask)."""
    cache = []

    def offset_map(x: int) -> int:
        if not cache:
            cache.extend((np.array(shift_at, dtype=np.int64), np.cumsum(shift_by, dtype=np.int64)))
        ends, cum = cache
        i = int(np.searchsorted(ends, x, side="right"))
        return x + (int(cum[i - 1]) if i else 0)

    return offset_map


def _first_special(specials: Sequence[tuple], lo: int, hi: int) -> Optional[tuple]:
    """First (start, end) special-token occurrence with lo <= start and end <= hi."""
    import bisect

    i = bisect.bisect_left(specials, (lo, -1))
    if i < len(specials) and specials[i][1] <= hi:
        return specials[i]
    return None


def _header_before(text: str, header: str, pos: int, floor: int) -> Optional[int]:
    """Where the message text starts if ``header`` ends just before it, allowing for the
    text's own leading whitespace (kept outside the placeholder); None otherwise."""
    k = pos
    while True:
        if k - len(header) >= floor and text.startswith(header, k - len(header)):
            return k
        if k <= floor or not text[k - 1].isspace():
            return None
        k -= 1


def _reply_start(text: str, gen_prompt: str, sp, prev_last: int, first: int) -> Optional[int]:
    """Where an assistant reply's trained span starts; ``sp`` is the first special token after
    the previous message's text (its end token), None if there is none before this text."""
    b = sp[1] if sp else first
    g = b
    while g < first and text[g].isspace():
        g += 1
    if gen_prompt and text.startswith(gen_prompt, g) and g + len(gen_prompt) <= first:
        return g + len(gen_prompt)  # after the assistant header
    if not gen_prompt:  # Llama-2 / Mistral: the reply follows the previous end token directly
        start = b
        if sp is None:  # Llama-2's ' ' + answer: the space is the answer's first token
            while start > prev_last and text[start - 1].isspace():
                start -= 1
        return start
    # The header right before the text (e.g. after a default system prompt), or none: the
    # template used the text elsewhere (Llama-3.1 moves a first message into its tools block)
    # and transformers' markers train nothing of it.
    return _header_before(text, gen_prompt, first, prev_last)


def derive_spans(text: str, slots: list, specials: list, gen_prompt: str, roles: list):
    """(trained spans, turn regions) from the message slots; see the module docstring."""
    first, last = {}, {}
    for s, e, m in slots:
        if m is None:
            continue
        first[m] = min(first.get(m, s), s)
        last[m] = max(last.get(m, e), e)
    order = sorted(first, key=lambda m: (first[m], m))
    ends = {}
    for j, m in enumerate(order):
        nxt = first[order[j + 1]] if j + 1 < len(order) else len(text)
        sp = _first_special(specials, last[m], max(nxt, last[m]))
        ends[m] = sp[1] if sp else last[m]
    regions, trained = [], []
    prev_end = prev_last = 0
    for j, m in enumerate(order):
        boundary = prev_end
        while boundary < first[m] and text[boundary].isspace():
            boundary += 1
        region = boundary if j else 0
        if roles[m] == "assistant":
            sp = _first_special(specials, prev_last, first[m])
            start = _reply_start(text, gen_prompt, sp, prev_last, first[m])
            if start is not None:
                trained.append((start, ends[m], m))
                if sp is None and j:  # no end token between (Llama-2): the turn starts at the answer
                    region = max(region, start)
        regions.append((region, m))
        prev_end, prev_last = ends[m], last[m]
    return trained, regions


def token_flags(starts: np.ndarray, ends: np.ndarray, spans: list, regions: list):
    """Per token: trained (overlaps a span, transformers' rule) and the message of its region."""
    if spans:
        sp = np.array(sorted((s, e) for s, e, _ in spans if e > s), dtype=np.int64).reshape(-1, 2)
    else:
        sp = np.zeros((0, 2), dtype=np.int64)
    idx = np.searchsorted(sp[:, 1], starts, side="right")
    ok = idx < len(sp)
    trained = np.zeros(len(starts), dtype=bool)
    trained[ok] = sp[idx[ok], 0] < ends[ok]
    r_starts = np.array([r[0] for r in regions], dtype=np.int64)
    r_msgs = np.array([r[1] for r in regions], dtype=np.int64)
    if len(r_starts):
        which = np.maximum(np.searchsorted(r_starts, starts, side="right") - 1, 0)
        msg = r_msgs[which]
    else:
        msg = np.zeros(len(starts), dtype=np.int64)
    return trained, msg
