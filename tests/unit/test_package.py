"""The package imports without GPU extras and exposes the data API the architecture names."""

import subprocess
import sys


def test_import_is_light_and_needs_no_gpu_extras():
    code = ("import sys, megatron_pack, megatron_pack.data, megatron_pack.model; "
            "heavy = [m for m in ('megatron.core', 'transformer_engine', 'flash_attn', 'apex', "
            "'megatron_pack._packing') if m in sys.modules]; print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_data_exports_resolve():
    """Every exported name is the very object its home module defines, nothing else."""
    import importlib

    import megatron_pack.data as data
    from megatron_pack.data.packed_dataset import PackedSFTDataset

    assert data.PackedSFTDataset is PackedSFTDataset
    for name in data.__all__:
        home = importlib.import_module(data._EXPORTS[name])
        assert getattr(data, name) is getattr(home, name), name
        obj = getattr(data, name)
        if hasattr(obj, "__module__") and callable(obj):  # defined there (or re-exported on purpose)
            assert obj.__module__.startswith("megatron_pack."), (name, obj.__module__)
    # negative control: a name mapped to the wrong module would not be the same object
    assert data.collate_thd is not data.collate_padded
    try:
        data.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("unknown names must raise AttributeError")
