"""The rows the isolation audit runs: packed micro-batches of the run's own plan, their
documents, and the rows derived from them (one document replaced, one document alone).

A THD micro-batch of two rows of S = 8 (``micro_batch_size`` 2), documents a, b, c, d::

    tokens     a a a b b c c . | d d d d . . . .      global positions 0..15
    documents  (0,3) (3,5) (5,7)   (8,12)              real-token spans [start, end)
    parity     0     1     0       0                   index of the document in its row, mod 2

    perturbed, parity 0:  x x x b b y y . | z z z z . . . .   (random ids, same lengths)
        -> b's per-token loss must not move
    alone (reference) for b:  b b . . . . . . | . . . . . . . .
        -> b's per-token loss must equal its loss in the packed row

With context parallelism every document keeps its padded span (a multiple of 2*CP), so its
chunks land on the same CP ranks in the packed row and alone. Only the document's own
tokens (and, under CP, its padding) move; labels and the loss mask travel with them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_pack.data.collate import collate_thd
from megatron_pack.data.context_parallel import padded_lengths, rank_token_index

MIN_DOCS = 3  # documents per audited row: two boundaries, one document with neighbours on both sides


@dataclass(frozen=True)
class Doc:
    """One document of an audited micro-batch: its real tokens ``[start, end)`` and its padded
    span ``[start, pend)`` in the global (pre-CP-split) micro-batch row."""

    row: int
    index: int  # position of the document in its row
    start: int
    end: int
    pend: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class AuditBatch:
    """A collated THD micro-batch and where its documents are."""

    batch: dict
    docs: list
    built: bool = False  # rows built from conversations (the plan had too few rows of MIN_DOCS documents)
    source: list = field(default_factory=list)  # the served indices of the rows, or conversation ids when built

    @property
    def total(self) -> int:
        return int(self.batch["tokens"].numel())

    def owner(self) -> torch.Tensor:
        """Document id (index into ``docs``) of every global position; -1 outside documents."""
        out = torch.full((self.total,), -1, dtype=torch.int64)
        for i, d in enumerate(self.docs):
            out[d.start:d.end] = i
        return out


def plain_dataset(ds):
    """The packed dataset whose plan serves rows: ``ds`` itself, or a blend's first source."""
    if hasattr(ds, "order"):
        return ds
    if hasattr(ds, "first_view"):  # BlendedPackedDataset: one PackedSFTDataset per (source, epoch)
        return ds.first_view()
    raise ValueError(f"cannot read packed rows from {type(ds).__name__}")


