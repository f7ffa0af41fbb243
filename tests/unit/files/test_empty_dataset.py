"""An empty SFT dataset (every record rejected) is refused wherever it is opened, on one line
naming the prefix; a dataset with nothing supervised within --seq-length refuses to pack."""

import json

import pytest

from megatron_pack.data.packed_dataset import PackedSFTDataset
from megatron_pack.files.indexed import SFTDatasetWriter, SFTIndexedDataset, check_dataset, conversation_count
from megatron_pack.files.indexed_check import DatasetError, EmptyDatasetError


def write(prefix, docs):
    with SFTDatasetWriter(prefix) as w:
        for tokens, mask in docs:
            w.add(tokens, mask, [0])
    return prefix


@pytest.fixture
def empty(tmp_path):
    return write(str(tmp_path / "empty"), [])


def test_empty_dataset_is_refused_by_every_opener(empty):
    assert conversation_count(empty) == 0
    with pytest.raises(EmptyDatasetError, match=r"empty: empty SFT dataset \(0 conversations"):
        check_dataset(empty)
    for validate in (True, False):  # Megatron's reader would fail on the 0-byte .bin with a traceback
        with pytest.raises(EmptyDatasetError, match="empty SFT dataset"):
            SFTIndexedDataset(empty, validate=validate)
    assert issubclass(EmptyDatasetError, DatasetError)  # every front-end's "bad input" branch


def test_empty_dataset_names_its_summary(empty):
    with open(empty + "_summary.json", "w") as f:
        json.dump({"counts": {"written": 0}}, f)
    with pytest.raises(EmptyDatasetError, match="see .*empty_summary.json"):
        check_dataset(empty)


def test_one_conversation_is_not_empty(tmp_path):
    """Negative control: the same check passes a dataset of one conversation."""
    p = write(str(tmp_path / "one"), [([1, 2, 3], [0, 1, 1])])
    check_dataset(p)
    assert conversation_count(p) == 1 and len(SFTIndexedDataset(p)) == 1


@pytest.mark.parametrize("mask, why", [
    ([0] * 40, "3 without a supervised token within --seq-length 16"),  # nothing supervised anywhere
    ([0] * 30 + [1] * 10, "3 without a supervised token within --seq-length 16"),  # only past the truncation
])
def test_nothing_to_train_on_is_one_line_naming_the_prefix(tmp_path, mask, why):
    p = write(str(tmp_path / "nosup"), [(list(range(1, 41)), mask)] * 3)
    with pytest.raises(EmptyDatasetError) as e:
        PackedSFTDataset(p, 16, "bfd", use_cache=False)
    msg = str(e.value)
    assert msg.startswith(p + ": nothing to train or score on: 3 conversations, 0 packed sequences") and why in msg
    assert "\n" not in msg
    # negative control: one supervised token inside the window and it packs
    q = write(str(tmp_path / "ok"), [(list(range(1, 41)), [0, 1] + [0] * 38)] * 3)
    assert len(PackedSFTDataset(q, 16, "bfd", use_cache=False)) >= 1


def test_nothing_to_train_on_through_the_plan_cache(tmp_path):
    """The cached path (training's default) says the same instead of failing to hash an empty array."""
    p = write(str(tmp_path / "nosup"), [([1, 2, 3, 4], [0, 0, 0, 0])] * 2)
    with pytest.raises(EmptyDatasetError, match="nothing to train or score on"):
        PackedSFTDataset(p, 16, "greedy", cache_dir=str(tmp_path / "plans"))
