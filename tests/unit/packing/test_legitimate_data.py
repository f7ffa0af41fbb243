"""Runs that do not die on legitimate data: items left with no supervised token are not packed
(counted); a plan-cache meta that is valid JSON but malformed is rebuilt, not a crash."""

import glob
import json

import numpy as np
import pytest

from megatron_pack.files.indexed import SFTDatasetWriter, SFTIndexedDataset
from megatron_pack.packing.cache import get_plan
from megatron_pack.packing.plan import build_plan, dataset_supervised


@pytest.fixture
def data(tmp_path):
    p = str(tmp_path / "d")
    with SFTDatasetWriter(p) as w:
        w.add(list(range(1, 11)), [0] * 8 + [1, 1], [0, 8])  # the answer sits past a 6-token cut
        w.add([1, 2, 3, 4], [0, 1, 1, 1], [0, 1])  # fits, supervised
        w.add([5, 6, 7], [1, 0, 0], [0])  # only the first token is marked: it predicts nothing
        w.add(list(range(1, 13)), [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1], [0, 3, 6, 11])
    return SFTIndexedDataset(p)


def test_truncated_prompt_only_items_are_left_out_and_counted(data):
    plan = build_plan(data.lengths, 6, "bfd", overlong="truncate", supervised=dataset_supervised(data))
    assert sorted(set(plan.doc.tolist())) == [1, 3]
    assert plan.stats.unsupervised_items == 2 and plan.stats.unsupervised_tokens == 6 + 3
    s = plan.stats
    assert s.placed_tokens + s.truncated_tokens + s.dropped_tokens + s.unsupervised_tokens == s.total_tokens
    # negative control: without the counts every item is packed
    assert sorted(set(build_plan(data.lengths, 6, "bfd").doc.tolist())) == [0, 1, 2, 3]


def test_cut_items_are_judged_piece_by_piece(data):
    plan = build_plan(data.lengths, 6, "bfd", overlong="cut-at-turns", turn_starts=data.turns,
                      supervised=dataset_supervised(data))
    pieces = {tuple(p) for p in plan.pieces.tolist()}
    # doc 0 -> [0,6) prompt only (left out) + [6,10) answer; doc 3 -> [0,6) + [6,12), both trained
    assert pieces == {(3, 0, 6), (3, 6, 12), (0, 6, 10), (1, 0, 4)}
    assert plan.stats.unsupervised_items == 2 and plan.stats.unsupervised_tokens == 6 + 3  # doc 0's head, doc 2
    assert plan.stats.placed_tokens == sum(e - s for _, s, e in pieces)


def test_all_unsupervised_gives_an_empty_plan(tmp_path):
    p = str(tmp_path / "z")
    with SFTDatasetWriter(p) as w:
        w.add([1, 2, 3], [0, 0, 0], [0])
    ds = SFTIndexedDataset(p)
    plan = build_plan(ds.lengths, 8, "bfd", supervised=dataset_supervised(ds))
    assert plan.num_sequences == 0 and plan.stats.unsupervised_items == 1


@pytest.mark.parametrize("damage", ["missing_key", "list", "seq_length", "stats_type", "sha_type"])
def test_malformed_plan_meta_is_rebuilt(data, damage):
    first = get_plan(data, 8, "bfd")
    meta_path = glob.glob(data.prefix + "_plans/*.json")[0]
    meta = json.load(open(meta_path))
    if damage == "missing_key":
        del meta["num_pieces"]
    elif damage == "list":
        meta = [meta]
    elif damage == "seq_length":
        meta["max_seq_length"] = 4
    elif damage == "stats_type":
        meta["stats"] = {"no_such_field": 1}
    else:
        meta["sha256"] = "abc"
    json.dump(meta, open(meta_path, "w"))
    with pytest.warns(UserWarning, match="cached packing plan rejected"):
        again = get_plan(data, 8, "bfd")
    np.testing.assert_array_equal(again.pieces, first.pieces)
    assert get_plan(data, 8, "bfd").num_sequences == first.num_sequences  # and the rebuilt file is good
