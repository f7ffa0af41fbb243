"""The vocabulary-size rule, one copy for training, the planner and the help text.

Unpadded size: ``--vocab-size``, else the tokenizer's (``--tokenizer-model``: the ids the data
was encoded with), else the architecture's, else the dataset's largest token id + 1. The model
then pads it to a multiple of 128 x TP (:func:`megatron_pack.model.presets.padded_vocab_size`).
"""

from __future__ import annotations

from typing import Optional

#: The rule in words, for --help texts.
VOCAB_RULE = ("the tokenizer's (--tokenizer-model), else the architecture's, else the dataset's largest "
              "token id + 1; padded to a multiple of 128 x TP either way")


def resolve_vocab_size(vocab_size: Optional[int], tokenizer_model: Optional[str], architecture=None,
                       data_path: Optional[str] = None) -> int:
    if vocab_size:
        return int(vocab_size)
    if tokenizer_model:
        from megatron_pack.tokenization.tokenizer import load_tokenizer

        return int(load_tokenizer(tokenizer_model).vocab_size)
    if architecture is not None and architecture.vocab_size:
        return int(architecture.vocab_size)
    if data_path:
        import numpy as np

        tokens = np.memmap(data_path + ".bin", dtype=np.int32, mode="r")
        return int(tokens.max(initial=0)) + 1
    raise ValueError(f"no vocabulary size for {getattr(architecture, 'name', 'the model')}: pass --vocab-size or "
                     "--tokenizer-model")
