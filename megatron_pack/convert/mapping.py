"""HF Llama / Mistral / Qwen2 <-> Megatron-Core GPTModel weight mapping, with tensor-parallel sharding.

Pure tensor functions, no I/O. Names on the Megatron side are *canonical*: Transformer
Engine's fused names, which are also what Megatron-Core writes into dist checkpoints for
local layers (``input_layernorm`` -> ``self_attention.linear_qkv.layer_norm_weight``);
:func:`megatron_pack.model.state_keys.model_key` turns them into whatever a built model's ``state_dict`` calls them.

Fused tensors (per layer, ``G`` query groups, ``H/G`` query heads per group, head dim ``d``)::

    linear_qkv  rows: [q_0 (H/G*d) k_0 (d) v_0 (d)] [q_1 k_1 v_1] ... [q_{G-1} k v]
                TP rank r holds groups r*G/tp .. (r+1)*G/tp - 1: a contiguous row block
    linear_fc1  rows: [gate_r ; up_r] on TP rank r, gate/up each split in tp row blocks;
                unsharded (TP 1, and the dist checkpoint's global tensor): [gate ; up]

Qwen2's q/k/v biases go into ``linear_qkv.bias`` in the same group-interleaved row order.
RoPE needs no permutation: HF Llama weights are stored for ``rotate_half`` and Megatron-Core
(``rotary_interleaved=False``) rotates halves the same way (the logits tests check it).
"""

from __future__ import annotations

import torch

from megatron_pack.model.presets import LlamaPreset
from megatron_pack.model.state_keys import MEG_EMBEDDING, MEG_FINAL_NORM, MEG_OUTPUT, MEGATRON_LAYER_NAMES, model_key  # noqa: F401

# Per-layer names: canonical Megatron name -> HF Llama name (after "model.layers.{i}.").
LAYER_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
}
HF_LAYER_NAMES = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
HF_QKV_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
MEG_QKV_BIAS = "self_attention.linear_qkv.bias"
HF_EMBEDDING, HF_FINAL_NORM, HF_OUTPUT = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def hf_layer_names(preset: LlamaPreset) -> tuple:
    """HF names of one layer's tensors for this architecture (Qwen2 adds the q/k/v biases)."""
    return HF_LAYER_NAMES + (HF_QKV_BIASES if preset.qkv_bias else ())


def hf_layer_key(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def check_tp(preset: LlamaPreset, tp: int) -> None:
    """TP must split query heads, key/value groups and the FFN evenly."""
    if tp < 1:
        raise ValueError(f"tensor model parallel size must be >= 1, got {tp}")
    for what, n in (("attention heads", preset.num_attention_heads), ("key/value heads (query groups)",
                    preset.num_query_groups), ("FFN hidden size", preset.ffn_hidden_size)):
        if n % tp:
            raise ValueError(f"tensor model parallel size {tp} does not divide the {n} {what}")


def check_pp(preset: LlamaPreset, pp: int) -> None:
    if pp < 1 or preset.num_layers % pp:
        raise ValueError(f"pipeline model parallel size {pp} does not divide the {preset.num_layers} layers")


# ---- attention --------------------------------------------------------------------------------

def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset: LlamaPreset) -> torch.Tensor:
    """HF q/k/v projections -> Megatron's group-interleaved ``linear_qkv`` (unsharded)."""
    g, d = preset.num_query_groups, preset.kv_channels
    per = preset.num_attention_heads // g
    h = q.shape[-1]
    qkv = torch.cat([q.reshape(g, per * d, h), k.reshape(g, d, h), v.reshape(g, d, h)], dim=1)
    return qkv.reshape(g * (per + 2) * d, h)


def interleave_qkv_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, preset: LlamaPreset) -> torch.Tensor:
    """The q/k/v biases in ``linear_qkv``'s row order (a bias is a weight with one column)."""
    return interleave_qkv(q[:, None], k[:, None], v[:, None], preset)[:, 0]


def split_qkv(qkv: torch.Tensor, preset: LlamaPreset, groups: int | None = None):
    """Inverse of :func:`interleave_qkv`; ``groups`` = the groups in ``qkv`` (a TP shard has fewer)."""
    g = preset.num_query_groups if groups is None else groups
    d = preset.kv_channels
    per = preset.num_attention_heads // preset.num_query_groups
    h = qkv.shape[-1]
    if qkv.shape[0] != g * (per + 2) * d:
        raise ValueError(f"linear_qkv has {qkv.shape[0]} rows, expected {g} groups x ({per}+2) x {d}")
    x = qkv.reshape(g, (per + 2) * d, h)
    q, k, v = torch.split(x, [per * d, d, d], dim=1)
    return q.reshape(g * per * d, h), k.reshape(g * d, h), v.reshape(g * d, h)


# ---- generic TP splits -------------------------------------------------------------------------

