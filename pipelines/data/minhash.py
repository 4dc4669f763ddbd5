"""Vectorised MinHash signatures, LSH banding and duplicate grouping: pure numpy, no Ray.

Words are the ones ``pipelines.data.text.words`` defines. The two loops that touch every byte and
every (shingle, permutation) pair are numba kernels, so nothing of size shingles x permutations
is ever materialised:

1. shingle hashes: one pass over a batch's bytes hashes each word (FNV-1a, then mixed) and each
   run of ``n`` consecutive words of one document;
2. signatures: ``num_perm`` multiply-shift hash functions ``(a * x + b) >> 32`` applied to every
   shingle, minimum per document;
3. LSH: each band of ``rows`` signature values is mixed into one 64-bit bucket key (numpy).

All integer arithmetic is modulo 2**64, which is what the hash functions want.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

U64 = np.uint64
EMPTY = np.uint32(0xFFFFFFFF)  # signature value of a document with no shingles

_WORD_BYTE = np.zeros(256, dtype=bool)
for _lo, _hi in ((ord("0"), ord("9")), (ord("A"), ord("Z")), (ord("a"), ord("z")), (0x80, 0xFF)):
    _WORD_BYTE[_lo : _hi + 1] = True
_WORD_BYTE[ord("_")] = True



def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: spreads every input bit over all 64 output bits."""
    x = x ^ (x >> U64(30))
    x = x * U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> U64(27))
    x = x * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


@numba.njit(cache=True, inline="always")
def mix64_one(x: np.uint64) -> np.uint64:
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@numba.njit(cache=True)
def _shingle_kernel(
    buf: np.ndarray, doc_end: np.ndarray, is_word: np.ndarray, n: int, mult: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One pass over a batch's bytes: hash each word, then each run of ``n`` words of a document.

    Args:
        buf: (N,) uint8, the lower-cased UTF-8 documents back to back.
        doc_end: (B,) int64, one past each document's last byte.
        is_word: (256,) bool, which bytes are word bytes.
        mult: (n,) uint64 odd multipliers, one per position in the n-gram.

    Returns:
        shingle hashes (S,) uint64 and their document index (S,) int64.
    """
    out_h = np.empty(buf.size // 2 + doc_end.size, dtype=np.uint64)
    out_d = np.empty(buf.size // 2 + doc_end.size, dtype=np.int64)
    ring = np.empty(n, dtype=np.uint64)  # the document's last n word hashes
    s = 0
    pos = 0
    for d in range(doc_end.size):
        count = 0  # words seen in this document
        end = doc_end[d]
        while pos < end:
            if not is_word[buf[pos]]:
                pos += 1
                continue
            h = np.uint64(0xCBF29CE484222325)
            while pos < end and is_word[buf[pos]]:
                h = (h ^ np.uint64(buf[pos])) * np.uint64(0x100000001B3)  # FNV-1a
                pos += 1
            ring[count % n] = mix64_one(h)
            count += 1
            if count >= n:
                acc = np.uint64(0)
                for k in range(n):
                    acc += ring[(count - n + k) % n] * mult[k]
                out_h[s] = mix64_one(acc)
                out_d[s] = d
                s += 1
        if 0 < count < n:  # a short document is one shingle of all its words
            acc = np.uint64(0)
            for k in range(count):
                acc += ring[k] * mult[k]
            out_h[s] = mix64_one(acc)
            out_d[s] = d
            s += 1
    return out_h[:s], out_d[:s]


@numba.njit(cache=True)
def _minhash_kernel(
    shingle_hash: np.ndarray, doc_start: np.ndarray, a: np.ndarray, b: np.ndarray, out: np.ndarray
) -> None:
    """out[d, p] = min over document d's shingles x of (a[p] * x + b[p]) >> 32 (mod 2**64).

    Document d's shingles are ``shingle_hash[doc_start[d]:doc_start[d + 1]]``. The running minima
    of one document stay in a uint64 row that the permutation loop vectorises over (compare and
    store the width of the multiply): 2.5x the speed of comparing against ``out``'s uint32 row in
    place (0.021 s against 0.052 s for 4,096 ~1 KB documents on one core), the same values.
    """
    row = np.empty(a.size, dtype=np.uint64)
    for d in range(doc_start.size - 1):
        lo, hi = doc_start[d], doc_start[d + 1]
        if lo == hi:
            continue  # no shingles: the row stays EMPTY
        row[:] = np.uint64(0xFFFFFFFFFFFFFFFF)
        for i in range(lo, hi):
            x = shingle_hash[i]
            for p in range(a.size):
                row[p] = min(row[p], (a[p] * x + b[p]) >> np.uint64(32))
        for p in range(a.size):
            out[d, p] = np.uint32(row[p])


@dataclass(frozen=True)
class MinHasher:
    """``num_perm`` multiply-shift hash functions drawn from ``seed``."""

    num_perm: int
    ngram: int
    seed: int = 42

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        a = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64) * U64(2) + U64(1)
        b = rng.integers(0, 2**63, size=self.num_perm, dtype=np.uint64)
        object.__setattr__(self, "_a", a)  # (P,) odd multipliers
        object.__setattr__(self, "_b", b)  # (P,)

    def __reduce__(self) -> tuple[type, tuple[int, int, int]]:
        # Pickled as its fields, the permutations drawn again where it lands: Ray gives a task its
        # arguments' arrays read-only (zero-copy), a type of their own to numba, so an empty cache
        # got _minhash_kernel compiled a second time in the first data stage (the one
        # scripts/setup.sh compiles takes writable arrays, as any caller outside Ray passes).
        return MinHasher, (self.num_perm, self.ngram, self.seed)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """MinHash signatures of a batch of documents.

        Returns:
            (B, num_perm) uint32; a document with no words gets all ``EMPTY``.
        """
        shingle_hash, shingle_doc = shingle_hashes(texts, self.ngram)  # (S,), (S,) sorted by document
        doc_start = np.searchsorted(shingle_doc, np.arange(len(texts) + 1))  # (B + 1,)
        out = np.full((len(texts), self.num_perm), EMPTY, dtype=np.uint32)
        _minhash_kernel(shingle_hash, doc_start, self._a, self._b, out)
        return out


def shingle_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the word ``n``-grams of a batch (``pipelines.data.text.shingles``' sets).

    Returns:
        hashes (S,) uint64 and each shingle's document index (S,) int64, sorted by document.
    """
    encoded = [t.lower().encode("utf-8") for t in texts]
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    doc_end = np.cumsum(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded)))
    mult = mix64(np.arange(1, n + 1, dtype=U64)) | U64(1)
    return _shingle_kernel(buf, doc_end, _WORD_BYTE, n, mult)


