"""Token ids of corpus documents, exactly as ``tokenizers`` encodes them, several times faster.

Packing spends most of its time in ``Tokenizer.encode_batch``, and most of that in building each
piece's Python-visible ``Encoding`` and in the pre-tokenizer's Unicode regex, for text whose words
repeat (Zipf). For the tokenizer kiln trains (``pipelines/data/tokenizer.py``: digits split one per
token, then GPT-2's byte-level regex, then byte-level BPE, no normaliser) and ASCII text, the
pre-tokenizer is a plain ``re`` pattern, and a word's tokens are a function of the word alone, so
each distinct word is run through the library's own BPE model once and its ids are cached.

Anything else goes to ``encode_batch`` unchanged: another tokenizer (``data.tokenizer.path``),
non-ASCII text, or the ASCII control characters on which Python's and Oniguruma's ``\\s`` differ.
``tests/test_encode.py`` checks the ids against ``encode_batch`` on generated and corpus text.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

# tokenizers' ByteLevel regex (GPT-2's), where \p{L} and \p{N} are [A-Za-z] and [0-9] on ASCII.
_PIECE = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+""")
_DIGIT = re.compile(r"([0-9])")  # Digits(individual_digits=True): each digit its own piece
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
        self._words: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int] | None:
        """The ids of an ASCII text, or None when the fast path does not apply to it."""
        if not (self.fast and text.isascii()) or _S_DIFFERS.search(text):
            return None
        cache, out = self._words, []
        if len(cache) > _MAX_CACHED_WORDS:
            cache.clear()
        for segment in _DIGIT.split(text):
            for piece in _PIECE.findall(segment):
                ids = cache.get(piece)
                if ids is None:
                    ids = cache[piece] = [t.id for t in self._model.tokenize(piece.translate(_BYTE_CHARS))]
                out += ids
        return out

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        found = [self._ids(t) for t in texts]
        slow = [i for i, ids in enumerate(found) if ids is None]
        if slow:
            encoded = self.tokenizer.encode_batch([texts[i] for i in slow], add_special_tokens=False)
            for i, e in zip(slow, encoded):
                found[i] = e.ids
        return [np.asarray(ids, dtype=np.int32) for ids in found]
