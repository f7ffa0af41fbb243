"""The train and held-out datasets of a run, plain or blended: the one builder training, the
planner and the experiment share, so the planner's and the experiment's plans are training's.

Every argument is a plain value (the run spec translates itself: :func:`megatron_pack.config.datasets`).
Each source is split by ``valid_fraction`` on its own (unless ``valid`` gives the held-out set)
and packed on its own plan; a blend interleaves the sources' plans by weight
(:class:`~megatron_pack.data.blend.BlendedPackedDataset`). Validation always uses the document
mask and ``eval_mode`` so its loss is the same computation whatever mode training used.
With ``pack_scope="step"`` (one plain source) training's rows are the padded run's steps, each
packed on its own (:class:`~megatron_pack.data.step_dataset.StepPackedDataset`).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_pack.data.blend import Blend, BlendedPackedDataset
from megatron_pack.data.packed_dataset import PackedSFTDataset
from megatron_pack.data.split import SFTSubset, split_indices
from megatron_pack.files.indexed import SFTIndexedDataset


@dataclass
class Datasets:
    train: PackedSFTDataset
    valid: PackedSFTDataset | None
    num_train_conversations: int
    num_valid_conversations: int
    train_names: tuple = ()  # blend source names (per-source loss); () for one plain prefix
    train_tokens: int = 0  # tokens of the training conversations, before packing


@dataclass(frozen=True)
class DatasetArgs:
    """How every source is packed (the dataset keywords shared by train and held-out parts)."""

    seq_length: int
    mode: object  # a packing.modes.PackingMode (or its string)
    eval_mode: object
    document_mask: bool = True
    overlong: str = "truncate"
    seed: int = 1234
    pad_to_multiple_of: int = 1
    document_multiple: int = 1
    cache_dir: str | None = None
    use_cache: bool = True
    pack_scope: str = "epoch"  # "step": the padded run's steps, each packed (bfd) on its own
    global_batch_size: int | None = None  # conversations per step: needed by the "step" scope


def _split_sources(blend: Blend, valid_fraction: float, seed: int) -> tuple[list, list, list]:
    """(train parts, held-out parts, held-out names): each source split on its own."""
    train_parts, valid_parts, valid_names = [], [], []
    for prefix, name in zip(blend.prefixes, blend.names):
        base = SFTIndexedDataset(prefix)
        tr, va = split_indices(len(base), valid_fraction, seed)
        if tr.size == 0:
            raise ValueError(f"{prefix}: no training conversations left after holding out "
                             f"--valid-fraction {valid_fraction} of {len(base)}")
        train_parts.append(SFTSubset(base, tr))
        if va.size:
            valid_parts.append(SFTSubset(base, va))
            valid_names.append(name)
    return train_parts, valid_parts, valid_names


def build_datasets(train: Blend, valid: Blend | None, packing: DatasetArgs, *, valid_fraction: float,
                   group=None, with_valid: bool = True) -> Datasets:
    """Train and held-out datasets. ``train``/``valid``: the parsed --data-path (or
    --train-data-path) and --valid-data-path; ``with_valid=False`` counts the held-out
    conversations without packing them (the planner)."""
    pk = packing
    hold_out = valid_fraction if valid is None else 0.0
    train_parts, valid_parts, valid_names = _split_sources(train, hold_out, pk.seed)
    if valid is not None:
        valid_parts = [SFTIndexedDataset(x) for x in valid.prefixes]
        valid_names = list(valid.names)
    common = dict(seed=pk.seed, overlong=pk.overlong, pad_to_multiple_of=pk.pad_to_multiple_of,
                  cache_dir=pk.cache_dir, use_cache=pk.use_cache, group=group,
                  document_multiple=pk.document_multiple)

    def source(data, **kw):
        return lambda epoch: PackedSFTDataset(data, pk.seq_length, epoch=epoch, **kw, **common)

    train_kw = dict(mode=pk.mode, document_mask=pk.document_mask)
    if pk.pack_scope == "step":
        if not train.plain:
            raise ValueError("--pack-scope step takes one dataset prefix, not a blend")
        train_ds, names = train_dataset(train_parts[0], pk, **common), ()
    elif train.plain:
        train_ds, names = source(train_parts[0], **train_kw)(0), ()
    else:
        names = train.names
        train_ds = BlendedPackedDataset([source(x, **train_kw) for x in train_parts], names, train.weights)
    valid_ds = None
    # Sequence order does not matter for a full pass; keep it fixed across epochs.
    valid_kw = dict(mode=pk.eval_mode, document_mask=True, shuffle_sequences=False)
    if valid_parts and with_valid:
        plain_valid = valid.plain if valid is not None else train.plain
        if plain_valid:
            valid_ds = source(valid_parts[0], **valid_kw)(0)
        else:
            valid_ds = BlendedPackedDataset([source(x, **valid_kw) for x in valid_parts], valid_names, None)
    return Datasets(train_ds, valid_ds, sum(len(x) for x in train_parts), sum(len(x) for x in valid_parts),
                    tuple(names), sum(int(x.lengths.sum()) for x in train_parts))


def train_dataset(data, packing: DatasetArgs, **common) -> PackedSFTDataset:
    """The training split's dataset for ``packing.pack_scope``: the epoch's plan, or the padded
    run's steps each packed on its own (:class:`~megatron_pack.data.step_dataset.StepPackedDataset`)."""
    pk = packing
    if pk.pack_scope != "step":
        return PackedSFTDataset(data, pk.seq_length, pk.mode, document_mask=pk.document_mask, **common)
    from megatron_pack.data.step_dataset import StepPackedDataset

    if pk.global_batch_size is None:
        raise ValueError("--pack-scope step needs --global-batch-size (conversations per step)")
    return StepPackedDataset(data, pk.seq_length, pk.mode, document_mask=pk.document_mask,
                             global_batch_size=pk.global_batch_size, **common)
