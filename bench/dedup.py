"""Near-dedup benchmark: kiln's MinHash + LSH against datasketch, same corpus, same parameters.

Run from the repository root (2 CPUs / 24 GiB: the default run takes about 10 minutes):

    .venv/bin/python -m bench.dedup                      # 20k and 200k documents
    .venv/bin/python -m bench.dedup --quick              # 5k and 20k, about 2 minutes
    .venv/bin/python -m bench.dedup --sizes 20000,100000

What it measures, per corpus size, each method in a fresh (spawned) process so that peak memory
belongs to that method alone:

* ``datasketch``: the standard dedup loop over documents in corpus order: ``MinHash(num_perm=112)``
  + ``update_batch`` on the document's shingles (``pipelines.data.text.shingles`` joined to bytes),
  query ``MinHashLSH(threshold=0.8, num_perm=112, params=(14, 8))`` first, insert only if there is
  no candidate; every candidate is a duplicate edge. One core.
* ``kiln kernel``: the in-process vectorised path, one core, no Ray: ``MinHasher.signatures`` in
  batches, ``band_keys``, ``bucket_pairs``, ``components``. No candidate verification (like
  datasketch), so both see the same LSH false positives.
* ``kiln Ray stage``: the real data stage (``pipelines.data.stage.run``, quality filters and exact dedup
  off) on the embedded 2-CPU Ray cluster, reading the corpus as JSONL shards. Its time is the sum of
  the phases that near dedup needs (``read_filter_minhash`` + ``group`` + ``near_dedup`` in the
  stage report): reading, normalising, signing, writing the scratch table, the LSH-key shuffle and
  the exact-Jaccard verification shuffle. ``ray.init`` is reported apart as startup; the stage's
  later phases (documents table, tokenizer, packing) are not timed.

Every method uses 5-gram word shingles (``pipelines.data.text.words``), 112 permutations, 14 bands x 8
rows, threshold 0.8. The corpus is synthetic (~1 KB documents over a Zipf-distributed vocabulary of
invented words) with 10% planted near copies, each made by 0-6 word substitutions in turn, so their
exact Jaccard spreads from 1.0 down to about 0.6, half of them on each side of the threshold.

Quality: each method's output is clusters (connected components of its duplicate edges); its
predicted pairs are (dropped document, the document it is a duplicate of). Recall is the share of
true pairs (exact Jaccard >= 0.8, from all planted pairs plus random pairs) that the method puts in
one cluster; precision is the share of its predicted pairs (all, or a sample) whose exact Jaccard
is >= 0.8.

Memory: ``peak MB`` is the measuring process's peak RSS (for the Ray stage: the peak, during the
timed phases, of the proportional set size summed over the driver and every Ray process, so the
shared object store is counted once); ``work MB`` is that peak minus the same measure just before
the timed section (corpus loaded, Ray started), i.e. what the method itself needs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from pipelines.data.text import jaccard, shingles

NGRAM = 5
NUM_PERM = 112
BANDS, ROWS = 14, 8
THRESHOLD = 0.8
SEED = 42
COPY_FRACTION = 0.1  # share of the corpus that is planted near copies
MAX_EDITS = 6  # word substitutions per near copy: 0..MAX_EDITS in turn
VOCAB_SIZE = 50_000
DOCS_PER_SHARD = 25_000
KERNEL_BATCH_DOCS = 4096
RANDOM_PAIRS = 3000  # random (non-planted) pairs checked for hidden true duplicates
PRECISION_SAMPLE = 5000  # predicted pairs whose exact Jaccard is computed, per method
SAMPLE_EVERY_S = 0.25  # memory sampling period of the Ray stage
MB = 1024 * 1024


# --- corpus --------------------------------------------------------------------------------------


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


def generate_corpus(num_docs: int, out_dir: Path, seed: int = SEED) -> Corpus:
    """Write ``num_docs`` ~1 KB documents (10% planted near copies) as JSONL shards.

    Deterministic: the same ``num_docs`` and ``seed`` give byte-identical shards.
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
    offsets = np.arange(0, num_docs, DOCS_PER_SHARD, dtype=np.int64)
    num_bytes = 0
    for f, start in enumerate(offsets):
        lines = [json.dumps({"text": texts[i]}) + "\n" for i in order[start : start + DOCS_PER_SHARD]]
        payload = "".join(lines).encode()
        num_bytes += sum(len(texts[i].encode()) for i in order[start : start + DOCS_PER_SHARD])
        (shard_dir / f"part-{f:04d}.jsonl").write_bytes(payload)
    return Corpus(shard_dir, offsets, num_docs, num_bytes, position[planted_idx], planted_jac)


