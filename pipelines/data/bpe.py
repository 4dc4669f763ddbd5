"""Byte-level BPE training from word counts: ``tokenizers``' ``BpeTrainer`` algorithm, in numba.

The library's trainer spends most of its time before the first merge: it builds a pre-tokenized
string, an owned ``String`` and a hash-map entry for every word *occurrence* (~0.5 us of CPU each,
3M of them in the data stage's 20,000-document sample), where BPE needs only each distinct word's
count. Here the words are counted by the numba pre-tokenizer (``pretokenize.piece_end``) in one pass
over the bytes, and the merges are learnt from the counts by the library's own procedure, step for
step (``tokenizers/src/models/bpe/trainer.rs``, ``do_train`` and ``Word::merge``):

- the vocabulary starts with the special tokens, then the 256 byte characters sorted by code point;
- every word starts as its bytes; a pair's count is the sum over words of occurrences x count;
- a max-heap of (count, pair, the words to visit) pops the highest count, ties to the smaller pair
  (by token ids); an entry whose count is stale is pushed back with the current count;
- merging a pair in a word goes left to right, and records the same +1/-1 changes of its
  neighbouring pairs as the library's (the merged pair's own count is not reset, as there);
- after each merge, every pair that gained an occurrence is pushed with the words that gained it;
- training stops at ``vocab_size`` tokens, an empty heap, or a count below ``min_frequency``.

The result is the library's tokenizer byte for byte (``tests/test_bpe.py`` trains both on generated
and corpus text: the library's trainer is the reference there). For 20,000 documents (3.05M
words, 69,472 distinct, 8,192 tokens): counting 0.35 s against the library's ~1.6 CPU-seconds
(~1.0 s on 2 threads), learning the merges 0.17 s against its ~0.5 s. numba compiles it once per
install, ~5 s on a slow 2-core machine (its cache is kept beside the source). Where two heap entries tie on
count *and* pair (only after a merge re-creates an existing token) the library's own order depends
on its hash maps' random iteration order, so neither trainer is defined there beyond that.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numba
import numpy as np
from tokenizers import Tokenizer, models

from pipelines.data.encode import PieceCounter, key_slot
from pipelines.data.pretokenize import byte_chars, piece_hash, pre_tokenizer

_CHUNK_BYTES = 4 << 20  # text per counting call (the kernel reserves ~40 bytes a byte)


# --- counting words -----------------------------------------------------------------------------


def count_words(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pre-tokenizer's words of the documents, counted: ASCII documents by the corpus
    encoder's numba kernel (``encode.PieceCounter``), any other by the library's pre-tokenizer (its
    byte-level pieces mapped back to bytes). Returns the distinct words' bytes back to back, their
    offsets and counts."""
    counter, library = PieceCounter(), pre_tokenizer()
    inverse = {ch: b for b, ch in enumerate(byte_chars())}
    other: Counter[bytes] = Counter()
    batch: list[str] = []
    size = 0
    for text in texts:
        if not text.isascii():
            other.update(bytes(inverse[c] for c in piece) for piece, _ in library.pre_tokenize_str(text))
            continue
        batch.append(text)
        size += len(text)
        if size >= _CHUNK_BYTES:
            counter.add(batch)
            batch, size = [], 0
    if batch:
        counter.add(batch)
    data, off, counts = counter.pieces()
    if not other and not counter.unindexed:
        return data, off, counts
    merged = Counter({data[a:b].tobytes(): int(c) for a, b, c in zip(off[:-1], off[1:], counts)})
    merged.update(other)
    merged.update(counter.unindexed)
    words = list(merged)
    lengths = np.fromiter(map(len, words), np.int64, len(words))
    return (np.frombuffer(b"".join(words), np.uint8), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            np.fromiter(merged.values(), np.int64, len(words)))  # fmt: skip


# --- learning the merges ------------------------------------------------------------------------


# numba compiles each of these once per install (its cache is kept beside the source), ~0.3-2 s a
# function on a slow 2-core machine: they are written as plain loops over flat int64 arrays (no
# 2-D slices, sorts or typed dicts, which cost seconds each to compile).


