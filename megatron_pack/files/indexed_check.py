"""Validation of an SFT indexed dataset on open: vectorised, one pass over the small arrays.

Megatron-Core's ``IndexedDataset`` trusts its files: a changed dtype byte reads int32 tokens as
uint16, edited pointers return a neighbour's bytes, a truncated ``.bin`` opens and fails at some
later step. What is checked here, and what it costs (numbers for 1M conversations in README):

=================================  ==========================================  ===============
check                              how                                         cost
=================================  ==========================================  ===============
header, version, dtype per part    ``.idx`` header bytes; dtype must be the    O(1)
                                   part's (int32 tokens, uint8 mask, int32
                                   turns); ``.idx`` size = header + arrays
pointers and lengths vs ``.bin``   lengths >= 0; pointers = exclusive cumsum   O(documents)
                                   of lengths x itemsize; total = ``.bin``
                                   size; document index = 0..n
summary match (preprocessed sets)  sizes; SHA-256 of the ``.idx`` files and    O(tokens), 1 B
                                   of the loss mask; its count of 1s = the
                                   summary's supervised tokens; the
                                   "incomplete" summary of an interrupted
                                   run refused
parts agree                        same count; tokens and mask same lengths    O(documents)
loss mask values in {0, 1}         ``max`` over the mask ``.bin``              O(tokens), 1 B
turn offsets inside each document  first 0, strictly increasing, < length      O(turns)
token ids < vocabulary             ``min``/``max`` over the token ``.bin``,     O(tokens), 4 B
                                   once per training run (needs the vocab)
=================================  ==========================================  ===============

Every failure names the file, the document and the reason.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from megatron_pack.files.digest import sha256_file

#: Preprocessing's summary beside the dataset: written last, it names the files it vouches for.
SUMMARY_SUFFIX = "_summary.json"

_HEADER = b"MMIDIDX\x00\x00"
_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}  # Megatron-Core's DType


class DatasetError(ValueError):
    """An SFT dataset file that would train on wrong data; the message names file, document, reason."""


class EmptyDatasetError(DatasetError):
    """An SFT dataset with nothing to train on: no conversation, or none with a supervised token
    (within the sequence length). The message names the prefix."""


def read_index_header(idx_path: str):
    """``(version, dtype code, sequences, documents)`` from a Megatron ``.idx`` header (34 bytes,
    no other imports), or None when the file does not start with one."""
    with open(idx_path, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != _HEADER:
        return None
    return struct.unpack("<QBQQ", head[9:34])


class IndexArrays:
    """The arrays of one ``.idx`` file (memory-mapped, read-only) after the header checks."""

    def __init__(self, idx_path: str, expected_dtype):
        size = os.path.getsize(idx_path)
        header = read_index_header(idx_path)
        if header is None:
            raise DatasetError(f"{idx_path}: not a Megatron indexed-dataset index (bad header)")
        version, code, n, d = header
        if version != 1:
            raise DatasetError(f"{idx_path}: index version {version}, expected 1")
        dtype = _CODES.get(code)
        if dtype is None:
            raise DatasetError(f"{idx_path}: unknown dtype code {code}")
        if np.dtype(dtype) != np.dtype(expected_dtype):
            raise DatasetError(f"{idx_path}: dtype {np.dtype(dtype).name}, this part is "
                               f"{np.dtype(expected_dtype).name} (edited or not an SFT dataset part)")
        want = 34 + 4 * n + 8 * n + 8 * d
        if size != want:
            raise DatasetError(f"{idx_path}: {size} bytes, the header's {n} sequences / {d} documents need {want}")
        self.path, self.dtype, self.count = idx_path, np.dtype(dtype), n
        mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
        self.lengths = np.frombuffer(mm, dtype=np.int32, count=n, offset=34)
        self.pointers = np.frombuffer(mm, dtype=np.int64, count=n, offset=34 + 4 * n)
        self.documents = np.frombuffer(mm, dtype=np.int64, count=d, offset=34 + 12 * n)

    def check_against_bin(self, bin_path: str) -> None:
        n, s = self.count, self.dtype.itemsize
        neg = np.flatnonzero(self.lengths < 0)
        if neg.size:
            raise DatasetError(f"{self.path}: document {neg[0]}: negative length {self.lengths[neg[0]]}")
        ends = np.cumsum(self.lengths, dtype=np.int64) * s
        starts = np.empty(n, dtype=np.int64)
        starts[:1] = 0
        starts[1:] = ends[:-1]
        bad = np.flatnonzero(self.pointers != starts)
        if bad.size:
            i = bad[0]
            raise DatasetError(f"{self.path}: document {i}: pointer {self.pointers[i]}, the lengths before it "
                               f"put it at {starts[i]} (edited pointers or lengths)")
        total = int(ends[-1]) if n else 0
        size = os.path.getsize(bin_path)
        if size != total:
            what = "truncated" if size < total else "has trailing bytes"
            raise DatasetError(f"{bin_path}: {size} bytes, the index describes {total}: {what}")
        if self.documents.size != n + 1 or not np.array_equal(self.documents, np.arange(n + 1)):
            raise DatasetError(f"{self.path}: document index is not 0..{n} (one sequence per conversation)")


def _document_of(ends: np.ndarray, flat_index: int) -> int:
    """Which document holds element ``flat_index`` of a ``.bin`` (``ends``: cumulative lengths)."""
    return int(np.searchsorted(ends, flat_index, side="right"))


def validate_dataset(prefix: str, parts) -> None:
    """All checks but the vocabulary, for ``parts`` = ((suffix, dtype), ...) of the dataset at
    ``prefix`` (tokens, loss mask, turns). Raises :class:`DatasetError`."""
    (tok_sfx, tok_dt), (mask_sfx, mask_dt), (turn_sfx, turn_dt) = parts
    tok = IndexArrays(prefix + tok_sfx + ".idx", tok_dt)
    mask = IndexArrays(prefix + mask_sfx + ".idx", mask_dt)
    turns = IndexArrays(prefix + turn_sfx + ".idx", turn_dt)
    for arr, sfx in ((tok, tok_sfx), (mask, mask_sfx), (turns, turn_sfx)):
        arr.check_against_bin(prefix + sfx + ".bin")
    if not tok.count == mask.count == turns.count:
        raise DatasetError(f"{prefix}: parts disagree on the number of conversations "
                           f"({tok.count} tokens, {mask.count} masks, {turns.count} turn lists)")
    bad = np.flatnonzero(tok.lengths != mask.lengths)
    if bad.size:
        i = bad[0]
        raise DatasetError(f"{prefix + mask_sfx}.idx: document {i}: {mask.lengths[i]} mask values for "
                           f"{tok.lengths[i]} tokens")
    _check_mask(prefix + mask_sfx + ".bin", mask)
    _check_turns(prefix + turn_sfx + ".bin", turns, tok.lengths)


def _check_mask(bin_path: str, mask: IndexArrays) -> None:
    if not mask.lengths.size or not os.path.getsize(bin_path):
        return
    values = np.memmap(bin_path, mode="r", dtype=np.uint8)
    if values.max() > 1:
        j = int(np.argmax(values > 1))
        doc = _document_of(np.cumsum(mask.lengths, dtype=np.int64), j)
        raise DatasetError(f"{bin_path}: document {doc}: loss-mask value {values[j]} (only 0 and 1 are valid)")


def _check_turns(bin_path: str, turns: IndexArrays, doc_lengths: np.ndarray) -> None:
    n = turns.count
    if not n:
        return
    empty = np.flatnonzero(turns.lengths < 1)
    if empty.size:
        raise DatasetError(f"{bin_path}: document {empty[0]}: no turn starts (the first must be 0)")
    flat = np.memmap(bin_path, mode="r", dtype=np.int32)
    firsts = np.cumsum(turns.lengths, dtype=np.int64) - turns.lengths
    bad = np.flatnonzero(flat[firsts] != 0)
    if bad.size:
        raise DatasetError(f"{bin_path}: document {bad[0]}: first turn start {flat[firsts[bad[0]]]}, expected 0")
    doc = np.repeat(np.arange(n), turns.lengths)
    limit = np.maximum(doc_lengths.astype(np.int64), 1)[doc]  # an empty conversation keeps its [0]
    out = np.flatnonzero((flat < 0) | (flat >= limit))
    if out.size:
        j = out[0]
        raise DatasetError(f"{bin_path}: document {doc[j]}: turn start {flat[j]} outside the conversation's "
                           f"{doc_lengths[doc[j]]} tokens")
    step = np.diff(flat)
    same = doc[1:] == doc[:-1]
    down = np.flatnonzero(same & (step <= 0))
    if down.size:
        j = down[0] + 1
        raise DatasetError(f"{bin_path}: document {doc[j]}: turn starts not increasing ({flat[j - 1]}, {flat[j]})")


def check_token_ids(prefix: str, vocab_size: int, lengths: np.ndarray | None = None) -> None:
    """Every token id in ``prefix.bin`` must lie in ``[0, vocab_size)``: an id past the
    embedding is an IndexError at some step, one in the TP padding rows trains to NaN."""
    path = prefix + ".bin"
    if not os.path.getsize(path):
        return
    tokens = np.memmap(path, mode="r", dtype=np.int32)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo >= 0 and hi < vocab_size:
        return
    j = int(np.argmax((tokens < 0) | (tokens >= vocab_size)))
    if lengths is None:
        lengths = IndexArrays(prefix + ".idx", np.int32).lengths
    doc = _document_of(np.cumsum(lengths, dtype=np.int64), j)
    raise DatasetError(f"{path}: document {doc}: token id {tokens[j]} outside the model's vocabulary of "
                       f"{vocab_size} (--vocab-size / --tokenizer-model too small, or the wrong tokenizer)")



def dataset_manifest(files, names=None, hash_also=()) -> dict:
    """``{name: {"bytes": size[, "sha256": ...]}}`` for the dataset's ``files`` (``names``: the
    basenames to record them under, default their own -- the final names when measured on
    temporary files). The ``.idx`` files (20 bytes per conversation) and ``hash_also`` (the loss
    mask's ``.bin``, 1 byte per token: a same-size mask from another run, e.g. ``--loss-on all``,
    otherwise passes) are hashed, the other ``.bin`` files sized."""
    out = {}
    for i, f in enumerate(files):
        entry = {"bytes": os.path.getsize(f)}
        if f.endswith(".idx") or f in hash_also:
            entry["sha256"] = sha256_file(f)
        out[names[i] if names is not None else os.path.basename(f)] = entry
    return out


#: What a summary holds while preprocessing replaces the dataset beside it (see ``SFTDatasetWriter.close``).
INCOMPLETE = "incomplete"


def read_summary(prefix: str):
    """The preprocessing summary at ``prefix`` (None without one); :class:`DatasetError` when it
    is unreadable or marks a preprocessing run that was interrupted while replacing the dataset."""
    path = prefix + SUMMARY_SUFFIX
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable preprocessing summary ({type(e).__name__}: {e})") from None
    if INCOMPLETE in summary:
        raise DatasetError(f"{path}: preprocessing into {prefix} did not finish ({summary[INCOMPLETE]}); "
                           "the dataset may be part old, part new: re-run preprocessing")
    return summary


def preprocessing_finished(prefix: str) -> bool:
    """A finished preprocessing run's summary is at ``prefix`` (not an interrupted one's)."""
    try:
        return read_summary(prefix) is not None
    except DatasetError:
        return False


def _count_ones(mask_bin: str) -> int:
    return int(np.count_nonzero(np.memmap(mask_bin, mode="r", dtype=np.uint8))) if os.path.getsize(mask_bin) else 0


def _mask_refusal(path: str, mask_bin: str, supervised) -> DatasetError:
    have = _count_ones(mask_bin)
    says = f"says {supervised:,} supervised tokens" if isinstance(supervised, int) else "records another loss mask"
    return DatasetError(f"{path}: {says}, {mask_bin} marks {have:,}: the loss mask comes from another "
                        "preprocessing run (another --loss-on?); re-run preprocessing")


def check_summary(prefix: str, files, mask_bin: str | None = None) -> None:
    """A dataset with a preprocessing summary must be the one the summary vouches for: a run
    killed while replacing the dataset, a dataset copied over another, or a loss mask from
    another run (``mask_bin``: its SHA-256 where the summary records one, its count of 1s
    against the summary's ``supervised_tokens``) is refused. Datasets without a summary (written
    by the library directly) pass; summaries from before a field existed are checked on the others."""
    summary = read_summary(prefix)
    if summary is None:
        return
    path = prefix + SUMMARY_SUFFIX
    supervised = summary.get("supervised_tokens")
    supervised = supervised if isinstance(supervised, int) and not isinstance(supervised, bool) else None
    vouched = summary.get("files")
    differ = []
    for f in files if vouched is not None else ():  # None: a summary from before summaries named their files
        want = vouched.get(os.path.basename(f)) if isinstance(vouched, dict) else None
        have = {"bytes": os.path.getsize(f)}
        if isinstance(want, dict) and "sha256" in want:  # what the summary recorded is what is compared
            have["sha256"] = sha256_file(f)
        if want != have:
            differ.append((f, want, have))
    if mask_bin is not None and [f for f, _, _ in differ] == [mask_bin]:
        raise _mask_refusal(path, mask_bin, supervised)
    if differ:
        f, want, have = differ[0]
        raise DatasetError(f"{path}: vouches for {os.path.basename(f)} as {want}, the file is {have}: the dataset "
                           "and its summary come from different preprocessing runs (one interrupted?); "
                           "re-run preprocessing")
    if mask_bin is not None and supervised is not None and _count_ones(mask_bin) != supervised:
        raise _mask_refusal(path, mask_bin, supervised)  # summaries without the mask's hash: its count
