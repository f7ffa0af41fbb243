"""FrontDoorParser: one-line errors, the nearest flag suggested, no abbreviations, help that
marks required flags and shows each default once."""

import argparse

import pytest

from megatron_pack.frontdoor import FrontDoorParser, unknown_message


def parser():
    p = FrontDoorParser(prog="tool")
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per sequence")
    p.add_argument("--sequence-parallel", action="store_true", help="shard activations")
    p.add_argument("--data-path", required=True, help="dataset prefix")
    p.add_argument("--eval-iters", type=int, default=None, help="batches (default: the whole split)")
    return p


def error_of(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # no usage block
    return err


def test_typo_names_the_nearest_flag_before_complaining_about_required_ones(capsys):
    err = error_of(["--seq-lenght", "8"], capsys)
    assert err.startswith("tool: error: unrecognized argument --seq-lenght (did you mean --seq-length?)")


def test_prefixes_are_not_abbreviations_but_get_suggestions(capsys):
    err = error_of(["--data-path", "x", "--seq", "8"], capsys)
    assert "--seq (did you mean --seq-length or --sequence-parallel?)" in err


def test_missing_required_and_bad_values_are_one_line(capsys):
    assert "required: --data-path" in error_of([], capsys)
    assert "invalid int value" in error_of(["--data-path", "x", "--seq-length", "many"], capsys)


def test_valid_command_line_parses():
    ns = parser().parse_args(["--data-path", "x", "--seq-length=8"])
    assert (ns.data_path, ns.seq_length, ns.sequence_parallel) == ("x", 8, False)


def test_help_marks_required_and_shows_defaults_once():
    text = parser().format_help()
    assert "dataset prefix (required)" in text
    assert "tokens per sequence (default: 4096)" in " ".join(text.split())
    assert text.count("default") == 2  # seq-length's, and eval-iters' own words: never doubled
    assert "(default: False)" not in text and "(default: None)" not in text


def test_negative_control_plain_argparse_prints_a_usage_block(capsys):
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--seq-length", type=int)
    with pytest.raises(SystemExit):
        p.parse_args(["--seq-lenght", "8"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) > 1 and "did you mean" not in err


def test_unknown_message_forms():
    assert unknown_message(["--zzz", "1"], ["--a"]) == "unrecognized argument --zzz"
    assert unknown_message(["stray"], ["--a"]) == "unexpected argument(s): stray"
    assert "not a flag of this command" in unknown_message(["--a"], ["--a"])


def test_a_refusal_is_printed_by_rank_0_only(monkeypatch, capsys):
    from megatron_pack import frontdoor

    monkeypatch.setattr(frontdoor, "QUIET_RANK_WAIT_S", 0.0)
    for env, speaks in (({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3", "LOCAL_RANK": "1"}, False),
                        ({"LOCAL_RANK": "1"}, False), ({"RANK": "4", "LOCAL_RANK": "0"}, False)):
        for name in ("RANK", "LOCAL_RANK"):
            monkeypatch.delenv(name, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert frontdoor.speaks_for_the_job() is speaks
        assert frontdoor.refusal("prog", "bad input") == 2
        assert capsys.readouterr().err == ("prog: error: bad input\n" if speaks else "")  # negative control: rank 0
