"""Text normalisation and the word / shingle definitions shared by dedup and its ground truth.

A *word* is a maximal run of bytes of the lower-cased UTF-8 text that are ASCII letters, digits,
``_`` or any byte >= 0x80 (so every non-ASCII letter counts as a word character). The vectorised
MinHash in ``pipelines/data/minhash.py`` hashes exactly these words; the reference functions here are
what tests and the quickstart generator use to compute exact Jaccard similarities.
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(rb"[0-9A-Za-z_\x80-\xff]+")
_SPACES = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """Unicode NFC, ``\\r\\n`` to ``\\n``, runs of spaces to one, trailing spaces and excess
    blank lines removed."""
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:  # a test is cheaper than two replaces that copy the text for nothing
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    # _SPACES never matches a newline: one pass over the whole text equals one per line. Most text
    # has nothing for it to change, which plain substring tests (C speed) can tell first.
    if not (text.isascii() and "  " not in text and "\t" not in text and "\f" not in text and "\v" not in text):
        text = _SPACES.sub(" ", text)
    text = "\n".join([line.strip() for line in text.split("\n")])
    return (_BLANK_LINES.sub("\n\n", text) if "\n\n\n" in text else text).strip()


def words(text: str) -> list[bytes]:
    """The words of ``text`` as dedup sees them (lower-cased UTF-8 byte strings)."""
    return _WORD.findall(text.lower().encode("utf-8"))


def shingles(text: str, n: int) -> set[tuple[bytes, ...]]:
    """The set of word ``n``-grams; a document of 1..n-1 words is one shingle, 0 words none."""
    w = words(text)
    if not w:
        return set()
    if len(w) < n:
        return {tuple(w)}
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str, n: int) -> float:
    """Exact Jaccard similarity of two documents' word ``n``-gram sets."""
    sa, sb = shingles(a, n), shingles(b, n)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)
