"""Training data: held-out split, packed datasets, a resumable DP-sharded batch stream.

Every rank, on every pipeline stage and TP rank, builds the same datasets and iterates the
same micro-batches for its data-parallel rank. Intermediate pipeline stages ignore the
tokens but still need ``cu_seqlens`` for their attention layers (a known Megatron-LM bug is
stages without them), so each stage derives its ``PackedSeqParams`` from its own copy.

Order of sequences within an epoch (``G`` = global batch, ``D`` = data-parallel ranks)::

    epoch order (PackedSFTDataset.set_epoch permutation):  s0 s1 s2 ... s_{N-1}
    step k takes s[kG : (k+1)G]; DP rank r takes s[kG + r*G/D : kG + (r+1)*G/D],
    cut into micro-batches of --micro-batch-size.

With a ``BatchBalancer`` (:mod:`megatron_pack.data.balance`, on by default when DP > 1 or
PP > 1) step k still takes s[kG : (k+1)G], but which rank and micro-batch gets each
sequence is chosen to even out their compute (a pure function of the step's sequences).

The position is ``(epoch, step in epoch)``, saved in checkpoints; the last partial global
batch of an epoch is dropped (as Megatron does) so every step has the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_pack.data.collate import collate_thd, trim_to_longest
from megatron_pack.data.context_parallel import document_multiple
from megatron_pack.files.indexed import SFTIndexedDataset
from megatron_pack.data.packed_dataset import PackedSFTDataset, required_multiple


class SFTSubset(SFTIndexedDataset):
    """The conversations ``indices`` of an indexed dataset, renumbered 0..n-1.

    The plan cache keys on the prefix and a hash of the (subset's) lengths, so the train
    and valid splits get plans of their own.
    """

    def __init__(self, base: SFTIndexedDataset, indices):
        self.base = base
        self.prefix = base.prefix
        self.indices = np.asarray(indices, dtype=np.int64)
        self._lengths = base.lengths[self.indices]
        self.turns = _Remap(base.turns, self.indices)

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def supervised_counts(self) -> np.ndarray:
        return self.base.supervised_counts()[self.indices]

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def get_slice(self, i: int, start: int, end: int):
        return self.base.get_slice(int(self.indices[i]), start, end)


class _Remap:
    def __init__(self, seq, indices):
        self.seq, self.indices = seq, indices

    def __getitem__(self, i):
        return self.seq[int(self.indices[i])]

    def __len__(self):
        return int(self.indices.size)


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) conversation indices: a seeded random ``valid_fraction`` held out,
    both sorted; independent of the packing mode so every mode sees the same split."""
    n_valid = int(round(n * valid_fraction))
    if valid_fraction > 0 and n_valid == 0 and n > 1:
        n_valid = 1
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


@dataclass
class Datasets:
    train: PackedSFTDataset
    valid: PackedSFTDataset | None
    num_train_conversations: int
    num_valid_conversations: int
    train_names: tuple = ()  # blend source names (per-source loss); () for one plain prefix


def padding_multiple(cfg, tp_size: int = 1, cp_size: int = 1) -> int:
    """What every document is padded to: ``--document-padding-multiple``, else what CP (and SP)
    need (:func:`~megatron_pack.data.context_parallel.document_multiple`; 1 at CP 1)."""
    n = cfg.data.packing.document_padding_multiple
    return int(n) if n is not None else document_multiple(cp_size, tp_size, cfg.parallel.sequence_parallel)


def build_datasets(cfg, *, tp_size: int = 1, cp_size: int = 1, group=None) -> Datasets:
    """Train and held-out :class:`PackedSFTDataset` for a :class:`TrainConfig`.

    Validation always uses the document mask and ``--eval-pack-mode`` so its loss is the
    same computation whatever ``--pack-mode``/``--no-document-mask`` training used.
    """
    d, p = cfg.data, cfg.data.packing
    if not isinstance(d.data_path, str) or d.valid_data_path is not None:
        return build_blended_datasets(cfg, tp_size=tp_size, cp_size=cp_size, group=group)
    base = SFTIndexedDataset(d.data_path)
    train_idx, valid_idx = split_indices(len(base), d.valid_fraction, cfg.train.seed)
    if train_idx.size == 0:
        raise ValueError(f"{d.data_path}: no training conversations left after holding out "
                         f"--valid-fraction {d.valid_fraction} of {len(base)}")
    multiple = required_multiple(tp_size, cp_size, cfg.parallel.sequence_parallel)
    common = dict(seed=cfg.train.seed, overlong=p.overlong, pad_to_multiple_of=multiple,
                  cache_dir=d.data_cache_path, group=group,
                  document_multiple=padding_multiple(cfg, tp_size, cp_size))
    train = train_dataset(cfg, SFTSubset(base, train_idx), **common)
    valid = None
    if valid_idx.size:
        # Sequence order does not matter for a full pass; keep it fixed across epochs.
        valid = PackedSFTDataset(SFTSubset(base, valid_idx), d.seq_length, p.eval_pack_mode,
                                 document_mask=True, shuffle_sequences=False, **common)
    return Datasets(train, valid, int(train_idx.size), int(valid_idx.size))


def build_blended_datasets(cfg, *, tp_size: int = 1, cp_size: int = 1, group=None) -> Datasets:
    """:func:`build_datasets` for blends (:mod:`megatron_pack.data.blend`) and --train/--valid-data-path.

    Each source is split by --valid-fraction on its own (unless --valid-data-path gives the
    held-out set) and packed on its own plan; the held-out parts are scored once each.
    """
    from megatron_pack.data.blend import BlendedPackedDataset, parse_blend

    d, p = cfg.data, cfg.data.packing
    train_value = d.train_data_path if d.train_data_path is not None else d.data_path
    train_blend = parse_blend(train_value, "--data-path")
    hold_out = d.valid_fraction if d.valid_data_path is None else 0.0
    train_parts, valid_parts, valid_names = [], [], []
    for prefix, name in zip(train_blend.prefixes, train_blend.names):
        base = SFTIndexedDataset(prefix)
        tr, va = split_indices(len(base), hold_out, cfg.train.seed)
        if tr.size == 0:
            raise ValueError(f"{prefix}: no training conversations left after holding out --valid-fraction {hold_out}")
        train_parts.append(SFTSubset(base, tr))
        if va.size:
            valid_parts.append(SFTSubset(base, va))
            valid_names.append(name)
    if d.valid_data_path is not None:
        valid_blend = parse_blend(d.valid_data_path, "--valid-data-path")
        valid_parts = [SFTIndexedDataset(x) for x in valid_blend.prefixes]
        valid_names = list(valid_blend.names)
    multiple = required_multiple(tp_size, cp_size, cfg.parallel.sequence_parallel)
    common = dict(seed=cfg.train.seed, overlong=p.overlong, pad_to_multiple_of=multiple,
                  cache_dir=d.data_cache_path, group=group,
                  document_multiple=padding_multiple(cfg, tp_size, cp_size))

    def source(data, **kw):
        return lambda epoch: PackedSFTDataset(data, d.seq_length, epoch=epoch, **kw, **common)

    train_kw = dict(mode=p.pack_mode, document_mask=p.document_mask)
    if isinstance(train_value, str):  # one plain prefix (with --valid-data-path)
        train, names = train_dataset(cfg, train_parts[0], **common), ()
    else:
        names = train_blend.names
        train = BlendedPackedDataset([source(x, **train_kw) for x in train_parts], names, train_blend.weights)
    valid = None
    valid_kw = dict(mode=p.eval_pack_mode, document_mask=True, shuffle_sequences=False)
    if valid_parts and isinstance(d.valid_data_path, str):
        valid = source(valid_parts[0], **valid_kw)(0)
    elif valid_parts:
        valid = BlendedPackedDataset([source(x, **valid_kw) for x in valid_parts], valid_names, None)
    return Datasets(train, valid, sum(len(x) for x in train_parts), sum(len(x) for x in valid_parts), tuple(names))


def train_dataset(cfg, data, **common) -> PackedSFTDataset:
    """The training split's dataset for ``--pack-scope``: the epoch's plan, or the padded run's
    steps each packed on its own (:class:`~megatron_pack.data.step_dataset.StepPackedDataset`)."""
    p = cfg.data.packing
    if getattr(p, "pack_scope", "epoch") == "step":
        from megatron_pack.data.step_dataset import StepPackedDataset

        return StepPackedDataset(data, cfg.data.seq_length, p.pack_mode, document_mask=p.document_mask,
                                 global_batch_size=cfg.train.global_batch_size, **common)
    return PackedSFTDataset(data, cfg.data.seq_length, p.pack_mode, document_mask=p.document_mask, **common)


def steps_in_epoch(num_sequences: int, global_batch_size: int) -> int:
    return num_sequences // global_batch_size


@dataclass
class DataPosition:
    """Where the train stream is: checkpointed, so ``--load`` continues with the next batch."""

    epoch: int = 0
    step_in_epoch: int = 0
    consumed_samples: int = 0  # sequences over the whole run (Megatron's "consumed samples")
    consumed_conversations: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_state_dict(cls, sd: dict) -> "DataPosition":
        return cls(**{k: int(v) for k, v in sd.items() if k in cls.__dataclass_fields__})


def _annotate(dataset: PackedSFTDataset, idx: list, batch: dict) -> dict:
    """Add per-batch counters the logs need: samples placed and capacity."""
    counts = dataset.plan.pieces_per_sequence()[dataset.order[np.asarray(idx)]]
    batch["num_samples"] = torch.tensor(int(counts.sum()), dtype=torch.int64)
    batch["capacity"] = torch.tensor(batch["tokens"].numel(), dtype=torch.int64)  # cut with pad_to=longest
    return batch


class TrainStream:
    """Global batches of the training split for one DP rank, resumable at any step.

    ``next_step()`` returns the list of micro-batches (THD-collated dicts) of the next
    global batch, moving to the next epoch (new plan for shuffling modes, new order) when
    the current one runs out.
    """

    def __init__(self, dataset: PackedSFTDataset, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, position: DataPosition | None = None, balancer=None):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError("global batch size must be a multiple of micro batch size * DP")
        self.ds, self.gbs, self.mbs = dataset, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.pos = position or DataPosition()
        self.balancer = balancer  # a data.balance.BatchBalancer, or None: contiguous placement
        if self.ds.epoch != self.pos.epoch:
            self.ds.set_epoch(self.pos.epoch)
        self._check_epoch_size()

    def _check_epoch_size(self):
        if steps_in_epoch(len(self.ds), self.gbs) == 0:
            raise ValueError(f"epoch {self.ds.epoch} has {len(self.ds)} sequences, fewer than one global batch "
                             f"({self.gbs}); lower --global-batch-size or add data")

    def next_step(self) -> list:
        if self.pos.step_in_epoch >= steps_in_epoch(len(self.ds), self.gbs):
            self.pos.epoch += 1
            self.pos.step_in_epoch = 0
            self.ds.set_epoch(self.pos.epoch)
            self._check_epoch_size()
        start = self.pos.step_in_epoch * self.gbs
        idx = np.arange(start, start + self.gbs)
        per_rank = self.gbs // self.dp_size
        seqs = self.ds.order[idx]
        balance = {}
        if self.balancer is None:  # contiguous: rank r takes the r-th slice, cut into micro-batches
            placement = [[np.arange(r * per_rank + i, r * per_rank + i + self.mbs) for i in range(0, per_rank, self.mbs)]
                         for r in range(self.dp_size)]
        else:
            placement, balance = self.balancer.placement(self.ds, seqs)
        micro = [self.micro_batch(idx[mb].tolist()) for mb in placement[self.dp_rank]]
        samples = int(self.ds.plan.pieces_per_sequence()[seqs].sum())
        # Global-batch figures for the logs, from the plan: no communication needed.
        capacity = self.gbs * self.ds.padded_length
        if self.ds.mode.pads_to_longest:  # each micro-batch as long as its longest sequence
            lens = self.ds.plan.sequence_lengths()[seqs]
            m = self.ds.pad_multiple
            capacity = 0
            for mb in (mb for rank in placement for mb in rank):
                longest = int(lens[mb].max())
                capacity += min(self.ds.padded_length, max(m, -(-longest // m) * m)) * len(mb)
        self.last_stats = {"real_tokens": int(self.ds.plan.sequence_lengths()[seqs].sum()), "samples": samples,
                           "capacity": capacity, **balance}
        self.pos.step_in_epoch += 1
        self.pos.consumed_samples += self.gbs
        self.pos.consumed_conversations += samples
        return micro

    def micro_batch(self, idx: list) -> dict:
        items = [self.ds[i] for i in idx]
        if self.ds.mode.pads_to_longest:
            items = trim_to_longest(items, self.ds.pad_multiple)
        return _annotate(self.ds, idx, collate_thd(items))


def epochs_to_iters(dataset: PackedSFTDataset, global_batch_size: int, epochs: float) -> int:
    """Optimizer steps in ``epochs`` passes; shuffling modes re-plan each epoch, so the
    number of sequences (and steps) may differ slightly from epoch to epoch."""
    whole, frac = int(epochs), epochs - int(epochs)
    saved = dataset.epoch
    total = 0
    for e in range(whole + (1 if frac > 0 else 0)):
        if dataset.epoch != e:
            dataset.set_epoch(e)
        n = getattr(dataset, "num_steps", None)  # per-step scope: the padded run's steps
        n = steps_in_epoch(len(dataset), global_batch_size) if n is None else n
        total += n if e < whole else int(n * frac)
    if dataset.epoch != saved:
        dataset.set_epoch(saved)
    return max(total, 1)


def eval_batches(dataset: PackedSFTDataset, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, max_steps: int | None = None, balancer=None):
    """The held-out split as global batches (lists of micro-batches) for one DP rank.

    The tail that does not fill a global batch is kept: ranks without a sequence for a
    micro-batch get an all-padding one (zero loss mask), so every token is scored exactly
    once and the micro-batch count is the same on every rank. ``balancer`` (the
    :class:`~megatron_pack.data.balance.BatchBalancer` of training's ``--balance-batches``)
    places each step's sequences on ranks and micro-batches as training does, the tail's
    empty fillers counting as free; ``None``: contiguous, rank ``r`` takes the ``r``-th block.
    Placement changes no figure: every sequence is still scored once, only where.
    """
    from megatron_pack.data.balance import contiguous

    n = len(dataset)
    steps = -(-n // global_batch_size)
    if max_steps is not None:
        steps = min(steps, max_steps)
    for s in range(steps):
        lo = s * global_batch_size
        real = min(global_batch_size, n - lo)
        if balancer is None:
            placement = contiguous(global_batch_size, dp_size, micro_batch_size)
        else:
            placement, _ = balancer.placement(dataset, dataset.order[lo:lo + real], fillers=global_batch_size - real)
        yield [collate_thd([dataset[lo + p] if p < real else _empty_item(dataset) for p in mb])
               for mb in placement[dp_rank]]


def _empty_item(dataset: PackedSFTDataset) -> dict:
    return dataset._assemble(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
