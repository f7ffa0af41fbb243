"""Scoring a fine-tuned model the way a user would meet it, in transformers: held-out loss with
each chat alone, and a generation score on held-out question/answer prompts. Used by the study
(:mod:`.study`) on the base model and on every setting's HF export."""

from __future__ import annotations

import re


def load_hf(path: str):
    """An HF causal LM in float32, eval mode (the scores are CPU-reproducible), with the
    attention the leakage measurement expects (:data:`.leakage.LOADED_ATTENTION`, transformers'
    default)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_pack.experiment.leakage import LOADED_ATTENTION

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=LOADED_ATTENTION).eval()


def heldout_loss(model, prefix: str) -> float:
    """Token-weighted loss over supervised targets, each held-out chat alone."""
    import torch

    from megatron_pack.files.indexed import SFTIndexedDataset

    data = SFTIndexedDataset(prefix)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)):
            t, m = data.get_slice(i, 0, int(data.lengths[i]))
            ids = torch.as_tensor(t, dtype=torch.long)[None]
            nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:],
                                                    reduction="none")
            w = torch.as_tensor(m[1:], dtype=torch.bool)
            total += float(nll[w].sum())
            count += int(w.sum())
    return total / max(count, 1)


def normalize_answer(s: str) -> str:
    """Lower case, letters and digits only, articles dropped: what answer matching compares."""
    s = re.sub(r"[^a-z0-9 ]", " ", s.lower())
    return " ".join(w for w in s.split() if w not in ("the", "a", "an"))


def answer_scores(qa: list, answers: list) -> dict:
    """Answer-contained (normalized reference inside the normalized answer) and exact match."""
    contained = [bool(normalize_answer(q["answer"])) and normalize_answer(q["answer"]) in normalize_answer(g)
                 for q, g in zip(qa, answers)]
    exact = [normalize_answer(q["answer"]) == normalize_answer(g) for q, g in zip(qa, answers)]
    return {"prompts": len(qa), "contained": sum(contained) / len(qa), "exact": sum(exact) / len(qa),
            "examples": [{"q": q["question"], "ref": q["answer"], "got": g} for q, g in zip(qa[:5], answers[:5])]}


def greedy_answers(model, tokenizer, questions: list, max_new_tokens: int = 24, batch: int = 16) -> list:
    """Greedy answers to single-turn chat prompts, left-padded batches."""
    import torch

    answers = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for a in range(0, len(questions), batch):
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in questions[a:a + batch]]
        ids = [list(x["input_ids"] if isinstance(x, dict) else x) for x in ids]
        width = max(map(len, ids))
        inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        att = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)
        answers += [tokenizer.decode(o[width:], skip_special_tokens=True).strip() for o in out]
    return answers


def generation_score(model, tokenizer, qa: list, max_new_tokens: int = 24, batch: int = 16) -> dict:
    """Greedy answers to the QA prompts, scored by :func:`answer_scores`."""
    if not qa:
        return {"prompts": 0}
    answers = greedy_answers(model, tokenizer, [q["question"] for q in qa], max_new_tokens, batch)
    return answer_scores(qa, answers)
