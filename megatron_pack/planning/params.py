"""Exact per-rank parameter counts: build every distinct rank's shard with Megatron-Core.

No formula: for each distinct ``(tp_rank, pp_rank)`` the real ``GPTModel`` is constructed
on the ``meta`` device (shapes, no storage, so a 70B shard costs milliseconds and no RAM)
inside a fake process group of the full world size (``torch.distributed`` backend
``"fake"``: collectives do nothing, ranks and group sizes are real), with Megatron's
``parallel_state`` initialised for that rank. Data/context-parallel replicas hold the
same shard, so one representative rank per ``(tp_rank, pp_rank)`` is built::

    world 32 = TP 8 x PP 4 (x DP 1), order tp-cp-ep-dp-pp (TP fastest)
    global rank = tp_rank + TP * CP * DP * pp_rank     e.g. (tp 1, pp 1) -> rank 9

Counting the model once from its shards: parameters Megatron marks
``tensor_model_parallel`` (QKV/proj/fc1/fc2, vocab-parallel embedding and output layer)
are split over TP and summed over TP ranks; the rest (RMSNorm weights) is replicated on
every TP rank and counted once per stage. A tied output layer on the last stage (PP > 1)
is a copy of the first stage's embedding and is counted for memory, not in the total.

The vocabulary is padded to a multiple of ``128 * TP`` (Megatron's rule), so the built
model has ``(V_pad - V) * hidden`` extra rows per embedding matrix; ``total`` is the built
(padded) count and ``total_unpadded`` removes those rows, which is what published sizes
(8.03B, 70.55B) count.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from megatron_pack.model.presets import LlamaPreset, padded_vocab_size, transformer_config

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_EMBEDDING_MATRICES = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class RankParams:
    """What one rank holds; identical on every DP/CP replica of ``(tp_rank, pp_rank)``."""

    tp_rank: int
    pp_rank: int
    global_rank: int
    parameters: int
    """Everything this rank stores (what its weights/grads/optimizer memory is made of)."""
    tp_sharded: int
    """Part split over TP (summed over TP ranks in the model total)."""
    tp_replicated: int
    """Part every TP rank holds in full (norms)."""
    tied_copy: int
    """Tied output-layer copy on the last stage (PP > 1 only); not in the model total."""
    matmul: int
    """2-D weights used in matmuls (everything but the input embedding and norms)."""
    num_layers: int
    has_embedding: bool
    has_output_layer: bool


@dataclass
class ParamReport:
    per_rank: list
    total: int
    """Unique parameters of the built model, padded vocabulary."""
    total_unpadded: int
    """``total`` without the vocabulary padding rows: comparable with published sizes."""
    matmul_total: int
    """Unique matmul parameters (padded vocab, as computed): the 6*N in the FLOP count."""
    vocab_size: int
    padded_vocab_size: int
    build_seconds: float
    builder: str
    notes: list = field(default_factory=list)

    def stage_ranks(self, pp_rank: int) -> list:
        return [r for r in self.per_rank if r.pp_rank == pp_rank]

    def max_rank(self) -> RankParams:
        return max(self.per_rank, key=lambda r: r.parameters)

    def to_json(self) -> dict:
        d = asdict(self)
        d["per_rank"] = [asdict(r) for r in self.per_rank]
        return d


def representative_rank(tp_rank: int, pp_rank: int, tp: int, cp: int, dp: int) -> int:
    """Global rank of ``(tp_rank, pp_rank)`` with dp = cp = 0 in Megatron's default order."""
    return tp_rank + tp * cp * dp * pp_rank


@contextlib.contextmanager
def fake_world(rank: int, world_size: int, tp: int, pp: int, cp: int = 1):
    """Megatron ``parallel_state`` for ``rank`` of ``world_size`` over a fake process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers backend "fake"
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise RuntimeError(f"this torch build lacks the fake process group ({e}); the planner needs it") from e
    if dist.is_initialized() or ps.model_parallel_is_initialized():
        raise RuntimeError("plan in a process where torch.distributed is not initialised "
                           "(the planner simulates the world with a fake process group)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        # Gloo groups need real transport; the fake backend provides every group Megatron uses.
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     context_parallel_size=cp, create_gloo_process_groups=False)
        yield ps
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def _no_init(weight):
    """Initialisation that draws nothing: random fills on meta still cost Python time."""


def _build_shard(preset: LlamaPreset, config, vocab_size: int):
    """This rank's ``GPTModel`` on the meta device; (model, builder name)."""

    from megatron_pack.model.builder import build_model

    with torch.device("meta"):
        return build_model(preset, config, vocab_size=vocab_size, backend="local"), \
            "megatron_pack.model.builder.build_model(backend='local')"


def _split_names(model) -> set:
    """Names of the parameters Megatron splits over TP, from the layer types.

    Column-parallel weight and bias (output dim), row-parallel weight (input dim; its bias
    is added after the all-reduce and stays whole), vocab-parallel embedding rows. This is
    what Megatron's initialisation tags ``tensor_model_parallel``.
    """
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    out = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, (ColumnParallelLinear, VocabParallelEmbedding)):
            keys = ("weight", "bias")
        elif isinstance(mod, RowParallelLinear):
            keys = ("weight",)
        else:
            continue
        for k in keys:
            if getattr(mod, k, None) is not None:
                out.add(f"{mname}.{k}" if mname else k)
    return out


