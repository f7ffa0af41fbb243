"""pytest imports test modules by basename (rootdir 'prepend' mode): two test files with the same
name in different folders stop collection, so the whole suite would not run."""

import collections
import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_test_module_basenames_are_unique():
    names = collections.Counter(f for _, _, files in os.walk(TESTS) for f in files
                                if f.startswith("test_") and f.endswith(".py"))
    assert [n for n, c in names.items() if c > 1] == []
