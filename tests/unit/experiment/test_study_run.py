"""The study end to end on a tiny random Llama with the sample's tokenizer (no fetched model):
prepare, the base model's scores, one no-mask setting trained, exported, scored in transformers
with its leakage; the seed state and the report are written and record no absolute path."""

import json
import os
import shutil

import pytest

pytestmark = pytest.mark.slow


def tiny_hf_model(tmp_path) -> tuple[str, str]:
    """An HF directory (random 2-layer Llama + the sample's tokenizer) and the sample's chats."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer

    from megatron_pack.preprocess.sample import prepare_sample

    jsonl, tokdir = prepare_sample(str(tmp_path / "sample"))
    vocab = Tokenizer.from_file(os.path.join(tokdir, "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    hf = tmp_path / "hf"
    tf.LlamaForCausalLM(cfg).save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokdir, name), hf)
    return str(hf), jsonl


def test_study_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    from megatron_pack.experiment.study_cli import main

    hf, jsonl = tiny_hf_model(tmp_path)
    chats = [r for r in map(json.loads, open(jsonl)) if "messages" in r][:30]
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    qa = [{"messages": [m for m in r["messages"] if m["role"] != "system"][:2]} for r in chats[:3]]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    out = tmp_path / "out"
    assert main(["--model", hf, "--data-path", str(tmp_path / "chats.jsonl"), "--qa-path", str(tmp_path / "qa.jsonl"),
                 "--output-dir", str(out), "--train-docs", "6", "--heldout-docs", "6", "--qa", "3",
                 "--seq-length", "256", "--layers", "1", "--settings", "greedy/nomask"]) == 0
    text = (out / "study_seed1234.json").read_text()
    assert str(tmp_path) not in text  # the state records no absolute path of this machine
    state = json.loads(text)
    row = state["rows"]["greedy/nomask"]
    assert row["log_file"] == os.path.join("seed1234", "runs", "greedy_nomask.jsonl")
    assert state["prepared"]["train"] == os.path.join("data", "train")
    assert row["generation"]["prompts"] == 3 and row["heldout_loss_hf"] > 0
    assert set(row["leakage"]) == {"file order", "shuffled"} and state["base"]["mask_check"]["attention_max"] == 0
    assert not (out / "seed1234" / "ckpt" / "greedy_nomask").exists()  # the export is what was scored
    md = (out / "study.md").read_text()
    assert "fine-tuned greedy/nomask" in md and "base (no fine-tune)" in md
    for png in ("study_quality.png", "study_leakage.png", "loss_vs_time.png"):
        assert (out / png).stat().st_size > 0
