"""Fixtures for the multi-process tests: a small SFT dataset on disk, shared by every launch."""

import numpy as np
import pytest

from megatron_pack.files.indexed import SFTDatasetWriter


@pytest.fixture(scope="session")
def sft_prefix(tmp_path_factory):
    """24 conversations of 4..30 tokens (ids 1..255), first third of each is an untrained prompt."""
    rng = np.random.default_rng(7)
    prefix = str(tmp_path_factory.mktemp("dist_data") / "sft")
    with SFTDatasetWriter(prefix) as w:
        for _ in range(24):
            n = int(rng.integers(4, 31))
            prompt = max(1, n // 3)
            mask = [0] * prompt + [1] * (n - prompt)
            w.add(rng.integers(1, 256, n).tolist(), mask, [0, prompt])
    return prefix


@pytest.fixture(scope="session")
def cp_prefix(tmp_path_factory):
    """Context-parallel data: 30 conversations of odd lengths 1..29, several shorter than 2*CP = 4."""
    rng = np.random.default_rng(11)
    prefix = str(tmp_path_factory.mktemp("cp_data") / "sft")
    lengths = [1, 3, 2, 5, 3] + [int(2 * rng.integers(0, 15) + 1) for _ in range(25)]
    with SFTDatasetWriter(prefix) as w:
        for n in lengths:
            prompt = n // 3
            w.add(rng.integers(1, 256, n).tolist(), [0] * prompt + [1] * (n - prompt), [0, prompt] if prompt else [0])
    return prefix
