"""Packing modes: one frozen config class per strategy, in one registry.

A mode maps item lengths to sequences (``pack``), in C++ (``megatron_pack._packing``) or with
its Python twin in :mod:`megatron_pack.packing.reference`. Modes: ``padding`` (one item per
sequence), ``greedy`` and ``random`` (the rules of "Packing Analysis", arXiv 2410.08081, as its
text states them), ``bfd`` (best-fit decreasing), and ``windowed_bfd`` (best fit inside shuffled
windows, so a batch keeps its randomness). Options are written ``name:key=value``.
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

    def key(self) -> dict[str, Any]:
        """Everything that identifies the plan this mode builds (for cache keys and reports)."""
        return {"mode": self.name, **dataclasses.asdict(self)}

    def __str__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())
        return f"{self.name}:{args}" if args else self.name


@register_mode
@dataclass(frozen=True)
class Padding(PackingMode):
    """One conversation per sequence, padded: the baseline."""

    name: ClassVar[str] = "padding"


@register_mode
@dataclass(frozen=True)
class Greedy(PackingMode):
    """The paper's greedy packing: longest first, close the sequence when the next item does not fit."""

    name: ClassVar[str] = "greedy"


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
    """

    name: ClassVar[str] = "random"
    shuffles: ClassVar[bool] = True

    def pack(self, lengths, capacity, seed, engine):
        return _engine(engine).pack_random(lengths, capacity, seed)


def _engine(engine: Engine):
    if engine == "cpp":
        from megatron_pack import _packing  # compiled engine, imported where used

        return _packing
    if engine == "reference":
        return ref
    raise ValueError(f"engine must be 'cpp' or 'reference', got {engine!r}")


def get_mode(spec: "str | PackingMode") -> PackingMode:
    """``"bfd"``, ``"windowed_bfd:window=4096"`` or a :class:`PackingMode` instance."""
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
        kwargs[k] = int(v)
    return cls(**kwargs)


#: Every mode registered above, in registry order: what pack_report and the planner compare.
DEFAULT_MODES = tuple(PACKING_MODES)
