"""The training loss covers the true vocabulary only, not the rows padded for TP."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r"""
    import torch
    from megatron_pack.model.builder import build_model
    from megatron_pack.model.presets import get_preset, transformer_config
    from megatron_pack.parallel import initialize_distributed, set_seed

    initialize_distributed()
    set_seed(0)
    vocab = 300  # padded to 384 at TP1
    model = build_model(get_preset("tiny"), transformer_config(get_preset("tiny"), use_cpu_initialization=True),
                        vocab_size=vocab, backend="local")
    with torch.no_grad():  # padded rows as an import leaves them: zero logits
        model.output_layer.weight[vocab:] = 0
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (2, 16), generator=g)
    labels = torch.randint(0, vocab, (2, 16), generator=g)
    pos = torch.arange(16).expand(2, 16)
    logits = model(tokens, pos, None)  # [b, s, padded vocab]
    assert logits.shape[-1] == 384, logits.shape
    losses = model(tokens, pos, None, labels=labels)  # [b, s]
    true = torch.nn.functional.cross_entropy(logits[..., :vocab].reshape(-1, vocab), labels.reshape(-1),
                                             reduction="none").reshape(2, 16)
    padded = torch.nn.functional.cross_entropy(logits.reshape(-1, 384), labels.reshape(-1),
                                               reduction="none").reshape(2, 16)
    diff = (losses - true).abs().max().item()
    gap = (padded - true).abs().min().item()
    losses.sum().backward()
    pad_grad = model.output_layer.weight.grad[vocab:].abs().max().item()
    print(f"RESULT {diff} {gap} {pad_grad}")
""")


def test_loss_ignores_padded_vocabulary_rows():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                         env={"PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                              **{k: v for k, v in __import__("os").environ.items()
                                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert lines, out.stdout[-2000:] + out.stderr[-3000:]
    diff, gap, pad_grad = map(float, lines[-1].split()[1:])
    assert diff < 1e-5  # the model's loss is cross-entropy over the 300 real tokens
    assert gap > 1e-3  # and measurably not the one over all 384 rows (84 zero logits join the softmax)
    assert pad_grad == 0.0  # padded rows learn nothing
