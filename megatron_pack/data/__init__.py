"""megatron_pack.data: plans -> tensors. The packed SFT dataset and the batches a run reads.

    packed_dataset  PackedSFTDataset: fixed-length sequences with labels, loss mask,
                    positions and cu_seqlens from a packing plan
    collate         THD (packed) and padded collate functions
    split           the held-out split and subset views
    datasets        train and held-out datasets, plain or blended (built from plain arguments)
    sampling        the resumable DP-sharded training stream
    eval_batches    the held-out split as global batches

Names are resolved lazily so ``import megatron_pack.data`` needs neither torch nor the
compiled packing engine until they are used.
"""

_EXPORTS = {
    "SFTDatasetWriter": "megatron_pack.files.indexed",
    "SFTIndexedDataset": "megatron_pack.files.indexed",
    "build_plan": "megatron_pack.packing.plan",
    "PackingPlan": "megatron_pack.packing.plan",
    "PACKING_MODES": "megatron_pack.packing.modes",
    "get_mode": "megatron_pack.packing.modes",
    "PackedSFTDataset": "megatron_pack.data.packed_dataset",
    "required_multiple": "megatron_pack.data.packed_dataset",
    "collate_padded": "megatron_pack.data.collate",
    "collate_thd": "megatron_pack.data.collate",
    "PreprocessConfig": "megatron_pack.preprocess.pipeline",
    "preprocess": "megatron_pack.preprocess.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_pack.data' has no attribute {name!r}")