def read_texts(corpus: Corpus) -> list[str]:
    """All documents in stream order (what a single-process dedup would hold)."""
    texts: list[str] = []
    for path in sorted(corpus.shard_dir.glob("*.jsonl")):
        with path.open("rb") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


# --- measuring -----------------------------------------------------------------------------------


@dataclass
class MethodRun:
    """One method on one corpus: its time, memory and duplicate decisions."""

    seconds: float  # the timed section
    startup_s: float  # fixed cost outside it (ray.init, numba load)
    peak_mb: float
    work_mb: float
    dropped: np.ndarray  # (M,) int64 positions of documents judged duplicates
    kept: np.ndarray  # (M,) int64 the document each one duplicates (its cluster's earliest)
    detail: dict[str, Any] = field(default_factory=dict)


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _clusters(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from pipelines.data.minhash import components

    return components(np.asarray(edges, dtype=np.int64).reshape(-1, 2))


def run_datasketch(corpus: Corpus) -> MethodRun:
    """The standard datasketch dedup loop, one core."""
    from datasketch import MinHash, MinHashLSH

    texts = read_texts(corpus)
    base = _rss_mb()
    t = time.perf_counter()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=(BANDS, ROWS))
    edges: list[tuple[int, int]] = []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([b" ".join(s) for s in shingles(text, NGRAM)])
        candidates = lsh.query(m)
        if candidates:
            edges.extend((c, i) for c in candidates)
        else:
            lsh.insert(i, m)
    seconds = time.perf_counter() - t
    peak = _peak_rss_mb()
    dropped, kept = _clusters(np.array(edges))
    return MethodRun(seconds, 0.0, peak, peak - base, dropped, kept, {"candidate_pairs": len(edges)})


def run_kiln_kernel(corpus: Corpus) -> MethodRun:
    """Signatures in batches, band keys, bucket pairs, components: one core, no Ray."""
    from pipelines.data.minhash import MinHasher, band_keys, bucket_pairs, components

    texts = read_texts(corpus)
    t = time.perf_counter()
    hasher = MinHasher(NUM_PERM, NGRAM, SEED)
    hasher.signatures(texts[:16])  # loads (or compiles) the numba kernels
    startup = time.perf_counter() - t
    base = _rss_mb()
    t = time.perf_counter()
    signatures = np.empty((len(texts), NUM_PERM), dtype=np.uint32)  # (N, P)
    for start in range(0, len(texts), KERNEL_BATCH_DOCS):
        signatures[start : start + KERNEL_BATCH_DOCS] = hasher.signatures(texts[start : start + KERNEL_BATCH_DOCS])
    keys = band_keys(signatures, BANDS, ROWS)  # (N, bands); the band index is mixed into each key
    ids = np.repeat(np.arange(len(texts), dtype=np.int64), BANDS)
    pairs = bucket_pairs(keys.reshape(-1), ids)  # (E, 2)
    dropped, kept = components(pairs)
    seconds = time.perf_counter() - t
    peak = _peak_rss_mb()
    return MethodRun(seconds, startup, peak, peak - base, dropped, kept, {"candidate_pairs": len(pairs)})


