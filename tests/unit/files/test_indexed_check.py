"""Data that cannot train wrong: crafted corruptions of an SFT indexed dataset are refused on
open, naming file, document and reason; the untouched dataset (and, as a negative control, the
corrupted one with ``validate=False``) opens."""

import struct

import numpy as np
import pytest

from megatron_pack.files.indexed import SFTDatasetWriter, SFTIndexedDataset
from megatron_pack.files.indexed_check import DatasetError, check_token_ids

DOCS = [([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], [0, 2]), ([1, 2, 3], [0, 1, 1], [0, 1]),
        ([10, 11, 12, 13], [0, 0, 1, 1], [0, 2, 3])]


@pytest.fixture
def prefix(tmp_path):
    p = str(tmp_path / "ds")
    with SFTDatasetWriter(p) as w:
        for t, m, s in DOCS:
            w.add(t, m, s)
    return p


def _patch(path, offset, data: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


N = len(DOCS)
LENGTHS_AT, POINTERS_AT = 34, 34 + 4 * N


def _corrupt(prefix, case):
    """Apply one corruption; returns the text the error must contain."""
    if case == "dtype":
        _patch(prefix + ".idx", 17, bytes([8]))  # int32 tokens relabelled uint16
        return "ds.idx: dtype uint16"
    if case == "unknown_dtype":
        _patch(prefix + "_loss_mask.idx", 17, bytes([99]))
        return "unknown dtype code 99"
    if case == "pointer":
        _patch(prefix + ".idx", POINTERS_AT + 8, struct.pack("<q", 8))
        return "document 1: pointer 8"
    if case == "length":
        _patch(prefix + ".idx", LENGTHS_AT + 4, struct.pack("<i", 4))  # doc 1 claims its neighbour's token
        return "document 2: pointer"
    if case == "mask_value":
        _patch(prefix + "_loss_mask.bin", 6, bytes([0x41]))  # doc 1, second token
        return "document 1: loss-mask value 65"
    if case == "turn_far":
        _patch(prefix + "_turns.bin", 4 * 3, struct.pack("<i", 100_000_000))  # doc 1's second turn
        return "document 1: turn start 100000000 outside"
    if case == "turn_negative":
        _patch(prefix + "_turns.bin", 4 * 6, struct.pack("<i", -3))  # doc 2's last turn
        return "document 2: turn start -3 outside"
    if case == "turn_first":
        _patch(prefix + "_turns.bin", 4 * 2, struct.pack("<i", 1))
        return "document 1: first turn start 1"
    if case == "turn_order":
        _patch(prefix + "_turns.bin", 4 * 5, struct.pack("<i", 3))
        _patch(prefix + "_turns.bin", 4 * 6, struct.pack("<i", 2))
        return "document 2: turn starts not increasing"
    if case == "truncated_bin":
        with open(prefix + ".bin", "r+b") as f:
            f.truncate(20)
        return "ds.bin: 20 bytes, the index describes 48: truncated"
    if case == "trailing_bin":
        with open(prefix + "_loss_mask.bin", "ab") as f:
            f.write(b"\0")
        return "trailing bytes"
    raise AssertionError(case)


CASES = ["dtype", "unknown_dtype", "pointer", "length", "mask_value", "turn_far", "turn_negative", "turn_first",
         "turn_order", "truncated_bin", "trailing_bin"]


def test_untouched_dataset_opens(prefix):
    ds = SFTIndexedDataset(prefix)
    assert len(ds) == 3 and ds[1].tokens.tolist() == [1, 2, 3]
    ds.check_vocab(14)


@pytest.mark.parametrize("case", CASES)
def test_corruption_refused_naming_file_document_reason(prefix, case):
    expected = _corrupt(prefix, case)
    with pytest.raises(DatasetError) as e:
        SFTIndexedDataset(prefix)
    assert expected in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["dtype", "pointer", "mask_value", "turn_far", "truncated_bin"])
def test_negative_control_corruption_passes_unvalidated(prefix, case):
    """Megatron's reader alone opens every one of these (the silent wrong training the checks stop)."""
    _corrupt(prefix, case)
    assert len(SFTIndexedDataset(prefix, validate=False)) == 3


def test_token_ids_checked_against_vocabulary(prefix):
    check_token_ids(prefix, 14)
    with pytest.raises(DatasetError, match=r"ds.bin: document 2: token id 13 outside the model's vocabulary of 13"):
        check_token_ids(prefix, 13)
    _patch(prefix + ".bin", 4 * 6, struct.pack("<i", -1))  # doc 1, first token
    with pytest.raises(DatasetError, match="document 1: token id -1"):
        SFTIndexedDataset(prefix).check_vocab(1000)


def test_empty_conversation_and_empty_dataset(tmp_path):
    p = str(tmp_path / "e")
    with SFTDatasetWriter(p) as w:
        w.add([], [], [0])
        w.add([3], [1], [0])
    SFTIndexedDataset(p).check_vocab(4)
    q = str(tmp_path / "z")
    with SFTDatasetWriter(q):
        pass
    check_token_ids(q, 1)  # no tokens: nothing to refuse
    assert np.asarray(SFTIndexedDataset(p).lengths).tolist() == [0, 1]
