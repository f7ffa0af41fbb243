"""HF ``config.json`` <-> :class:`~megatron_pack.model.architecture.Architecture`.

Supported (one mapping, per-family switches):

=================================  ===========  =============================================
family (``model_type``)            q/k/v bias   notes
=================================  ===========  =============================================
Llama 2 / 3 / 3.1 / 3.2 / 3.3,     no           tied embeddings (3.2 1B/3B, SmolLM), explicit
SmolLM (``llama``)                              ``head_dim``, RoPE ``llama3`` / ``linear``
Mistral v0.3 (``mistral``)         no           sliding window must be off (``null``)
Qwen2 / Qwen2.5 (``qwen2``)        yes          ``use_sliding_window`` must be false
=================================  ===========  =============================================

Refused, with the key and value named: sliding-window attention, mixture-of-experts, RoPE
types other than default/linear/llama3 (yarn, dynamic, longrope, ...), partial rotary
embeddings, activations other than SiLU, biases on o_proj or the MLP, other model types.
Here (in ``model/``) so that training and the planner can read a config without the
converter; :mod:`megatron_pack.convert.hf_config` wraps it for conversion.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from megatron_pack.model.architecture import SIZE_LIMITS, Architecture, ArchitectureError, size_problem

HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                 "rms_norm_eps")
#: Size keys of a config -> the architecture field whose bound (``SIZE_LIMITS``) they obey; checked
#: before anything is sized from them.
SIZE_KEYS = {"hidden_size": "hidden_size", "intermediate_size": "ffn_hidden_size",
             "num_attention_heads": "num_attention_heads", "num_hidden_layers": "num_layers",
             "vocab_size": "vocab_size", "num_key_value_heads": "num_query_groups", "head_dim": "head_dim",
             "max_position_embeddings": "max_position_embeddings"}
#: Keys whose presence (non-zero) means mixture-of-experts layers.
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")


def _refuse(path: str, key: str, value, reason: str):
    raise ArchitectureError(f"{path}: {key} = {json.dumps(value)}: {reason}")


def _number(path: str, key: str, value) -> float:
    """A finite, non-negative JSON number (Python's json reads ``Infinity`` and ``NaN`` too)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        _refuse(path, key, value, "must be a finite number >= 0")
    return float(value)


def _family(cfg: dict, path: str) -> str:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    by_arch = {v: k for k, v in HF_ARCHITECTURES.items()}
    if model_type is None and not archs:
        raise ArchitectureError(f"{path}: neither 'architectures' nor 'model_type' names the model family")
    family = model_type if model_type is not None else next((by_arch[a] for a in archs if a in by_arch), None)
    if family not in HF_ARCHITECTURES:
        key, value = ("model_type", model_type) if model_type is not None else ("architectures", archs)
        _refuse(path, key, value, "not a supported family (supported: " +
                ", ".join(f"{k} / {v}" for k, v in HF_ARCHITECTURES.items()) + ")")
    if archs and HF_ARCHITECTURES[family] not in archs:
        _refuse(path, "architectures", archs, f"model_type {family!r} is built by {HF_ARCHITECTURES[family]}")
    return family


def _sliding_window(cfg: dict, family: str, path: str) -> None:
    types = cfg.get("layer_types")
    if isinstance(types, list) and any(t != "full_attention" for t in types):
        _refuse(path, "layer_types", sorted(set(types)), "sliding-window layers are not supported (full "
                "attention only; a packed document would see a different context than in the original)")
    window = cfg.get("sliding_window")
    if family == "qwen2":
        if cfg.get("use_sliding_window"):
            _refuse(path, "use_sliding_window", cfg["use_sliding_window"],
                    f"sliding-window attention (sliding_window {window}) is not supported")
        return
    if window is not None and window < int(cfg.get("max_position_embeddings", 0) or 0):
        _refuse(path, "sliding_window", window, "sliding-window attention is not supported (Mistral v0.3 and "
                "later set it to null); converted, the model would attend beyond its window")


def _rope(cfg: dict, path: str) -> dict:
    """Theta and scaling fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (4.x configs, the hub's)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            _refuse(path, key, value, "must be a JSON object")
    where = "rope_parameters" if params.get("rope_type") or params.get("type") else "rope_scaling"
    source = {**scaling, **params} if where == "rope_parameters" else {**params, **scaling}
    kind = source.get("rope_type") or source.get("type") or "default"
    theta = _number(path, "rope_theta", params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = source.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse(path, "partial_rotary_factor", partial, "partial rotary embeddings are not supported")
    out = {"rope_theta": theta}
    if kind == "default":
        return out
    if kind not in ("linear", "llama3"):
        _refuse(path, f"{where}.rope_type", kind, "RoPE scaling of this type is not supported (only default, "
                "linear and llama3); ignoring it would compute different positions")

    def need(key):
        if key not in source:
            raise ArchitectureError(f"{path}: {where}.{key} is missing (needed by rope_type {kind!r})")
        return _number(path, f"{where}.{key}", source[key])

    out.update(rope_scaling_type=kind, rope_scaling_factor=need("factor"))
    if kind == "llama3":
        out.update(rope_low_freq_factor=need("low_freq_factor"), rope_high_freq_factor=need("high_freq_factor"))
        need("original_max_position_embeddings")
        original = source["original_max_position_embeddings"]
        problem = size_problem(original, SIZE_LIMITS["rope_original_max_position_embeddings"])
        if problem:
            _refuse(path, f"{where}.original_max_position_embeddings", original, problem)
        out["rope_original_max_position_embeddings"] = original
        if out["rope_high_freq_factor"] <= out["rope_low_freq_factor"]:
            _refuse(path, f"{where}.high_freq_factor", out["rope_high_freq_factor"],
                    "must exceed low_freq_factor")
    return out


def architecture_from_hf_config(cfg: dict, path: str = "config.json", name: Optional[str] = None) -> Architecture:
    """Validate a HF ``config.json`` dict and return the architecture it describes; anything
    that would make the converted model compute something else is refused, naming the key."""
    for key in MOE_KEYS:
        if cfg.get(key):
            _refuse(path, key, cfg[key], "mixture-of-experts models are not supported")
    family = _family(cfg, path)
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ArchitectureError(f"{path}: missing required keys {missing}")
    for k, field in SIZE_KEYS.items():
        v = cfg.get(k)
        if v is None and k not in REQUIRED_KEYS:
            continue
        problem = size_problem(v, SIZE_LIMITS[field])
        if problem:
            _refuse(path, k, v, problem)
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        _refuse(path, "hidden_act", act, "only SiLU (SwiGLU) MLPs are supported")
    if cfg.get("mlp_bias"):
        _refuse(path, "mlp_bias", cfg["mlp_bias"], "MLP biases are not supported")
    if family == "llama" and cfg.get("attention_bias"):
        _refuse(path, "attention_bias", cfg["attention_bias"], "Llama's attention_bias also puts a bias on "
                "o_proj, which is not supported (Qwen2's q/k/v-only bias is)")
    _sliding_window(cfg, family, path)
    heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
    kv = cfg.get("num_key_value_heads") or heads
    if heads % kv:
        _refuse(path, "num_key_value_heads", kv, f"does not divide num_attention_heads {heads}")
    head_dim = cfg.get("head_dim")
    if head_dim is None and hidden % heads:
        _refuse(path, "hidden_size", hidden, f"not a multiple of num_attention_heads {heads} and no head_dim given")
    default_max = {"llama": 2048, "mistral": 32768, "qwen2": 32768}[family]
    return Architecture(
        name=name or f"hf-{family}", family=family, num_layers=cfg["num_hidden_layers"], hidden_size=hidden,
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=heads, num_query_groups=kv,
        vocab_size=cfg["vocab_size"], max_position_embeddings=int(cfg.get("max_position_embeddings") or default_max),
        norm_eps=_number(path, "rms_norm_eps", cfg["rms_norm_eps"]),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_method_std=_number(path, "initializer_range", cfg.get("initializer_range", 0.02)),
        head_dim=head_dim if head_dim not in (None, hidden // heads) else None,
        qkv_bias=family == "qwen2", **_rope(cfg, path),
    )


def read_hf_config(path: str) -> tuple[dict, str]:
    """``(config dict, path of the config.json)`` for a config file or a model directory."""
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(cfg_path):
        raise ArchitectureError(f"{cfg_path}: not found (expected a Hugging Face config.json or model directory)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ArchitectureError(f"{cfg_path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ArchitectureError(f"{cfg_path}: not a text file") from None
    if not isinstance(cfg, dict):
        raise ArchitectureError(f"{cfg_path}: expected a JSON object")
    return cfg, cfg_path


def load_hf_architecture(path: str) -> Architecture:
    """The architecture of the HF config (file or model directory) at ``path``."""
    cfg, cfg_path = read_hf_config(path)
    base = os.path.basename(os.path.dirname(os.path.abspath(cfg_path)))
    return architecture_from_hf_config(cfg, cfg_path, name=base or None)


def hf_config_from_architecture(arch: Architecture, dtype_name: str, special: Optional[dict] = None) -> dict:
    """``config.json`` of the family's ``*ForCausalLM`` with ``arch`` (readable by transformers
    4.x via ``rope_theta``/``rope_scaling``/``torch_dtype`` and 5.x via ``rope_parameters``/``dtype``).
    ``special``: bos/eos/pad token ids to write."""
    theta = float(arch.rope_theta)
    rope = {"rope_type": "default", "rope_theta": theta}
    scaling = None
    if arch.rope_scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": arch.rope_scaling_factor}
    elif arch.rope_scaling_type == "llama3":
        scaling = {"rope_type": "llama3", "factor": arch.rope_scaling_factor,
                   "low_freq_factor": arch.rope_low_freq_factor, "high_freq_factor": arch.rope_high_freq_factor,
                   "original_max_position_embeddings": arch.rope_original_max_position_embeddings}
    if scaling:
        rope = {**scaling, "rope_theta": theta}
    cfg = {
        "architectures": [HF_ARCHITECTURES[arch.family]], "model_type": arch.family,
        "hidden_size": arch.hidden_size, "intermediate_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_query_groups,
        "num_hidden_layers": arch.num_layers, "head_dim": arch.kv_channels,
        "rms_norm_eps": arch.norm_eps, "rope_theta": theta, "rope_scaling": scaling, "rope_parameters": rope,
        "vocab_size": arch.vocab_size, "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings, "hidden_act": "silu",
        "initializer_range": arch.init_method_std, "torch_dtype": dtype_name, "dtype": dtype_name,
    }
    if arch.family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif arch.family == "mistral":
        cfg.update(sliding_window=None)
    elif arch.family == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=arch.num_layers)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if (special or {}).get(k) is not None:
            cfg[k] = special[k]
    cfg.setdefault("bos_token_id", None)
    cfg.setdefault("eos_token_id", None)
    return cfg
