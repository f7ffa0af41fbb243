"""megatron_pack.data: chat schemas and templates, tokenizers, the indexed SFT dataset,
packing plans (C++ engine + references) and ``PackedSFTDataset`` with its collate functions.

Names are resolved lazily so ``import megatron_pack.data`` needs neither torch nor the
compiled packing engine until they are used.
"""

_EXPORTS = {
    "SFTDatasetWriter": "megatron_pack.data.indexed",
    "SFTIndexedDataset": "megatron_pack.data.indexed",
    "build_plan": "megatron_pack.data.packing",
    "PackingPlan": "megatron_pack.data.packing",
    "PACKING_MODES": "megatron_pack.data.packing",
    "get_mode": "megatron_pack.data.packing",
    "PackedSFTDataset": "megatron_pack.data.packed_dataset",
    "required_multiple": "megatron_pack.data.packed_dataset",
    "collate_padded": "megatron_pack.data.collate",
    "collate_thd": "megatron_pack.data.collate",
    "PreprocessConfig": "megatron_pack.data.preprocess",
    "preprocess": "megatron_pack.data.preprocess",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_pack.data' has no attribute {name!r}")
