"""kiln's pre-tokenizer on ASCII text, as a state machine over bytes, for training and encoding.

The tokenizer kiln trains (``pipelines/data/tokenizer.py``) splits digits one per piece, then runs
GPT-2's byte-level regex and maps every byte to a printable character. On ASCII text that split is
a small state machine (``piece_end``), tested against the library and against ``PIECE_PATTERN``.
Two users, both through the corpus encoder's kernel: ``encode.CorpusEncoder`` (token ids of corpus
documents) and ``encode.PieceCounter`` (the BPE trainer's word counts, ``pipelines/data/bpe.py``).
"""

from __future__ import annotations

import re

import numba
import numpy as np
from tokenizers import pre_tokenizers

from pipelines.data.minhash import mix64_one

# The pre-tokenizer as one pattern over a whole ASCII text (the reference the kernel is tested
# against). tokenizers splits every digit off first (Digits, individual_digits) and then runs GPT-2's
# ByteLevel regex on each digit-free segment, where \p{L} and \p{N} are [A-Za-z] and [0-9]. That
# equals this pattern on the text: a digit is a piece of its own, and a whitespace run that a digit
# follows ends its segment, so GPT-2's ``\s+(?!\S)`` takes all of it there (``(?![^\s0-9])``).
# Oniguruma's \s (tokenizers') is [\t\n\v\f\r ] on ASCII (Python's also has \x1c-\x1f), spelt out.
PIECE_PATTERN = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+|[0-9]| ?[^\t\n\x0b\x0c\r A-Za-z0-9]+"""
                           r"""|[\t\n\x0b\x0c\r ]+(?![^\t\n\x0b\x0c\r 0-9])|[\t\n\x0b\x0c\r ]+""")  # fmt: skip
OTHER, LETTER, DIGIT, SPACE = 0, 1, 2, 3
CLASS = np.zeros(128, dtype=np.uint8)  # Oniguruma's classes of the ASCII bytes
CLASS[[ord(c) for c in "\t\n\x0b\x0c\r "]] = SPACE
CLASS[ord("0") : ord("9") + 1] = DIGIT
CLASS[ord("A") : ord("Z") + 1] = LETTER
CLASS[ord("a") : ord("z") + 1] = LETTER
# The pre-tokenizer kiln's tokenizers have, as tokenizer.json writes it.
PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
    ],
}


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The library's pre-tokenizer (``PRE_TOKENIZER``): digits one per piece, then byte-level."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (what ByteLevel applies), for all 256 bytes."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@numba.njit(cache=True, inline="always")
def piece_end(buf: np.ndarray, i: int, end: int, cls: np.ndarray) -> int:
    """One past the last byte of the piece that starts at ``buf[i]`` (``PIECE_PATTERN``'s match)."""
    c = buf[i]
    k = cls[c]
    if c == 39 and i + 1 < end:  # an apostrophe: 's 't 'm 'd, then 're 've 'll
        c1 = buf[i + 1]
        if c1 == 115 or c1 == 116 or c1 == 109 or c1 == 100:
            return i + 2
        if i + 2 < end and (
            (c1 == 114 or c1 == 118)
            and buf[i + 2] == 101
            or c1 == 108
            and buf[i + 2] == 108
        ):
            return i + 3
    if k == DIGIT:
        return i + 1
    if (
        k == SPACE
        and c == 32
        and i + 1 < end
        and (cls[buf[i + 1]] == LETTER or cls[buf[i + 1]] == OTHER)
    ):
        i += 1  # " ?[A-Za-z]+" and " ?[^\sA-Za-z0-9]+": a space joins the run after it
        k = cls[buf[i]]
    j = i + 1
    while j < end and cls[buf[j]] == k:
        j += 1
    if k != SPACE or j == end or cls[buf[j]] == DIGIT:
        return j
    # Whitespace before a letter or other byte: "\s+(?!\S)" leaves the run's last byte (to join
    # what follows if it is a space), or "\s+" takes a run of one.
    return j - 1 if j - 1 > i else j


@numba.njit(cache=True, inline="always")
def piece_hash(buf: np.ndarray, start: int, stop: int) -> np.uint64:
    """A piece's hash: FNV-1a of its bytes, mixed; never 0."""
    h = np.uint64(0xCBF29CE484222325)
    for q in range(start, stop):
        h = (h ^ np.uint64(buf[q])) * np.uint64(0x100000001B3)
    return mix64_one(h) | np.uint64(1)
