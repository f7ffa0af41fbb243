"""Export writes bos/eos ids into config.json for training checkpoints too (they were null):
from the tokenizer given or recorded, else from the import the run started from."""

import json

from megatron_pack.tokenization.tiny_tokenizers import build_wordlevel_tokenizer
from megatron_pack.convert.megatron_to_hf import special_token_ids


def test_ids_from_the_tokenizer(tmp_path):
    tok = build_wordlevel_tokenizer(str(tmp_path / "tok"), ["hello"])
    # the tiny tokenizer's config: bos <|begin_of_text|> (id 0), eos <|eot_id|> (id 4)
    assert special_token_ids({}, [tok]) == {"bos_token_id": 0, "eos_token_id": 4}


def test_an_import_keeps_its_own_ids_and_missing_sources_are_skipped(tmp_path):
    tok = build_wordlevel_tokenizer(str(tmp_path / "tok"), ["hello"])
    assert special_token_ids({"bos_token_id": 7, "eos_token_id": 9}, [tok]) == {"bos_token_id": 7, "eos_token_id": 9}
    assert special_token_ids({}, [None, str(tmp_path / "nope"), tok]) == {"bos_token_id": 0, "eos_token_id": 4}


def test_ids_from_the_import_the_run_started_from(tmp_path):
    from megatron_pack.checkpoint.imported import IMPORT_FORMAT, IMPORT_VERSION, META_NAME

    d = tmp_path / "imp" / "iter_0000000"
    d.mkdir(parents=True)
    (tmp_path / "imp" / "latest_checkpointed_iteration.txt").write_text("0\n")
    (d / META_NAME).write_text(json.dumps({"format": IMPORT_FORMAT, "version": IMPORT_VERSION,
                                           "hf_config": {"bos_token_id": 1, "eos_token_id": 2}}))
    assert special_token_ids({}, [None], [str(tmp_path / "imp")]) == {"bos_token_id": 1, "eos_token_id": 2}


def test_negative_control_no_source_leaves_them_unset(tmp_path):
    assert special_token_ids({}, [None], [str(tmp_path)]) == {"bos_token_id": None, "eos_token_id": None}
