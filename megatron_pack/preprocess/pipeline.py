"""Chat JSONL -> Megatron-Core indexed SFT dataset (tokens, loss mask, turn starts).

``preprocess(PreprocessConfig(...))`` reads the inputs in order, sends chunks of lines to
worker processes (parse, validate, template, one batched tokenizer call per chunk) and
writes the results in input order, so the output is byte-identical for any ``workers``.

Outputs for ``--output-prefix P``::

    P.bin/.idx, P_loss_mask.bin/.idx, P_turns.bin/.idx   (megatron_pack.files.indexed)
    P_summary.json    counts, rejects by reason, tokens, length percentiles, over-long
    P_rejects.jsonl   one line per rejected record: file, line, reason, message, record
    P_lengths.png     histogram of document lengths

Every file is written under a temporary name and renamed when complete. The summary is the
commit point (``SFTDatasetWriter.close``): replaced by an "incomplete" one before the new files
are renamed in, renamed in last, so a run killed at any step leaves either the old dataset with
its own summary or one every opener refuses.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from megatron_pack.files.indexed import SFTDatasetWriter, dataset_exists, dataset_files
from megatron_pack.preprocess.encode import LOSS_POLICIES, ChunkEncoder, ChunkResult
from megatron_pack.preprocess.overlong import overlong_policy
from megatron_pack.templates.registry import TEMPLATES, auto_template_name, build_template
from megatron_pack.tokenization.tokenizer import load_tokenizer


class PreprocessError(RuntimeError):
    """Bad input or setup; the message names file, line and reason where there is one."""


@dataclass
class PreprocessConfig:
    inputs: list
    """JSONL files (``.jsonl`` or ``.jsonl.gz``), read in the given order."""
    tokenizer: str
    """tokenizer.json, a HF tokenizer directory, or a SentencePiece .model."""
    output_prefix: str
    chat_template: str = "auto"
    """llama3 | llama2 | chatml | jinja | auto (the tokenizer's own, else by its special tokens)."""
    max_seq_length: Optional[int] = None
    overlong: str = "truncate"
    """truncate | drop | split-chat (each piece re-rendered as a whole chat), over max_seq_length."""
    loss_on: str = "assistant"
    """assistant (every assistant turn incl. its end token) | last (last assistant turn) | all."""
    workers: int = 1
    strict: bool = False
    """Stop with an error at the first bad record instead of skipping it."""
    chunk_size: int = 512
    """Conversations per worker task (one tokenizer batch call each)."""
    special_as_text: bool = True
    """Message text that spells a control token stays text (False: it becomes the token,
    transformers' default); the fast paths hand such chats to the Jinja path."""
    template_time_limit_s: float = 5.0
    """Jinja templates: seconds one record may take to render before it is rejected."""
    template_date: Optional[str] = None
    """Jinja templates: the day ``strftime_now`` returns (YYYY-MM-DD); default the day the run
    starts, fixed for all workers so one run renders one date."""
    fast_tokenizer: bool = True
    """Encode byte-level BPE with tiktoken when it is installed and gives identical ids."""
    progress: Optional[bool] = None
    """tqdm bar; None shows it when stderr is a terminal."""
    plot: bool = True

    def __post_init__(self):
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise PreprocessError("no input files")
        if self.chat_template != "auto" and self.chat_template not in TEMPLATES:
            raise PreprocessError(
                f"unknown chat template {self.chat_template!r}; choose from auto, {', '.join(TEMPLATES)}")
        try:
            self.overlong = overlong_policy(self.overlong)
        except ValueError as e:
            raise PreprocessError(str(e)) from None
        if self.loss_on not in LOSS_POLICIES:
            raise PreprocessError(f"unknown --loss-on {self.loss_on!r}; choose from {', '.join(LOSS_POLICIES)}")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise PreprocessError(f"--max-seq-length must be >= 2, got {self.max_seq_length}")
        if self.template_date is not None:
            import datetime

            try:
                datetime.date.fromisoformat(self.template_date)
            except (TypeError, ValueError):
                raise PreprocessError(f"template date {self.template_date!r} is not YYYY-MM-DD") from None
        if self.workers < 1 or self.chunk_size < 1:
            raise PreprocessError("--workers and chunk size must be >= 1")


# -- reading ------------------------------------------------------------------------------
def check_paths(cfg: PreprocessConfig):
    """Inputs and output directory exist (cheap; the tool runs it before heavy imports)."""
    for path in cfg.inputs:
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: input file does not exist")
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"{cfg.output_prefix}: output directory {out_dir} does not exist")


