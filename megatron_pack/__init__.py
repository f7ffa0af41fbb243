"""megatron_pack: supervised fine-tuning on Megatron-Core with sequence packing.

Subpackages are imported lazily by their users so `import megatron_pack` stays cheap and
works without Transformer Engine, flash-attn, apex or the compiled packing engine.
"""

__version__ = "0.1.0"
