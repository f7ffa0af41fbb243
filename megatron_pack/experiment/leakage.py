"""Does the separator keep packed samples apart without a document mask? Measure it.

A no-mask run sees a packed sequence as one causal document, positions 0..R-1::

    tokens   B a a a E | b b b E | c c E        (B: BOS, E: the separator, the template's end token)
    doc      0 0 0 0 0   1 1 1 1   2 2 2
    start    0           5         9

For every token t of a document after the first (own start s > 0) and every analysed layer
and head, with w the attention row of t:

- ``leak``  = sum of w over tokens 1..s-1: attention on earlier documents, *without* the sink;
- ``sink``  = w on token 0. Pretrained models park attention on the sequence's first token
  whatever it is (the "attention sink"); counted as leakage it would dominate, so it is
  reported apart and compared with ``alone_first``: the share on the document's *own* first
  token when the document is scored alone, where that token is its sink;
- ``uniform`` = s / (t + 1): what uniform attention would put on earlier documents.

All are averaged over heads (per head in the JSON) and bucketed by the distance t - s from
the document's start: the first tokens after a boundary are the suspects.

Loss contamination: each document's mean loss over its supervised tokens (predictions made
inside the document, its trailing separator left out) packed after the others minus alone, in
nats: signed (earlier samples of the same style can act as in-context examples and lower it)
and absolute. Separator variants: ``as-is``; ``removed`` (no separator between documents);
``doubled`` (two). Scored with ``document_mask=True`` (block-diagonal mask, positions restart)
every figure is zero: a check of the measurement, not of the model.

Attention is materialised only inside the analysed layers (eager attention there, the
model's own elsewhere) and reduced to these sums at once; memory is one layer's
``heads x R x R`` for one sequence.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

#: Distance-from-start buckets [lo, hi): single tokens first, then powers of two.
BUCKET_EDGES = (0, 1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 30)
VARIANTS = ("as-is", "removed", "doubled")


def bucket_names() -> list[str]:
    e = BUCKET_EDGES
    return [str(e[i]) if e[i + 1] - e[i] == 1 else f"{e[i]}-{e[i + 1] - 1}" if e[i + 1] < 1 << 30 else f">={e[i]}"
            for i in range(len(e) - 1)]


def bucket_of(distance: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(BUCKET_EDGES), distance, side="right") - 1


@dataclass
class Packed:
    """One packed sequence: tokens, supervised flags, and each document's span and scored core."""

    tokens: np.ndarray  # [R] int64
    supervised: np.ndarray  # [R] bool: the token is a training target
    starts: np.ndarray  # [D] start of each document in the sequence
    ends: np.ndarray  # [D]
    core_ends: np.ndarray  # [D] end of the scored part (trailing separators excluded)

    def doc_of_token(self) -> np.ndarray:
        return np.repeat(np.arange(self.starts.size), self.ends - self.starts)


