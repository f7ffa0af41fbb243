"""The three isolation checks, run on this rank's share of the layout; the verdict is merged over
every rank by :mod:`megatron_pack.training.isolation`.

Passes (each one schedule call over the audit micro-batches, forward only unless stated):

    original     the packed rows; every layer's output and rotated query kept (this stage's layers)
    repeat       the same rows again: how far two identical forwards differ (0 = deterministic)
    perturb 0/1  documents 0, 2, 4 ... (then 1, 3, ...) of each row replaced by random ids:
                 the other documents' per-token loss and hidden states must not move
    reference    each document alone in a micro-batch: its per-token loss, hidden states and rotated
                 queries (RoPE: positions restart per document) must be the packed ones
    backward 0/1 loss of documents 0, 2, ... (then 1, 3, ...); the gradient reaching every layer's
                 input at the other documents' tokens must be zero (at layer 1: the embedding output)

Each rank records the largest differences it sees in :class:`Largest` (key -> value, detail);
the first layer where a forward difference appears and the deepest layer a gradient crosses at
are where a leak is.
"""

from __future__ import annotations

import torch

from megatron_pack.training.isolation_probe import AuditEnv, LayerWatch, run_pass
from megatron_pack.training.isolation_rows import (
    AuditBatch,
    alone,
    local_positions,
    perturbed,
    positions_restart,
    sp_shard,
)

PERTURB_SEED = 20260527
MAX_REFERENCE_DOCS = 32  # reference micro-batches per DP rank (one forward each): seconds on a large model


class Largest:
    """Largest value per key on this rank (with a detail string), and sums for means."""

    def __init__(self):
        self.max: dict = {}
        self.sum: dict = {}

    def update(self, key: str, value, detail=None) -> None:
        value = float(value)
        if key not in self.max or value > self.max[key][0]:
            self.max[key] = (value, detail)

    def add(self, key: str, value) -> None:
        self.sum[key] = self.sum.get(key, 0.0) + float(value)


def _inverse(batch: dict, env: AuditEnv) -> torch.Tensor:
    """Global position -> index in this CP rank's (TP-gathered) activations; -1 elsewhere."""
    pos = local_positions(batch, env.cp_size, env.cp_rank)
    inv = torch.full((int(batch["tokens"].numel()),), -1, dtype=torch.int64)
    inv[pos] = torch.arange(pos.numel())
    return inv


def _pair(inv_a: torch.Tensor, sel_a: torch.Tensor, inv_b: torch.Tensor, sel_b: torch.Tensor, device):
    """Local indices of the same tokens in two passes, kept where this rank holds both."""
    a, b = inv_a[sel_a], inv_b[sel_b]
    keep = (a >= 0) & (b >= 0)
    return a[keep].to(device), b[keep].to(device)


def _doc_name(ab: AuditBatch, b: int, d) -> str:
    return f"micro-batch {b} row {d.row} document {d.index} (tokens {d.start}-{d.end - 1})"


