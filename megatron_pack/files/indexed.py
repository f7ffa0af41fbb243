"""On-disk SFT dataset: three Megatron-Core indexed datasets sharing one prefix.

```
PREFIX.bin/.idx            tokens, int32, one sequence (= one document) per conversation
PREFIX_loss_mask.bin/.idx  uint8, same lengths: 1 where the token is trained on
PREFIX_turns.bin/.idx      int32, per conversation the token offsets where each message
                           turn starts (first entry 0); split points between turns
```

Example, a two-exchange conversation of 12 tokens::

    tokens     u u u a a a u u a a a a
    loss_mask  0 0 0 1 1 1 0 0 1 1 1 1
    turns      [0, 3, 6, 8]

Everything is written under temporary names and renamed only once complete, so an
interrupted run never leaves a dataset that looks whole; with a preprocessing summary, the
summary is the commit point (:meth:`SFTDatasetWriter.close`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LOSS_MASK_SUFFIX = "_loss_mask"
TURNS_SUFFIX = "_turns"
PART_SUFFIXES = ("", LOSS_MASK_SUFFIX, TURNS_SUFFIX)
PART_DTYPES = (np.int32, np.uint8, np.int32)


def dataset_files(prefix: str) -> list[str]:
    """All files that make up the dataset at ``prefix``."""
    return [prefix + s + ext for s in PART_SUFFIXES for ext in (".bin", ".idx")]


def dataset_exists(prefix: str) -> bool:
    return all(os.path.exists(p) for p in dataset_files(prefix))


def check_dataset(prefix: str) -> None:
    """The check every opener of an SFT dataset goes through (:class:`SFTIndexedDataset` calls
    it; front-ends call it before their heavy imports): one-line ``DatasetError`` when its
    preprocessing summary marks an interrupted run, ``FileNotFoundError`` unless every part
    exists, ``EmptyDatasetError`` when it holds no conversation (an empty
    set must never pass for a whole one: nothing downstream can train, plan or score on it)."""
    from megatron_pack.files.indexed_check import read_summary

    read_summary(prefix)  # refuses the summary of a preprocessing run interrupted while replacing the dataset
    missing = [p for p in dataset_files(prefix) if not os.path.exists(p)]
    if len(missing) == len(PART_SUFFIXES) * 2:
        raise FileNotFoundError(f"{prefix}: no SFT dataset at this prefix (expected {prefix}.bin/.idx and its "
                                f"_loss_mask/_turns parts, written by tools/preprocess_sft.py)")
    if missing:
        raise FileNotFoundError(f"{prefix}: SFT dataset incomplete, missing "
                                + ", ".join(os.path.basename(p) for p in missing))
    if conversation_count(prefix) == 0:
        from megatron_pack.files.indexed_check import SUMMARY_SUFFIX, EmptyDatasetError

        summary = prefix + SUMMARY_SUFFIX
        why = (f"preprocessing wrote no conversation, see {summary}" if os.path.exists(summary)
               else "no conversation was written")
        raise EmptyDatasetError(f"{prefix}: empty SFT dataset (0 conversations; {why})")


def conversation_count(prefix: str):
    """Conversations in the dataset at ``prefix``, from the tokens ``.idx`` header alone;
    ``None`` when the header is not a Megatron index (validation on open says why)."""
    from megatron_pack.files.indexed_check import read_index_header

    header = read_index_header(prefix + ".idx")
    return None if header is None else header[2]


class SFTDatasetWriter:
    """Streams conversations into the three indexed datasets, atomically on close.

    Use as a context manager; on an exception nothing is renamed into place and the
    temporary files are removed.
    """

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        out_dir = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(out_dir):
            raise FileNotFoundError(f"{prefix}: output directory {out_dir} does not exist")
        self.prefix = prefix
        self._tmp_prefix = f"{prefix}.tmp-{os.getpid()}"
        self._builders = [
            IndexedDatasetBuilder(self._tmp_prefix + s + ".bin", dtype=dt)
            for s, dt in zip(PART_SUFFIXES, PART_DTYPES)
        ]
        self.num_conversations = 0
        self._closed = False

    def add(self, tokens: Sequence[int], loss_mask: Sequence[int], turn_starts: Sequence[int]):
        tokens = np.asarray(tokens, dtype=np.int32)
        loss_mask = np.asarray(loss_mask, dtype=np.uint8)
        turn_starts = np.asarray(turn_starts, dtype=np.int32)
        if tokens.shape != loss_mask.shape:
            raise ValueError("tokens and loss_mask differ in length")
        if turn_starts.size == 0 or turn_starts[0] != 0:
            raise ValueError("turn_starts must start with 0")
        for builder, arr in zip(self._builders, (tokens, loss_mask, turn_starts)):
            builder.add_document(arr, [arr.size])
        self.num_conversations += 1

    def _tmp_files(self) -> list[str]:
        return dataset_files(self._tmp_prefix)

    def close(self, summary: dict | None = None, also_rename=()) -> dict | None:
        """Rename the finished parts into place. With a preprocessing ``summary`` the commit is::

            1. the summary, vouching for the new files, written under a temporary name
            2. PREFIX_summary.json replaced by an "incomplete" one   (the dataset is refused from here)
            3. old parts removed, new parts renamed in; ``also_rename`` (rejects, histogram)
            4. the temporary summary renamed over the incomplete one (the commit point)

        A run killed anywhere leaves either the old dataset with its own summary (before 2) or an
        "incomplete" summary that every opener refuses (2-3); never a complete-looking mix.
        Without a summary (the library used directly) only 3 happens. Returns the summary as
        written (with ``files``). Idempotent."""
        if self._closed:
            return self._written
        from megatron_pack.files.atomic import temp_name, write_json_atomic
        from megatron_pack.files.indexed_check import INCOMPLETE, SUMMARY_SUFFIX, dataset_manifest

        for builder, s in zip(self._builders, PART_SUFFIXES):
            builder.finalize(self._tmp_prefix + s + ".idx")
        finals = dataset_files(self.prefix)
        summary_path = self.prefix + SUMMARY_SUFFIX
        if summary is not None:
            files = dataset_manifest(self._tmp_files(), [os.path.basename(f) for f in finals],
                                     hash_also=(self._tmp_prefix + LOSS_MASK_SUFFIX + ".bin",))
            summary = dict(summary, files=files)
            self._summary_tmp = temp_name(summary_path) + ".new"  # write_json_atomic uses temp_name itself
            with open(self._summary_tmp, "w", encoding="utf-8") as f:  # 1
                json.dump(summary, f, indent=2)
                f.write("\n")
            write_json_atomic({INCOMPLETE: f"process {os.getpid()} was replacing the dataset"}, summary_path)  # 2
        # Remove an older dataset at this prefix first: a crash between the renames below
        # then leaves an incomplete set (refused by the reader), never a mix of old and new.
        for final in finals:
            if os.path.exists(final):
                os.remove(final)
        for tmp, final in list(zip(self._tmp_files(), finals)) + list(also_rename):
            os.replace(tmp, final)
        if summary is not None:
            os.replace(self._summary_tmp, summary_path)  # 4
        self._closed, self._written = True, summary
        return summary

    def abort(self):
        for builder in self._builders:
            try:
                builder.data_file.close()
            except Exception:
                pass
        for tmp in self._tmp_files() + [getattr(self, "_summary_tmp", "")]:
            if tmp and os.path.exists(tmp):
                os.remove(tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif not self._closed:
            self.abort()
        return False


@dataclass
class SFTConversation:
    tokens: np.ndarray
    loss_mask: np.ndarray
    turn_starts: np.ndarray


class SFTIndexedDataset:
    """Memory-mapped reader over the three parts, via Megatron-Core's ``IndexedDataset``.

    ``validate`` (default) checks the files first (:mod:`megatron_pack.files.indexed_check`:
    dtypes, pointers and sizes, mask values, turn offsets); token ids against the model's
    vocabulary are :meth:`check_vocab`, called once per run by training."""

    def __init__(self, prefix: str, validate: bool = True):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        check_dataset(prefix)
        if validate:
            from megatron_pack.files.indexed_check import check_summary, validate_dataset

            check_summary(prefix, dataset_files(prefix), mask_bin=prefix + LOSS_MASK_SUFFIX + ".bin")
            validate_dataset(prefix, tuple(zip(PART_SUFFIXES, PART_DTYPES)))
        self.prefix = prefix
        self.tokens = IndexedDataset(prefix)
        self.loss_mask = IndexedDataset(prefix + LOSS_MASK_SUFFIX)
        self.turns = IndexedDataset(prefix + TURNS_SUFFIX)
        if not (len(self.tokens) == len(self.loss_mask) == len(self.turns)):
            raise ValueError(f"{prefix}: parts disagree on the number of conversations")
        if not np.array_equal(self.tokens.sequence_lengths, self.loss_mask.sequence_lengths):
            raise ValueError(f"{prefix}: tokens and loss mask disagree on conversation lengths")

    def __len__(self) -> int:
        return len(self.tokens)

    def supervised_counts(self) -> np.ndarray:
        """Per conversation, the trained targets: ``loss_mask[1:]`` summed (int64; one pass over
        the mask file, cached)."""
        if getattr(self, "_supervised", None) is None:
            lengths = self.tokens.sequence_lengths.astype(np.int64)
            out = np.zeros(lengths.size, dtype=np.int64)
            if lengths.sum():
                mask = np.memmap(self.prefix + LOSS_MASK_SUFFIX + ".bin", mode="r", dtype=np.uint8)
                nonempty = np.flatnonzero(lengths)
                starts = (np.cumsum(lengths) - lengths)[nonempty]
                # segments run from one non-empty conversation's start to the next one's
                out[nonempty] = np.add.reduceat(mask, starts, dtype=np.int64) - mask[starts]
            self._supervised = out
        return self._supervised

    def check_vocab(self, vocab_size: int) -> None:
        """Raise :class:`~megatron_pack.files.indexed_check.DatasetError` naming the document
        when a token id is negative or ``>= vocab_size``."""
        from megatron_pack.files.indexed_check import check_token_ids

        check_token_ids(self.prefix, vocab_size, self.tokens.sequence_lengths)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of every conversation (int64)."""
        return self.tokens.sequence_lengths.astype(np.int64)

    # Megatron's IndexedDataset closes its memory map when it is collected, so views into
    # it would dangle: everything returned here is a copy.
    def __getitem__(self, i: int) -> SFTConversation:
        return SFTConversation(self.tokens[i].copy(), self.loss_mask[i].copy(), self.turns[i].copy())

    def get_slice(self, i: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and loss mask of conversation ``i`` in ``[start, end)``."""
        n = end - start
        return (self.tokens.get(i, offset=start, length=n).copy(),
                self.loss_mask.get(i, offset=start, length=n).copy())
