"""``PackedSFTDataset``: fixed-length training sequences from an indexed SFT dataset and a plan.

Two conversations packed into one sequence of S = 12 (``.`` = padding, ``p`` = pad id,
``m`` = supervised flag of each token), with the document mask on (default)::

    tokens        a0 a1 a2 a3 b0 b1 b2 .  .  .  .  .
    m (input)     0  0  1  1  0  1  1
    labels        a1 a2 a3 p  b1 b2 p  p  p  p  p  p     next token, inside a segment only
    loss_mask     0  1  1  0  1  1  0  0  0  0  0  0     = m of the label token; 0 at segment ends
    position_ids  0  1  2  3  0  1  2  3  4  5  6  7     restart per segment; padding continues
    cu_seqlens    [0, 4, 7, -1, ...]  num_cu_seqlens = 3, max_seqlen = 4, num_real_tokens = 7

With the document mask off (the setting of the "Packing Analysis" paper) the real
tokens form one causal document: ``a3`` predicts ``b0`` (trained if ``b0`` is), positions
run 0..S-1 and ``cu_seqlens = [0, 7, -1, ...]``.

``cu_seqlens`` has a fixed length K = (most pieces in any sequence of the plan) + 1 so
items stack; the padding tail is outside every segment. S is ``seq_length`` rounded up to
``pad_to_multiple_of`` (see :func:`required_multiple` for TP sequence parallel and CP);
the plan's capacity stays ``seq_length``.

With context parallelism (``document_multiple`` > 1) every segment is padded to a multiple
of 2*CP and items carry ``cu_seqlens_padded`` too; see :mod:`megatron_pack.data.context_parallel`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_pack.data.context_parallel import document_multiple, padded_lengths
from megatron_pack.files.indexed import SFTIndexedDataset
from megatron_pack.packing.plan import PackingPlan, get_mode


def required_multiple(tp_size: int = 1, cp_size: int = 1, sequence_parallel: bool = False) -> int:
    """What S must divide by: ``tp`` with sequence parallel (sequence split over TP ranks),
    the per-document multiple with context parallel (:func:`document_multiple`)."""
    m = tp_size if sequence_parallel and tp_size > 1 else 1
    if cp_size > 1:
        m = math.lcm(m, document_multiple(cp_size, tp_size, sequence_parallel))
    return m


def _nothing_to_train(data, seq_length: int, stats):
    """The one-line error for a plan without a sequence: say what left every conversation out."""
    from megatron_pack.files.indexed_check import EmptyDatasetError

    base = getattr(data, "base", None)  # a split (SFTSubset) of the dataset
    conversations = (
        f"{len(data)} of its {len(base)} conversations" if base is not None else f"{len(data)} conversations"
    )

    why = []
    if stats is not None and stats.unsupervised_items:
        why.append(f"{stats.unsupervised_items} without a supervised token within --seq-length {seq_length}")
    if stats is not None and stats.dropped_docs:
        why.append(f"{stats.dropped_docs} dropped as over-long")
    return EmptyDatasetError(
        f"{data.prefix}: nothing to train or score on: {conversations}, 0 packed sequences ("
        + ("; ".join(why) or "no tokens")
        + ")"
    )


class PackedSFTDataset(torch.utils.data.Dataset):
    """Map-style dataset of packed sequences following the batch contract.

    Args:
        dataset: an :class:`SFTIndexedDataset` or its path prefix.
        seq_length: plan capacity in tokens (``--seq-length``).
        mode: packing mode name or config (``padding``, ``greedy``, ``random``, ``bfd``,
            ``windowed_bfd[:window=W]``).
        seed, epoch: drive the shuffling modes and the sequence order; see :meth:`set_epoch`.
        overlong: ``truncate`` | ``drop`` | ``cut-at-turns`` for conversations over ``seq_length``.
        document_mask: segments per conversation (default) or one causal document per sequence.
        pad_to_multiple_of: round S up to this (``required_multiple(tp, cp, sp)``).
        pad_token_id: token and label id for padding and for labels with no next token.
        shuffle_sequences: serve sequences in a (seed, epoch) permutation; ``bfd`` and
            ``greedy`` emit them sorted by their longest member, which no batch should see.
        cache_dir: plan cache directory (default ``PREFIX_plans``); ``use_cache=False`` plans
            in memory. ``plan`` skips planning altogether (tests, custom plans).
        group: process group for the build-on-rank-0 step of the cache.
        document_multiple: context parallelism: pad every segment to this multiple
            (:func:`~megatron_pack.data.context_parallel.document_multiple`), pack at padded
            lengths and add ``cu_seqlens_padded``; ``seq_length`` must be a multiple of it.
    """

    def __init__(
        self,
        dataset: "SFTIndexedDataset | str",
        seq_length: int,
        mode="bfd",
        *,
        seed: int = 1234,
        epoch: int = 0,
        overlong: str = "truncate",
        document_mask: bool = True,
        pad_to_multiple_of: int = 1,
        pad_token_id: int = 0,
        shuffle_sequences: bool = True,
        cache_dir: str | None = None,
        use_cache: bool = True,
        plan: PackingPlan | None = None,
        group=None,
        document_multiple: int = 1,
    ):
        self.data = dataset if isinstance(dataset, SFTIndexedDataset) else SFTIndexedDataset(dataset)
        if seq_length < 2:
            raise ValueError(f"seq_length must be >= 2, got {seq_length}")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        if document_multiple < 1 or seq_length % document_multiple:  # the flags are checked in config.spec
            raise ValueError(f"seq_length {seq_length} is not a multiple of document_multiple {document_multiple}")
        self.document_multiple = int(document_multiple)
        self.seq_length = int(seq_length)
        self.padded_length = -(-self.seq_length // pad_to_multiple_of) * pad_to_multiple_of
        self.pad_multiple = int(pad_to_multiple_of)
        self.mode = get_mode(mode)
        self.seed, self.overlong = seed, overlong
        self.document_mask = document_mask
        self.pad_token_id = pad_token_id
        self.shuffle_sequences = shuffle_sequences
        self.cache_dir, self.use_cache, self.group = cache_dir, use_cache, group
        self._fixed_plan = plan
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Switch to ``epoch``'s plan: a new shuffle for shuffling modes and a new sequence order."""
        self.epoch = int(epoch)
        if self._fixed_plan is not None:
            self.plan = self._fixed_plan
        elif self.use_cache:
            from megatron_pack.packing.cache import get_plan

            self.plan = get_plan(
                self.data,
                self.seq_length,
                self.mode,
                seed=self.seed,
                epoch=self.epoch,
                overlong=self.overlong,
                cache_dir=self.cache_dir,
                group=self.group,
                pad_multiple=self.document_multiple,
            )
        else:
            from megatron_pack.packing.plan import build_plan, dataset_supervised

            self.plan = build_plan(
                self.data.lengths,
                self.seq_length,
                self.mode,
                seed=self.seed,
                epoch=self.epoch,
                overlong=self.overlong,
                turn_starts=self.data.turns,
                pad_multiple=self.document_multiple,
                supervised=dataset_supervised(self.data),
            )
        if self.plan.max_seq_length > self.seq_length:
            raise ValueError(f"plan capacity {self.plan.max_seq_length} exceeds seq_length {self.seq_length}")
        n = self.plan.num_sequences
        if n == 0:
            raise _nothing_to_train(self.data, self.seq_length, self.plan.stats)
        self.order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle_sequences else np.arange(n)
        )
        counts = self.plan.pieces_per_sequence()
        self.cu_seqlens_len = int(counts.max(initial=1)) + 1 if self.document_mask else 2

    def __len__(self) -> int:
        return self.plan.num_sequences

    def __getitem__(self, idx: int) -> dict:
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range [0, {len(self)})")
        pieces = self.plan.sequence(int(self.order[idx]))
        toks, masks = (
            zip(*(self.data.get_slice(int(d), int(a), int(b)) for d, a, b in pieces)) if len(pieces) else ((), ())
        )
        seg_lens = np.asarray([len(t) for t in toks], dtype=np.int64)
        flat_tok = np.concatenate(toks).astype(np.int64) if toks else np.zeros(0, np.int64)
        flat_mask = np.concatenate(masks).astype(np.float32) if masks else np.zeros(0, np.float32)
        return self.assemble(flat_tok, flat_mask, seg_lens)

    def used_lengths(self, rows: np.ndarray) -> np.ndarray:
        """Tokens each plan row in ``rows`` occupies up to its last document's end: its real
        tokens, or with context parallelism its padded end (what ``collate.trim_to_longest`` keeps)."""
        plan, rows = self.plan, np.asarray(rows, dtype=np.int64)
        if self.document_multiple <= 1:
            return plan.sequence_lengths()[rows]
        if not self.document_mask:  # the real tokens are one segment
            return padded_lengths(plan.sequence_lengths()[rows], self.document_multiple)
        csum = np.concatenate([[0], np.cumsum(padded_lengths(plan.piece_lengths, self.document_multiple))])
        return (csum[plan.seq_offsets[1:]] - csum[plan.seq_offsets[:-1]])[rows]

    def assemble(self, tok: np.ndarray, mask: np.ndarray, seg_lens: np.ndarray) -> dict:
        """One item (tokens, labels, loss mask, positions, ``cu_seqlens``) from a row's flat tokens,
        loss mask and segment lengths, laid out as this dataset lays out its own rows (used for
        fillers, evaluation padding and the isolation audit's rows)."""
        if self.document_multiple > 1:
            return self._assemble_padded_docs(tok, mask, seg_lens)
        S, R = self.padded_length, len(tok)
        if R > S:
            raise ValueError(f"sequence holds {R} tokens, more than {S}")
        tokens = np.full(S, self.pad_token_id, dtype=np.int64)
        labels = np.full(S, self.pad_token_id, dtype=np.int64)
        loss_mask = np.zeros(S, dtype=np.float32)
        tokens[:R] = tok
        if R:
            labels[: R - 1] = tok[1:]
            loss_mask[: R - 1] = mask[1:]
        if self.document_mask:
            ends = np.cumsum(seg_lens)
            labels[ends - 1] = self.pad_token_id  # the last token of a segment predicts nothing
            loss_mask[ends - 1] = 0.0
            starts = ends - seg_lens
            position_ids = np.arange(S, dtype=np.int64)
            position_ids[:R] -= np.repeat(starts, seg_lens)
            if R and R < S:  # padding continues the last segment's count
                position_ids[R:] = np.arange(S - R) + seg_lens[-1]
            cu = np.concatenate([[0], ends])
            max_seqlen = int(seg_lens.max(initial=0))
        else:
            position_ids = np.arange(S, dtype=np.int64)
            cu = np.array([0, R])
            max_seqlen = R
        cu_seqlens = np.full(self.cu_seqlens_len, -1, dtype=np.int32)
        cu_seqlens[: len(cu)] = cu
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "num_cu_seqlens": len(cu),
            "max_seqlen": max_seqlen,
            "num_real_tokens": R,
        }

    def _assemble_padded_docs(self, tok: np.ndarray, mask: np.ndarray, seg_lens: np.ndarray) -> dict:
        """Context parallelism: every segment padded to ``document_multiple`` (see
        :mod:`megatron_pack.data.context_parallel`). Without the document mask the real tokens
        are one segment. Adds ``cu_seqlens_padded``; ``cu_seqlens`` counts real tokens."""
        S, R = self.padded_length, len(tok)
        if not self.document_mask:
            seg_lens = np.asarray([R] if R else [], dtype=np.int64)
        seg_lens = np.asarray(seg_lens, dtype=np.int64)
        padded = padded_lengths(seg_lens, self.document_multiple)
        P = int(padded.sum())
        if P > S:
            raise ValueError(f"sequence holds {P} tokens after per-document padding, more than {S}")
        real_starts = np.cumsum(seg_lens) - seg_lens
        pad_starts = np.cumsum(padded) - padded
        # where each real token goes in the padded row
        dest = np.arange(R, dtype=np.int64) + np.repeat(pad_starts - real_starts, seg_lens)
        tokens = np.full(S, self.pad_token_id, dtype=np.int64)
        labels = np.full(S, self.pad_token_id, dtype=np.int64)
        loss_mask = np.zeros(S, dtype=np.float32)
        tokens[dest] = tok
        nxt = np.ones(R, dtype=bool)
        nxt[np.cumsum(seg_lens) - 1] = False  # the last token of a segment predicts nothing
        src = np.flatnonzero(nxt)
        labels[dest[src]] = tok[src + 1]
        loss_mask[dest[src]] = mask[src + 1]
        position_ids = np.arange(S, dtype=np.int64)
        position_ids[:P] -= np.repeat(pad_starts, padded)  # restart per segment, padding continues
        if P < S:
            position_ids[P:] = np.arange(S - P) + (int(padded[-1]) if len(padded) else 0)
        K = self.cu_seqlens_len
        cu = np.full(K, -1, dtype=np.int32)
        cu_pad = np.full(K, -1, dtype=np.int32)
        cu[: len(seg_lens) + 1] = np.concatenate([[0], np.cumsum(seg_lens)])
        cu_pad[: len(seg_lens) + 1] = np.concatenate([[0], np.cumsum(padded)])
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu),
            "cu_seqlens_padded": torch.from_numpy(cu_pad),
            "num_cu_seqlens": len(seg_lens) + 1,
            "max_seqlen": int(padded.max(initial=0)),
            "num_real_tokens": R,
        }