@numba.njit(cache=True)
def _sorted_sets_kernel(hashes: np.ndarray, doc: np.ndarray, num_docs: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's run of ``hashes`` (grouped by ``doc``, ascending) sorted and deduplicated."""
    out = np.empty_like(hashes)
    offsets = np.zeros(num_docs + 1, dtype=np.int64)
    lo, w = 0, 0
    for d in range(num_docs):
        hi = lo
        while hi < hashes.size and doc[hi] == d:
            hi += 1
        run = np.sort(hashes[lo:hi])
        for k in range(run.size):
            if k == 0 or run[k] != run[k - 1]:
                out[w] = run[k]
                w += 1
        offsets[d + 1] = w
        lo = hi
    return out[:w], offsets


def shingle_sets(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each document's set of shingle hashes as a sorted, unique run (what exact Jaccard merges).

    Returns:
        ``hashes`` (S,) uint64 and ``offsets`` (B + 1,) int64: document ``j``'s set is
        ``hashes[offsets[j]:offsets[j + 1]]``.
    """
    hashes, doc = shingle_hashes(texts, n)  # grouped by document, in document order
    return _sorted_sets_kernel(hashes, doc, len(texts))


def band_keys(signatures: np.ndarray, num_bands: int, rows_per_band: int) -> np.ndarray:
    """LSH bucket keys: one uint64 per (document, band), the band index mixed in.

    Args:
        signatures: (B, num_bands * rows_per_band) uint32.

    Returns:
        (B, num_bands) uint64; equal keys mean equal values in every row of that band.
    """
    b, p = signatures.shape
    if p < num_bands * rows_per_band:
        raise ValueError(f"signature has {p} values, bands need {num_bands * rows_per_band}")
    bands = signatures[:, : num_bands * rows_per_band].reshape(b, num_bands, rows_per_band)
    acc = np.arange(num_bands, dtype=U64)[None, :] * U64(0x9E3779B97F4A7C15)  # (1, bands)
    for r in range(rows_per_band):
        acc = mix64(acc ^ bands[:, :, r].astype(U64))
    return acc


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Share of equal signature values: an unbiased estimate of Jaccard similarity.

    Args:
        sig_a, sig_b: (E, P) uint32.

    Returns:
        (E,) float64.
    """
    return np.mean(sig_a == sig_b, axis=-1)


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the false positive plus false
    negative probability mass of the LSH S-curve around ``threshold`` (as datasketch does)."""
    grid = np.linspace(0.0, 1.0, 1001)

    def curve(b: int, r: int) -> np.ndarray:
        return 1.0 - (1.0 - grid**r) ** b  # P(candidate | Jaccard = grid)

    best, best_err = (1, num_perm), np.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            c = curve(b, r)
            fp = np.trapezoid(np.where(grid < threshold, c, 0.0), grid)
            fn = np.trapezoid(np.where(grid >= threshold, 1.0 - c, 0.0), grid)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


# Largest bucket given every pair; a larger one gets a star (and, for LSH keys, a window).
MAX_CLIQUE = 16


def bucket_pairs(keys: np.ndarray, ids: np.ndarray, max_clique: int = MAX_CLIQUE, neighbours: int = 0) -> np.ndarray:
    """Candidate pairs from documents that share a bucket key.

    Buckets of up to ``max_clique`` documents give every pair (so candidate verification sees
    each real duplicate pair); larger ones give a star to their smallest id, enough to connect
    them without a quadratic blow-up when every member is a copy of every other (exact keys).
    A near-duplicate bucket is not: its members can all be >= threshold to some of the others and
    below it to the smallest id (60 edited copies of one page, the page itself absent: the star
    alone lost 11 of the 57 duplicates, ``tests/test_minhash.py``). With
    ``neighbours`` > 0, each member of a large bucket is also paired with the next ``neighbours``
    members in id order (a sorted-neighbourhood window), so a verified path through the cluster
    is found at a cost linear in its size.

    Args:
        keys: (N,) bucket keys, or (N, W) keys of W words each (a bucket: all W equal);
            ids: (N,) int64 document ids.
        max_clique: largest bucket given every pair.
        neighbours: members after each one it is paired with in a larger bucket (0: the star only).

    Returns:
        (E, 2) int64 pairs, smaller id first, unique.
    """
    if ids.size < 2:
        return np.zeros((0, 2), dtype=np.int64)
    if keys.ndim == 1:
        order = np.lexsort((ids, keys))
        k, i = keys[order], ids[order]
        new = np.r_[True, k[1:] != k[:-1]]
    else:  # np.lexsort sorts on its last key first
        order = np.lexsort((ids, *keys.T[::-1]))
        k, i = keys[order], ids[order]
        new = np.r_[True, (k[1:] != k[:-1]).any(axis=1)]
    run_start = np.flatnonzero(new)
    run_len = np.diff(np.r_[run_start, i.size])
    pairs = []
    for size in np.unique(run_len[(run_len >= 2) & (run_len <= max_clique)]):
        first = run_start[run_len == size]  # (R,)
        a, b = np.triu_indices(size, k=1)
        pairs.append(np.stack([i[first[:, None] + a], i[first[:, None] + b]], axis=-1).reshape(-1, 2))
    big = run_len > max_clique
    if big.any():
        run_of = np.cumsum(new) - 1
        in_big = big[run_of]
        member = in_big & ~new
        leader = i[run_start][run_of]
        pairs.append(np.stack([leader[member], i[member]], axis=-1))
        at = np.flatnonzero(in_big)  # positions in large buckets, each bucket's members in id order
        for step in range(1, neighbours + 1):
            a = at[at + step < i.size]
            a = a[run_of[a + step] == run_of[a]]
            pairs.append(np.stack([i[a], i[a + step]], axis=-1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    out = np.concatenate(pairs).astype(np.int64)
    out = out[out[:, 0] != out[:, 1]]
    return np.unique(np.sort(out, axis=1), axis=0)


def components(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a duplicate graph; each component keeps its smallest id.

    Args:
        pairs: (E, 2) int64 document ids.

    Returns:
        (dropped, kept): (M,) int64 each, sorted by ``dropped``; ``kept[j]`` is the document that
        ``dropped[j]`` duplicates (its component's smallest id).
    """
    if pairs.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    nodes, local = np.unique(pairs, return_inverse=True)  # nodes sorted ascending
    local = local.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(local)), (local[:, 0], local[:, 1])), shape=(nodes.size,) * 2)
    _, label = connected_components(graph, directed=False)
    # nodes are sorted, so the first node seen with each label is its smallest id.
    _, first = np.unique(label, return_index=True)
    rep = nodes[first][label]  # (V,) each node's representative
    keep = nodes != rep
    return nodes[keep], rep[keep]
