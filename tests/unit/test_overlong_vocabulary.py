"""One over-long vocabulary: preprocessing's ``split-chat`` (re-render each piece as a chat) and
packing's ``cut-at-turns`` (cut the stored tokens at turn starts); the retired spellings still
work, with a deprecation note, on every command line."""

import subprocess
import sys

import pytest

from megatron_pack.packing.plan import OVERLONG_POLICIES as PACKING_POLICIES
from megatron_pack.packing.plan import apply_overlong, overlong_policy
from megatron_pack.preprocess.overlong import OVERLONG_POLICIES as PREPROCESS_POLICIES
from megatron_pack.preprocess.overlong import overlong_policy as preprocess_policy


def test_two_mechanisms_two_names_one_style():
    assert set(PREPROCESS_POLICIES) == {"truncate", "drop", "split-chat"}
    assert set(PACKING_POLICIES) == {"truncate", "drop", "cut-at-turns"}
    assert all("_" not in p for p in (*PREPROCESS_POLICIES, *PACKING_POLICIES))


def test_retired_spellings_map_with_a_note(capsys):
    assert preprocess_policy("split-turns") == "split-chat"
    assert overlong_policy("split_turns") == "cut-at-turns"
    err = capsys.readouterr().err
    assert "split-turns is deprecated; use --overlong split-chat" in err
    assert "split_turns is deprecated; use --overlong cut-at-turns" in err
    with pytest.raises(ValueError, match="cut-at-turns"):
        overlong_policy("split-chat")  # the preprocess mechanism is not a packing policy
    with pytest.raises(ValueError):
        preprocess_policy("cut-at-turns")


def test_old_and_new_packing_spelling_give_the_same_items():
    turns = [[0, 3, 6, 8]]
    new, _ = apply_overlong([12], 6, "cut-at-turns", turns)
    old, _ = apply_overlong([12], 6, "split_turns", turns)
    assert new.tolist() == old.tolist() == [[0, 0, 6], [0, 6, 12]]


@pytest.mark.parametrize("argv", [
    ["-m", "megatron_pack.train", "--help"],
    ["tools/pack_report.py", "--help"],
    ["tools/plan_parallel.py", "--help"],
    ["tools/preprocess_sft.py", "--help"],
])
def test_every_command_line_lists_the_new_names(argv):
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120).stdout
    assert ("split-chat" in out) if "preprocess" in argv[0] else ("cut-at-turns" in out)
