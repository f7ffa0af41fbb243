"""What to do with a conversation longer than ``--max-seq-length``: one class per policy.

- ``truncate``: keep the first N tokens (turn starts past N are dropped);
- ``drop``: reject it (counted as ``overlong``);
- ``split-chat``: cut between exchanges (an exchange starts at a user message) and
  render each group of exchanges as its own conversation, repeating the system prompt,
  so every piece is a well-formed chat with its BOS and headers. Exchanges are grouped
  greedily up to N tokens; a single exchange longer than N is truncated.

Any resulting document without a trained token is left out: it would cost compute and
teach nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from megatron_pack.templates.messages import RecordError


@dataclass
class Outcome:
    docs: list = field(default_factory=list)
    reject: str = ""
    message: str = ""
    counts: dict = field(default_factory=dict)


def truncate(tokens, mask, turns, max_len):
    return tokens[:max_len], mask[:max_len], turns[turns < max_len]


class Truncate:
    name = "truncate"

    def apply(self, encoder, conv, tokens, mask, turns, max_len) -> Outcome:
        doc = truncate(tokens, mask, turns, max_len)
        if not doc[1].any():
            return Outcome(reject="overlong_unsupervised", counts={"unsupervised_after_truncation": 1},
                           message=f"{len(tokens)} tokens > {max_len}; no trained token left after truncation")
        return Outcome(docs=[doc], counts={"truncated": 1})


class Drop:
    name = "drop"

    def apply(self, encoder, conv, tokens, mask, turns, max_len) -> Outcome:
        return Outcome(reject="overlong", message=f"{len(tokens)} tokens > --max-seq-length {max_len}",
                       counts={"dropped": 1})


class SplitChat:
    name = "split-chat"

    @staticmethod
    def _exchanges(messages) -> list[int]:
        """Message index where each exchange starts (after an optional system message)."""
        first = 1 if messages[0].role == "system" else 0
        starts = [i for i in range(first + 1, len(messages)) if messages[i].role == "user"]
        return [first] + starts

    def apply(self, encoder, conv, tokens, mask, turns, max_len) -> Outcome:
        messages = conv.messages
        system = messages[:1] if messages[0].role == "system" else []
        starts = self._exchanges(messages)
        # Token offset of each message's turn, from the first render; messages without
        # tokens of their own (llama2's system) take the next turn's offset.
        turn_msgs = []
        prev = None
        for m in conv.rendered.msg:
            if m != prev:
                turn_msgs.append(m)
                prev = m
        offset_of = {}
        for msg_idx, off in zip(turn_msgs, turns.tolist()):
            offset_of[msg_idx] = off
        bounds = [min((off for mi, off in offset_of.items() if mi >= s), default=len(tokens)) for s in starts]
        bounds.append(len(tokens))
        size = [bounds[e + 1] - bounds[e] for e in range(len(starts))]
        docs, counts = [], {"split": 1}
        e = 0
        while e < len(starts):
            # Greedy group by the lengths measured in the full render, then re-render it; the
            # estimate can be short (a BOS the full render counted in the first exchange is
            # re-added to every piece), so a group that renders too long gives back its last
            # exchange instead of being truncated (which would cut its final end-of-turn token).
            stop, est = e + 1, bounds[0] + size[e]
            while stop < len(starts) and est + size[stop] <= max_len:
                est += size[stop]
                stop += 1
            while True:
                end = starts[stop] if stop < len(starts) else len(messages)
                piece = system + messages[starts[e]:end]
                try:
                    encoder.template.validate(piece)
                    t, m, u = encoder.render_messages(piece, getattr(conv.rendered, "tools", None))
                except RecordError:
                    t = None
                    break
                if len(t) <= max_len or stop - e == 1:
                    break
                stop -= 1
            e = stop
            if t is None:
                counts["pieces_invalid"] = counts.get("pieces_invalid", 0) + 1
                continue
            if len(t) > max_len:  # one exchange alone is too long: keep its head
                t, m, u = truncate(t, m, u, max_len)
                counts["pieces_truncated"] = counts.get("pieces_truncated", 0) + 1
            if not np.any(m):
                counts["pieces_unsupervised"] = counts.get("pieces_unsupervised", 0) + 1
                continue
            docs.append((t, m, u))
        if not docs:
            return Outcome(reject="overlong_unsupervised", counts=counts,
                           message=f"{len(tokens)} tokens > {max_len}; no split piece keeps a trained token")
        counts["split_pieces"] = len(docs)
        return Outcome(docs=docs, counts=counts)


OVERLONG_POLICIES = {p.name: p for p in (Truncate, Drop, SplitChat)}
#: Retired spelling -> policy. ``split-turns`` read too much like the packer's turn cut.
DEPRECATED_OVERLONG = {"split-turns": "split-chat"}


def overlong_policy(name: str) -> str:
    """The canonical preprocess-time policy for ``name`` (a retired spelling is accepted with a
    one-line note on stderr). Compare :func:`megatron_pack.packing.plan.overlong_policy`: the
    packer's ``cut-at-turns`` cuts the stored tokens and re-renders nothing."""
    if name in DEPRECATED_OVERLONG:
        import sys

        print(f"note: --overlong {name} is deprecated; use --overlong {DEPRECATED_OVERLONG[name]}", file=sys.stderr)
        return DEPRECATED_OVERLONG[name]
    if name not in OVERLONG_POLICIES:
        raise ValueError(f"unknown --overlong {name!r}; choose from {', '.join(OVERLONG_POLICIES)}")
    return name