def row_docs(lengths, row: int, row_length: int, multiple: int, document_mask: bool) -> list:
    """The :class:`Doc` spans of one row whose documents have ``lengths`` (the dataset's layout:
    segments padded to ``multiple`` with the mask on; real tokens back to back with it off)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    span = padded_lengths(lengths, multiple) if document_mask else lengths
    starts = np.cumsum(span) - span
    off = row * row_length
    out = []
    for k, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        pend = s + (int(padded_lengths([n], multiple)[0]) if document_mask else n)
        out.append(Doc(row, k, off + s, off + s + n, off + pend))
    return out


def _plan_rows(ds, count: int, offset: int) -> list:
    """Served indices of ``count`` rows with at least MIN_DOCS documents, most documents first;
    ``offset`` (the DP rank times ``count``) gives each data-parallel rank rows of its own."""
    pieces = ds.plan.pieces_per_sequence()[np.asarray(ds.order)]
    cand = np.flatnonzero(pieces >= MIN_DOCS)
    if cand.size < count:
        return []
    cand = cand[np.argsort(-pieces[cand], kind="stable")][:4096]
    return [int(cand[(offset + j) % cand.size]) for j in range(count)]


def _built_rows(ds, count: int, offset: int) -> list:
    """``count`` rows of MIN_DOCS+ conversations each (cut to a third of the row), assembled
    by the dataset itself: ``[(item, lengths, conversation ids)]``."""
    data, S, m = ds.data, ds.seq_length, max(1, ds.document_multiple)
    cap = max(2, (S // MIN_DOCS) // m * m)
    n_conv = len(data)
    if n_conv < MIN_DOCS:
        raise ValueError(f"the training split holds {n_conv} conversations; the isolation audit needs at least "
                         f"{MIN_DOCS} to pack into one row")
    rows, conv = [], (offset * MIN_DOCS) % n_conv
    for _ in range(count):
        toks, masks, lens, ids, used = [], [], [], [], 0
        for _ in range(n_conv):
            n = int(min(int(data.lengths[conv]), cap))
            if n >= 2 and used + int(padded_lengths([n], m)[0]) <= S:
                t, mk = data.get_slice(conv, 0, n)
                toks.append(np.asarray(t, np.int64))
                masks.append(np.asarray(mk, np.float32))
                lens.append(n)
                ids.append(conv)
                used += int(padded_lengths([n], m)[0])
            conv = (conv + 1) % n_conv
            if len(lens) >= MIN_DOCS and used + m * 2 > S:
                break
        if len(lens) < MIN_DOCS:
            raise ValueError(f"cannot fit {MIN_DOCS} conversations into one row of --seq-length {S}")
        rows.append((np.concatenate(toks), np.concatenate(masks), lens, ids))
    view = copy.copy(ds)  # room for the rows' boundaries; the dataset itself is left as it is
    view.cu_seqlens_len = max(len(r[2]) for r in rows) + 1
    return [(view.assemble(t, mk, np.asarray(lens, np.int64)), lens, ids) for t, mk, lens, ids in rows]


def audit_batches(dataset, micro_batch_size: int, dp_rank: int, num_batches: int = 1) -> list:
    """``num_batches`` THD micro-batches for this data-parallel rank: rows of the run's plan
    with at least MIN_DOCS documents, else rows built from its conversations. Reading rows
    moves no stream position and draws no random number."""
    ds = plain_dataset(dataset)
    count = micro_batch_size * num_batches
    picked = _plan_rows(ds, count, dp_rank * count)
    S, m = ds.padded_length, max(1, ds.document_multiple)
    if picked:
        rows = [(ds[i], [int(b - a) for _, a, b in ds.plan.sequence(int(ds.order[i]))], [i]) for i in picked]
    else:
        rows = _built_rows(ds, count, dp_rank * count)
    out = []
    for b in range(num_batches):
        part = rows[b * micro_batch_size:(b + 1) * micro_batch_size]
        docs = [d for r, (_, lens, _) in enumerate(part) for d in row_docs(lens, r, S, m, ds.document_mask)]
        out.append(AuditBatch(collate_thd([item for item, _, _ in part]), docs, built=not picked,
                              source=[x for _, _, ids in part for x in ids]))
    return out


def perturbed(ab: AuditBatch, parity: int, vocab_size: int, seed: int) -> AuditBatch:
    """``ab`` with the tokens of every document whose index in its row has ``parity`` replaced by
    random ids in [1, vocab_size) (a private generator: the run's RNG streams are not touched)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = ab.batch["tokens"].clone()
    for d in ab.docs:
        if d.index % 2 == parity:
            tokens[0, d.start:d.end] = torch.randint(1, max(2, vocab_size), (d.length,), generator=gen,
                                                     dtype=tokens.dtype)
    return AuditBatch({**ab.batch, "tokens": tokens}, ab.docs, ab.built, ab.source)


def alone(ab: AuditBatch, doc: Doc, multiple: int) -> AuditBatch:
    """The reference row: ``doc`` (tokens, labels, loss mask) at the start of an otherwise empty
    micro-batch of the same size, positions 0..n-1, its own segment (padded to ``multiple``)
    and one padding segment after it. Built here, not by the data path, so a data-path bug
    (positions that do not restart, say) shows as a difference."""
    T, n = ab.total, doc.length
    p = int(padded_lengths([n], multiple)[0])
    src, pad = ab.batch, 0  # the datasets' pad id
    out = {"tokens": torch.full((1, T), pad, dtype=src["tokens"].dtype),
           "labels": torch.full((1, T), pad, dtype=src["labels"].dtype),
           "loss_mask": torch.zeros((1, T), dtype=src["loss_mask"].dtype)}
    for k in out:
        out[k][0, :n] = src[k][0, doc.start:doc.end]
    pos = torch.arange(T, dtype=src["position_ids"].dtype)
    pos[p:] = torch.arange(T - p, dtype=pos.dtype)
    out["position_ids"] = pos.unsqueeze(0)
    bounds = [0, p] + ([T] if p < T else [])
    padded = "cu_seqlens_padded" in src
    real = [0, n] + ([n] if p < T else [])
    out["cu_seqlens"] = torch.tensor(real if padded else [0, n] + ([T] if n < T else []), dtype=torch.int32)
    if padded:
        out["cu_seqlens_padded"] = torch.tensor(bounds, dtype=torch.int32)
    out["num_cu_seqlens"] = torch.tensor(int(out["cu_seqlens"].numel()), dtype=torch.int64)
    out["max_seqlen"] = torch.tensor(max(p, T - p) if padded else max(n, T - n), dtype=torch.int64)
    out["num_real_tokens"] = torch.tensor(n, dtype=torch.int64)
    return AuditBatch(out, [Doc(0, 0, 0, n, p)])


def local_positions(batch: dict, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Global positions of the tokens this CP rank holds, in its local order."""
    T = int(batch["tokens"].numel())
    if cp_size == 1:
        return torch.arange(T)
    n = int(batch["num_cu_seqlens"])
    return rank_token_index(batch["cu_seqlens_padded"][:n], cp_size, cp_rank)


def sp_shard(positions: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """The sequence-parallel slice of ``positions`` this TP rank's activations hold."""
    L = positions.numel() // tp_size
    return positions[tp_rank * L:(tp_rank + 1) * L]


def positions_restart(ab: AuditBatch) -> list:
    """Documents whose position ids do not run 0..n-1: ``[(doc, first position)]``."""
    pos = ab.batch["position_ids"].reshape(-1)
    bad = []
    for d in ab.docs:
        if not torch.equal(pos[d.start:d.end], torch.arange(d.length, dtype=pos.dtype)):
            bad.append((d, int(pos[d.start])))
    return bad


def straddling(ab: AuditBatch, cp_size: int, tp_size: int, sequence_parallel: bool) -> int:
    """Documents whose tokens sit on more than one rank of the token split (CP chunks, and the
    sequence-parallel shards of each CP rank's tokens)."""
    T = ab.total
    shards = tp_size if sequence_parallel else 1
    where = torch.empty(T, dtype=torch.int64)
    for r in range(cp_size):
        pos = local_positions(ab.batch, cp_size, r)
        L = pos.numel() // shards
        for s in range(shards):
            where[pos[s * L:(s + 1) * L]] = r * shards + s
    return sum(1 for d in ab.docs if d.length and int(where[d.start:d.end].unique().numel()) > 1)
