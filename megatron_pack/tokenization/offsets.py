"""Whole chats to token ids with character offsets, the way ``transformers`` tokenizes a rendered
chat: added tokens in the text become their ids (except inside protected message text), the text
between them goes through the tokenizer, and every token gets the character span it covers so
the loss mask can be read off character spans.

Backends: ``tokenizers`` (the whole chat in one call, offsets from the Encoding), tiktoken (one
call per chat with the added tokens registered as its specials, offsets from a byte-length
table), SentencePiece and Meta's tiktoken file (text between control tokens encoded piecewise).
"""

from __future__ import annotations

import numpy as np


def char_offsets(text: str, byte_lens):
    """Character (start, end) of consecutive tokens of ``text`` given their byte lengths; a token
    that ends inside a multi-byte character counts that character (as ``tokenizers`` does)."""
    raw = text.encode("utf-8")
    lens = np.asarray(byte_lens, dtype=np.int64)
    if not len(lens) or not raw:
        return np.zeros(len(lens), np.int64), np.zeros(len(lens), np.int64)
    char_of_byte = np.cumsum((np.frombuffer(raw, dtype=np.uint8) & 0xC0) != 0x80) - 1
    bend = np.cumsum(lens)
    starts = char_of_byte[np.minimum(bend - lens, len(raw) - 1)]
    ends = char_of_byte[np.clip(bend - 1, 0, len(raw) - 1)] + 1
    return starts, ends


def segments(tok, text, protect, added_re):
    """(start, end, token id or None) pieces: added tokens outside ``protect`` are single
    ids; text between them, cut at the protected ranges, is encoded as plain text."""
    cuts = sorted({x for a, b in protect for x in (a, b)})
    matches = [m for m in added_re.finditer(text)] if added_re else []
    out, pos = [], 0
    pi = 0
    for m in matches:
        if any(a < m.end() and m.start() < b for a, b in protect):
            continue
        while pi < len(cuts) and cuts[pi] <= m.start():
            if cuts[pi] > pos:
                out.append((pos, cuts[pi], None))
                pos = cuts[pi]
            pi += 1
        if m.start() > pos:
            out.append((pos, m.start(), None))
        out.append((m.start(), m.end(), tok._piece_to_id(m.group())))
        pos = m.end()
    for c in cuts[pi:]:
        if pos < c <= len(text):
            out.append((pos, c, None))
            pos = c
    if pos < len(text):
        out.append((pos, len(text), None))
    return out


def split_encode(tok, text, protect, added_re):
    """(ids, char starts, char ends); segments tile the text, so offsets are one cumulative sum."""
    ids, lens = [], []
    for a, b, tid in segments(tok, text, protect, added_re):
        if tid is not None:
            ids.append(tid)
            lens.append(len(text[a:b].encode("utf-8")))
        else:
            seg_ids, seg_lens = tok._encode_bytes(text[a:b])
            ids.extend(seg_ids)
            lens.extend(seg_lens)
    return ids, *char_offsets(text, lens)


def from_encoding(enc):
    off = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
    return list(enc.ids), off[:, 0], off[:, 1]



def hf_encode_chats(tok, texts, protects, added_re):
    """``HFTokenizer``: tiktoken when it is the backend, else ``tokenizers`` on whole chats."""
    if tok.tiktoken is not None:
        return tiktoken_chats(tok, texts, protects, added_re)
    out = [None] * len(texts)
    plain = [i for i, p in enumerate(protects) if not p]
    backend = tok.chat_backend()  # added tokens matched in text, as transformers encodes a rendered chat
    for i, enc in zip(plain, backend.encode_batch([texts[i] for i in plain], add_special_tokens=False)):
        out[i] = from_encoding(enc)
    for i, p in enumerate(protects):
        if p:
            out[i] = encode_marked(tok, texts[i], p)
    return out


def plain_ids(backend, text: str) -> list:
    """``text`` through normalizer, pre-tokenizer and model only: no added token is matched,
    special or not (transformers' ``_encode_without_added_tokens``)."""
    if backend.normalizer is not None:
        text = backend.normalizer.normalize_str(text)
    splits = [text]
    if backend.pre_tokenizer is not None:
        splits = [split for split, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
    return [t.id for split in splits for t in backend.model.tokenize(split)]


def encode_marked(tok, text, protect):
    """transformers' ``encode_marked_chat``: cut at each protected control-token string, encode
    it as plain text, and every piece after the first behind a newline it then drops. A
    protected piece's tokens all get the piece's span (it lies inside one message's text)."""
    hf = tok.chat_backend()
    newline = hf.encode("\n", add_special_tokens=False).ids
    newline_plain = plain_ids(hf, "\n")
    cuts = [0] + sorted({x for a, b in protect for x in (a, b)}) + [len(text)]
    ids, starts, ends = [], [], []
    for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        if b <= a:
            continue
        piece = text[a:b]
        if (a, b) in protect:
            p_ids = plain_ids(hf, "\n" + piece)
            p_ids = p_ids[len(newline_plain):] if p_ids[:len(newline_plain)] == newline_plain else plain_ids(hf, piece)
            p_s, p_e = np.full(len(p_ids), a, np.int64), np.full(len(p_ids), b, np.int64)
        elif j == 0:
            p_ids, p_s, p_e = from_encoding(hf.encode(piece, add_special_tokens=False))
            p_s, p_e = p_s + a, p_e + a
        else:
            p_ids, p_s, p_e = from_encoding(hf.encode("\n" + piece, add_special_tokens=False))
            if p_ids[:len(newline)] == newline:
                p_ids, p_s, p_e = p_ids[len(newline):], p_s[len(newline):] - 1 + a, p_e[len(newline):] - 1 + a
            else:
                p_ids, p_s, p_e = from_encoding(hf.encode(piece, add_special_tokens=False))
                p_s, p_e = p_s + a, p_e + a
        ids.extend(p_ids)
        starts.append(np.maximum(p_s, a))
        ends.append(np.maximum(p_e, a))
    if not starts:
        return ids, np.zeros(0, np.int64), np.zeros(0, np.int64)
    return ids, np.concatenate(starts), np.concatenate(ends)


def tiktoken_tables(enc, added: dict, vocab_size: int) -> tuple:
    """``(byte length of every id, a tiktoken Encoding that also knows the added tokens)`` for
    the tiktoken Encoding ``enc`` and ``added`` (``{content: id}``)."""
    import tiktoken

    lens = np.zeros(vocab_size, dtype=np.int64)
    for i in range(enc.n_vocab):
        try:
            lens[i] = len(enc.decode_single_token_bytes(i))
        except KeyError:
            pass
    for content, i in added.items():
        lens[i] = len(content.encode("utf-8"))
    with_added = tiktoken.Encoding("megatron_pack_chat", pat_str=enc._pat_str, mergeable_ranks=enc._mergeable_ranks,
                                   special_tokens=added)
    return lens, with_added


def tiktoken_chats(tok, texts, protects, added_re):
    """One tiktoken call per chat, the added tokens registered as its special tokens (split
    out in Rust, as ``tokenizers`` splits them); chats with protected text go piecewise."""
    byte_len, with_added = tok.tiktoken_tables()
    out = []
    for text, protect in zip(texts, protects):
        if protect:
            out.append(split_encode(tok, text, protect, added_re))
            continue
        ids = with_added.encode(text, allowed_special="all", disallowed_special=())
        out.append((ids, *char_offsets(text, byte_len[ids] if ids else [])))
    return out
