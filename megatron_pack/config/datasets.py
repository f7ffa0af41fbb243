"""``build_datasets(spec)``: the run's train and held-out datasets, for training, the planner
and the experiment alike (plain or blended data, CP/document padding, the held-out split).

The spec translates itself into the plain arguments of :func:`megatron_pack.data.datasets.build_datasets`;
``data/`` never reads a config object.
"""

from __future__ import annotations

from megatron_pack.config.spec import RunSpec


def dataset_args(spec: RunSpec, *, use_cache: bool = True):
    """The packing keywords of ``spec``'s datasets (sequence length padded as SP/CP need)."""
    from megatron_pack.data.datasets import DatasetArgs
    from megatron_pack.data.packed_dataset import required_multiple

    d, p, par = spec.data, spec.data.packing, spec.parallel
    return DatasetArgs(seq_length=d.seq_length, mode=p.mode, eval_mode=p.eval_mode, document_mask=p.document_mask,
                       overlong=p.overlong, seed=spec.train.seed,
                       pad_to_multiple_of=required_multiple(par.tensor_model_parallel_size, par.context_parallel_size,
                                                            par.sequence_parallel),
                       document_multiple=spec.document_multiple, cache_dir=d.data_cache_path, use_cache=use_cache,
                       pack_scope=p.pack_scope, global_batch_size=spec.train.global_batch_size)


def build_datasets(spec: RunSpec, *, group=None, use_cache: bool = True, with_valid: bool = True):
    """:class:`~megatron_pack.data.datasets.Datasets` of ``spec``; ``use_cache=False`` plans in
    memory and writes nothing (the planner, the experiment's forecast); ``with_valid=False``
    leaves the held-out split unpacked (only counted)."""
    from megatron_pack.data.datasets import build_datasets as build

    if spec.data.train_blend is None:
        raise ValueError("no --data-path: nothing to build datasets from")
    return build(spec.data.train_blend, spec.data.valid_blend, dataset_args(spec, use_cache=use_cache),
                 valid_fraction=spec.data.valid_fraction, group=group, with_valid=with_valid)