def remove_stale_temps(prefix: str) -> list[str]:
    """Delete ``PREFIX*.tmp-PID*`` files left by runs that were killed (their PID is gone);
    a live run's files are left alone. Returns what was removed."""
    import glob
    import re

    removed = []
    for path in glob.glob(glob.escape(prefix) + "*.tmp-*"):
        m = re.search(r"\.tmp-(\d+)", path[len(prefix):])
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # alive (this host): another run in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _chunks(inputs, chunk_size, on_bytes) -> Iterator[list]:
    """Lists of (file, line number, raw bytes); decoding happens in the workers."""
    chunk = []
    for path in inputs:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            pos = 0
            try:
                for lineno, line in enumerate(stream, start=1):
                    chunk.append((path, lineno, line))
                    if len(chunk) == chunk_size:
                        yield chunk
                        chunk = []
                        pos = _advance(raw, pos, on_bytes)
            except (OSError, EOFError) as exc:  # truncated or corrupt .gz
                raise PreprocessError(f"{path}: unreadable input ({exc})") from None
            _advance(raw, pos, on_bytes)
    if chunk:
        yield chunk


def _advance(raw, pos, on_bytes):
    now = raw.tell()
    on_bytes(now - pos)
    return now


# -- workers ------------------------------------------------------------------------------
_ENCODER: Optional[ChunkEncoder] = None


def _make_encoder(cfg: PreprocessConfig, tokenizer=None) -> ChunkEncoder:
    tok = tokenizer or load_tokenizer(cfg.tokenizer, fast=cfg.fast_tokenizer)
    import datetime

    date = datetime.datetime.fromisoformat(cfg.template_date) if cfg.template_date else None
    template = build_template(cfg.chat_template, tok, special_as_text=cfg.special_as_text,
                              time_limit_s=cfg.template_time_limit_s, date=date)
    return ChunkEncoder(tok, template, cfg.loss_on, cfg.max_seq_length, cfg.overlong)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _init_worker(cfg: PreprocessConfig, threads: int):
    global _ENCODER
    # Share the cores between workers: each one's tokenizer batch call may use this many
    # threads (tokenizers reads RAYON_NUM_THREADS when its pool starts, on first use).
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    _ENCODER = _make_encoder(cfg)
    _ENCODER.tok.threads = threads


def _work(lines) -> ChunkResult:
    return _ENCODER(lines)


def _ordered_results(cfg: PreprocessConfig, encoder: ChunkEncoder, chunks) -> Iterator[ChunkResult]:
    """Chunk results in input order; at most a few chunks in flight per worker."""
    if cfg.workers == 1:
        encoder.tok.threads = _cpus()
        for lines in chunks:
            yield encoder(lines)
        return
    import multiprocessing as mp

    # spawn, not fork: a forked child of a process that already used tokenizers' thread
    # pool gets parallelism switched off, and fresh workers start cheaply (no torch import).
    ctx = mp.get_context("spawn")
    threads = max(1, _cpus() // cfg.workers)
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, threads)) as pool:
        pending = collections.deque()
        for lines in chunks:
            pending.append(pool.apply_async(_work, (lines,)))
            if len(pending) >= 3 * cfg.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -- outputs ------------------------------------------------------------------------------