class _ClusterMemory:
    """Samples the proportional set size of this process plus all its descendants (the Ray
    processes), so pages of the shared object store are counted once, not once per worker."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (perf_counter, MB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def measure(self) -> float:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass  # a worker that exited between listing and reading
        return total / MB

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.measure()))
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> _ClusterMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> float:
        inside = [mb for t, mb in self.samples if start <= t <= end]
        return max(inside, default=0.0)


def _stage_config(corpus: Corpus, run_root: Path) -> Any:
    from pipelines.config import parse_config

    no_filters = {k: None for k in ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length",
                                    "max_symbol_word_ratio", "max_duplicate_line_fraction",
                                    "min_alpha_word_fraction", "max_bullet_line_fraction",
                                    "max_ellipsis_line_fraction")}  # fmt: skip
    return parse_config({
        "run": {"name": "bench", "root": str(run_root)},
        "ray": {"address": None, "num_cpus": 2},
        "data": {
            "input": {"paths": [str(corpus.shard_dir)]},
            "filters": no_filters,
            "dedup": {"exact": False, "near": True, "ngram": NGRAM, "threshold": THRESHOLD,
                      "num_bands": BANDS, "rows_per_band": ROWS, "verify_candidates": True, "seed": SEED},
            # The phases after dedup are not timed; a small tokenizer keeps them short.
            "tokenizer": {"vocab_size": 1024, "max_training_documents": 2000},
        },
    })  # fmt: skip


def run_kiln_ray(corpus: Corpus, run_root: Path) -> MethodRun:
    """The data stage on the embedded 2-CPU cluster; times its near-dedup phases."""
    # Imported here so the other methods' processes do not carry Ray in their memory.
    import pyarrow.parquet as pq
    import ray

    from cluster.runtime import init_ray
    from pipelines.data import stage as data

    cfg = _stage_config(corpus, run_root)
    t = time.perf_counter()
    init_ray(cfg.ray)
    startup = time.perf_counter() - t
    with _ClusterMemory() as memory:
        time.sleep(1.0)  # let the idle cluster settle before the baseline
        base = memory.measure()
        start = time.perf_counter()
        with _quiet():
            report = data.run(cfg, force=True)
    phases = {k: report["seconds"][k] for k in ("read_filter_minhash", "group", "near_dedup")}
    seconds = sum(phases.values())
    peak = memory.peak(start, start + seconds + 0.5)  # the timed phases run first, back to back
    ray.shutdown()

    table = pq.read_table(cfg.run.dir / "data" / "documents", columns=["id", "status", "dup_of"])
    near = table.column("status").to_numpy(zero_copy_only=False) == data.NEAR
    ids = table.column("id").to_numpy()[near]
    of = table.column("dup_of").to_numpy()[near]
    detail = {**phases, **report["near_dedup"], "after_dedup_s": report["seconds"]["total"] - seconds}
    return MethodRun(seconds, startup, peak, peak - base, _position(corpus, ids), _position(corpus, of), detail)


class _quiet:
    """Silences stdout/stderr at the file-descriptor level (Ray Data's progress output)."""

    def __enter__(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)


def _position(corpus: Corpus, ids: np.ndarray) -> np.ndarray:
    """kiln record ids (file_index << 32 | line number from 1) to stream positions."""
    ids = np.asarray(ids, dtype=np.int64)
    return corpus.shard_offsets[ids >> 32] + (ids & 0xFFFFFFFF) - 1


def in_fresh_process(fn: Callable[..., MethodRun], *args: Any) -> MethodRun:
    """Run ``fn(*args)`` in a newly spawned process, so its peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# --- quality -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quality:
    recall: float
    precision: float
    true_pairs: int  # true pairs in the recall sample
    checked_pairs: int  # predicted pairs whose exact Jaccard was computed


def _exact_jaccard(texts: list[str], pairs: np.ndarray, cache: dict[tuple[int, int], float]) -> np.ndarray:
    out = np.empty(len(pairs))
    for k, (a, b) in enumerate(pairs.tolist()):
        key = (min(a, b), max(a, b))
        if key not in cache:
            cache[key] = jaccard(texts[a], texts[b], NGRAM)
        out[k] = cache[key]
    return out


def score(run: MethodRun, true_pairs: np.ndarray, texts: list[str], cache: dict[tuple[int, int], float],
          rng: np.random.Generator) -> Quality:  # fmt: skip
    """Recall over ``true_pairs`` (E, 2); precision over (a sample of) the run's predicted pairs."""
    rep = np.arange(len(texts), dtype=np.int64)  # each document's cluster representative
    rep[run.dropped] = run.kept
    recall = float(np.mean(rep[true_pairs[:, 0]] == rep[true_pairs[:, 1]])) if len(true_pairs) else 1.0
    predicted = np.stack([run.dropped, run.kept], axis=1)
    if len(predicted) > PRECISION_SAMPLE:
        predicted = predicted[rng.choice(len(predicted), size=PRECISION_SAMPLE, replace=False)]
    jac = _exact_jaccard(texts, predicted, cache)
    precision = float(np.mean(jac >= THRESHOLD)) if len(jac) else 1.0
    return Quality(recall, precision, len(true_pairs), len(predicted))


def true_pairs_sample(corpus: Corpus, texts: list[str], cache: dict[tuple[int, int], float],
                      rng: np.random.Generator) -> tuple[np.ndarray, int]:  # fmt: skip
    """Planted pairs plus random pairs whose exact Jaccard is >= the threshold; also how many of
    the random pairs were true duplicates (expected: none, the vocabulary makes them unrelated)."""
    for (a, b), j in zip(corpus.planted.tolist(), corpus.planted_jaccard):
        cache[(min(a, b), max(a, b))] = float(j)
    random_pairs = rng.integers(0, corpus.num_docs, size=(RANDOM_PAIRS, 2))
    random_pairs = random_pairs[random_pairs[:, 0] != random_pairs[:, 1]]
    random_true = random_pairs[_exact_jaccard(texts, random_pairs, cache) >= THRESHOLD]
    planted_true = corpus.planted[corpus.planted_jaccard >= THRESHOLD]
    return np.concatenate([planted_true, random_true]), len(random_true)


# --- report --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    method: str
    docs: int
    corpus_mb: float
    run: MethodRun
    quality: Quality


def _table(rows: list[Row]) -> str:
    base = {r.docs: r.run.seconds for r in rows if r.method == "datasketch"}
    lines = [
        "| method | docs | corpus MB | seconds | startup s | docs/s | vs datasketch | peak MB | work MB "
        "| recall | precision |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = base[r.docs] / r.run.seconds if r.docs in base else math.nan
        lines.append(
            f"| {r.method} | {r.docs:,} | {r.corpus_mb:.0f} | {r.run.seconds:.1f} | {r.run.startup_s:.1f} "
            f"| {r.docs / r.run.seconds:,.0f} | {ratio:.1f}x | {r.run.peak_mb:,.0f} | {r.run.work_mb:,.0f} "
            f"| {r.quality.recall:.3f} | {r.quality.precision:.3f} |"
        )
    return "\n".join(lines)


def _scaling(rows: list[Row]) -> str:
    """How work memory grows from the smallest to the largest size, against the corpus."""
    lines = []
    for method in dict.fromkeys(r.method for r in rows):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.docs)
        lo, hi = mine[0], mine[-1]
        if lo is hi:
            continue
        lines.append(
            f"- {method}: corpus x{hi.corpus_mb / lo.corpus_mb:.1f} -> work memory "
            f"x{hi.run.work_mb / max(lo.run.work_mb, 1.0):.1f}, peak x{hi.run.peak_mb / lo.run.peak_mb:.1f} "
            f"({hi.run.work_mb / hi.corpus_mb:.2f} MB of work memory per corpus MB at {hi.docs:,} docs)"
        )
    return "\n".join(lines)


def _ray_details(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        if r.method != "kiln Ray stage":
            continue
        d = r.run.detail
        lines.append(
            f"- {r.docs:,} docs: read_filter_minhash {d['read_filter_minhash']:.1f} s, group {d['group']:.1f} s, "
            f"near_dedup {d['near_dedup']:.1f} s; {d['candidate_pairs']:,} candidate pairs, "
            f"{d['verified_pairs']:,} verified; untimed later phases {d['after_dedup_s']:.1f} s"
        )
    return "\n".join(lines)


def bench_size(num_docs: int, work_dir: Path) -> Iterator[Row]:
    """Generate one corpus, run the three methods on it, score them."""
    t = time.perf_counter()
    corpus = generate_corpus(num_docs, work_dir)
    print(f"[{num_docs:,} docs] corpus generated in {time.perf_counter() - t:.1f} s "
          f"({corpus.num_bytes / MB:.0f} MB, {len(corpus.planted):,} planted copies)", flush=True)  # fmt: skip
    runs = {
        "datasketch": in_fresh_process(run_datasketch, corpus),
        "kiln kernel": in_fresh_process(run_kiln_kernel, corpus),
        "kiln Ray stage": in_fresh_process(run_kiln_ray, corpus, work_dir / "runs"),
    }
    texts = read_texts(corpus)
    cache: dict[tuple[int, int], float] = {}
    rng = np.random.default_rng(SEED)
    true_pairs, random_true = true_pairs_sample(corpus, texts, cache, rng)
    print(f"[{num_docs:,} docs] {len(true_pairs):,} true pairs (J >= {THRESHOLD}) in the sample, "
          f"{random_true} of them among {RANDOM_PAIRS:,} random pairs", flush=True)  # fmt: skip
    for method, run in runs.items():
        quality = score(run, true_pairs, texts, cache, rng)
        print(f"[{num_docs:,} docs] {method}: {run.seconds:.1f} s", flush=True)
        yield Row(method, num_docs, corpus.num_bytes / MB, run, quality)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,200000", help="comma-separated corpus sizes (documents)")
    parser.add_argument("--quick", action="store_true", help="sizes 5000,20000")
    args = parser.parse_args(argv)
    sizes = [5000, 20000] if args.quick else [int(s) for s in args.sizes.split(",")]
    t = time.perf_counter()
    rows: list[Row] = []
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-dedup-"))
    try:
        for n in sizes:
            rows.extend(bench_size(n, root / str(n)))
            shutil.rmtree(root / str(n))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nkiln near-dedup benchmark: {NGRAM}-gram word shingles, {NUM_PERM} permutations, "
          f"{BANDS} bands x {ROWS} rows, threshold {THRESHOLD}; {os.cpu_count()} CPUs\n")  # fmt: skip
    print(_table(rows))
    print("\nMemory scaling (smallest to largest size):\n" + _scaling(rows))
    print("\nRay stage phases:\n" + _ray_details(rows))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nwall time {time.perf_counter() - t:.0f} s; load average at the end {load} (1, 5, 15 min)")


if __name__ == "__main__":
    main()
