"""Token ids of corpus documents, exactly as ``tokenizers`` encodes them, several times faster.

Packing spends most of its time in ``Tokenizer.encode_batch``, and most of that in building each
piece's Python-visible ``Encoding`` and in the pre-tokenizer's Unicode regex, for text whose words
repeat (Zipf). For the tokenizer kiln trains (``pipelines/data/tokenizer.py``: digits split one per
token, then GPT-2's byte-level regex, then byte-level BPE, no normaliser) and ASCII text, the
pre-tokenizer is a plain ``re`` pattern, and a word's tokens are a function of the word alone, so
each distinct word is run through the library's own BPE model once and its ids are cached. A batch's
pieces are looked up in one pass at C speed (``map`` over the cache's ``dict.get``) and their ids
gathered with numpy: no Python-level loop over pieces once the cache holds them.

Anything else goes to ``encode_batch`` unchanged: another tokenizer (``data.tokenizer.path``),
non-ASCII text, or the ASCII control characters on which Python's and Oniguruma's ``\\s`` differ.
``tests/test_encode.py`` checks the ids against ``encode_batch`` on generated and corpus text.
"""

from __future__ import annotations

import json
import re
from itertools import chain, repeat
from typing import Any

import numpy as np

# The pre-tokenizer as one pattern over a whole ASCII text. tokenizers splits every digit off first
# (Digits, individual_digits) and then runs GPT-2's ByteLevel regex on each digit-free segment,
# where \p{L} and \p{N} are [A-Za-z] and [0-9]. That equals this pattern on the text: a digit is
# a piece of its own, and a whitespace run that a digit follows ends its segment, so GPT-2's
# ``\s+(?!\S)`` takes all of it there (``(?![^\s0-9])``).
_PIECE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+|\s+(?![^\s0-9])|\s+""")
_S_DIFFERS = re.compile(r"[\x1c-\x1f]")  # whitespace to Python's \s, not to Oniguruma's
_MAX_CACHED_WORDS = 500_000  # ~100 MB of cache at most
_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def _ascii_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel applies), for bytes 0-127."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {b: chars[b] for b in range(128)}


_BYTE_CHARS = str.maketrans(_ascii_byte_chars())


def fast_path_applies(spec: dict[str, Any]) -> bool:
    """Whether a tokenizer (its JSON) is the kind whose ASCII encoding this module reproduces."""
    model = spec.get("model") or {}
    return (
        spec.get("normalizer") is None
        and spec.get("pre_tokenizer") == _PRE_TOKENIZER
        and model.get("type") == "BPE"
        and not model.get("dropout")
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
        and all(t.get("special") for t in spec.get("added_tokens", []))
    )


class CorpusEncoder:
    """``encode(texts)``: token ids of each document, no special tokens added; special-token text
    in a document is encoded as ordinary text (``encode_special_tokens``)."""

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.encode_special_tokens = True
        self.fast = fast_path_applies(json.loads(tokenizer_json))
        self._model = self.tokenizer.model
        self._clear()

    def _clear(self) -> None:
        """Empty the piece cache: piece -> k, whose ids are ``_ids[_start[k] : _start[k] + _len[k]]``."""
        self._index: dict[str, int] = {}
        self._start = np.zeros(1024, dtype=np.int64)
        self._len = np.zeros(1024, dtype=np.int64)
        self._ids = np.zeros(4096, dtype=np.int32)
        self._used = 0  # ids stored

    def _add(self, piece: str) -> int:
        """Cache one piece's ids (the BPE model on its byte-level characters); returns its index."""
        ids = [t.id for t in self._model.tokenize(piece.translate(_BYTE_CHARS))]
        k = len(self._index)
        if k == self._start.size:
            self._start, self._len = (np.resize(a, 2 * a.size) for a in (self._start, self._len))
        while self._used + len(ids) > self._ids.size:
            self._ids = np.resize(self._ids, 2 * self._ids.size)
        self._ids[self._used : self._used + len(ids)] = ids
        self._start[k], self._len[k] = self._used, len(ids)
        self._used += len(ids)
        self._index[piece] = k
        return k

    def _fast_ids(self, texts: list[str]) -> list[np.ndarray]:
        """The ids of ASCII texts the fast path applies to, every piece looked up in the cache."""
        if len(self._index) > _MAX_CACHED_WORDS:
            self._clear()
        pieces = [_PIECE.findall(t) for t in texts]
        flat = list(chain.from_iterable(pieces))
        index = np.fromiter(map(self._index.get, flat, repeat(-1)), dtype=np.int64, count=len(flat))
        for j in np.flatnonzero(index < 0).tolist():  # new pieces (a piece may repeat among them)
            k = self._index.get(flat[j])
            index[j] = self._add(flat[j]) if k is None else k
        lens, starts = self._len[index], self._start[index]
        ends = np.cumsum(lens)
        ids = self._ids[np.repeat(starts - (ends - lens), lens) + np.arange(ends[-1] if ends.size else 0)]
        per_doc = np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)))
        bounds = np.r_[0, ends][np.r_[0, per_doc]]  # each document's first id, and the end
        return np.split(ids, bounds[1:-1])

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(texts)
        fast = [i for i, t in enumerate(texts) if self.fast and t.isascii() and not _S_DIFFERS.search(t)]
        for i, ids in zip(fast, self._fast_ids([texts[i] for i in fast])):
            out[i] = ids
        slow = [i for i, ids in enumerate(out) if ids is None]
        if slow:
            encoded = self.tokenizer.encode_batch([texts[i] for i in slow], add_special_tokens=False)
            for i, e in zip(slow, encoded):
                out[i] = np.asarray(e.ids, dtype=np.int32)
        return out  # type: ignore[return-value]
