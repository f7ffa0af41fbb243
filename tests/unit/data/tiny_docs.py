"""The four hand-computed conversations the dataset tests draw their expected rows from."""

from megatron_pack.files.indexed import SFTDatasetWriter, SFTIndexedDataset

P = 0  # pad id

# doc: tokens, supervised mask, turn starts
DOCS = [
    ([10, 11, 12, 13], [0, 0, 1, 1], [0, 2]),
    ([20, 21, 22], [0, 1, 1], [0, 1]),
    ([30, 31, 32, 33, 34], [0, 0, 1, 1, 1], [0, 2]),
    ([40, 41], [0, 1], [0, 1]),
]


def write(prefix, docs):
    with SFTDatasetWriter(str(prefix)) as w:
        for t, m, turns in docs:
            w.add(t, m, turns)
    return SFTIndexedDataset(str(prefix))
