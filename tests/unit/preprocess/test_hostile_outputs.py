"""Preprocessing that cannot write (a read-only directory, a full disk) or is given a chat template
that is not a string: one line naming the file and the reason, exit 2, no temporary file left."""

import errno
import importlib.util
import json
import os
import shutil

import pytest
from test_preprocess import GOOD, write_lines

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "..", "tools", "preprocess_sft.py")


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("preprocess_sft", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(cli, tmp_path, tok, out_dir):
    src = write_lines(tmp_path / "in.jsonl", GOOD)
    return cli.main(["--input", src, "--tokenizer", tok, "--output-prefix", str(out_dir / "sft"), "--no-plot",
                     "--no-progress"])


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preprocess_sft.py: error: "), err
    return err[0]


@pytest.mark.parametrize("template", [42, {"default": "{{ x }}"}, [{"name": "default", "template": 7}]])
def test_chat_template_that_is_not_a_string_is_refused(cli, wordlevel_dir, tmp_path, capsys, template):
    """An integer ``chat_template`` used to be ignored and a template guessed (rc 0)."""
    tok = tmp_path / "tok"
    shutil.copytree(wordlevel_dir, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    (tok / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    (tmp_path / "out").mkdir()
    assert _run(cli, tmp_path, str(tok), tmp_path / "out") == 2
    line = _one_error_line(capsys)
    assert f"{tok / 'tokenizer_config.json'}: chat_template" in line
    assert os.listdir(tmp_path / "out") == []
    # control: the same directory with a string template preprocesses
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert _run(cli, tmp_path, str(tok), tmp_path / "out") == 0


def test_read_only_output_directory(cli, wordlevel_dir, tmp_path, capsys, monkeypatch):
    """Root ignores file modes, so the directory's refusal is simulated where the files are opened."""
    from megatron_pack.preprocess import pipeline

    out = tmp_path / "ro"
    out.mkdir()

    def read_only_open(path, mode="r", *a, **kw):
        if str(path).startswith(str(out)) and any(c in mode for c in "wax+"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, mode, *a, **kw)

    monkeypatch.setattr(pipeline, "open", read_only_open, raising=False)
    assert _run(cli, tmp_path, wordlevel_dir, out) == 2
    line = _one_error_line(capsys)
    assert f"{out}/sft_rejects.jsonl.tmp-" in line and "Permission denied (no permission to write there" in line
    assert os.listdir(out) == []


def test_full_disk_while_writing_leaves_nothing(cli, wordlevel_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC from the dataset writer's ``write`` (no file name, as a real one): the prefix and the
    reason on one line; every temporary file removed."""
    from megatron_pack.files.indexed import SFTDatasetWriter

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SFTDatasetWriter, "add", full)
    out = tmp_path / "full"
    out.mkdir()
    assert _run(cli, tmp_path, wordlevel_dir, out) == 2
    line = _one_error_line(capsys)
    assert f"{out / 'sft'}: No space left on device (the disk is full; nothing was left half-written)" in line
    assert os.listdir(out) == []


def test_full_disk_in_the_summary_leaves_no_temporary(tmp_path, monkeypatch):
    from megatron_pack.files import atomic

    real_dump = json.dump

    def dump_then_full(obj, f, **kw):
        real_dump({"partial": True}, f)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.json, "dump", dump_then_full)
    with pytest.raises(OSError):
        atomic.write_json_atomic({"a": 1}, str(tmp_path / "x.json"))
    assert os.listdir(tmp_path) == []
