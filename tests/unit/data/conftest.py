"""The ``data`` fixture: the four hand-computed conversations of :mod:`tiny_docs` on disk."""

import pytest
from tiny_docs import DOCS, write


@pytest.fixture
def data(tmp_path):
    return write(tmp_path / "tiny", DOCS)