def _count(model, tp_rank: int, pp_rank: int, global_rank: int, megatron_tags: bool = False) -> RankParams:
    sharded = replicated = tied = matmul = 0
    layers = set()
    names = set()
    split = None if megatron_tags else _split_names(model)
    for name, p in model.named_parameters():
        n = p.numel()
        names.add(name)
        m = _LAYER.search(name)
        if m:
            layers.add(int(m.group(1)))
        if getattr(p, "shared_embedding", False) and name == "output_layer.weight":
            tied += n  # copy of the first stage's embedding (tied weights, PP > 1)
        elif (getattr(p, "tensor_model_parallel", False) if split is None else name in split):
            sharded += n
        else:
            replicated += n
        if p.dim() >= 2 and "word_embeddings" not in name and not getattr(p, "shared_embedding", False):
            matmul += n
    return RankParams(
        tp_rank=tp_rank, pp_rank=pp_rank, global_rank=global_rank,
        parameters=sharded + replicated + tied, tp_sharded=sharded, tp_replicated=replicated,
        tied_copy=tied, matmul=matmul, num_layers=len(layers),
        has_embedding="embedding.word_embeddings.weight" in names,
        has_output_layer="output_layer.weight" in names,
    )


def count_parameters(
    preset: LlamaPreset,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    world_size: Optional[int] = None,
    vocab_size: Optional[int] = None,
    progress: bool = False,
    megatron_tags: bool = False,
) -> ParamReport:
    """Build each distinct ``(tp_rank, pp_rank)`` shard on meta and count (see module doc).

    ``world_size`` defaults to TP * PP * CP (DP 1); pass the real one so every Megatron
    group has its real size. The layout must be valid (see ``plan.validate_layout``).
    """
    from tqdm import tqdm

    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    world = world_size or tp * pp * cp
    if world % (tp * pp * cp):
        raise ValueError(f"world size {world} is not divisible by TP*PP*CP = {tp * pp * cp}")
    dp = world // (tp * pp * cp)
    vocab = vocab_size or preset.vocab_size
    if vocab is None:
        raise ValueError(f"preset {preset.name!r} has no vocabulary size; pass vocab_size")
    # Sequence parallel and precision change no shapes; SP is off here because the local
    # spec's torch norm refuses it (TE's fused norm accepts it, with the same parameters).
    # Megatron's CPU-initialisation path creates tensors on the default device (meta here)
    # rather than on ``cuda``. Skipping initialisation makes a shard ~5x cheaper to build;
    # ``megatron_tags=True`` runs it (as no-op fills) so Megatron itself tags the TP-split
    # parameters, which the tests use to check :func:`_tp_split`.
    config = transformer_config(preset, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                context_parallel_size=cp, bf16=True, use_cpu_initialization=True,
                                perform_initialization=megatron_tags, init_method=_no_init,
                                output_layer_init_method=_no_init)
    t0 = time.perf_counter()
    per_rank, builder = [], ""
    ranks = [(t, s) for s in range(pp) for t in range(tp)]
    for t, s in tqdm(ranks, desc="building shards on meta", disable=None if progress else True, leave=False):
        g = representative_rank(t, s, tp, cp, dp)
        with fake_world(g, world, tp, pp, cp) as ps:
            got = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
            if got != (t, s):  # Megatron's rank order changed: the representative is wrong
                raise RuntimeError(f"rank {g} is (tp {got[0]}, pp {got[1]}) in Megatron, expected ({t}, {s})")
            model, builder = _build_shard(preset, config, vocab)
            per_rank.append(_count(model, t, s, g, megatron_tags))
            del model
    seconds = time.perf_counter() - t0

    total = matmul_total = 0
    for s in range(pp):
        stage = [r for r in per_rank if r.pp_rank == s]
        if len({r.tp_replicated for r in stage}) != 1:
            raise RuntimeError(f"stage {s}: TP ranks disagree on replicated parameters")
        total += sum(r.tp_sharded for r in stage) + stage[0].tp_replicated
        matmul_total += sum(r.matmul for r in stage)  # matmul weights are all TP-sharded
    vpad = padded_vocab_size(vocab, tp)
    if preset.tie_word_embeddings:  # the logits matmul runs on the (shared) embedding matrix
        matmul_total += vpad * preset.hidden_size
    matrices = 1 if preset.tie_word_embeddings else 2
    total_unpadded = total - (vpad - vocab) * preset.hidden_size * matrices
    notes = []
    if vpad != vocab:
        notes.append(f"vocabulary padded {vocab} -> {vpad} (multiple of 128*TP={128 * tp}): "
                     f"+{(vpad - vocab) * preset.hidden_size * matrices:,} parameters in the built model")
    return ParamReport(per_rank=per_rank, total=total, total_unpadded=total_unpadded, matmul_total=matmul_total,
                       vocab_size=vocab, padded_vocab_size=vpad, build_seconds=seconds, builder=builder, notes=notes)