def assemble(docs: list, separator: int | None, variant: str = "as-is") -> Packed:
    """``docs``: ``(tokens, supervised)`` per document, in order. ``variant`` changes the
    separators *between* documents (the last document keeps its own)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    toks, sup, starts, ends, cores, pos = [], [], [], [], [], 0
    for k, (t, m) in enumerate(docs):
        t, m = np.asarray(t, np.int64), np.asarray(m, bool)
        core = len(t)
        while separator is not None and core > 1 and t[core - 1] == separator:
            core -= 1
        if k < len(docs) - 1 and separator is not None:
            if variant == "removed":
                t, m = t[:core], m[:core]
            elif variant == "doubled":
                t, m = np.append(t, separator), np.append(m, m[-1] if len(m) else False)
        starts.append(pos)
        cores.append(pos + core)
        pos += len(t)
        ends.append(pos)
        toks.append(t)
        sup.append(m)
    return Packed(np.concatenate(toks), np.concatenate(sup), np.asarray(starts), np.asarray(ends), np.asarray(cores))


def attention_mask(starts, ends, length: int, document_mask: bool, dtype=torch.float32) -> torch.Tensor:
    """Additive ``[1, 1, R, R]`` mask: causal, and block-diagonal with ``document_mask``."""
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    if document_mask:
        doc = torch.from_numpy(np.repeat(np.arange(len(starts)), np.asarray(ends) - np.asarray(starts)))
        allowed &= doc[:, None] == doc[None, :]
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def position_ids(starts, ends, document_mask: bool) -> torch.Tensor:
    R = int(ends[-1])
    pos = np.arange(R)
    if document_mask:
        pos = pos - np.repeat(np.asarray(starts), np.asarray(ends) - np.asarray(starts))
    return torch.from_numpy(pos)[None]


class AttentionStats:
    """Running sums per (layer, head, distance bucket) of leak, sink, uniform and alone-first."""

    def __init__(self, layers: list[int], num_heads: int):
        nb = len(BUCKET_EDGES) - 1
        self.layers = list(layers)
        z = lambda: np.zeros((len(layers), num_heads, nb))  # noqa: E731
        self.leak, self.sink, self.alone_first = z(), z(), z()
        self.count = np.zeros(nb)  # packed tokens per bucket (documents after the first)
        self.alone_count = np.zeros(nb)
        self.uniform = np.zeros(nb)

    def add_packed(self, li: int, w: torch.Tensor, packed: Packed) -> None:
        """``w``: ``[H, R, R]`` attention probabilities of layer ``self.layers[li]``."""
        doc = packed.doc_of_token()
        s = packed.starts[doc]
        t = np.flatnonzero(s > 0)
        if t.size == 0:
            return
        s_t = torch.from_numpy(s[t])
        rows = w[:, torch.from_numpy(t)].double()  # [H, T, R]
        before = rows.cumsum(-1).gather(-1, (s_t - 1).expand(rows.shape[0], -1)[..., None])[..., 0]
        sink = rows[..., 0]
        b = bucket_of(t - s[t])
        for arr, vals in ((self.leak, (before - sink).numpy()), (self.sink, sink.numpy())):
            np.add.at(arr[li], (slice(None), b), vals)
        if li == 0:
            np.add.at(self.count, b, 1)
            np.add.at(self.uniform, b, s[t] / (t + 1))

    def add_alone(self, li: int, w: torch.Tensor) -> None:
        """A document scored alone: share on its own first token, tokens 1..R-1."""
        t = np.arange(1, w.shape[-1])
        if t.size == 0:
            return
        np.add.at(self.alone_first[li], (slice(None), bucket_of(t)), w[:, 1:, 0].double().numpy())
        if li == 0:
            np.add.at(self.alone_count, bucket_of(t), 1)

    def summary(self) -> dict:
        div = lambda a, c: np.where(c > 0, a / np.maximum(c, 1), np.nan)  # noqa: E731
        leak, sink = div(self.leak, self.count), div(self.sink, self.count)
        alone = div(self.alone_first, self.alone_count)
        tot = lambda a: a.sum(-1) / max(1.0, self.count.sum())  # token-weighted over buckets  # noqa: E731
        return {
            "layers": self.layers,
            "buckets": bucket_names(),
            "tokens_per_bucket": self.count.tolist(),
            "uniform": div(self.uniform, self.count).tolist(),
            "leak": leak.mean(1).tolist(),
            "sink": sink.mean(1).tolist(),
            "alone_first": alone.mean(1).tolist(),
            "leak_overall": tot(self.leak).mean(-1).tolist(),
            "sink_overall": tot(self.sink).mean(-1).tolist(),
            "per_head": {"leak": leak.tolist(), "sink": sink.tolist(), "alone_first": alone.tolist()},
        }


#: The attention the leakage models are loaded with (``from_pretrained(attn_implementation=...)``),
#: run in every layer not measured and put back after :func:`capture_attention`.
LOADED_ATTENTION = "sdpa"
#: The name :func:`capture_attention` registers its attention function under (transformers'
#: public ``AttentionInterface``).
CAPTURE_ATTENTION = "megatron_pack_leakage_capture"


@contextmanager
def capture_attention(model, layers: list[int], sink):
    """Eager attention in ``layers`` only (eager is what returns the probabilities), the loaded
    sdpa elsewhere; ``sink(layer_pos, probs [H, R, R])`` gets each measured layer's. Done with
    transformers' public API: an attention function registered in ``AttentionInterface`` and
    ``model.set_attn_implementation``. Run the model through :func:`forward_nll` (explicit 4D
    mask, which transformers passes through as it is) inside it."""
    import sys

    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    blocks = model.model.layers
    measured = {id(blocks[layer].self_attn): li for li, layer in enumerate(layers)}

    def attention(module, query, key, value, attention_mask, **kwargs):
        li = measured.get(id(module))
        if li is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        eager = sys.modules[type(module).__module__].eager_attention_forward  # the model family's own
        out, probs = eager(module, query, key, value, attention_mask, **kwargs)
        sink(li, probs[0].float())
        return out, probs

    AttentionInterface.register(CAPTURE_ATTENTION, attention)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(CAPTURE_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(LOADED_ATTENTION)


def forward_nll(model, p: Packed, document_mask: bool, device="cpu") -> torch.Tensor:
    """Per-position next-token loss ``[R - 1]`` (position p predicts token p + 1).

    Always with an explicit 4D mask: the eager layers of :func:`capture_attention` must not
    depend on the mask format the model's own attention implementation would build."""
    ids = torch.as_tensor(p.tokens, dtype=torch.long, device=device)[None]
    mask = attention_mask(p.starts, p.ends, int(p.ends[-1]), document_mask)
    pos = position_ids(p.starts, p.ends, document_mask)
    out = model(input_ids=ids, position_ids=pos.to(device), attention_mask=mask.to(device))
    logits = out.logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none").cpu()