def shard(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous block of ``t`` along ``dim`` (a copy, so the whole tensor can be freed)."""
    if t.shape[dim] % tp:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} does not split over {tp} TP ranks")
    return torch.chunk(t, tp, dim=dim)[rank].contiguous().clone()


def fc1_shard(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    return torch.cat([shard(gate, tp, rank, 0), shard(up, tp, rank, 0)], dim=0)


def fc1_merge(shards: list) -> tuple:
    """``[gate_r ; up_r]`` per TP rank -> (gate, up)."""
    gates, ups = zip(*(torch.chunk(s, 2, dim=0) for s in shards))
    return torch.cat(gates, dim=0), torch.cat(ups, dim=0)


# ---- vocabulary ---------------------------------------------------------------------------------

def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to ``padded`` (the rows no token id reaches)."""
    if t.shape[0] > padded:
        raise ValueError(f"vocabulary of {t.shape[0]} rows exceeds the padded size {padded}")
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])], dim=0)


def strip_vocab(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if t.shape[0] < vocab_size:
        raise ValueError(f"embedding has {t.shape[0]} rows, fewer than the vocabulary size {vocab_size}")
    return t[:vocab_size]


def vocab_rows(vocab_size: int, padded: int, tp: int, rank: int) -> tuple:
    """(start, end) of real vocabulary rows in TP rank ``rank``'s block of the padded table, and
    how many zero rows follow them in that block."""
    per = padded // tp
    start, end = rank * per, (rank + 1) * per
    real_end = min(end, vocab_size)
    return start, max(start, real_end), end - max(start, real_end)


# ---- one layer, both directions ------------------------------------------------------------------

def hf_layer_to_megatron(hf: dict, preset: LlamaPreset, tp: int) -> list:
    """HF tensors of one layer (names as in ``HF_LAYER_NAMES``) -> one dict per TP rank
    (canonical Megatron names)."""
    qkv = interleave_qkv(hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"],
                         hf["self_attn.v_proj.weight"], preset)
    bias = (interleave_qkv_bias(*(hf[n] for n in HF_QKV_BIASES), preset) if preset.qkv_bias else None)
    out = []
    for r in range(tp):
        out.append({
            "self_attention.linear_qkv.layer_norm_weight": hf["input_layernorm.weight"].clone(),
            "self_attention.linear_qkv.weight": shard(qkv, tp, r, 0),
            "self_attention.linear_proj.weight": shard(hf["self_attn.o_proj.weight"], tp, r, 1),
            "mlp.linear_fc1.layer_norm_weight": hf["post_attention_layernorm.weight"].clone(),
            "mlp.linear_fc1.weight": fc1_shard(hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"], tp, r),
            "mlp.linear_fc2.weight": shard(hf["mlp.down_proj.weight"], tp, r, 1),
        })
        if bias is not None:
            out[-1][MEG_QKV_BIAS] = shard(bias, tp, r, 0)
    return out


def megatron_layer_to_hf(shards: list, preset: LlamaPreset) -> dict:
    """One dict per TP rank (canonical names; a single unsharded dict works as TP 1) -> HF tensors."""
    tp = len(shards)
    qkv = torch.cat([s["self_attention.linear_qkv.weight"] for s in shards], dim=0)
    q, k, v = split_qkv(qkv, preset)
    gate, up = fc1_merge([s["mlp.linear_fc1.weight"] for s in shards])
    for name in LAYER_NORMS:
        first = shards[0][name]
        if any(not torch.equal(first, s[name]) for s in shards[1:]):
            raise ValueError(f"{name} differs between the {tp} TP ranks (it must be replicated)")
    out = {
        # clones: a tensor read from a safetensors file may keep the file's whole mapping resident
        "input_layernorm.weight": shards[0]["self_attention.linear_qkv.layer_norm_weight"].clone(),
        "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
        "self_attn.o_proj.weight": torch.cat([s["self_attention.linear_proj.weight"] for s in shards], dim=1),
        "post_attention_layernorm.weight": shards[0]["mlp.linear_fc1.layer_norm_weight"].clone(),
        "mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up,
        "mlp.down_proj.weight": torch.cat([s["mlp.linear_fc2.weight"] for s in shards], dim=1),
    }
    if preset.qkv_bias:
        if any(MEG_QKV_BIAS not in s for s in shards):
            raise ValueError(f"the architecture has q/k/v biases but a shard lacks {MEG_QKV_BIAS}")
        bias = torch.cat([s[MEG_QKV_BIAS] for s in shards], dim=0)[:, None]
        out.update(zip(HF_QKV_BIASES, (b[:, 0] for b in split_qkv(bias, preset))))
    return out


def hf_shapes(preset: LlamaPreset) -> dict:
    """Expected shape of every HF tensor (per-layer names use layer 0's form without the prefix)."""
    h, f, d = preset.hidden_size, preset.ffn_hidden_size, preset.kv_channels
    nq, nkv, v = preset.num_attention_heads, preset.num_query_groups, preset.vocab_size
    layer = {
        "input_layernorm.weight": (h,), "self_attn.q_proj.weight": (nq * d, h),
        "self_attn.k_proj.weight": (nkv * d, h), "self_attn.v_proj.weight": (nkv * d, h),
        "self_attn.o_proj.weight": (h, nq * d), "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f),
    }
    if preset.qkv_bias:
        layer.update({"self_attn.q_proj.bias": (nq * d,), "self_attn.k_proj.bias": (nkv * d,),
                      "self_attn.v_proj.bias": (nkv * d,)})
    top = {HF_EMBEDDING: (v, h), HF_FINAL_NORM: (h,)}
    if not preset.tie_word_embeddings:
        top[HF_OUTPUT] = (v, h)
    return {"layer": layer, "top": top}
