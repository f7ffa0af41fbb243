"""The comparisons' presets in one place: the quickstart's (the demo and ``tools/compare_modes.py``
on the built-in sample with the tiny model) and the study's (``python -m megatron_pack.experiment``
on a pretrained model: ``small`` for CPUs, ``full`` for a real run). The settings compared are
:mod:`.settings`' (the paper's modes, with and without the mask)."""

from __future__ import annotations

#: The quickstart's training on the built-in sample, as ``python -m megatron_pack.train`` flags:
#: compare_modes' flags without ``--data-path``, and the demo's defaults (its minimum learning rate
#: is a tenth of ``--lr`` as here).
QUICKSTART_FLAGS = {"--model": "tiny", "--seq-length": "512", "--micro-batch-size": "4", "--global-batch-size": "8",
                    "--lr": "2e-3", "--min-lr": "2e-4", "--lr-warmup-fraction": "0.1", "--clip-grad": "1.0",
                    "--valid-fraction": "0.05", "--log-interval": "5"}


def quickstart(flag: str) -> float:
    """One quickstart value as a number (the demo's parser defaults)."""
    return float(QUICKSTART_FLAGS[flag])


def sample_train_flags(prefix: str, tokenizer: str) -> list[str]:
    """The quickstart's training flags for the tiny model on the sample data."""
    return ["--data-path", prefix, "--tokenizer-model", tokenizer] + [x for kv in QUICKSTART_FLAGS.items() for x in kv]


#: The study's presets: train chats (None: all), held-out chats, QA prompts (None: all), sequence
#: length, micro / global batch, learning rate, epochs, layers measured for leakage (None: all),
#: packed rows measured for leakage.
STUDY_PRESETS = {
    "small": dict(train_docs=24, heldout_docs=16, qa=24, seq_length=512, mbs=1, gbs=1, lr=5e-5, epochs=1.0,
                  layers=[0, 5, 10, 15, 20, 25, 29], leak_sequences=2),
    "full": dict(train_docs=None, heldout_docs=128, qa=None, seq_length=1024, mbs=1, gbs=8, lr=2e-5, epochs=2.0,
                 layers=None, leak_sequences=16),
}