def _doc_losses(nll: torch.Tensor, p: Packed, offset_docs: int = 0) -> list:
    """Mean loss of each document over its scored targets: tokens start+1..core_end-1 that are
    supervised (a prediction from inside the document); None when it has none."""
    out = []
    for k in range(offset_docs, p.starts.size):
        tgt = np.arange(p.starts[k] + 1, p.core_ends[k])
        tgt = tgt[p.supervised[tgt]]
        out.append(float(nll[tgt - 1].mean()) if tgt.size else None)
    return out


@torch.no_grad()
def analyze_sequences(
    model, sequences: list, separator: int | None, layers: list[int], *, document_mask: bool = False, device="cpu"
) -> dict:
    """``sequences``: lists of ``(tokens, supervised)`` documents, packed in that order.
    Returns ``{"attention": AttentionStats.summary(), "contamination": {variant: [...]}}``."""
    model.eval()
    stats = AttentionStats(layers, model.config.num_attention_heads)
    contamination = {v: [] for v in VARIANTS}
    for docs in sequences:
        alone = []
        for t, m in docs[1:]:
            p1 = assemble([(t, m)], separator)
            current = lambda li, w: stats.add_alone(li, w)  # noqa: E731
            with capture_attention(model, layers, current):
                nll = forward_nll(model, p1, False, device)
            alone.append(_doc_losses(nll, p1)[0])
        for variant in VARIANTS:
            p = assemble(docs, separator, variant)
            if variant == "as-is":
                with capture_attention(model, layers, lambda li, w: stats.add_packed(li, w, p)):
                    nll = forward_nll(model, p, document_mask, device)
            else:
                nll = forward_nll(model, p, document_mask, device)
            for a, b in zip(_doc_losses(nll, p, 1), alone):
                if a is not None and b is not None:
                    contamination[variant].append(a - b)
    return {"attention": stats.summary(), "contamination": {v: summarize(x) for v, x in contamination.items()}}


def summarize(values: list) -> dict:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return {"documents": 0}
    q = np.percentile(x, [5, 50, 95])
    return {
        "documents": int(x.size),
        "mean": float(x.mean()),
        "mean_abs": float(np.abs(x).mean()),
        "max_abs": float(np.abs(x).max()),
        "p5": float(q[0]),
        "p50": float(q[1]),
        "p95": float(q[2]),
        "values": x.tolist(),
    }
