"""The shuffle seeds of packing: one splitmix64 stream shared by the C++ engine and its twins.

``derive_seed(seed, epoch)`` gives every epoch an unrelated permutation; the C++ engine
(``csrc/packing.cpp``) and :mod:`megatron_pack.packing.reference` draw from the same generator.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


class SplitMix64:
    """splitmix64 (Steele, Lea, Flood 2014): tiny, seedable, identical in C++ and here."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)


def derive_seed(seed: int, epoch: int) -> int:
    """A 64-bit shuffle seed per (seed, epoch): every epoch gets an unrelated permutation."""
    return SplitMix64(SplitMix64(seed).next() ^ (epoch & _MASK64)).next()
