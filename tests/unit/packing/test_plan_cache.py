"""Plan cache: built once, memory-mapped after; corrupt or mismatched files warn and rebuild."""

import glob
import json
import os

import numpy as np
import pytest

from megatron_pack.data.packed_dataset import PackedSFTDataset
from megatron_pack.files.indexed import SFTDatasetWriter, SFTIndexedDataset
from megatron_pack.packing.cache import get_plan
from megatron_pack.packing.plan import build_plan, dataset_supervised


def write(prefix, n=40, seed=0):
    rng = np.random.default_rng(seed)
    with SFTDatasetWriter(str(prefix)) as w:
        for _ in range(n):
            k = int(rng.integers(1, 30))
            w.add(rng.integers(1, 100, k), rng.integers(0, 2, k), [0])
    return SFTIndexedDataset(str(prefix))


@pytest.fixture
def data(tmp_path):
    return write(tmp_path / "d")


def same(a, b):
    np.testing.assert_array_equal(a.pieces, b.pieces)
    np.testing.assert_array_equal(a.seq_offsets, b.seq_offsets)
    assert a.stats == b.stats and a.mode == b.mode and a.max_seq_length == b.max_seq_length


def files(data):
    return sorted(glob.glob(data.prefix + "_plans/*"))


def test_build_then_mmap(data):
    plan = get_plan(data, 32, "bfd")
    assert [os.path.basename(f).split("_", 2)[:2] for f in files(data)] == [["bfd", "L32"]] * 3
    again = get_plan(data, 32, "bfd")
    assert isinstance(again.pieces, np.memmap)
    same(plan, again)
    same(again, build_plan(data.lengths, 32, "bfd", supervised=dataset_supervised(data)))
    # deterministic modes share one file across epochs and seeds; shuffling modes do not
    get_plan(data, 32, "bfd", epoch=3, seed=9)
    assert len(files(data)) == 3
    r0, r1 = get_plan(data, 32, "random", epoch=0), get_plan(data, 32, "random", epoch=1)
    assert len(files(data)) == 9 and not np.array_equal(r0.pieces, r1.pieces)
    same(r1, build_plan(data.lengths, 32, "random", epoch=1, supervised=dataset_supervised(data)))


def corrupt_npy(path):
    raw = bytearray(open(path, "rb").read())
    raw[-5] ^= 0xFF  # flip a data byte, keep the header valid
    open(path, "wb").write(bytes(raw))


@pytest.mark.parametrize("damage", ["flip", "truncate", "json", "fingerprint"])
def test_damaged_cache_warns_and_rebuilds(data, damage):
    get_plan(data, 32, "greedy")
    plan = build_plan(
        data.lengths, 32, "greedy", supervised=dataset_supervised(data)
    )  # not the mmap: it would see the damage
    pieces = next(f for f in files(data) if f.endswith(".pieces.npy"))
    meta = next(f for f in files(data) if f.endswith(".json"))
    if damage == "flip":
        corrupt_npy(pieces)
    elif damage == "truncate":
        open(pieces, "r+b").truncate(100)
    elif damage == "json":
        open(meta, "w").write("{not json")
    else:  # a file claiming to be for another dataset under this key
        m = json.load(open(meta))
        m["inputs"]["dataset"]["lengths_sha256"] = "0" * 64
        json.dump(m, open(meta, "w"))
    with pytest.warns(UserWarning, match="cached packing plan rejected"):
        rebuilt = get_plan(data, 32, "greedy")
    same(plan, rebuilt)
    same(plan, get_plan(data, 32, "greedy"))  # the rebuilt file is valid again


def test_changed_dataset_gets_a_new_plan(tmp_path):
    data = write(tmp_path / "d", seed=0)
    old = get_plan(data, 32, "bfd")
    data = write(tmp_path / "d", seed=1)  # same prefix, different content
    new = get_plan(data, 32, "bfd")
    same(new, build_plan(data.lengths, 32, "bfd", supervised=dataset_supervised(data)))
    assert not np.array_equal(np.asarray(old.pieces), np.asarray(new.pieces))
    assert len(files(data)) == 6


def test_dataset_uses_cache_dir(data, tmp_path):
    ds = PackedSFTDataset(data, 32, "windowed_bfd:window=8", cache_dir=str(tmp_path / "plans"))
    assert len(glob.glob(str(tmp_path / "plans" / "windowed_bfd_L32_*.json"))) == 1
    ds.set_epoch(1)
    assert len(glob.glob(str(tmp_path / "plans" / "*.json"))) == 2


def test_unwritable_cache_dir_warns_and_plans_in_memory(data, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")  # a file where the cache directory should go
    with pytest.warns(UserWarning, match="cannot write the packing plan cache"):
        plan = get_plan(data, 32, "bfd", cache_dir=str(blocker / "plans"))
    same(plan, build_plan(data.lengths, 32, "bfd", supervised=dataset_supervised(data)))


def _rank_main(rank, world, prefix, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        plan = get_plan(SFTIndexedDataset(prefix), 32, "bfd")
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), np.asarray(plan.pieces))
        np.save(os.path.join(out_dir, f"mmap{rank}.npy"), np.array([isinstance(plan.pieces, np.memmap)]))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_rank0_builds_others_mmap(data, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_main, args=(2, data.prefix, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    expect = build_plan(data.lengths, 32, "bfd", supervised=dataset_supervised(data)).pieces
    for r in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{r}.npy"), expect)
        assert np.load(tmp_path / f"mmap{r}.npy")[0]
    assert len(files(data)) == 3
