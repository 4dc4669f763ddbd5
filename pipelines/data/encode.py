"""Token ids of corpus documents, exactly as ``tokenizers`` encodes them, several times faster.

Packing spends most of its time in ``Tokenizer.encode_batch``, and most of that in building each
piece's Python-visible ``Encoding`` and in the pre-tokenizer's Unicode regex, for text whose words
repeat (Zipf). For the tokenizer kiln trains (``pipelines/data/tokenizer.py``: digits split one per
token, then GPT-2's byte-level regex, then byte-level BPE, no normaliser) and ASCII text, the
pre-tokenizer is a small state machine over bytes (``pipelines/data/pretokenize.py``), and a
piece's tokens are a function of the piece alone, so each distinct piece's ids are computed once
(``_bpe_kernel``: the model's merges applied lowest rank first, as the library's BPE model does)
and cached. One numba pass cuts a batch into pieces,
hashes each and looks it up in the cache (an open-addressing table; a hit compares the bytes, so a
hash collision cannot give wrong ids); a second gathers the ids back to back with each document's
count: no Python object per piece, and none per document in ``encode_ragged``.

Anything else goes to ``encode_batch`` unchanged: another tokenizer (``data.tokenizer.path``),
non-ASCII text. ``tests/test_encode.py`` checks the ids against ``encode_batch`` on generated and
corpus text, and the state machine against GPT-2's regular expression.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numba
import numpy as np

from pipelines.data.minhash import mix64_one
from pipelines.data.pretokenize import (
    CLASS,
    PRE_TOKENIZER,
    byte_chars,
    piece_end,
    piece_hash,
)

_MAX_CACHED_WORDS = 500_000  # ~100 MB of cache at most
# The longest piece whose ids _bpe_kernel computes (a run of letters can be a whole file long).
_KERNEL_PIECE_BYTES = 256
# Text per kernel call: the index kernel's arrays take up to 40 bytes per byte of text (reserved,
# mostly untouched), so a batch of large documents (text_unit: file) is cut into calls of at most
# this much (one document at least).
_CHUNK_BYTES = 4 << 20
# ANDed into every piece's hash: all ones; a test sets 0 to make every piece collide.
_HASH_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def fast_path_applies(spec: dict[str, Any]) -> bool:
    """Whether a tokenizer (its JSON) is the kind whose ASCII encoding this module reproduces."""
    model = spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and spec.get("pre_tokenizer") == PRE_TOKENIZER
        and model.get("type") == "BPE"
        and not model.get("dropout")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
        and not model.get("ignore_merges")
        and all(t.get("special") for t in spec.get("added_tokens", []))
    )


@numba.njit(cache=True, inline="always")
def _packed(buf: np.ndarray, lo: int, hi: int) -> np.uint64:
    """The first (up to) 8 bytes of ``buf[lo:hi]``, little-endian in one integer."""
    v = np.uint64(0)
    for q in range(min(hi - lo, 8)):
        v |= np.uint64(buf[lo + q]) << np.uint64(8 * q)
    return v


@numba.njit(cache=True, inline="always")
def _home(h: np.uint64, mask: np.uint64) -> np.uint64:
    """A hash's first slot, from its high bits: ``piece_hash`` sets the low bit, and homes from the
    low bits were odd slots only, which made linear probing cluster."""
    return (h >> np.uint64(1)) & mask


@numba.njit(cache=True, inline="always")
def _find(buf: np.ndarray, lo: int, hi: int, h: np.uint64, table: np.ndarray, piece_bytes: np.ndarray,
          piece_off: np.ndarray) -> int:  # fmt: skip
    """The cache entry of the piece ``buf[lo:hi]`` (hash ``h``), or -1: linear probing from
    ``_home(h)``; a slot matches when its hash, length and bytes all equal the piece's.

    A slot is one 32-byte row of ``table`` (hash, entry + 1 or 0 when free, length, the first 8
    bytes), so a probe of a piece of up to 8 bytes (most of them) reads one cache line; a longer
    one also compares its other bytes in ``piece_bytes``. (With hash, length and bytes in three
    other arrays the lookups of 4,096 documents took 0.074 s, with the rows 0.071 s; the home from
    the hash's high bits took them to 0.049 s.)"""
    mask = np.uint64(table.shape[0] - 1)
    n = hi - lo
    head = _packed(buf, lo, hi)
    s = _home(h, mask)
    while table[s, 1] != 0:
        if table[s, 0] == h and table[s, 2] == n and table[s, 3] == head:
            k = np.int64(table[s, 1]) - 1
            if n <= 8:
                return k
            base, same = piece_off[k], True
            for q in range(8, n):
                if piece_bytes[base + q] != buf[lo + q]:
                    same = False
                    break
            if same:
                return k
        s = (s + np.uint64(1)) & mask
    return -1


@numba.njit(cache=True)
def _index_kernel(buf: np.ndarray, doc_end: np.ndarray, cls: np.ndarray, hash_mask: np.uint64, table: np.ndarray,
                  piece_bytes: np.ndarray, piece_off: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Cut a batch of ASCII documents (bytes back to back, each ending at ``doc_end``) into pieces
    and look each up in the cache, in one pass.

    Returns:
        each piece's cache entry or -1 (P,), each document's piece count (B,), and for the pieces
        not found (M,): their numbers, starts, ends and hashes (M x 3 int64, then M uint64).
    """
    index = np.empty(buf.size, dtype=np.int64)
    counts = np.zeros(doc_end.size, dtype=np.int64)
    missed = np.empty((buf.size, 3), dtype=np.int64)  # reserved, touched only where pieces are new
    miss_hash = np.empty(buf.size, dtype=np.uint64)
    p, m, pos = 0, 0, 0
    for d in range(doc_end.size):
        end = doc_end[d]
        first = p
        while pos < end:
            stop = piece_end(buf, pos, end, cls)
            h = (piece_hash(buf, pos, stop) & hash_mask) | np.uint64(1)
            k = _find(buf, pos, stop, h, table, piece_bytes, piece_off)
            index[p] = k
            if k < 0:
                missed[m, 0], missed[m, 1], missed[m, 2] = p, pos, stop
                miss_hash[m] = h
                m += 1
            p += 1
            pos = stop
        counts[d] = p - first
    return index[:p], counts, missed[:m], miss_hash[:m]


@numba.njit(cache=True)
def _lookup_kernel(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, hashes: np.ndarray, table: np.ndarray,
                   piece_bytes: np.ndarray, piece_off: np.ndarray) -> np.ndarray:  # fmt: skip
    """Each given piece's cache entry, or -1."""
    out = np.empty(starts.size, dtype=np.int64)
    for p in range(starts.size):
        out[p] = _find(buf, starts[p], ends[p], hashes[p], table, piece_bytes, piece_off)
    return out


@numba.njit(cache=True)
def _gather_kernel(index: np.ndarray, counts: np.ndarray, id_off: np.ndarray,
                   ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The pieces' cached ids back to back, each document's token count, and whether a document
    has a piece with no entry (-1: it gets no ids here)."""
    lens = np.zeros(counts.size, dtype=np.int64)
    bad = np.zeros(counts.size, dtype=np.bool_)
    total, p = 0, 0
    for d in range(counts.size):
        for q in range(p, p + counts[d]):
            k = index[q]
            if k < 0:
                bad[d] = True
            else:
                lens[d] += id_off[k + 1] - id_off[k]
        if bad[d]:
            lens[d] = 0
        total += lens[d]
        p += counts[d]
    out = np.empty(total, dtype=np.int32)
    o, p = 0, 0
    for d in range(counts.size):
        if not bad[d]:
            for q in range(p, p + counts[d]):
                k = index[q]
                for t in range(id_off[k], id_off[k + 1]):
                    out[o] = ids[t]
                    o += 1
        p += counts[d]
    return out, lens, bad


@numba.njit(cache=True)
def _insert_kernel(table: np.ndarray, hashes: np.ndarray, piece_bytes: np.ndarray, piece_off: np.ndarray,
                   first: int, last: int) -> None:  # fmt: skip
    """Put cache entries ``first .. last - 1`` into free slots of ``table``."""
    mask = np.uint64(table.shape[0] - 1)
    for k in range(first, last):
        h = hashes[k]
        s = _home(h, mask)
        while table[s, 1] != 0:
            s = (s + np.uint64(1)) & mask
        lo, hi = piece_off[k], piece_off[k + 1]
        table[s, 0], table[s, 1], table[s, 2] = h, np.uint64(k + 1), np.uint64(hi - lo)
        table[s, 3] = _packed(piece_bytes, lo, hi)


@numba.njit(cache=True)
def key_slot(keys: np.ndarray, key: int) -> int:
    """The slot of a non-negative int64 key (a pair of token ids: a << 32 | b) in an open-addressing
    table of keys (-1: free), or the free slot where it would go."""
    mask = np.uint64(keys.size - 1)
    s = mix64_one(np.uint64(key)) & mask
    while keys[s] != key and keys[s] != -1:
        s = (s + np.uint64(1)) & mask
    return np.int64(s)


@numba.njit(cache=True)
def _bpe_kernel(piece_bytes: np.ndarray, piece_off: np.ndarray, byte_id: np.ndarray, merge_keys: np.ndarray,
                merge_rank: np.ndarray, merge_new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Each piece's token ids by the BPE model: its bytes' tokens, then, while any adjacent pair
    has a merge, the one of lowest rank (the leftmost of equals) merged, as ``Word::merge_all``
    does without dropout. Each step rescans the piece (quadratic in its length), so a piece longer
    than ``_KERNEL_PIECE_BYTES`` gets no ids here (count -1; the caller asks the library, whose
    queue is not quadratic). Returns the ids back to back and each piece's count."""
    n = piece_off.size - 1
    ids = np.empty(piece_off[n] - piece_off[0], np.int32)
    counts = np.empty(n, np.int64)
    sym = np.empty(_KERNEL_PIECE_BYTES, np.int64)
    o = 0
    for k in range(n):
        lo, hi = piece_off[k], piece_off[k + 1]
        if hi - lo > _KERNEL_PIECE_BYTES:
            counts[k] = -1
            continue
        m = hi - lo
        for q in range(m):
            sym[q] = byte_id[piece_bytes[lo + q]]
        while m > 1:
            best, best_rank, best_new = -1, np.int64(1) << 62, 0
            for i in range(m - 1):
                s = key_slot(merge_keys, (sym[i] << 32) | sym[i + 1])
                if merge_keys[s] != -1 and merge_rank[s] < best_rank:
                    best, best_rank, best_new = i, merge_rank[s], merge_new[s]
            if best < 0:
                break
            sym[best] = best_new
            for r in range(best + 1, m - 1):
                sym[r] = sym[r + 1]
            m -= 1
        for q in range(m):
            ids[o + q] = sym[q]
        o += m
        counts[k] = m
    return ids[:o], counts


def _merge_table(model: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A BPE model's (its tokenizer.json ``model``) byte -> token id map and its merges as an
    open-addressing table: pair key (a << 32 | b) -> rank and merged token id."""
    vocab = model["vocab"]
    byte_id = np.array([vocab.get(ch, -1) for ch in byte_chars()], np.int64)
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    size = 16
    while size < 2 * len(merges) + 2:
        size *= 2
    keys, rank, new = np.full(size, -1, np.int64), np.zeros(size, np.int64), np.zeros(size, np.int64)
    for r, (a, b) in enumerate(merges):
        key = (vocab[a] << 32) | vocab[b]
        s = key_slot(keys, key)
        keys[s], rank[s], new[s] = key, r, vocab[a + b]  # a pair listed twice: its last rank, as the library's map
    return byte_id, keys, rank, new


class _PieceCache:
    """Distinct pieces (bytes and hash) and their token ids, in growable flat arrays, with an
    open-addressing table from hash to entry (at most half full)."""

    def __init__(self) -> None:
        self.size = 0
        self.bytes, self.byte_off = np.zeros(1 << 16, np.uint8), np.zeros(1 << 12, np.int64)
        self.ids, self.id_off = np.zeros(1 << 16, np.int32), np.zeros(1 << 12, np.int64)
        self.hashes = np.zeros(1 << 12, np.uint64)
        self.table = np.zeros((1 << 13, 4), np.uint64)  # slots: hash, entry + 1 (0: free), length, first 8 bytes

    def lookup(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        return _lookup_kernel(buf, starts, ends, hashes, self.table, self.bytes, self.byte_off)

    def index(self, texts: list[str], ids_of: Callable[[bytes, np.ndarray], tuple[np.ndarray, np.ndarray]]
              ) -> tuple[np.ndarray, np.ndarray, list[bytes]]:  # fmt: skip
        """ASCII texts cut into pieces and looked up: each piece's entry and each text's piece
        count. Pieces new to the cache are added first, one of each, with the token ids (back to
        back, and a count each) that ``ids_of(their bytes back to back, offsets)`` gives. Also the
        pieces still without an entry: another piece has their hash (never seen in practice)."""
        encoded = [t.encode("ascii") for t in texts]
        buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        doc_end = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        index, counts, missed, miss_hash = _index_kernel(buf, doc_end, CLASS, _HASH_MASK, self.table, self.bytes,
                                                         self.byte_off)  # fmt: skip
        if not miss_hash.size:
            return index, counts, []
        _, first = np.unique(miss_hash, return_index=True)  # one of each new piece
        new = np.sort(first)
        pieces = [buf[a:b].tobytes() for a, b in missed[new, 1:].tolist()]
        off = np.concatenate([[0], np.cumsum(missed[new, 2] - missed[new, 1])])
        self.add(pieces, miss_hash[new], *ids_of(b"".join(pieces), off))
        index[missed[:, 0]] = self.lookup(buf, missed[:, 1], missed[:, 2], miss_hash)
        still = np.flatnonzero(index[missed[:, 0]] < 0)
        return index, counts, [buf[a:b].tobytes() for a, b in missed[still, 1:].tolist()]

    def add(self, pieces: list[bytes], hashes: np.ndarray, ids: np.ndarray, counts: np.ndarray) -> None:
        """New entries: each piece's bytes, hash and token ids (back to back, ``counts`` each)."""
        n, first = len(pieces), self.size
        lengths = np.fromiter(map(len, pieces), np.int64, n)
        self.byte_off = _grow(self.byte_off, first + n + 1)
        self.id_off = _grow(self.id_off, first + n + 1)
        self.hashes = _grow(self.hashes, first + n)
        self.byte_off[first + 1 : first + n + 1] = self.byte_off[first] + np.cumsum(lengths)
        self.id_off[first + 1 : first + n + 1] = self.id_off[first] + np.cumsum(counts)
        self.bytes = _grow(self.bytes, int(self.byte_off[first + n]))
        self.ids = _grow(self.ids, int(self.id_off[first + n]))
        self.bytes[self.byte_off[first] : self.byte_off[first + n]] = np.frombuffer(b"".join(pieces), np.uint8)
        self.ids[self.id_off[first] : self.id_off[first + n]] = ids
        self.hashes[first : first + n] = hashes
        self.size += n
        if 2 * self.size > len(self.table):  # rehash everything into a table twice the size
            capacity = len(self.table) * 2
            while 2 * self.size > capacity:
                capacity *= 2
            self.table = np.zeros((capacity, 4), np.uint64)
            _insert_kernel(self.table, self.hashes, self.bytes, self.byte_off, 0, self.size)
        else:
            _insert_kernel(self.table, self.hashes, self.bytes, self.byte_off, first, self.size)


def _no_ids(pieces: bytes, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """No token ids for any piece (``PieceCounter`` counts pieces; it does not encode them)."""
    return np.zeros(0, np.int32), np.zeros(off.size - 1, np.int64)


class PieceCounter:
    """How often each distinct pre-tokenizer piece occurs in ASCII documents: the encoder's index
    kernel and cache, with no token ids (the BPE trainer's word counts, ``pipelines/data/bpe.py``)."""

    def __init__(self) -> None:
        self._cache = _PieceCache()
        self._counts = np.zeros(1 << 12, np.int64)
        self.unindexed: list[bytes] = []  # pieces whose hash another piece has (never seen in practice)

    def add(self, texts: list[str]) -> None:
        """Count the pieces of ASCII documents."""
        cache = self._cache
        index, _, unindexed = cache.index(texts, _no_ids)
        self.unindexed += unindexed
        self._counts = _grow(self._counts, cache.size)
        self._counts[: cache.size] += np.bincount(index[index >= 0], minlength=cache.size)

    def pieces(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every distinct piece counted: their bytes back to back, offsets (n + 1) and counts
        (``unindexed`` pieces not among them)."""
        n = self._cache.size
        off = self._cache.byte_off[: n + 1]
        return self._cache.bytes[: off[n]], off, self._counts[:n]


def _grow(array: np.ndarray, needed: int) -> np.ndarray:
    """``array`` with room for at least ``needed`` items (doubled, so appends cost O(1) each)."""
    if needed <= array.size:
        return array
    bigger = np.zeros(max(needed, 2 * array.size), dtype=array.dtype)
    bigger[: array.size] = array
    return bigger


class CorpusEncoder:
    """``encode(texts)``: token ids of each document, no special tokens added; special-token text
    in a document is encoded as ordinary text (``encode_special_tokens``)."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.encode_special_tokens = True
        # A copied tokenizer (data.tokenizer.path) may carry truncation or padding, made for model
        # inputs: documents must be encoded whole and unpadded, as the fast path does.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.fast = fast_path_applies(json.loads(tokenizer_json))
        self._cache = _PieceCache()
        if self.fast:
            self._merges = _merge_table(json.loads(tokenizer_json)["model"])
            self._byte_chars = str.maketrans(dict(enumerate(byte_chars()[:128])))

    def _ids_of(self, pieces: bytes, off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pieces' ids back to back and each one's count: the kernel's, and the library
        model's for the pieces too long for it."""
        ids, counts = _bpe_kernel(np.frombuffer(pieces, np.uint8), off, *self._merges)
        long = np.flatnonzero(counts < 0)
        if not long.size:
            return ids, counts
        per_piece = np.split(ids, np.cumsum(np.maximum(counts, 0))[:-1])
        for k in long.tolist():
            piece = pieces[off[k] : off[k + 1]].decode("ascii").translate(self._byte_chars)
            per_piece[k] = np.array([t.id for t in self.tokenizer.model.tokenize(piece)], np.int32)
            counts[k] = per_piece[k].size
        return np.concatenate(per_piece).astype(np.int32), counts

    def _fast_ragged(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ASCII texts' ids back to back (int32), each text's token count, and which texts have a
        piece whose hash another cached piece has (never seen in practice; they get no ids here).
        Pieces new to the cache are added first, their ids from the BPE kernel."""
        if self._cache.size > _MAX_CACHED_WORDS:
            self._cache = _PieceCache()
        cache = self._cache
        # An entry -1: another piece has the hash (its document takes the slow path).
        index, counts, _ = cache.index(texts, self._ids_of)
        return _gather_kernel(index, counts, cache.id_off, cache.ids)

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's token ids (int32)."""
        out: list[np.ndarray | None] = [None] * len(texts)
        fast = [i for i, t in enumerate(texts) if self.fast and t.isascii()]
        for chunk in _chunks(fast, [len(texts[i]) for i in fast], _CHUNK_BYTES):
            ids, lens, bad = self._fast_ragged([texts[i] for i in chunk])
            for i, doc_ids, b in zip(chunk, np.split(ids, np.cumsum(lens)[:-1]), bad.tolist()):
                out[i] = None if b else doc_ids
        slow = [i for i, ids in enumerate(out) if ids is None]
        if slow:
            encoded = self.tokenizer.encode_batch([texts[i] for i in slow], add_special_tokens=False)
            for i, e in zip(slow, encoded):
                out[i] = np.asarray(e.ids, dtype=np.int32)
        return out  # type: ignore[return-value]

    def encode_ragged(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The texts' ids back to back (int32) and each text's token count: ``encode`` without an
        array per text (the data stage's form: it joins them into one stream anyway)."""
        if self.fast and all(t.isascii() for t in texts):
            parts = [self._fast_ragged(texts[c[0] : c[-1] + 1])
                     for c in _chunks(list(range(len(texts))), [len(t) for t in texts], _CHUNK_BYTES)]  # fmt: skip
            if not any(bad.any() for _, _, bad in parts):
                if not parts:
                    return np.zeros(0, np.int32), np.zeros(0, np.int64)
                return np.concatenate([ids for ids, _, _ in parts]), np.concatenate([lens for _, lens, _ in parts])
        docs = self.encode(texts)  # int32 each
        ids = np.concatenate(docs) if docs else np.zeros(0, np.int32)
        return ids, np.fromiter(map(len, docs), np.int64, len(docs))


def _chunks(items: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """``items`` cut, in order, into runs whose ``sizes`` add up to at most ``budget`` (an item
    larger than that is a run of its own)."""
    runs: list[list[int]] = []
    total = budget + 1  # the first item opens a run
    for item, size in zip(items, sizes):
        if total + size > budget:
            runs.append([])
            total = 0
        runs[-1].append(item)
        total += size
    return runs
