"""Packed-vs-padded logits comparison for the GPU tests, runnable (and tested) on CPU.

A loss comparison cannot catch a broken document mask: attention leaking across the whole
packed row moves the tiny model's mean loss by about 1%, inside the 2% that bf16 needs. The
logits of each real token can: ``doc_logits`` lines them up (the padded layout and the packed
THD row give the same ``[tokens, vocab]`` matrix), and ``assert_logits_match`` bounds the largest
difference by ``LOGIT_ATOL``.

Why ``LOGIT_ATOL = 0.25``, measured on CPU by ``tests/unit/model/test_packed_logits.py`` with the
GPU tests' tiny model (init std 0.1, logits up to about 3): the masked packed row equals the
padded rows to ~1e-6 in fp32 and to 0.016-0.031 in bf16 (three seeds); the same row with the
mask off (one causal document over the whole row, ``leaked_batch``) moves logits by 4.2-4.5 (its
mean loss by only 0.3%). The bound is ~8x the bf16 noise and ~17x under the leak; the CPU test
keeps both margins (bf16 gap < LOGIT_ATOL / 4, leak > 4 x LOGIT_ATOL), and every GPU comparison
runs the leaked batch as its negative control, which must fail the same comparison.
"""

from __future__ import annotations

import torch

LOGIT_ATOL = 0.25
LENGTHS = (37, 64, 5, 90, 48)  # several documents per row, one very short
SEQ = 96


def make_items(lengths=LENGTHS, S: int = SEQ, vocab: int = 256, seed: int = 0) -> list[dict]:
    """One dataset item per document (``PackedSFTDataset``'s fields), each padded to ``S``."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for n in lengths:
        toks = torch.randint(1, vocab, (n,), generator=g)
        tok = torch.zeros(S, dtype=torch.long)
        tok[:n] = toks
        lab = torch.zeros(S, dtype=torch.long)
        lab[: n - 1] = toks[1:]
        lm = torch.zeros(S)
        lm[: n - 1] = 1
        cu = torch.tensor([0, n, -1], dtype=torch.int32)
        items.append(dict(tokens=tok, labels=lab, loss_mask=lm, position_ids=torch.arange(S), cu_seqlens=cu,
                          num_cu_seqlens=2, max_seqlen=n, num_real_tokens=n))
    return items


def thd_batch(items) -> dict:
    from megatron_pack.data.collate import collate_thd

    return collate_thd(items)


def padded_batch(items) -> dict:
    from megatron_pack.data.collate import collate_padded

    return collate_padded(items)


def leaked_batch(items) -> dict:
    """The packed row with the document mask off: one causal segment over the whole row, so
    every document attends to all earlier ones (positions still restart per document)."""
    from megatron_pack.data.collate import collate_thd

    b = collate_thd(items)
    total = b["tokens"].numel()
    cu = torch.full_like(b["cu_seqlens"], -1)
    cu[:2] = torch.tensor([0, total], dtype=cu.dtype)
    return {**b, "cu_seqlens": cu, "num_cu_seqlens": torch.tensor(2), "max_seqlen": torch.tensor(total)}


def doc_logits(model, batch: dict, items, device=None) -> torch.Tensor:
    """``[real tokens, vocab]`` float32 logits, documents in item order, whatever the layout."""
    from megatron_pack.model.packed import model_inputs

    kw = model_inputs({k: v for k, v in batch.items() if k != "labels"}, device=device)
    logits = model(**kw).float()
    S = items[0]["tokens"].numel()
    rows = logits.reshape(len(items), S, -1)  # THD [1, B*S, V] and padded [B, S, V] alike
    return torch.cat([rows[i, : int(it["num_real_tokens"])] for i, it in enumerate(items)]).cpu()


def logit_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference between two ``doc_logits`` results."""
    if a.shape != b.shape:
        raise ValueError(f"logits of different shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return float((a - b).abs().max())


def assert_logits_match(a: torch.Tensor, b: torch.Tensor, atol: float = LOGIT_ATOL, what: str = "") -> float:
    gap = logit_gap(a, b)
    assert gap <= atol, f"{what}: logits differ by up to {gap:.4f} > {atol}"
    return gap


def check_packed_equals_padded(model, items=None, device=None, atol: float = LOGIT_ATOL, what: str = "") -> dict:
    """Packed (THD, document mask) == padded within ``atol``, and the negative control: the
    leaked row must *fail* the same comparison. Returns the two gaps."""
    items = items or make_items()
    with torch.no_grad():
        padded = doc_logits(model, padded_batch(items), items, device)
        packed = doc_logits(model, thd_batch(items), items, device)
        leaked = doc_logits(model, leaked_batch(items), items, device)
    gap = assert_logits_match(packed, padded, atol, what)
    leak = logit_gap(leaked, padded)
    assert leak > atol, f"{what}: negative control passed (mask off moves logits only {leak:.4f} <= {atol})"
    return {"gap": gap, "leak": leak}
