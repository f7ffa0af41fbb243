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
