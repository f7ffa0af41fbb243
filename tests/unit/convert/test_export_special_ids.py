"""``megatron-to-hf``: the special-token ids and generation config the checkpoint recorded win over
the tokenizer's unless ``--special-tokens-from tokenizer``; the export says which it used (log line,
``megatron_pack_export.json``) and loads in transformers with those ids."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pack.convert.export_specials import (
    PROVENANCE_NAME,
    Said,
    checkpoint_said,
    resolve_export_specials,
    tokenizer_said,
)
from megatron_pack.tokenization.tiny_tokenizers import build_wordlevel_tokenizer

REPO = Path(__file__).resolve().parents[3]
TOOL = str(REPO / "tools" / "convert_checkpoint.py")

# The checkpoint's record (from the HF model it was imported from) and the tokenizer's disagree.
CKPT_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
CKPT_GEN = {"bos_token_id": 1, "eos_token_id": [2, 9], "temperature": 0.6, "do_sample": True}
TOK_IDS = {"bos_token_id": 0, "eos_token_id": 4, "pad_token_id": 5}  # the tiny tokenizer's config
TOK_GEN = {"bos_token_id": 0, "eos_token_id": 4, "temperature": 0.9, "do_sample": True}


def tokenizer_dir(path, generation=TOK_GEN) -> str:
    tok = build_wordlevel_tokenizer(str(path), ["hello"])
    if generation is not None:
        Path(tok, "generation_config.json").write_text(json.dumps(generation))
    return tok


def imported(tmp_path, ids=CKPT_IDS, generation=CKPT_GEN, tokenizer=None) -> str:
    """An ``hf-to-megatron`` import of a tiny Llama whose config.json / generation_config.json
    hold ``ids`` / ``generation``, with ``tokenizer`` copied into it."""
    from test_convert_mapping import hf_config, write_hf_dir

    from megatron_pack.convert import convert_hf_to_megatron

    hf = tmp_path / "hf"
    write_hf_dir(hf, cfg=hf_config(**ids))
    if generation is not None:
        (hf / "generation_config.json").write_text(json.dumps(generation))
    convert_hf_to_megatron(str(hf), str(tmp_path / "meg"), tokenizer=tokenizer, progress=False)
    return str(tmp_path / "meg")


def export(tmp_path, name, *flags) -> tuple:
    r = subprocess.run([sys.executable, TOOL, "megatron-to-hf", "--load", str(tmp_path / "meg"), "--output",
                        str(tmp_path / name), "--no-progress", *flags], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    return r, tmp_path / name


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


def test_checkpoint_wins_unless_the_flag_says_tokenizer_and_transformers_loads_it(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    imported(tmp_path, tokenizer=tokenizer_dir(tmp_path / "tok"))  # the import keeps the tokenizer's files
    r, out = export(tmp_path, "default")
    assert r.returncode == 0, r.stderr
    cfg = read(out, "config.json")
    assert {k: cfg[k] for k in CKPT_IDS} == CKPT_IDS
    assert read(out, "generation_config.json") == CKPT_GEN  # not the tokenizer directory's copy
    prov = read(out, PROVENANCE_NAME)
    assert prov["special_tokens_from"] == "checkpoint" and prov["generation_config_from"] == "checkpoint"
    assert {k: v["from"] for k, v in prov["special_tokens"].items()} == dict.fromkeys(CKPT_IDS, "checkpoint")
    assert prov["overruled"]["eos_token_id"] == 4 and prov["overruled"]["generation_config"] == TOK_GEN
    line = [x for x in r.stdout.splitlines() if x.startswith("special tokens")]
    assert line == ["special tokens from the checkpoint: bos 1, eos 2, pad 3; generation_config.json from the "
                    "checkpoint (the tokenizer's differ: bos 0, eos 4, pad 5, generation_config.json; "
                    "--special-tokens-from tokenizer to use them)"], r.stdout
    # what transformers reads back
    assert AutoConfig.from_pretrained(str(out)).eos_token_id == 2
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == [2, 9] and gen.bos_token_id == 1 and gen.temperature == 0.6
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, 3)
    assert model.generation_config.eos_token_id == [2, 9]

    r, out = export(tmp_path, "by_tokenizer", "--special-tokens-from", "tokenizer")
    assert r.returncode == 0, r.stderr
    cfg = read(out, "config.json")
    assert {k: cfg[k] for k in TOK_IDS} == TOK_IDS
    assert read(out, "generation_config.json") == TOK_GEN
    assert read(out, PROVENANCE_NAME)["special_tokens_from"] == "tokenizer"
    assert "special tokens from the tokenizer: bos 0, eos 4, pad 5" in r.stdout
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 4, 5)
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == 4


def test_negative_controls_nothing_recorded_falls_back_and_a_bad_flag_is_a_usage_error(tmp_path):
    # a checkpoint that records nothing: the tokenizer's are used, and the record says so
    imported(tmp_path, ids={}, generation=None, tokenizer=tokenizer_dir(tmp_path / "tok"))
    r, out = export(tmp_path, "default")
    assert r.returncode == 0, r.stderr
    assert {k: read(out, "config.json")[k] for k in TOK_IDS} == TOK_IDS
    assert read(out, "generation_config.json") == TOK_GEN
    prov = read(out, PROVENANCE_NAME)
    assert prov["generation_config_from"] == "tokenizer" and prov["overruled"] == {}
    assert {k: v["from"] for k, v in prov["special_tokens"].items()} == dict.fromkeys(TOK_IDS, "tokenizer")
    r, out = export(tmp_path, "bad", "--special-tokens-from", "both")
    assert r.returncode == 2 and "invalid choice: 'both'" in r.stderr and not out.exists()


def test_the_preferred_source_wins_key_by_key_and_the_other_fills_gaps():
    ck = Said({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}, {"eos_token_id": 2})
    tok = Said({"bos_token_id": 0, "eos_token_id": 4, "pad_token_id": 5}, None)
    s = resolve_export_specials(ck, tok)
    assert s.ids == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 5}
    assert s.came_from == {"bos_token_id": "checkpoint", "eos_token_id": "checkpoint", "pad_token_id": "tokenizer",
                           "generation_config": "checkpoint"}
    assert s.overruled == {"bos_token_id": 0, "eos_token_id": 4}
    t = resolve_export_specials(ck, tok, "tokenizer")
    assert t.ids == {"bos_token_id": 0, "eos_token_id": 4, "pad_token_id": 5}
    assert t.generation_config == {"eos_token_id": 2} and t.came_from["generation_config"] == "checkpoint"
    with pytest.raises(ValueError, match="--special-tokens-from x: choose checkpoint or tokenizer"):
        resolve_export_specials(ck, tok, "x")


def test_tokenizer_ids_and_missing_sources_are_skipped(tmp_path):
    tok = tokenizer_dir(tmp_path / "tok", generation=None)
    said = tokenizer_said([None, str(tmp_path / "nope"), tok])
    assert said.ids == TOK_IDS and said.where == tok and said.generation_config is None
    assert tokenizer_said([None]).ids == dict.fromkeys(TOK_IDS)  # negative control: no source, nothing said


def test_checkpoint_ids_from_the_import_the_run_started_from(tmp_path):
    from megatron_pack.checkpoint.imported import IMPORT_FORMAT, IMPORT_VERSION, META_NAME

    d = tmp_path / "imp" / "iter_0000000"
    d.mkdir(parents=True)
    (tmp_path / "imp" / "latest_checkpointed_iteration.txt").write_text("0\n")
    (d / META_NAME).write_text(json.dumps({"format": IMPORT_FORMAT, "version": IMPORT_VERSION,
                                           "hf_config": {"bos_token_id": 1, "eos_token_id": 2},
                                           "generation_config": {"eos_token_id": 2}}))
    said = checkpoint_said({"eos_token_id": 7}, None, [str(tmp_path / "imp")])
    assert said.ids == {"bos_token_id": 1, "eos_token_id": 7, "pad_token_id": None}  # its own record first
    assert said.generation_config == {"eos_token_id": 2}
    assert checkpoint_said({}, None, [str(tmp_path)]).ids == dict.fromkeys(TOK_IDS)  # no import there
