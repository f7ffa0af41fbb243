"""Chunk encoding: raw JSONL lines -> token, loss-mask and turn arrays (runs in workers).

A chunk of lines is parsed, validated and rendered by the template; all message texts of
the chunk go through the tokenizer in *one* batch call, and the token/mask arrays are
assembled with numpy over the whole chunk (no per-token Python work). Over-long
conversations are then handled one by one by the overlong policy.

Output per chunk, flat so it pickles cheaply between processes::

    tokens   int32  [T]      all documents back to back
    mask     uint8  [T]
    doc_off  int64  [D+1]    document d is tokens[doc_off[d]:doc_off[d+1]]
    turns    int32  [U]      turn starts, relative to their document
    turn_off int64  [D+1]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import chain
from typing import Optional, Sequence

import numpy as np

from megatron_pack.preprocess.overlong import OVERLONG_POLICIES, Outcome, overlong_policy
from megatron_pack.preprocess.schema import normalize_record, record_tools
from megatron_pack.templates.base import ChatTemplate, Rendered
from megatron_pack.templates.messages import Message, RecordError

MAX_REJECT_RECORD_CHARS = 4000


# -- loss-mask policies: per part, is it trained? ------------------------------------------
def _assistant(r: Rendered) -> list:
    return r.trained


def _last_assistant(r: Rendered) -> list:
    last = max((m for m, t in zip(r.msg, r.trained) if t), default=-1)
    return [t and m == last for t, m in zip(r.trained, r.msg)]


def _all(r: Rendered) -> list:
    return [True] * len(r.parts)


LOSS_POLICIES = {"assistant": _assistant, "last": _last_assistant, "all": _all}


@dataclass
class Reject:
    file: str
    line: int
    reason: str
    message: str
    record: str

    def as_json(self) -> dict:
        return {"file": self.file, "line": self.line, "reason": self.reason, "message": self.message,
                "record": self.record}

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.message}"


@dataclass
class ChunkResult:
    tokens: np.ndarray
    mask: np.ndarray
    doc_off: np.ndarray
    turns: np.ndarray
    turn_off: np.ndarray
    read: int = 0
    rejects: list = field(default_factory=list)
    schemas: dict = field(default_factory=dict)
    overlong: dict = field(default_factory=dict)


@dataclass
class Conversation:
    file: str
    line: int
    messages: list
    rendered: Rendered


def assemble(rendered: Sequence[Rendered], encoded: Sequence[list], loss_on: str):
    """Flat tokens/mask/doc offsets/turns for rendered conversations, given the encodings
    of their string parts in order."""
    policy = LOSS_POLICIES[loss_on]
    enc = iter(encoded)
    parts, flags, new_turn, conv_parts = [], [], [], []
    for r in rendered:
        parts.extend(p if isinstance(p, tuple) else next(enc) for p in r.parts)
        flags.extend(policy(r))
        prev = None
        for m in r.msg:
            new_turn.append(m != prev)
            prev = m
        conv_parts.append(len(r.parts))
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    total = int(lengths.sum())
    tokens = np.fromiter(chain.from_iterable(parts), dtype=np.int32, count=total)
    mask = np.repeat(np.asarray(flags, dtype=np.uint8), lengths)
    part_start = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=part_start[1:])
    conv_first_part = np.zeros(len(rendered) + 1, dtype=np.int64)
    np.cumsum(conv_parts, out=conv_first_part[1:])
    doc_off = part_start[conv_first_part]
    # Turn starts: parts whose message differs from the previous part's, made relative to
    # their conversation; a zero-length part never starts a turn because add() skips it.
    is_start = np.asarray(new_turn, dtype=bool)
    conv_of_part = np.repeat(np.arange(len(rendered)), conv_parts)
    turns = (part_start[:-1][is_start] - doc_off[conv_of_part[is_start]]).astype(np.int32)
    turn_off = np.zeros(len(rendered) + 1, dtype=np.int64)
    np.cumsum(np.bincount(conv_of_part[is_start], minlength=len(rendered)), out=turn_off[1:])
    return tokens, mask, doc_off, turns, turn_off


class ChunkEncoder:
    """Everything a worker needs; built once per process."""

    def __init__(self, tokenizer, template: ChatTemplate, loss_on: str, max_seq_length: Optional[int],
                 overlong: str):
        if loss_on not in LOSS_POLICIES:
            raise ValueError(f"unknown loss policy {loss_on!r}; choose from {', '.join(LOSS_POLICIES)}")
        overlong = overlong_policy(overlong)
        self.tok = tokenizer
        self.template = template
        self.loss_on = loss_on
        self.max_len = max_seq_length
        self.overlong = OVERLONG_POLICIES[overlong]()

    def parse(self, file: str, line: int, raw: bytes):
        """(schema, messages, rendered) or raises RecordError."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordError("invalid_utf8", f"invalid UTF-8 at byte {exc.start}") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError("malformed_json", f"{exc.msg} at column {exc.colno}") from None
        except RecursionError:
            raise RecordError("malformed_json", "nested too deeply to parse") from None
        except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
            raise RecordError("malformed_json", str(exc).splitlines()[0][:200]) from None
        schema, messages = normalize_record(record)
        tools = record_tools(record)
        self.template.validate(messages)
        rendered = self.template.render(messages, tools=tools)
        rendered.tools = tools  # split-chat re-renders pieces with them
        return schema, messages, rendered

    def render_messages(self, messages: list[Message], tools=None):
        """Tokens, mask and turns of one message list (the over-long policies re-render pieces)."""
        rendered = self.template.render(messages, tools=tools)
        tokens, mask, _, turns, _ = self.encode_rendered([rendered])
        return tokens, mask, turns

    def encode_rendered(self, rendered: Sequence[Rendered]):
        rendered = self.template.finish(list(rendered))
        texts = [p for r in rendered for p in r.parts if isinstance(p, str)]
        return assemble(rendered, self.tok.encode_batch(texts), self.loss_on)

    def __call__(self, lines: Sequence[tuple[str, int, bytes]]) -> ChunkResult:
        convs, rejects, schemas = [], [], {}
        for file, line, raw in lines:
            if not raw.strip():
                continue  # blank lines are not records
            try:
                schema, messages, rendered = self.parse(file, line, raw)
            except Exception as err:  # one record never stops the run: every failure is a reject
                reason, detail = ((err.reason, err.detail) if isinstance(err, RecordError)
                                  else ("invalid_record", f"{type(err).__name__}: {str(err)[:200]}"))
                record = raw.decode("utf-8", errors="replace").rstrip("\n")[:MAX_REJECT_RECORD_CHARS]
                rejects.append(Reject(file, line, reason, detail, record))
                continue
            schemas[schema] = schemas.get(schema, 0) + 1
            convs.append(Conversation(file, line, messages, rendered))
        read = len(convs) + len(rejects)
        try:
            tokens, mask, doc_off, turns, turn_off = self.encode_rendered([c.rendered for c in convs])
        except Exception:  # the tokenizer failed on some record: find it, reject it, keep the rest
            convs = self._encodable(convs, rejects)
            tokens, mask, doc_off, turns, turn_off = self.encode_rendered([c.rendered for c in convs])
        result = ChunkResult(tokens, mask, doc_off, turns, turn_off, read, rejects, schemas)
        lengths = np.diff(doc_off)
        over = np.flatnonzero(lengths > self.max_len) if self.max_len else np.empty(0, dtype=np.int64)
        if over.size:
            self._apply_overlong(result, convs, over)
        result.rejects.sort(key=lambda r: (r.file, r.line))
        return result

    def _encodable(self, convs: list, rejects: list) -> list:
        keep = []
        for c in convs:
            try:
                self.encode_rendered([c.rendered])
                keep.append(c)
            except Exception as err:
                rejects.append(Reject(c.file, c.line, "tokenizer_error", f"{type(err).__name__}: {str(err)[:200]}", ""))
        return keep

    def _apply_overlong(self, res: ChunkResult, convs: list, over: np.ndarray):
        """Replace each over-long conversation by the documents its policy returns."""
        docs = []  # (tokens, mask, turns) for every kept document, in order
        over_set = set(over.tolist())
        for i in range(len(convs)):
            a, b = res.doc_off[i], res.doc_off[i + 1]
            t, m = res.tokens[a:b], res.mask[a:b]
            u = res.turns[res.turn_off[i]:res.turn_off[i + 1]]
            if i not in over_set:
                docs.append((t, m, u))
                continue
            res.overlong["over_max"] = res.overlong.get("over_max", 0) + 1
            try:
                outcome = self.overlong.apply(self, convs[i], t, m, u, self.max_len)
            except Exception as err:  # a piece that fails to re-render rejects this record only
                outcome = Outcome(reject="invalid_record", message=f"--overlong {self.overlong.name}: "
                                  f"{type(err).__name__}: {str(err)[:200]}")
            if outcome.reject:
                c = convs[i]
                res.rejects.append(Reject(c.file, c.line, outcome.reject, outcome.message, ""))
            else:
                docs.extend(outcome.docs)
            for key, n in outcome.counts.items():
                res.overlong[key] = res.overlong.get(key, 0) + n
        res.tokens = np.concatenate([d[0] for d in docs]) if docs else np.empty(0, np.int32)
        res.mask = np.concatenate([d[1] for d in docs]) if docs else np.empty(0, np.uint8)
        res.turns = np.concatenate([d[2] for d in docs]) if docs else np.empty(0, np.int32)
        res.doc_off = np.concatenate([[0], np.cumsum([len(d[0]) for d in docs], dtype=np.int64)])
        res.turn_off = np.concatenate([[0], np.cumsum([len(d[2]) for d in docs], dtype=np.int64)])


def encode_conversation(template: ChatTemplate, messages: list[Message], loss_on: str = "assistant",
                        tools=None):
    """(tokens int32, loss_mask uint8, turn_starts int32) of one validated conversation,
    exactly as preprocessing writes it (no over-long handling)."""
    template.validate(messages)
    rendered = template.finish([template.render(messages, tools=tools)])[0]
    texts = [p for p in rendered.parts if isinstance(p, str)]
    tokens, mask, _, turns, _ = assemble([rendered], template.tok.encode_batch(texts), loss_on)
    return tokens, mask, turns
