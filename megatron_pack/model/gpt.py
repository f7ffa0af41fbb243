"""``GPTModel`` whose loss ignores the vocabulary rows added for TP divisibility.

Megatron pads the vocabulary to a multiple of ``128 * TP`` and, in Megatron-LM, the padded
rows take part in the softmax. Those rows are no tokens: an imported Llama gives them zero
logits, which adds their ``exp(0)`` to every normaliser, so the trained objective would not
be the model's loss as exported to Hugging Face (which has no padded rows). Here they are
masked to ``-inf`` before Megatron-Core's vocab-parallel cross-entropy: the loss and the
gradients are those of the true vocabulary, on every TP layout.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel


class SFTGPTModel(GPTModel):
    """Megatron-Core ``GPTModel`` plus ``true_vocab_size`` for the loss."""

    def __init__(self, *args, true_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.true_vocab_size = int(true_vocab_size)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        partition = logits.size(-1)  # this TP rank's slice of the (padded) vocabulary
        start = ps.get_tensor_model_parallel_rank() * partition
        valid = min(max(self.true_vocab_size - start, 0), partition)
        if valid < partition:
            padded = torch.arange(partition, device=logits.device) >= valid
            logits = logits.masked_fill(padded, float("-inf"))
        return super().compute_language_model_loss(labels, logits)
