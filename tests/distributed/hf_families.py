"""Tiny random HF models of every supported family, built with ``transformers`` (CPU, no download).

Each switches on what sets its family apart, so one logits test per family exercises the
per-family code paths of the mapping and the model:

=============  =========================================================================
``llama``      Llama 2/3: untied output, plain RoPE (the ``tiny`` preset's shapes)
``llama3.1``   Llama 3.1/3.2: RoPE ``llama3`` with factors that are *not* Megatron-Core's
               hard-coded ones (low 2, high 8, original context 64) and tied embeddings
``mistral``    Mistral v0.3: explicit ``head_dim`` (32, not hidden / heads = 16), no sliding
               window, RoPE ``linear`` (factor 2)
``qwen2``      Qwen2.5: q/k/v bias, rms eps 1e-6, theta 1e6
=============  =========================================================================
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 300  # not a multiple of 128: padded to 384 at TP1 and 512 at TP2
FAMILIES = ("llama", "llama3.1", "mistral", "qwen2")
#: original_max_position_embeddings of the llama3.1 model: the test rows go beyond it.
LLAMA31_ORIGINAL_CONTEXT = 64
COMMON = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=4096, initializer_range=0.1,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
    if family == "llama3.1":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 2.0,
                "high_freq_factor": 8.0, "original_max_position_embeddings": LLAMA31_ORIGINAL_CONTEXT}
        return tf.LlamaConfig(**COMMON, rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, head_dim=32, rms_norm_eps=1e-5, sliding_window=None,
                                rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0},
                                tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**COMMON, rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False,
                              tie_word_embeddings=False)
    raise ValueError(family)


def build_hf_model(family: str, path: Path, seed: int = 0):
    """Save a random fp32 model of ``family`` (std 0.1: logits far from uniform) with a
    generation config and minimal tokenizer files under ``path``; returns the model."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hf_config(family)).float().eval()
    if family == "qwen2":  # HF initialises biases to zero: make them count
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.1)
    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = tf.GenerationConfig(bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0,
                                                  temperature=0.6, top_p=0.9, do_sample=True)
    model.save_pretrained(str(path), safe_serialization=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    return model


def load_hf(path) -> "torch.nn.Module":
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def hf_doc_logits(model, docs) -> torch.Tensor:
    """Each document alone through HF (positions from 0), concatenated: what a packed row with
    a document mask must reproduce."""
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([d])).logits[0] for d in docs])