@numba.njit(cache=True)
def _room(array: np.ndarray, n: int) -> np.ndarray:
    """``array`` (int64) with room for ``n`` items: itself, or a copy twice as large."""
    if n <= array.size:
        return array
    bigger = np.empty(max(n, 2 * array.size), np.int64)
    for i in range(array.size):
        bigger[i] = array[i]
    return bigger


@numba.njit(cache=True, inline="always")
def _ahead(c1: int, a1: int, b1: int, c2: int, a2: int, b2: int) -> bool:
    """Whether (c1, (a1, b1)) comes out of the heap strictly before (c2, (a2, b2)): a higher
    count, then the smaller pair (the library's ``Merge`` order)."""
    if c1 != c2:
        return c1 > c2
    return a1 < a2 or (a1 == a2 and b1 < b2)


@numba.njit(cache=True)
def _sift_up(heap: np.ndarray, pos: int, count: int, a: int, b: int, words: int) -> None:
    """Put the row (count, a, b, words) at ``pos`` or above it, past every parent it is strictly
    ahead of (rows of 4 in a flat array)."""
    while pos > 0:
        parent = (pos - 1) >> 1
        if not _ahead(count, a, b, heap[4 * parent], heap[4 * parent + 1], heap[4 * parent + 2]):
            break
        for q in range(4):
            heap[4 * pos + q] = heap[4 * parent + q]
        pos = parent
    heap[4 * pos], heap[4 * pos + 1], heap[4 * pos + 2], heap[4 * pos + 3] = count, a, b, words


@numba.njit(cache=True)
def _push(heap: np.ndarray, n: int, count: int, a: int, b: int, words: int) -> np.ndarray:
    """Add a row to the heap of ``n`` rows (the caller counts it)."""
    heap = _room(heap, 4 * (n + 1))
    _sift_up(heap, n, count, a, b, words)
    return heap


@numba.njit(cache=True)
def _pop(heap: np.ndarray, n: int) -> tuple[int, int, int, int]:
    """Take the top row of the heap of ``n`` rows (the caller counts it): the last row goes to the
    root, down to the bottom along the children that come out first, and back up, as Rust's
    ``BinaryHeap::pop`` does (and Python's ``heapq``)."""
    top = (heap[0], heap[1], heap[2], heap[3])
    n -= 1
    if n == 0:
        return top
    count, a, b, words = heap[4 * n], heap[4 * n + 1], heap[4 * n + 2], heap[4 * n + 3]
    pos, child = np.int64(0), np.int64(1)  # int64, not literal: one compiled _sift_up
    while child + 1 < n:
        right = child + 1
        # The right child when the left does not come out strictly first (Rust: left <= right).
        if not _ahead(heap[4 * child], heap[4 * child + 1], heap[4 * child + 2],
                      heap[4 * right], heap[4 * right + 1], heap[4 * right + 2]):  # fmt: skip
            child = right
        for q in range(4):
            heap[4 * pos + q] = heap[4 * child + q]
        pos, child = child, 2 * child + 1
    if child == n - 1:
        for q in range(4):
            heap[4 * pos + q] = heap[4 * child + q]
        pos = child
    _sift_up(heap, pos, count, a, b, words)
    return top


@numba.njit(cache=True)
def _empty_table(size: int) -> np.ndarray:
    keys = np.empty(size, np.int64)
    for i in range(size):
        keys[i] = -1
    return keys


@numba.njit(cache=True)
def _pair_add(keys: np.ndarray, values: np.ndarray, used: int, key: int,
              delta: int) -> tuple[np.ndarray, np.ndarray, int]:  # fmt: skip
    """``values[key] += delta`` (a new key starts at 0); the table doubles when half full."""
    s = key_slot(keys, key)
    if keys[s] == -1:
        if 2 * (used + 1) > keys.size:
            bigger_k, bigger_v = _empty_table(2 * keys.size), np.zeros(2 * keys.size, np.int64)
            for q in range(keys.size):
                if keys[q] != -1:
                    t = key_slot(bigger_k, keys[q])
                    bigger_k[t], bigger_v[t] = keys[q], values[q]
            keys, values = bigger_k, bigger_v
            s = key_slot(keys, key)
        keys[s], values[s] = key, 0
        used += 1
    values[s] += delta
    return keys, values, used


