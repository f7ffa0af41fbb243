"""The fetched real model (SmolLM2-135M-Instruct, ``scripts/fetch_small_model.sh``) after
``hf-to-megatron``: megatron_pack's logits on one packed row of three chats with the document
mask equal transformers' logits of each chat alone (fp32). Negative control: the same row
without the mask (one causal segment, positions running on) leaves the first chat equal and
moves the later ones far outside the tolerance.

Skipped unless the model is present: ``$MEGATRON_PACK_SMALL_MODEL`` or the fetch script's
default cache path. About 30 s on 2 CPU cores.
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

DEFAULT = os.path.join(os.environ.get("MEGATRON_PACK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                       "megatron_pack"), "smollm2-135m-instruct")
MODEL_DIR = os.environ.get("MEGATRON_PACK_SMALL_MODEL") or DEFAULT
TOL = 5e-4  # fp32 through 30 layers; logits span about +-30 here and the measured gap is ~9e-5
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Air scatters blue sunlight more than red light."},
     {"role": "user", "content": "And at sunset?"},
     {"role": "assistant", "content": "Light crosses more air, so the blue is scattered away and red remains."}],
    [{"role": "user", "content": "Name a prime number greater than ten."}, {"role": "assistant", "content": "Eleven."}],
]

pytestmark = pytest.mark.skipif(
    not os.path.isfile(os.path.join(MODEL_DIR, "model.safetensors")),
    reason=f"real small model not found at {MODEL_DIR} (run scripts/fetch_small_model.sh or set "
           "MEGATRON_PACK_SMALL_MODEL to its HF directory)")


def _docs() -> list[list[int]]:
    """The chats as preprocessing tokenizes them (the model's own Jinja template)."""
    from megatron_pack.preprocess.encode import encode_conversation
    from megatron_pack.preprocess.schema import normalize_record
    from megatron_pack.templates.registry import auto_template_name, build_template
    from megatron_pack.tokenization.tokenizer import load_tokenizer

    tok = load_tokenizer(MODEL_DIR)
    template = build_template(auto_template_name(tok), tok)
    return [encode_conversation(template, normalize_record({"messages": c})[1])[0].tolist() for c in CHATS]


def _row(docs, document_mask: bool) -> dict:
    tokens = torch.tensor([t for d in docs for t in d])[None]
    n = tokens.shape[1]
    if not document_mask:  # what a no-mask run sees: one causal segment, positions running on
        return {"tokens": tokens, "position_ids": torch.arange(n)[None],
                "cu_seqlens": torch.tensor([0, n], dtype=torch.int32), "num_cu_seqlens": 2, "max_seqlen": n}
    lens = [len(d) for d in docs]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {"tokens": tokens, "position_ids": torch.cat([torch.arange(k) for k in lens])[None],
            "cu_seqlens": cu, "num_cu_seqlens": len(cu), "max_seqlen": max(lens)}


@pytest.fixture(scope="module")
def logits(tmp_path_factory):
    """(docs, HF logits of each doc alone, megatron masked row, megatron unmasked row)."""
    from megatron_pack.checkpoint.imported import load_imported_weights, preset_from_metadata, read_import_metadata
    from megatron_pack.convert import convert_hf_to_megatron
    from megatron_pack.model import build_model, transformer_config
    from megatron_pack.model.packed import model_inputs
    from megatron_pack.parallel import cpu_compat, destroy_distributed, initialize_distributed, set_seed

    docs = _docs()
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.cat([hf(input_ids=torch.tensor([d])).logits[0] for d in docs])
    vocab = hf.config.vocab_size
    del hf
    out = str(tmp_path_factory.mktemp("real_import") / "import")
    convert_hf_to_megatron(MODEL_DIR, out, progress=False)
    initialize_distributed()
    try:
        set_seed(1)
        preset = preset_from_metadata(read_import_metadata(out))
        model = build_model(preset, transformer_config(preset, use_cpu_initialization=True))
        load_imported_weights(out, model, preset=preset, vocab_size=preset.vocab_size)
        model.eval()
        with torch.no_grad():
            got = {m: model(**model_inputs(_row(docs, m))).reshape(ref.shape[0], -1)[:, :vocab] for m in (True, False)}
    finally:
        destroy_distributed()
        cpu_compat.disable()  # process-wide: the CPU redirection tests expect it off
    return docs, ref, got[True], got[False]


def test_packed_row_with_mask_equals_each_chat_alone_in_transformers(logits):
    docs, ref, masked, _ = logits
    assert len(docs) == 3 and min(map(len, docs)) > 10
    assert ref.std() > 1.0, "real weights give spread-out logits"
    gap = (masked - ref).abs().max().item()
    print(f"max |megatron packed (mask) - HF alone| = {gap:.2e} over {ref.shape[0]} tokens")
    assert gap <= TOL
    assert torch.equal(masked.argmax(-1), ref.argmax(-1))


def test_negative_control_without_the_mask_later_chats_differ(logits):
    docs, ref, _, unmasked = logits
    first = len(docs[0])
    assert (unmasked[:first] - ref[:first]).abs().max().item() <= TOL  # causal: the first chat sees nothing else
    later = (unmasked[first:] - ref[first:]).abs().max().item()
    print(f"without the mask, later chats: max |diff| = {later:.2f}")
    assert later > 100 * TOL
