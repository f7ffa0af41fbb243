"""HF Llama / Mistral / Qwen2 <-> Megatron-Core checkpoint conversion (streamed, TP/PP aware).

``convert_hf_to_megatron`` writes the import format that ``--load`` fine-tunes from;
``convert_megatron_to_hf`` exports a training checkpoint (any TP/PP) or an import.
"""

from megatron_pack.convert.hf_config import ConversionError


def __getattr__(name):  # lazy: importing the package must not pull in Megatron-Core
    if name == "convert_hf_to_megatron":
        from megatron_pack.convert.hf_to_megatron import convert_hf_to_megatron

        return convert_hf_to_megatron
    if name == "convert_megatron_to_hf":
        from megatron_pack.convert.megatron_to_hf import convert_megatron_to_hf

        return convert_megatron_to_hf
    raise AttributeError(name)


__all__ = ["ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf"]
