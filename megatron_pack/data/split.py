"""The held-out split: which conversations train and which are scored, and the subset views.

Independent of the packing mode and of the layout, so every mode and every run of a seed sees
the same split; each source of a blend is split on its own.
"""

from __future__ import annotations

import numpy as np

from megatron_pack.files.indexed import SFTIndexedDataset


class SFTSubset(SFTIndexedDataset):
    """The conversations ``indices`` of an indexed dataset, renumbered 0..n-1.

    The plan cache keys on the prefix and a hash of the (subset's) lengths, so the train
    and valid splits get plans of their own.
    """

    def __init__(self, base: SFTIndexedDataset, indices):
        self.base = base
        self.prefix = base.prefix
        self.indices = np.asarray(indices, dtype=np.int64)
        self._lengths = base.lengths[self.indices]
        self.turns = _Remap(base.turns, self.indices)

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def supervised_counts(self) -> np.ndarray:
        return self.base.supervised_counts()[self.indices]

    def __getitem__(self, i: int):
        return self.base[int(self.indices[i])]

    def get_slice(self, i: int, start: int, end: int):
        return self.base.get_slice(int(self.indices[i]), start, end)


class _Remap:
    def __init__(self, seq, indices):
        self.seq, self.indices = seq, indices

    def __getitem__(self, i):
        return self.seq[int(self.indices[i])]

    def __len__(self):
        return int(self.indices.size)


def split_indices(n: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) conversation indices: a seeded random ``valid_fraction`` held out,
    both sorted; independent of the packing mode so every mode sees the same split."""
    n_valid = int(round(n * valid_fraction))
    if valid_fraction > 0 and n_valid == 0 and n > 1:
        n_valid = 1
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])
