"""The dedup benchmark's corpus: synthetic ~1 KB documents with planted near copies, as JSONL shards.

A Zipf vocabulary of invented words; 10% of the documents are near copies of others made by 0-6
word substitutions (exact Jaccard of their 5-word shingle sets 1.0 down to ~0.6). Deterministic:
the same arguments give byte-identical shards. Used by ``bench/dedup.py`` and its tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data.text import jaccard

NGRAM = 5  # shingle length of the planted pairs' exact Jaccard (and of every method)
SEED = 42
COPY_FRACTION = 0.1  # share of the corpus that is planted near copies
MAX_EDITS = 6  # word substitutions per near copy: 0..MAX_EDITS in turn
VOCAB_SIZE = 50_000
DOCS_PER_SHARD = 25_000


@dataclass(frozen=True)
class Corpus:
    """A generated corpus on disk and what was planted in it.

    Positions are the documents' order in the stream (shard by shard, line by line), which is also
    the order of kiln's record ids, so "earliest" means the same for every method.
    """

    shard_dir: Path
    shard_offsets: np.ndarray  # (F,) int64 position of each shard's first document
    num_docs: int
    num_bytes: int
    planted: np.ndarray  # (C, 2) int64 (original, copy) positions
    planted_jaccard: np.ndarray  # (C,) float64 exact Jaccard of each planted pair


def _vocabulary(rng: np.random.Generator) -> np.ndarray:
    """(VOCAB_SIZE,) object array of distinct invented lower-case words, 3-9 letters."""
    found: dict[str, None] = {}
    while len(found) < VOCAB_SIZE:
        lengths = rng.integers(3, 10, size=VOCAB_SIZE)
        letters = rng.integers(ord("a"), ord("z") + 1, size=(VOCAB_SIZE, 9), dtype=np.uint8)
        for row, n in zip(letters, lengths):
            found[row[:n].tobytes().decode()] = None
    out = np.empty(VOCAB_SIZE, dtype=object)
    out[:] = list(found)[:VOCAB_SIZE]
    return out


def _render(vocab: np.ndarray, word_ids: np.ndarray) -> str:
    """One document: the words, a full stop every 12th, one paragraph per 60 words."""
    words = vocab[word_ids].tolist()
    for i in range(11, len(words), 12):
        words[i] += "."
    lines = [" ".join(words[i : i + 60]) for i in range(0, len(words), 60)]
    return "\n".join(lines)


def generate_corpus(num_docs: int, out_dir: Path, seed: int = SEED, docs_per_shard: int = DOCS_PER_SHARD) -> Corpus:
    """Write ``num_docs`` ~1 KB documents (10% planted near copies) as JSONL shards of ``docs_per_shard``.

    Deterministic: the same arguments give byte-identical shards.
    """
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    zipf = 1.0 / np.arange(10, VOCAB_SIZE + 10) ** 0.9  # heavy head, long tail, like real text
    zipf /= zipf.sum()
    num_copies = int(num_docs * COPY_FRACTION)
    num_originals = num_docs - num_copies
    lengths = rng.integers(110, 170, size=num_originals)
    bounds = np.r_[0, np.cumsum(lengths)]
    flat = rng.choice(VOCAB_SIZE, size=int(bounds[-1]), p=zipf).astype(np.int32)
    docs = [flat[bounds[i] : bounds[i + 1]] for i in range(num_originals)]
    originals = rng.choice(num_originals, size=num_copies, replace=False)
    for k, src in enumerate(originals):
        copy = docs[src].copy()
        edits = rng.choice(copy.size, size=k % (MAX_EDITS + 1), replace=False)
        copy[edits] = rng.choice(VOCAB_SIZE, size=edits.size, p=zipf)
        docs.append(copy)
    texts = [_render(vocab, d) for d in docs]
    planted_idx = np.stack([originals, np.arange(num_originals, num_docs)], axis=1)
    planted_jac = np.array([jaccard(texts[a], texts[b], NGRAM) for a, b in planted_idx])

    order = rng.permutation(num_docs)  # stream position -> document
    position = np.empty(num_docs, dtype=np.int64)
    position[order] = np.arange(num_docs)
    shard_dir = out_dir / "corpus"
    shard_dir.mkdir(parents=True)
    offsets = np.arange(0, num_docs, docs_per_shard, dtype=np.int64)
    num_bytes = 0
    for f, start in enumerate(offsets):
        lines = [json.dumps({"text": texts[i]}) + "\n" for i in order[start : start + docs_per_shard]]
        payload = "".join(lines).encode()
        num_bytes += sum(len(texts[i].encode()) for i in order[start : start + docs_per_shard])
        (shard_dir / f"part-{f:04d}.jsonl").write_bytes(payload)
    return Corpus(shard_dir, offsets, num_docs, num_bytes, position[planted_idx], planted_jac)


def read_texts(corpus: Corpus) -> list[str]:
    """All documents in stream order (what a single-process dedup would hold)."""
    texts: list[str] = []
    for path in sorted(corpus.shard_dir.glob("*.jsonl")):
        with path.open("rb") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts
