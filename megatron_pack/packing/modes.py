"""Packing modes: one frozen config class per strategy, in one registry.

A mode maps item lengths to sequences (``pack``), in C++ (``megatron_pack._packing``) or with
its Python twin in :mod:`megatron_pack.packing.reference`. Modes: ``padding`` (one item per
sequence), ``greedy`` and ``random`` (the rules of "Packing Analysis", arXiv 2410.08081, as its
text states them), ``bfd`` (best-fit decreasing), and ``windowed_bfd`` (best fit inside shuffled
windows, so a batch keeps its randomness). Options are written ``name:key=value``.

The paper's *released code* behaves differently from its text; its rules are knobs of the
same modes (``greedy:chunk=1000``, ``random:chunk=1000``, ``padding:pad_to=longest``), see
each class. Whatever they drop is counted in ``PlanStats.mode_dropped_*``, never silent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from megatron_pack.packing import reference as ref

Engine = Literal["cpp", "reference"]

#: name -> mode config class; filled by :func:`register_mode`.
PACKING_MODES: dict[str, type["PackingMode"]] = {}


def register_mode(cls: type["PackingMode"]) -> type["PackingMode"]:
    if cls.name in PACKING_MODES:
        raise ValueError(f"packing mode {cls.name!r} registered twice")
    PACKING_MODES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class PackingMode:
    """A packing strategy: a frozen config whose fields are its knobs.

    ``pack`` maps item lengths to ``(item, lo, hi, seq_offsets, num_split_items)``, where
    ``lo``/``hi`` are token ranges inside items (``None`` when every item is placed whole).
    """

    name: ClassVar[str]
    #: whether the result depends on the seed (and so changes every epoch)
    shuffles: ClassVar[bool] = False

    def pack(self, lengths: np.ndarray, capacity: int, seed: int, engine: Engine):
        fn = getattr(_engine(engine), "pack_" + self.name)
        order, offsets = fn(lengths, capacity, *self._args(seed))
        return order, None, None, offsets, 0

    def _args(self, seed: int) -> tuple:
        return ()

    @property
    def keeps_overlong(self) -> bool:
        """True when the mode takes conversations of any length and handles over-long ones
        itself (the paper-code variants); ``--overlong`` then does not apply."""
        return False

    @property
    def pads_to_longest(self) -> bool:
        """True when a micro-batch is cut to its longest sequence instead of ``seq_length``."""
        return False

    def key(self) -> dict[str, Any]:
        """Everything that identifies the plan this mode builds (for cache keys and reports)."""
        return {"mode": self.name, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())
        return f"{self.name}:{args}" if args else self.name


@register_mode
@dataclass(frozen=True)
class Padding(PackingMode):
    """One conversation per sequence, padded: the baseline.

    ``pad_to=max`` (default) pads every sequence to ``--seq-length``; ``pad_to=longest`` pads a
    micro-batch only to its longest conversation (rounded up to the TP/CP multiple), as the
    paper's code does with HF's ``DataCollatorForSeq2Seq``. Shapes then change from one
    micro-batch to the next, which pipeline parallelism cannot take (``--pipeline-model-
    parallel-size`` must be 1); the plan is the same either way.
    """

    name: ClassVar[str] = "padding"
    pad_to: str = "max"

    def __post_init__(self):
        if self.pad_to not in ("max", "longest"):
            raise ValueError(f"padding: pad_to must be 'max' or 'longest', got {self.pad_to!r}")

    @property
    def pads_to_longest(self) -> bool:
        return self.pad_to == "longest"

    def key(self) -> dict[str, Any]:
        return {"mode": self.name}  # the plan does not depend on pad_to: one cache file

    def __str__(self) -> str:
        return "padding" if self.pad_to == "max" else f"padding:pad_to={self.pad_to}"


@register_mode
@dataclass(frozen=True)
class Greedy(PackingMode):
    """The paper's greedy packing: longest first, close the sequence when the next item does not fit.

    ``chunk=N`` (N >= 1) is what its released code does instead (``packing_style
    full-no-cut``): inside each chunk of N conversations in dataset order (its
    ``datasets.map`` batch: 1000), longest first, open a sequence and scan every later
    conversation, taking each that still fits — first-fit decreasing. A conversation longer
    than ``--seq-length`` never fits and is never placed: the code drops it silently; here it
    is counted in ``mode_dropped_docs``/``mode_dropped_tokens`` (``--overlong`` does not apply).
    When nothing fits after it either, no sequence is emitted and it stays dropped (our reading
    of the code; were it placed alone there, the code would drop slightly fewer than counted here).
    """

    name: ClassVar[str] = "greedy"
    chunk: int = 0

    def __post_init__(self):
        if self.chunk < 0:
            raise ValueError(f"greedy: chunk must be >= 0 (0: no chunks, the paper's text), got {self.chunk}")

    @property
    def keeps_overlong(self) -> bool:
        return self.chunk > 0

    def pack(self, lengths, capacity, seed, engine):
        if not self.chunk:
            return super().pack(lengths, capacity, seed, engine)
        order, offsets = _paper_engine(engine).pack_greedy_chunked(lengths, capacity, self.chunk)
        return order, None, None, offsets, 0

    def __str__(self) -> str:
        return "greedy" if not self.chunk else f"greedy:chunk={self.chunk}"


@register_mode
@dataclass(frozen=True)
class BestFitDecreasing(PackingMode):
    """Longest first, each item into the fullest sequence it fits in (O(n log max_seq_length))."""

    name: ClassVar[str] = "bfd"


@register_mode
@dataclass(frozen=True)
class WindowedBestFit(PackingMode):
    """Shuffle, then best-fit decreasing inside each window of ``window`` conversations.

    Sequences hold conversations of one random window only, so consecutive batches keep
    the randomness of a shuffled sampler (``bfd`` puts the longest samples together at
    the front and fills them with the shortest); the waste is a few partly filled
    sequences per window.
    """

    name: ClassVar[str] = "windowed_bfd"
    shuffles: ClassVar[bool] = True
    window: int = 2048

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"windowed_bfd: window must be >= 1, got {self.window}")

    def _args(self, seed: int) -> tuple:
        return (self.window, seed)


@register_mode
@dataclass(frozen=True)
class RandomPacking(PackingMode):
    """The paper's random packing: shuffle, concatenate, cut every ``max_seq_length`` tokens.

    A conversation may be split across two sequences (counted in ``split_items``). The
    chat template ends every conversation with EOS, so concatenation puts EOS between them.

    ``chunk=N`` (N >= 1) is what its released code does instead (``packing_style full``): no
    shuffle; inside each chunk of N conversations in dataset order, concatenate, keep
    ``total // seq_length * seq_length`` tokens and cut them into sequences; each chunk's
    remainder is dropped (counted in ``mode_dropped_tokens``). Over-long conversations are
    simply cut (``--overlong`` does not apply). Not reproduced: the code also drops blocks
    with no supervised token; here they stay (they add no loss).
    """

    name: ClassVar[str] = "random"
    shuffles: ClassVar[bool] = True
    chunk: int = 0

    def __post_init__(self):
        if self.chunk < 0:
            raise ValueError(
                f"random: chunk must be >= 0 (0: shuffle the whole set, the paper's text), got {self.chunk}")
        if self.chunk:
            object.__setattr__(self, "shuffles", False)  # dataset order: the same plan every epoch

    @property
    def keeps_overlong(self) -> bool:
        return self.chunk > 0

    def pack(self, lengths, capacity, seed, engine):
        if self.chunk:
            return _paper_engine(engine).pack_random_chunked(lengths, capacity, self.chunk)
        return _engine(engine).pack_random(lengths, capacity, seed)

    def __str__(self) -> str:
        return "random" if not self.chunk else f"random:chunk={self.chunk}"


def _engine(engine: Engine):
    if engine == "cpp":
        from megatron_pack import _packing  # compiled engine, imported where used

        return _packing
    if engine == "reference":
        return ref
    raise ValueError(f"engine must be 'cpp' or 'reference', got {engine!r}")


def _paper_engine(engine: Engine):
    """The paper-code rules: numpy (``cpp``: the fast path, no C++ needed) or the literal loops."""
    if engine == "cpp":
        from megatron_pack.packing import paper_code

        return paper_code
    if engine == "reference":
        return ref
    raise ValueError(f"engine must be 'cpp' or 'reference', got {engine!r}")


def get_mode(spec: "str | PackingMode") -> PackingMode:
    """``"bfd"``, ``"windowed_bfd:window=4096"``, ``"greedy:chunk=1000"``,
    ``"padding:pad_to=longest"`` or a :class:`PackingMode` instance."""
    if isinstance(spec, PackingMode):
        return spec
    name, _, args = str(spec).partition(":")
    if name not in PACKING_MODES:
        raise ValueError(f"unknown packing mode {name!r}; known: {', '.join(PACKING_MODES)}")
    cls = PACKING_MODES[name]
    kwargs = {}
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for kv in filter(None, args.split(":")):
        k, eq, v = kv.partition("=")
        if not eq or k not in types:
            raise ValueError(f"bad option {kv!r} for packing mode {name!r}; options: {list(types) or 'none'}")
        if types[k] in (int, "int"):
            try:
                kwargs[k] = int(v)
            except ValueError:
                raise ValueError(f"packing mode {name!r}: option {k} must be an integer, got {v!r}") from None
        else:
            kwargs[k] = v
    return cls(**kwargs)


#: Every mode registered above, in registry order: what pack_report compares.
DEFAULT_MODES = tuple(PACKING_MODES)
#: The four settings "Packing Analysis" (arXiv 2410.08081) compares, in its order: the experiment's
#: default; the planner's rows are these, then the other registered modes.
PAPER_MODES = ("padding", "greedy", "random", "bfd")
