"""The transformers baseline a packing run is compared with: learnable synthetic chats, and the
check that a padding-free (flattened) transformers batch computes what padded rows compute.

TRL's ``SFTTrainer(packing=True)`` flattens a batch into one row with restarting
``position_ids`` and no attention mask; transformers then reads the document boundaries from
the positions. :func:`padding_free_check` runs such a batch and the same conversations one per
padded row: a path that lets attention cross conversations gives a different loss, and a
comparison must report it as wrong rather than time it as a winner.
"""

from __future__ import annotations


def conversations(n: int, seq: int, vocab: int, seed: int = 0) -> list:
    """``n`` learnable multi-turn chats (arithmetic token progressions, each turn a prompt
    that is not trained then an answer that is), log-normal lengths (median ~seq/3) up to ``seq``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(np.clip(rng.lognormal(np.log(seq / 3), 0.6), 24, seq))
        a, b = int(rng.integers(0, vocab)), int(rng.integers(1, 7))
        toks = ((a + b * np.arange(length)) % (vocab - 3) + 3).tolist()
        mask, pos, turns = [0] * length, 0, []
        k = int(rng.integers(1, 4))
        for t in range(k):  # k turns of equal share: 30% prompt, 70% answer
            end = length if t == k - 1 else pos + length // k
            turns.append(pos)
            start = pos + max(1, (end - pos) * 3 // 10)
            mask[start:end] = [1] * (end - start)
            pos = end
        out.append({"input_ids": toks, "loss_mask": mask, "turn_starts": turns})
    return out


def padding_free_check(model, batch) -> dict:
    """Loss of a flattened (padding-free) batch vs the same conversations one per padded row."""
    import torch

    dev = next(model.parameters()).device
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist() + [pos.numel()]
    segs = [(a, b) for a, b in zip(starts[:-1], starts[1:])]
    width = max(b - a for a, b in segs)
    ids = torch.zeros(len(segs), width, dtype=torch.long, device=dev)
    att, lab = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (a, b) in enumerate(segs):
        ids[i, : b - a], att[i, : b - a], lab[i, : b - a] = batch["input_ids"][0, a:b], 1, batch["labels"][0, a:b]
    with torch.no_grad():
        # as SFTTrainer.compute_loss calls it: transformers reads document boundaries from
        # restarting position_ids only without an attention mask and without a KV cache
        keys = ("input_ids", "labels", "position_ids", "attention_mask")
        packed = float(model(**{k: batch[k] for k in keys if k in batch}, use_cache=False).loss)
        padded = float(model(input_ids=ids, attention_mask=att, labels=lab).loss)
    tol = 1e-2 if next(model.parameters()).dtype != torch.float32 else 1e-4
    return {"packed": packed, "padded": padded, "correct": abs(packed - padded) <= tol * abs(padded)}