class AuditRun:
    """The passes over one rank's audit micro-batches."""

    def __init__(self, env: AuditEnv, watch: LayerWatch, batches: list, vocab_size: int, multiple: int):
        self.env, self.watch, self.batches = env, watch, batches
        self.vocab_size, self.multiple = vocab_size, multiple
        self.found = Largest()
        self.store: dict = {}
        self.inv = [_inverse(ab.batch, env) for ab in batches]
        self.orig_losses: list = []
        self.passes = 0

    def original(self) -> None:
        def keep(kind):
            def fn(layer, k, h):
                self.store[(kind, layer, k)] = h.clone()
            return fn

        self.watch.on_output, self.watch.on_query = keep("layer"), keep("query")
        self.orig_losses = run_pass(self.env, self.watch, [ab.batch for ab in self.batches])
        self.watch.on_output = self.watch.on_query = None
        self.passes += 1
        for b, ab in enumerate(self.batches):
            for d, first in positions_restart(ab):
                self.found.update("positions", 1.0, f"{_doc_name(ab, b, d)} starts at position {first}, not 0")

    def _compare(self, name: str, rows: list, pairs: list, loss_pairs: list) -> None:
        """Run ``rows`` and compare with the original pass: hidden states by ``pairs[k] = (b, orig
        idx, idx)``, per-token losses by ``loss_pairs[k] = [(b, name, orig slice, slice)]``."""
        found = self.found

        def compare(kind, scale):
            def fn(layer, k, h):
                b, oi, ti = pairs[k]
                if oi.numel() == 0:
                    return
                ref = self.store[(kind, layer, b)].index_select(0, oi).float()
                found.update(f"{name}/{kind}/{layer}", (h.index_select(0, ti).float() - ref).abs().max())
                found.update(f"{name}/{scale}/{layer}", ref.abs().max())
            return fn

        self.watch.on_output, self.watch.on_query = compare("layer", "scale"), compare("query", "qscale")
        losses = run_pass(self.env, self.watch, rows)
        self.watch.on_output = self.watch.on_query = None
        self.passes += 1
        for k, loss in enumerate(losses):
            for b, doc, (s0, e0), (s1, e1) in loss_pairs[k]:
                diff = (loss[s1:e1] - self.orig_losses[b][s0:e0]).abs()
                found.update(f"{name}/loss", diff.max(), doc)
                found.add(f"{name}/loss_sum", diff.sum())
                found.add(f"{name}/loss_count", diff.numel())

    def same_rows(self, name: str, parity) -> None:
        """``repeat`` (parity None: the rows unchanged, all documents compared) or a perturbation
        of the documents with ``parity``, the others compared."""
        rows, pairs, loss_pairs = [], [], []
        for b, ab in enumerate(self.batches):
            row = ab if parity is None else perturbed(ab, parity, self.vocab_size, PERTURB_SEED + 7 * b + parity)
            kept = [d for d in ab.docs if parity is None or d.index % 2 != parity]
            sel = torch.cat([torch.arange(d.start, d.end) for d in kept]) if kept else torch.zeros(0, dtype=torch.long)
            oi, ti = _pair(self.inv[b], sel, self.inv[b], sel, self.env.device)
            rows.append(row.batch)
            pairs.append((b, oi, ti))
            loss_pairs.append([(b, _doc_name(ab, b, d), (d.start, d.end), (d.start, d.end)) for d in kept])
        self._compare(name, rows, pairs, loss_pairs)

    def reference(self) -> None:
        """Every document (the first MAX_REFERENCE_DOCS) alone in a micro-batch, compared token by
        token with the packed rows."""
        rows, pairs, loss_pairs = [], [], []
        for b, ab in enumerate(self.batches):
            for d in ab.docs[:max(0, MAX_REFERENCE_DOCS - len(rows))]:
                ref = alone(ab, d, self.multiple)
                inv = _inverse(ref.batch, self.env)
                oi, ti = _pair(self.inv[b], torch.arange(d.start, d.end), inv, torch.arange(d.length),
                               self.env.device)
                rows.append(ref.batch)
                pairs.append((b, oi, ti))
                loss_pairs.append([(b, _doc_name(ab, b, d), (d.start, d.end), (0, d.length))])
        self._compare("reference", rows, pairs, loss_pairs)

    def backward(self, parity: int) -> None:
        """Loss of the documents with ``parity``; gradients at every layer's input on the others."""
        env, found = self.env, self.found
        targets, masks = [], []
        for ab in self.batches:
            t = torch.zeros(ab.total)
            o = torch.zeros(ab.total, dtype=torch.bool)
            for d in ab.docs:
                if d.index % 2 == parity:
                    t[d.start:d.end] = 1.0
                else:
                    o[d.start:d.end] = True
            pos = local_positions(ab.batch, env.cp_size, env.cp_rank)
            if env.sequence_parallel and env.tp_size > 1:
                pos = sp_shard(pos, env.tp_size, env.tp_rank)
            targets.append(t)
            masks.append((o[pos].to(env.device), t[pos].bool().to(env.device)))

        def sink(layer, k, g):
            other, target = masks[k]
            size = g.float().abs().amax(-1)
            if bool(other.any()):
                found.update(f"backward/layer/{layer}", size[other].max())
            if bool(target.any()):
                found.update(f"backward/target/{layer}", size[target].max())

        self.watch.on_input_grad = sink
        run_pass(env, self.watch, [ab.batch for ab in self.batches], targets=targets)
        self.watch.on_input_grad = None
        self.passes += 1

    def run_all(self) -> Largest:
        self.original()
        self.same_rows("repeat", None)
        self.same_rows("perturbation", 0)
        self.same_rows("perturbation", 1)
        self.reference()
        self.backward(0)
        self.backward(1)
        return self.found