def output_paths(prefix: str) -> dict:
    return {
        "dataset": dataset_files(prefix),
        "summary": prefix + "_summary.json",
        "rejects": prefix + "_rejects.jsonl",
        "histogram": prefix + "_lengths.png",
    }


def _length_stats(lengths: np.ndarray) -> dict:
    if lengths.size == 0:
        return {"count": 0}
    pct = np.percentile(lengths, [50, 90, 95, 99])
    return {
        "count": int(lengths.size), "min": int(lengths.min()), "mean": round(float(lengths.mean()), 2),
        "p50": float(pct[0]), "p90": float(pct[1]), "p95": float(pct[2]), "p99": float(pct[3]),
        "max": int(lengths.max()),
    }


def _plot(lengths: np.ndarray, max_len: Optional[int], path: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if lengths.size:
        ax.hist(lengths, bins=min(60, max(10, lengths.size // 10)), color="#4477aa")
        for q, style in ((50, "--"), (99, ":")):
            v = float(np.percentile(lengths, q))
            ax.axvline(v, color="k", linestyle=style, linewidth=1, label=f"p{q} = {v:.0f}")
    if max_len:
        ax.axvline(max_len, color="#cc3311", linewidth=1.5, label=f"max_seq_length = {max_len}")
    ax.set_xlabel("tokens per document")
    ax.set_ylabel("documents")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    # No timestamp in PNG metadata: same input, same bytes.
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def _no_usable_conversation(cfg, paths, rejects_tmp, read, reasons, first_reject):
    """Every record rejected: no dataset is written (an empty indexed dataset cannot even be
    memory-mapped). Keep the rejects -- beside an older dataset under another name, so its own
    rejects stay with it -- and fail on one line naming the first bad record."""
    where = paths["rejects"]
    if dataset_exists(cfg.output_prefix):
        where = cfg.output_prefix + "_rejects.failed.jsonl"
    os.replace(rejects_tmp, where)
    first = f"; first: {str(first_reject).splitlines()[0][:300]}" if first_reject else ""
    raise PreprocessError(f"{', '.join(cfg.inputs)}: no usable conversation ({read} read, rejected: "
                          f"{dict(sorted(reasons.items()))}){first}; all rejects in {where}")


def _summary(cfg, tokenizer: dict, template_name: str, paths: dict, read: int, reasons, schemas, overlong,
             lengths: np.ndarray, supervised: int) -> dict:
    """The ``P_summary.json`` of a finished run (written last: its presence marks the run done)."""
    rejected = sum(reasons.values())
    tokens = int(lengths.sum())
    return {
        "inputs": list(cfg.inputs),
        "tokenizer": tokenizer,
        "chat_template": template_name,
        "loss_on": cfg.loss_on,
        "max_seq_length": cfg.max_seq_length,
        "overlong_policy": cfg.overlong,
        "conversations": {
            "read": read,
            "written": read - rejected,
            "rejected": rejected,
            "rejected_by_reason": dict(sorted(reasons.items())),
            "by_schema": dict(sorted(schemas.items())),
        },
        "documents": int(lengths.size),
        "tokens": tokens,
        "supervised_tokens": supervised,
        "supervised_fraction": round(supervised / tokens, 4) if tokens else 0.0,
        "length": _length_stats(lengths),
        # null without --max-seq-length: nothing was measured against a limit here (packing may
        # still truncate, drop or cut for its own --seq-length; pack_report counts those)
        "overlong": ({"over_max_seq_length": overlong.pop("over_max", 0), **dict(sorted(overlong.items()))}
                     if cfg.max_seq_length is not None else {"over_max_seq_length": None}),
        "outputs": {k: v for k, v in paths.items() if k != "histogram" or cfg.plot},
        # "files" (what the summary vouches for) is added by SFTDatasetWriter.close
    }


def preprocess(cfg: PreprocessConfig) -> dict:
    """Run the whole conversion; returns the summary dict (also written as JSON)."""
    check_paths(cfg)
    remove_stale_temps(cfg.output_prefix)
    if cfg.template_date is None:
        import dataclasses
        import datetime

        cfg = dataclasses.replace(cfg, template_date=datetime.datetime.now().date().isoformat())
    tokenizer = load_tokenizer(cfg.tokenizer, fast=cfg.fast_tokenizer)
    template_name = cfg.chat_template if cfg.chat_template != "auto" else auto_template_name(tokenizer)
    encoder = _make_encoder(cfg, tokenizer)
    paths = output_paths(cfg.output_prefix)
    tmp = f".tmp-{os.getpid()}"
    total_bytes = sum(os.path.getsize(p) for p in cfg.inputs)

    from tqdm import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal.
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", leave=False,
               disable=None if cfg.progress is None else not cfg.progress)
    counts = collections.Counter()
    reasons, schemas, overlong = collections.Counter(), collections.Counter(), collections.Counter()
    lengths, supervised = [], 0
    rejects_tmp = paths["rejects"] + tmp
    try:
        with contextlib.ExitStack() as stack, open(rejects_tmp, "w", encoding="utf-8") as rej:
            writer, first_reject = None, None
            for res in _ordered_results(cfg, encoder, _chunks(cfg.inputs, cfg.chunk_size, bar.update)):
                if cfg.strict:
                    # Over-long drops are the chosen policy, not bad input.
                    bad = [r for r in res.rejects if not r.reason.startswith("overlong")]
                    if bad:
                        raise PreprocessError(f"{bad[0]} (--strict)")
                for r in res.rejects:
                    rej.write(json.dumps(r.as_json(), ensure_ascii=False) + "\n")
                    reasons[r.reason] += 1
                first_reject = first_reject or (res.rejects[0] if res.rejects else None)
                counts["read"] += res.read
                schemas.update(res.schemas)
                overlong.update(res.overlong)
                if writer is None and len(res.doc_off) > 1:
                    # Opened at the first document, not before: the writer imports Megatron-Core
                    # (seconds of CPU), which a file of bad records never needs.
                    writer = stack.enter_context(SFTDatasetWriter(cfg.output_prefix))
                for d in range(len(res.doc_off) - 1):
                    a, b = res.doc_off[d], res.doc_off[d + 1]
                    writer.add(res.tokens[a:b], res.mask[a:b], res.turns[res.turn_off[d]:res.turn_off[d + 1]])
                lengths.append(np.diff(res.doc_off))
                supervised += int(res.mask.sum(dtype=np.int64))
                bar.set_postfix(conversations=counts["read"], rejected=sum(reasons.values()), refresh=False)
            bar.close()
            if writer is None:
                rej.close()
                _no_usable_conversation(cfg, paths, rejects_tmp, counts["read"], reasons, first_reject)
            rej.close()
            lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int64)
            summary = _summary(cfg, tokenizer.describe(), template_name, paths, counts["read"], reasons, schemas,
                               overlong, lengths, supervised)
            renames = [(rejects_tmp, paths["rejects"])]
            if cfg.plot:
                _plot(lengths, cfg.max_seq_length, paths["histogram"] + tmp,
                      f"{os.path.basename(cfg.output_prefix)}: {lengths.size} documents, {summary['tokens']} tokens")
                renames.append((paths["histogram"] + tmp, paths["histogram"]))
            # The commit (SFTDatasetWriter.close): the old summary is replaced by an "incomplete" one
            # before the dataset is renamed in, the new summary (vouching for the files) renamed last.
            summary = writer.close(summary, also_rename=renames)
    except BaseException:
        bar.close()
        for path in (rejects_tmp, paths["histogram"] + tmp):
            if os.path.exists(path):
                os.remove(path)
        raise
    return summary
