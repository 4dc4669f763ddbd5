"""Token ids of corpus documents, exactly as ``tokenizers`` encodes them, several times faster.

Packing spends most of its time in ``Tokenizer.encode_batch``, and most of that in building each
piece's Python-visible ``Encoding`` and in the pre-tokenizer's Unicode regex, for text whose words
repeat (Zipf). For the tokenizer kiln trains (``pipelines/data/tokenizer.py``: digits split one per
token, then GPT-2's byte-level regex, then byte-level BPE, no normaliser) and ASCII text, the
pre-tokenizer is a small state machine over bytes (``pipelines/data/pretokenize.py``), and a
piece's tokens are a function of the piece alone, so each distinct piece is run through the library's own BPE model once and its ids are
cached. A numba kernel cuts a batch into pieces and hashes them, a second looks every piece up in
the cache (an open-addressing table; a hit compares the bytes, so a hash collision cannot give
wrong ids), and numpy gathers the ids: no Python object per piece.

Anything else goes to ``encode_batch`` unchanged: another tokenizer (``data.tokenizer.path``),
non-ASCII text. ``tests/test_encode.py`` checks the ids against ``encode_batch`` on generated and
corpus text, and the state machine against GPT-2's regular expression.
"""

from __future__ import annotations

import json
from typing import Any

import numba
import numpy as np

from pipelines.data.pretokenize import BYTE_CHARS, CLASS, PRE_TOKENIZER, pieces_kernel

_MAX_CACHED_WORDS = 500_000  # ~100 MB of cache at most
# Text per kernel call: the piece kernel's arrays take 16 bytes per byte of text, so a batch of
# large documents (text_unit: file) is cut into calls of at most this much (one document at least).
_CHUNK_BYTES = 4 << 20


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
        and all(t.get("special") for t in spec.get("added_tokens", []))
    )


@numba.njit(cache=True)
def _lookup_kernel(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, hashes: np.ndarray, slots: np.ndarray,
                   slot_hash: np.ndarray, piece_bytes: np.ndarray, piece_off: np.ndarray) -> np.ndarray:  # fmt: skip
    """Each piece's index in the cache, or -1: linear probing from ``hash & mask``; a slot matches
    when its hash and the cached piece's bytes both equal the piece's."""
    mask = slots.size - 1
    out = np.full(starts.size, -1, dtype=np.int64)
    for p in range(starts.size):
        h, lo, n = hashes[p], starts[p], ends[p] - starts[p]
        s = h & np.uint64(mask)
        while slots[s] >= 0:
            k = slots[s]
            if slot_hash[s] == h and piece_off[k + 1] - piece_off[k] == n:
                base, same = piece_off[k], True
                for q in range(n):
                    if piece_bytes[base + q] != buf[lo + q]:
                        same = False
                        break
                if same:
                    out[p] = k
                    break
            s = (s + np.uint64(1)) & np.uint64(mask)
    return out


@numba.njit(cache=True)
def _insert_kernel(slots: np.ndarray, slot_hash: np.ndarray, hashes: np.ndarray, first: int) -> None:
    """Put cache entries ``first, first + 1, ...`` (hashes ``hashes``) into free slots."""
    mask = slots.size - 1
    for j in range(hashes.size):
        s = hashes[j] & np.uint64(mask)
        while slots[s] >= 0:
            s = (s + np.uint64(1)) & np.uint64(mask)
        slots[s], slot_hash[s] = first + j, hashes[j]