@numba.njit(cache=True)
def _find_token(table: np.ndarray, t_hash: np.ndarray, t_bytes: np.ndarray, t_off: np.ndarray, h: np.uint64,
                lo: int, hi: int) -> tuple[int, int]:  # fmt: skip
    """The id of the token whose bytes are ``t_bytes[lo:hi]`` (-1: none) and the slot where it is
    or would go, in a table of token ids (-1: free) homed by content hash."""
    mask = np.uint64(table.size - 1)
    s = h & mask
    n = hi - lo
    while table[s] != -1:
        t = table[s]
        if t_hash[t] == h and t_off[t + 1] - t_off[t] == n:
            base, same = t_off[t], True
            for q in range(n):
                if t_bytes[base + q] != t_bytes[lo + q]:
                    same = False
                    break
            if same:
                return t, np.int64(s)
        s = (s + np.uint64(1)) & mask
    return -1, np.int64(s)


@numba.njit(cache=True)
def _merge_in_words(sym: np.ndarray, word_off: np.ndarray, w_len: np.ndarray, pool: np.ndarray, lo: int, hi: int,
                    a: int, b: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Merge the pair (a, b) into ``new`` in each word of ``pool[lo:hi]``, left to right, as
    ``Word::merge`` does; returns the changes to neighbouring pairs: pair, +1 or -1, word."""
    bound = 0
    for q in range(lo, hi):
        bound += 2 * w_len[pool[q]]
    pairs, deltas, words = np.empty(bound, np.int64), np.empty(bound, np.int64), np.empty(bound, np.int64)
    n_ch = 0
    for q in range(lo, hi):
        w = pool[q]
        s, n = word_off[w], w_len[w]
        i = 0
        while i < n:
            if sym[s + i] == a and i + 1 < n and sym[s + i + 1] == b:
                if i > 0:
                    prev = sym[s + i - 1]
                    pairs[n_ch], deltas[n_ch], words[n_ch] = (prev << 32) | a, -1, w
                    pairs[n_ch + 1], deltas[n_ch + 1], words[n_ch + 1] = (prev << 32) | new, 1, w
                    n_ch += 2
                sym[s + i] = new
                for r in range(i + 1, n - 1):
                    sym[s + r] = sym[s + r + 1]
                n -= 1
                if i < n - 1:
                    nxt = sym[s + i + 1]
                    pairs[n_ch], deltas[n_ch], words[n_ch] = (b << 32) | nxt, -1, w
                    pairs[n_ch + 1], deltas[n_ch + 1], words[n_ch + 1] = (new << 32) | nxt, 1, w
                    n_ch += 2
            i += 1
        w_len[w] = n
    return pairs[:n_ch], deltas[:n_ch], words[:n_ch]


@numba.njit(cache=True)
def _push_pairs(pairs: np.ndarray, words: np.ndarray, take: np.ndarray, pk: np.ndarray, pv: np.ndarray,
                heap: np.ndarray, n_heap: int, pool: np.ndarray, used: int, list_off: np.ndarray,
                lists: int) -> tuple[np.ndarray, int, np.ndarray, int, np.ndarray, int]:  # fmt: skip
    """For each distinct pair among ``pairs[i]`` where ``take[i]``: a new word list (the words
    beside it, appended to ``pool``: list k is ``pool[list_off[k]:list_off[k + 1]]``) and, if the
    pair's count is positive, a heap entry for it with that list."""
    m = 0
    for i in range(take.size):
        m += take[i]
    size = 16
    while size < 2 * m:
        size *= 2
    local, group = _empty_table(size), np.empty(size, np.int64)
    first = np.empty(m + 1, np.int64)  # each group's first pair index, then its pool offset
    sizes = np.zeros(m + 1, np.int64)
    groups = 0
    for i in range(pairs.size):
        if take[i]:
            s = key_slot(local, pairs[i])
            if local[s] == -1:
                local[s], group[s] = pairs[i], groups
                first[groups] = i
                groups += 1
            sizes[group[s]] += 1
    pool = _room(pool, used + m)
    list_off = _room(list_off, lists + groups + 1)
    fill = np.empty(groups, np.int64)
    for g in range(groups):
        list_off[lists + g + 1] = list_off[lists + g] + sizes[g]
        fill[g] = list_off[lists + g]
    for i in range(pairs.size):
        if take[i]:
            g = group[key_slot(local, pairs[i])]
            pool[fill[g]] = words[i]
            fill[g] += 1
    for g in range(groups):
        p = pairs[first[g]]
        s = key_slot(pk, p)
        if pk[s] == p and pv[s] > 0:
            heap = _push(heap, n_heap, pv[s], p >> 32, p & 0xFFFFFFFF, lists + g)
            n_heap += 1
    return heap, n_heap, pool, used + m, list_off, lists + groups


@numba.njit(cache=True)
def _learn(word_bytes: np.ndarray, word_off: np.ndarray, counts: np.ndarray, tok_bytes: np.ndarray,
           tok_off: np.ndarray, byte_id: np.ndarray, vocab_size: int,
           min_frequency: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The merges, in order: a, b, new id, three per merge; and the bytes and offsets of every
    token (``tok_bytes`` / ``tok_off`` hold the first ones on entry: special tokens, then bytes)."""
    num_words = counts.size
    # Words as symbol ids, compacted in place as they merge.
    sym = np.empty(word_bytes.size, np.int64)
    for q in range(word_bytes.size):
        sym[q] = byte_id[word_bytes[q]]
    w_len = np.empty(num_words, np.int64)
    for w in range(num_words):
        w_len[w] = word_off[w + 1] - word_off[w]

    # Tokens: their bytes, content hashes, and a table to find a token by its bytes.
    n_tok = tok_off.size - 1
    capacity = max(vocab_size, n_tok) + 1
    t_off = np.zeros(capacity + 1, np.int64)
    for t in range(n_tok + 1):
        t_off[t] = tok_off[t]
    t_bytes = np.empty(max(4 * tok_bytes.size, 1024), np.uint8)
    for q in range(tok_bytes.size):
        t_bytes[q] = tok_bytes[q]
    t_hash = np.zeros(capacity, np.uint64)
    size = 16
    while size < 2 * capacity:
        size *= 2
    t_table = _empty_table(size)
    for t in range(n_tok):
        t_hash[t] = piece_hash(t_bytes, t_off[t], t_off[t + 1])
        found, slot = _find_token(t_table, t_hash, t_bytes, t_off, t_hash[t], t_off[t], t_off[t + 1])
        if found < 0:
            t_table[slot] = t

    # Pair counts, and the initial heap: every pair with the words it occurs in (a word listed
    # twice is harmless: its second visit finds no pair left to merge).
    zero = np.int64(0)  # int64 arguments, not literals: each helper compiles once
    pk, pv, p_used = _empty_table(np.int64(1 << 16)), np.zeros(1 << 16, np.int64), zero
    windows = 0
    for w in range(num_words):
        windows += max(0, w_len[w] - 1)
    win_pair, win_word, every = np.empty(windows, np.int64), np.empty(windows, np.int64), np.ones(windows, np.bool_)
    k = 0
    for w in range(num_words):
        s = word_off[w]
        for i in range(w_len[w] - 1):
            p = (sym[s + i] << 32) | sym[s + i + 1]
            pk, pv, p_used = _pair_add(pk, pv, p_used, p, counts[w])
            win_pair[k], win_word[k] = p, w
            k += 1
    heap, n_heap, pool, used, list_off, lists = _push_pairs(
        win_pair, win_word, every, pk, pv, np.empty(64, np.int64), zero, np.empty(16, np.int64), zero,
        np.zeros(16, np.int64), zero)  # fmt: skip

    merges = np.empty(3 * max(vocab_size, 16), np.int64)
    n_merges = 0
    while n_tok < vocab_size and n_heap > 0:
        count, a, b, entry = _pop(heap, n_heap)
        n_heap -= 1
        s = key_slot(pk, (a << 32) | b)
        current = pv[s] if pk[s] == (a << 32) | b else 0
        if count != current:
            heap = _push(heap, n_heap, current, a, b, entry)
            n_heap += 1
            continue
        if current < 1 or min_frequency > current:
            break
        # The new token: a's bytes then b's, written after the last token's; an existing token
        # of those bytes keeps its id (and the bytes written are dropped).
        lo = t_off[n_tok]
        len_a = t_off[a + 1] - t_off[a]
        n_bytes = len_a + t_off[b + 1] - t_off[b]
        if lo + n_bytes > t_bytes.size:
            bigger = np.empty(2 * (lo + n_bytes), np.uint8)
            for q in range(lo):
                bigger[q] = t_bytes[q]
            t_bytes = bigger
        for q in range(len_a):
            t_bytes[lo + q] = t_bytes[t_off[a] + q]
        for q in range(n_bytes - len_a):
            t_bytes[lo + len_a + q] = t_bytes[t_off[b] + q]
        h = piece_hash(t_bytes, lo, lo + n_bytes)
        new, slot = _find_token(t_table, t_hash, t_bytes, t_off, h, lo, lo + n_bytes)
        if new < 0:
            new = n_tok
            t_off[n_tok + 1] = lo + n_bytes
            t_hash[n_tok] = h
            t_table[slot] = n_tok
            n_tok += 1
        merges = _room(merges, 3 * n_merges + 3)
        merges[3 * n_merges], merges[3 * n_merges + 1], merges[3 * n_merges + 2] = a, b, new
        n_merges += 1
        # Merge it in every word of the entry, apply the neighbouring pairs' changes, then push
        # every pair that gained an occurrence, with the words that gained it.
        pairs, deltas, words = _merge_in_words(sym, word_off, w_len, pool, list_off[entry], list_off[entry + 1], a, b,
                                               new)  # fmt: skip
        for c in range(pairs.size):
            pk, pv, p_used = _pair_add(pk, pv, p_used, pairs[c], deltas[c] * counts[words[c]])
        heap, n_heap, pool, used, list_off, lists = _push_pairs(pairs, words, deltas > 0, pk, pv, heap, n_heap, pool,
                                                                used, list_off, lists)  # fmt: skip
    return merges[: 3 * n_merges], t_bytes[: t_off[n_tok]], t_off[: n_tok + 1]


def train(words: tuple[np.ndarray, np.ndarray, np.ndarray], vocab_size: int, min_frequency: int,
          special_tokens: list[str]) -> Tokenizer:  # fmt: skip
    """A byte-level BPE tokenizer learnt from word counts (``count_words``), as ``tokenizers``'
    ``BpeTrainer`` with ByteLevel's 256 characters as its initial alphabet learns it: the model and
    the special tokens; no pre-tokenizer, normaliser or decoder (the caller sets them)."""
    chars = byte_chars()
    inverse = {ch: b for b, ch in enumerate(chars)}
    # The special tokens first, then the byte characters by code point, each one once
    # (``add_special_tokens`` and ``compute_alphabet``). A token's bytes: a special token's
    # characters as bytes where each is a byte character (a merge could produce it), else none.
    names = list(dict.fromkeys(special_tokens))
    first = [bytes(inverse[c] for c in s) if all(c in inverse for c in s) else b"" for s in names]
    byte_id = np.empty(256, np.int64)
    for b in sorted(range(256), key=lambda b: ord(chars[b])):
        if chars[b] in names:
            byte_id[b] = names.index(chars[b])
        else:
            byte_id[b] = len(first)
            first.append(bytes([b]))
    tok_off = np.concatenate([[0], np.cumsum([len(t) for t in first])]).astype(np.int64)
    merges, tok_bytes, tok_off = _learn(*words, np.frombuffer(b"".join(first), np.uint8), tok_off, byte_id,
                                        vocab_size, min_frequency)  # fmt: skip
    token = names + ["".join(chars[b] for b in tok_bytes[lo:hi]) for lo, hi in zip(tok_off[len(names) : -1],
                                                                                    tok_off[len(names) + 1 :])]  # fmt: skip
    # A pair merged twice (the library's queue can hold it twice once a merge re-creates an
    # existing token) ranks where it was merged last, as the library's merge map keeps it.
    last = {(a, b): rank for rank, (a, b, _) in enumerate(merges.reshape(-1, 3).tolist())}
    ranked = sorted(last, key=last.__getitem__)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(token)}, merges=[(token[a], token[b]) for a, b in ranked]))
    tok.add_special_tokens(names)
    return tok
