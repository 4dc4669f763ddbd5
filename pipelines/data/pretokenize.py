"""kiln's pre-tokenizer on ASCII text, as a state machine over bytes, for training and encoding.

The tokenizer kiln trains (``pipelines/data/tokenizer.py``) splits digits one per piece, then runs
GPT-2's byte-level regex and maps every byte to a printable character. On ASCII text that split is
a small state machine (``piece_end``), tested against the library and against ``PIECE_PATTERN``.
Two users: ``encode.CorpusEncoder`` (token ids of corpus documents) and ``training_text``, which
hands the BPE trainer the pieces already split and mapped, so the trainer's own pre-tokenizer is a
whitespace split: the same word counts, hence the same tokenizer, in a third less time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

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
# Text per training string: the trainer counts the strings' words on its threads in parallel, and
# smaller strings share them out more evenly (1 MiB: 1.35 s, 64 KiB: 1.1 s on 20 MB, 2 threads).
_TRAINING_CHUNK_BYTES = 1 << 16


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The library's pre-tokenizer (``PRE_TOKENIZER``): digits one per piece, then byte-level."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )


def ascii_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel applies), for bytes 0-127."""
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
    return {b: chars[b] for b in range(128)}


BYTE_CHARS = str.maketrans(ascii_byte_chars())


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


def _utf8_of_byte_chars() -> tuple[np.ndarray, np.ndarray]:
    """Each ASCII byte's mapped character (``BYTE_CHARS``) in UTF-8: its bytes (128, 2) and length."""
    out, size = np.zeros((128, 2), np.uint8), np.zeros(128, np.int64)
    for b, ch in ascii_byte_chars().items():
        code = ch.encode("utf-8")
        out[b, : len(code)], size[b] = list(code), len(code)
    return out, size


_UTF8, _UTF8_SIZE = _utf8_of_byte_chars()


@numba.njit(cache=True)
def _spaced_pieces_kernel(buf: np.ndarray, doc_end: np.ndarray, cls: np.ndarray, utf8: np.ndarray,
                          utf8_size: np.ndarray) -> np.ndarray:  # fmt: skip
    """UTF-8 of the documents' pieces, each byte mapped, each piece followed by a space."""
    out = np.empty(
        3 * buf.size, dtype=np.uint8
    )  # at most two bytes per byte and a space
    o, pos = 0, 0
    for d in range(doc_end.size):
        end = doc_end[d]
        while pos < end:
            stop = piece_end(buf, pos, end, cls)
            for q in range(pos, stop):
                c = buf[q]
                out[o] = utf8[c, 0]
                out[o + 1] = utf8[c, 1]
                o += utf8_size[c]
            out[o] = 32
            o += 1
            pos = stop
    return out[:o]


def spaced_pieces(texts: list[str]) -> str:
    """ASCII documents' pieces, byte-level mapped, separated by spaces (no mapped character is
    whitespace): a whitespace split of the result is the pre-tokenizer's split of the documents."""
    encoded = [t.encode("ascii") for t in texts]
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    doc_end = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))
    return (
        _spaced_pieces_kernel(buf, doc_end, CLASS, _UTF8, _UTF8_SIZE)
        .tobytes()
        .decode("utf-8")
    )


def training_text(texts: Iterable[str]) -> Iterator[str]:
    """The documents as the BPE trainer should see them under a whitespace-split pre-tokenizer:
    every piece of ``pre_tokenizer()`` byte-level mapped, the pieces separated by spaces, about
    ``_TRAINING_CHUNK_BYTES`` of documents per string. ASCII documents are split here; any other
    goes through the library's pre-tokenizer."""
    library = pre_tokenizer()
    batch: list[str] = []
    size = 0
    for text in texts:
        if not text.isascii():
            yield " ".join(piece for piece, _ in library.pre_tokenize_str(text))
            continue
        batch.append(text)
        size += len(text)
        if size >= _TRAINING_CHUNK_BYTES:
            yield spaced_pieces(batch)
            batch, size = [], 0
    if batch:
        yield spaced_pieces(batch)