class _PieceCache:
    """Distinct pieces (bytes and hash) and their token ids, in growable flat arrays, with an
    open-addressing table from hash to entry (at most half full)."""

    def __init__(self) -> None:
        self.size = 0
        self.bytes, self.byte_off = np.zeros(1 << 16, np.uint8), np.zeros(1 << 12, np.int64)
        self.ids, self.id_off = np.zeros(1 << 16, np.int32), np.zeros(1 << 12, np.int64)
        self.hashes = np.zeros(1 << 12, np.uint64)
        self.slots, self.slot_hash = np.full(1 << 13, -1, np.int64), np.zeros(1 << 13, np.uint64)

    def lookup(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        return _lookup_kernel(buf, starts, ends, hashes, self.slots, self.slot_hash, self.bytes, self.byte_off)

    def add(self, pieces: list[bytes], hashes: np.ndarray, ids: list[list[int]]) -> None:
        """New entries: each piece's bytes, hash and token ids."""
        n, first = len(pieces), self.size
        lengths = np.fromiter(map(len, pieces), np.int64, n)
        counts = np.fromiter(map(len, ids), np.int64, n)
        self.byte_off = _grow(self.byte_off, first + n + 1)
        self.id_off = _grow(self.id_off, first + n + 1)
        self.hashes = _grow(self.hashes, first + n)
        self.byte_off[first + 1 : first + n + 1] = self.byte_off[first] + np.cumsum(lengths)
        self.id_off[first + 1 : first + n + 1] = self.id_off[first] + np.cumsum(counts)
        self.bytes = _grow(self.bytes, int(self.byte_off[first + n]))
        self.ids = _grow(self.ids, int(self.id_off[first + n]))
        self.bytes[self.byte_off[first] : self.byte_off[first + n]] = np.frombuffer(b"".join(pieces), np.uint8)
        self.ids[self.id_off[first] : self.id_off[first + n]] = [t for piece in ids for t in piece]
        self.hashes[first : first + n] = hashes
        self.size += n
        if 2 * self.size > self.slots.size:  # rehash everything into a table twice the size
            capacity = self.slots.size * 2
            while 2 * self.size > capacity:
                capacity *= 2
            self.slots, self.slot_hash = np.full(capacity, -1, np.int64), np.zeros(capacity, np.uint64)
            _insert_kernel(self.slots, self.slot_hash, self.hashes[: self.size], 0)
        else:
            _insert_kernel(self.slots, self.slot_hash, self.hashes[first : self.size], first)


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
        self.fast = fast_path_applies(json.loads(tokenizer_json))
        self._model = self.tokenizer.model
        self._cache = _PieceCache()

    def _tokens(self, piece: bytes) -> list[int]:
        return [t.id for t in self._model.tokenize(piece.decode("ascii").translate(BYTE_CHARS))]

    def _fast_ids(self, texts: list[str]) -> list[np.ndarray | None]:
        """The ids of ASCII texts, every piece looked up in the cache (new pieces added first);
        None for a text with a piece whose hash another cached piece has (never seen in practice)."""
        if self._cache.size > _MAX_CACHED_WORDS:
            self._cache = _PieceCache()
        encoded = [t.encode("ascii") for t in texts]
        buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        doc_end = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
        starts, ends, hashes, counts = pieces_kernel(buf, doc_end, CLASS)
        index = self._cache.lookup(buf, starts, ends, hashes)
        missing = np.flatnonzero(index < 0)
        if missing.size:
            _, first = np.unique(hashes[missing], return_index=True)  # one of each new piece
            new = missing[np.sort(first)]
            pieces = [buf[a:b].tobytes() for a, b in zip(starts[new].tolist(), ends[new].tolist())]
            self._cache.add(pieces, hashes[new], [self._tokens(p) for p in pieces])
            index[missing] = self._cache.lookup(buf, starts[missing], ends[missing], hashes[missing])
        collided = np.flatnonzero(index < 0)  # another piece's hash: those documents take the slow path
        index[collided] = 0
        lens = self._cache.id_off[index + 1] - self._cache.id_off[index]
        tok_end = np.cumsum(lens)
        ids = self._cache.ids[np.repeat(self._cache.id_off[index] - (tok_end - lens), lens)
                              + np.arange(tok_end[-1] if tok_end.size else 0)]  # fmt: skip
        piece_bounds = np.r_[0, np.cumsum(counts)]
        bounds = np.r_[0, tok_end][piece_bounds]  # each document's first id, and the end
        out: list[np.ndarray | None] = list(np.split(ids, bounds[1:-1]))
        for d in np.unique(np.searchsorted(piece_bounds, collided, side="right") - 1).tolist():
            out[d] = None
        return out

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(texts)
        fast = [i for i, t in enumerate(texts) if self.fast and t.isascii()]
        for chunk in _chunks(fast, [len(texts[i]) for i in fast], _CHUNK_BYTES):
            for i, ids in zip(chunk, self._fast_ids([texts[i] for i in chunk])):
                out[i] = ids
        slow = [i for i, ids in enumerate(out) if ids is None]
        if slow:
            encoded = self.tokenizer.encode_batch([texts[i] for i in slow], add_special_tokens=False)
            for i, e in zip(slow, encoded):
                out[i] = np.asarray(e.ids, dtype=np.int32)
        return out  # type: ignore[return-value]


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
