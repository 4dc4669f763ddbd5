"""Near-dedup benchmark: kiln against datasketch and rensa, same corpus, same shingles, same parameters.

Run from the repository root (on 2 CPUs the 1M size is the long one; ``--peers`` skips methods):

    .venv/bin/python -m bench.dedup                      # 100k and 1M documents, every method
    .venv/bin/python -m bench.dedup --quick              # 20k and 100k
    .venv/bin/python -m bench.dedup --sizes 100000,1000000 --peers kiln stage,kiln kernel
    .venv/bin/python -m bench.dedup --peers datasketch:100000,rensa,kiln kernel,kiln stage  # no datasketch at 1M

All methods: 5-word shingles (``pipelines.data.text.words``: lower-cased UTF-8 runs of [0-9A-Za-z_]
or bytes >= 0x80), 112 permutations, 14 bands x 8 rows, threshold 0.8; each in a fresh spawned
process. Every timed section starts from the corpus files (reading them is timed for every method,
as the stage's own reading is) and ends with a duplicate map (each dropped document and the
earliest document of its connected component of duplicate edges), and includes shingling:

* ``datasketch`` (2.0.0, one core), the maintainers' recipe (ekzhu/datasketch#188) on its fast
  paths: MurmurHash3 (``mmh3``, 32-bit) as its ``hashfunc``, the fast hash its docs point to in
  place of the default SHA-1; ``shingle_set`` (the one shared Python shingler) on every text inside ``MinHash.generator``,
  each kept as ``LeanMinHash``; all inserted through ``MinHashLSH.insertion_session``; one ``query``
  each (every candidate is a duplicate edge, unverified); components.
* ``datasketch x2`` (not a baseline): the same on both cores, as a user would spread it: a pool
  of two processes reads, shingles and sketches one shard at a time; this process indexes the
  sketches in stream order as they arrive. Its ratio is still against one-process datasketch.
* ``rensa`` (0.5.0, Rust, one core here), its dedup API ``RMinHashDeduplicator`` with LSH, per
  batch of 4,096: ``shingle_set`` on every text, ``RMinHash.from_token_sets``, ``add_pairs`` (drops
  a document whose sketch estimate against an indexed one is >= 0.8), ``get_duplicate_sets`` of the
  dropped ones (their edges); components. Skipped with a note when rensa is not installed.
* ``kiln kernel`` (reference; one core, no Ray): ``MinHasher.signatures`` in batches of 4,096 (its
  numba kernel finds words and hashes shingles itself), ``band_keys``, ``bucket_pairs``,
  ``components``; unverified.
* ``kiln near-dedup`` / ``kiln stage``: ONE run of the real data stage (``stage.run``, filters and
  exact dedup off, an 8,192-token tokenizer) on the embedded 2-CPU Ray cluster over JSONL shards.
  ``kiln near-dedup`` is its report's ``dedup_path`` (read, normalise, MinHash, LSH grouping, exact
  Jaccard verification of every candidate, duplicate map); ``kiln stage`` its ``total`` (also the
  documents table, tokenizer training and packing).

``startup s`` (not timed): imports, the numba kernels' load, ``ray.init``; for the stage also one
untimed run on a 2,000-document corpus of 8 shards first, so its workers have imported kiln and
loaded the kernels (warm against warm: the kernel method's first call is untimed too; the
warm-up's seconds are the JSON's ``warmup_s``). ``vs datasketch``: docs/s
over datasketch's at that size, else at the largest size it ran (``--peers datasketch:N``; footnoted).
``driver peak MB``: peak RSS of the process running the method (its exact high water mark; for the
stage, its driver, sampled every 0.25 s over the run). ``cluster peak MB``: for the stage, the peak (every 1 s)
PSS summed over the driver and all its descendants (Ray; the object store counts once); else the
driver peak. Only the single-process methods hold the corpus in memory.

Corpus (``bench/dedup_corpus.py``): synthetic ~1 KB documents (a Zipf vocabulary of invented words), 10% planted near copies
made by 0-6 word substitutions (exact Jaccard 1.0 down to ~0.6). Recall: the share of true pairs
(exact Jaccard >= 0.8; all planted pairs plus random pairs) a method puts in one cluster; precision:
the share of its (dropped, kept) pairs (at most 5,000 sampled) with exact Jaccard >= 0.8. Prints the
load averages before and after and the table; writes ``runs/bench/dedup.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from bench.dedup_corpus import NGRAM, SEED, Corpus, generate_corpus, read_texts
from pipelines.data.text import jaccard, words

NUM_PERM = 112
BANDS, ROWS = 14, 8
THRESHOLD = 0.8
# The stage's warm-up run (untimed, like the kernel's first call): enough shards that each of the
# cluster's workers imports kiln's modules and loads the numba kernels before the timed run.
WARMUP_DOCS, WARMUP_DOCS_PER_SHARD = 2_000, 250
BATCH_DOCS = 4096  # documents per batch for the kiln kernel and rensa
RANDOM_PAIRS = 3000  # random (non-planted) pairs checked for hidden true duplicates
PRECISION_SAMPLE = 5000  # predicted pairs whose exact Jaccard is computed, per method
SAMPLE_EVERY_S, CLUSTER_EVERY = 0.25, 4  # the stage driver's RSS every 0.25 s, the cluster's PSS every 4th time
MB = 1024 * 1024
DEFAULT_SIZES, QUICK_SIZES = (100_000, 1_000_000), (20_000, 100_000)
STAGE = "kiln stage"  # the --peers name of the stage run, which gives two rows
NEAR_DEDUP = "kiln near-dedup"
OLD_DEDUP_PHASES = ("read_filter_minhash", "group", "near_dedup")  # the stage report before dedup_path


def shingle_set(text: str) -> set[bytes]:
    """The document's word 5-grams, each as its words joined by one space: the shingles every
    peer hashes (the same set as ``pipelines.data.text.shingles(text, 5)``, joined)."""
    w = words(text)
    if len(w) < NGRAM:
        return {b" ".join(w)} if w else set()
    return set(map(b" ".join, zip(*(w[i:] for i in range(NGRAM)))))


@dataclass
class MethodRun:
    """One method on one corpus: its time, memory and duplicate decisions."""

    seconds: float  # the timed section
    startup_s: float  # fixed cost outside it (imports, numba load, ray.init)
    driver_peak_mb: float
    cluster_peak_mb: float
    dropped: np.ndarray  # (M,) int64 positions of documents judged duplicates
    kept: np.ndarray  # (M,) int64 the document each one duplicates (its cluster's earliest)
    detail: dict[str, Any] = field(default_factory=dict)


def _high_water_mb() -> float:
    """This process's exact peak RSS (Linux VmHWM; unlike ru_maxrss, not inherited across the spawn)."""
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024  # kB


def duplicate_map(edges: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(dropped, kept) from duplicate edges: connected components, each keeping its earliest
    document (as ``pipelines.data.minhash.components``, without loading numba into the peers)."""
    pairs = np.array(edges, dtype=np.int64).reshape(-1, 2)
    if pairs.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    nodes, local = np.unique(pairs, return_inverse=True)  # nodes sorted ascending
    local = local.reshape(-1, 2)
    graph = coo_matrix((np.ones(len(local)), (local[:, 0], local[:, 1])), shape=(nodes.size,) * 2)
    label = connected_components(graph, directed=False)[1]
    rep = nodes[np.unique(label, return_index=True)[1]][label]  # each label's first node is its smallest
    return nodes[nodes != rep], rep[nodes != rep]


def _datasketch_minhashes(texts: list[str]) -> Iterator[Any]:
    """datasketch's MinHash of each text's ``shingle_set``, hashed with MurmurHash3 (32 bits
    unsigned): the fast hash its docs point to in place of its default SHA-1 (at 100k documents the
    method took 18.6 s with it, 24.0 s with SHA-1: two runs the same afternoon)."""
    import mmh3
    from datasketch import MinHash

    murmur = functools.partial(mmh3.hash, signed=False)
    return MinHash.generator(map(shingle_set, texts), num_perm=NUM_PERM, seed=SEED, hashfunc=murmur)


def run_datasketch(corpus: Corpus) -> MethodRun:
    """datasketch's bulk recipe: all LeanMinHashes (``_datasketch_minhashes``), one insertion
    session, one query each."""
    t = time.perf_counter()
    import mmh3  # noqa: F401  (imported here: start-up, untimed)
    from datasketch import LeanMinHash, MinHashLSH

    startup = time.perf_counter() - t
    t = time.perf_counter()
    texts = read_texts(corpus)  # timed, as the stage's own reading is
    sketches = [LeanMinHash(m) for m in _datasketch_minhashes(texts)]
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=(BANDS, ROWS))
    with lsh.insertion_session() as session:
        for i, m in enumerate(sketches):
            session.insert(i, m, check_duplication=False)  # keys are unique
    edges = [(c, i) for i, m in enumerate(sketches) for c in lsh.query(m) if c < i]
    dropped, kept = duplicate_map(edges)
    seconds, peak = time.perf_counter() - t, _high_water_mb()
    return MethodRun(seconds, startup, peak, peak, dropped, kept)


def _datasketch_shard(path: str) -> tuple[np.ndarray, str, int, float]:
    """One shard read, shingled and sketched (``_datasketch_minhashes``) in a pool worker: its
    documents' hash values (docs, NUM_PERM), their scheme, the worker's pid and its peak RSS in MB
    so far."""
    with open(path, "rb") as f:
        sketches = list(_datasketch_minhashes([json.loads(line)["text"] for line in f]))
    values = np.stack([m.hashvalues for m in sketches]) if sketches else np.zeros((0, NUM_PERM), np.uint64)
    return values, sketches[0].scheme if sketches else "", os.getpid(), _high_water_mb()


def _datasketch_worker_ready(_: int) -> int:
    import mmh3  # noqa: F401  (the imports are start-up, as the other peers' are)
    import datasketch  # noqa: F401

    time.sleep(0.2)  # both workers up, not one task run twice
    return os.getpid()


def run_datasketch_2(corpus: Corpus) -> MethodRun:
    """datasketch on both cores, as a user would spread it: a pool of two processes reads, shingles
    and sketches one shard at a time (MurmurHash3), and this process indexes the sketches in
    stream order as they come (LeanMinHash, one insertion session, one query each)."""
    t = time.perf_counter()
    from datasketch import LeanMinHash, MinHashLSH

    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        list(pool.map(_datasketch_worker_ready, range(2)))
        startup = time.perf_counter() - t
        t = time.perf_counter()
        lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=(BANDS, ROWS))
        sketches: list[Any] = []
        worker_peaks: dict[int, float] = {}
        with lsh.insertion_session() as session:
            shards = map(str, sorted(corpus.shard_dir.glob("*.jsonl")))
            for values, scheme, pid, peak in pool.map(_datasketch_shard, shards):
                worker_peaks[pid] = max(peak, worker_peaks.get(pid, 0.0))
                for row in values:
                    m = LeanMinHash(seed=SEED, hashvalues=row, scheme=scheme)
                    session.insert(len(sketches), m, check_duplication=False)
                    sketches.append(m)
        edges = [(c, i) for i, m in enumerate(sketches) for c in lsh.query(m) if c < i]
        dropped, kept = duplicate_map(edges)
        seconds, peak = time.perf_counter() - t, _high_water_mb()
    # Each worker's peak as of its last shard (the peak so far), and this process's.
    return MethodRun(seconds, startup, peak, peak + sum(worker_peaks.values()), dropped, kept)


def run_rensa(corpus: Corpus) -> MethodRun:
    """rensa's RMinHashDeduplicator in batches; the dropped documents' matches give the edges."""
    t = time.perf_counter()
    from rensa import RMinHash, RMinHashDeduplicator

    startup = time.perf_counter() - t
    t = time.perf_counter()
    texts = read_texts(corpus)  # timed, as the stage's own reading is
    dedup = RMinHashDeduplicator(threshold=THRESHOLD, num_perm=NUM_PERM, use_lsh=True, num_bands=BANDS, seed=SEED)
    edges: list[tuple[int, int]] = []
    for start in range(0, len(texts), BATCH_DOCS):
        batch = [shingle_set(text) for text in texts[start : start + BATCH_DOCS]]
        sketches = RMinHash.from_token_sets(batch, num_perm=NUM_PERM, seed=SEED)
        keep = dedup.add_pairs([(str(start + j), m) for j, m in enumerate(sketches)])
        dups = [j for j, k in enumerate(keep) if not k]
        for j, matches in zip(dups, dedup.get_duplicate_sets([sketches[j] for j in dups])):
            edges.extend((int(key), start + j) for key in matches)
    dropped, kept = duplicate_map(edges)
    seconds, peak = time.perf_counter() - t, _high_water_mb()
    return MethodRun(seconds, startup, peak, peak, dropped, kept)


def run_kiln_kernel(corpus: Corpus) -> MethodRun:
    """Signatures in batches, band keys, bucket pairs, components: one core, no Ray."""
    t = time.perf_counter()
    from pipelines.data.minhash import MinHasher, band_keys, bucket_pairs, components

    hasher = MinHasher(NUM_PERM, NGRAM, SEED)
    hasher.signatures(["warm up the kernels"] * 16)  # loads (or compiles) the numba kernels
    startup = time.perf_counter() - t
    t = time.perf_counter()
    texts = read_texts(corpus)  # timed, as the stage's own reading is
    signatures = np.empty((len(texts), NUM_PERM), dtype=np.uint32)  # (N, P)
    for start in range(0, len(texts), BATCH_DOCS):
        signatures[start : start + BATCH_DOCS] = hasher.signatures(texts[start : start + BATCH_DOCS])
    keys = band_keys(signatures, BANDS, ROWS)  # (N, bands); the band index is mixed into each key
    ids = np.repeat(np.arange(len(texts), dtype=np.int64), BANDS)
    pairs = bucket_pairs(keys.reshape(-1), ids)  # (E, 2)
    dropped, kept = components(pairs)
    seconds, peak = time.perf_counter() - t, _high_water_mb()
    return MethodRun(seconds, startup, peak, peak, dropped, kept)


class _ClusterMemory(threading.Thread):
    """Samples until ``done``: this process's RSS (the stage's driver) every 0.25 s; every second, the PSS of
    this process plus all its descendants (Ray), so the shared object store's pages count once, not per worker."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, driver RSS MB, cluster MB)
        self.done = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        total, tick = 0, 0
        while True:  # at least one sample, however short the run
            driver = me.memory_info().rss
            if tick % CLUSTER_EVERY == 0:  # PSS reads every mapping: a 1/4 core at 4 Hz, taken from the stage
                total = 0
                for p in [me, *me.children(recursive=True)]:
                    with suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):  # exited meanwhile
                        total += p.memory_full_info().pss
            tick += 1
            self.samples.append((time.perf_counter(), driver / MB, total / MB))
            if self.done.wait(SAMPLE_EVERY_S):
                return


def _stage_config(corpus: Corpus, run_root: Path) -> Any:
    from pipelines.config import parse_config

    no_filters = {k: None for k in ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length",
                                    "max_symbol_word_ratio", "max_duplicate_line_fraction", "min_alpha_word_fraction",
                                    "max_bullet_line_fraction", "max_ellipsis_line_fraction")}  # fmt: skip
    return parse_config({
        "run": {"name": "bench", "root": str(run_root)},
        "ray": {"address": None, "num_cpus": 2},
        "data": {
            "input": {"paths": [str(corpus.shard_dir)]},
            "filters": no_filters,
            "dedup": {"exact": False, "near": True, "ngram": NGRAM, "threshold": THRESHOLD,
                      "num_bands": BANDS, "rows_per_band": ROWS, "verify_candidates": True, "seed": SEED},
            "tokenizer": {"vocab_size": 8192},
        },
    })  # fmt: skip


def stage_phases(seconds: dict[str, float]) -> dict[str, float]:
    """The stage report's phase seconds with ``dedup_path`` (read -> duplicate map) in either shape: the
    current report has it, the earlier one (read_filter_minhash, group, near_dedup, ...) its parts."""
    phases = {k: float(v) for k, v in seconds.items()}
    if "dedup_path" not in phases:
        phases["dedup_path"] = sum(phases[k] for k in OLD_DEDUP_PHASES)
    return phases


def run_kiln_stage(corpus: Corpus, run_root: Path, warmup: Corpus | None = None) -> MethodRun:
    """The data stage on the embedded 2-CPU cluster; ``seconds`` is its dedup path, ``detail`` all phases.

    With ``warmup``, the stage first runs once on that small corpus, untimed (its time goes to
    ``startup_s`` and ``detail["warmup_s"]``): warm against warm, as the other methods are."""
    # Imported here so the other methods' processes do not carry Ray in their memory.
    import pyarrow.parquet as pq
    import ray

    from cluster.runtime import init_ray
    from pipelines.data import stage as data

    cfg = _stage_config(corpus, run_root)
    t = time.perf_counter()
    init_ray(cfg.ray)
    warmup_s = 0.0
    if warmup is not None:
        w = time.perf_counter()
        with _quiet():
            data.run(_stage_config(warmup, run_root / "warmup"), force=True)
        warmup_s = time.perf_counter() - w
    startup = time.perf_counter() - t
    memory = _ClusterMemory()
    memory.start()
    with _quiet():
        report = data.run(cfg, force=True)
    memory.done.set()
    memory.join()  # samples cover the stage's run: it is all the sampler saw
    driver_peak, cluster_peak = (max(s[k] for s in memory.samples) for k in (1, 2))
    ray.shutdown()

    phases = stage_phases(report["seconds"])
    table = pq.read_table(cfg.run.dir / "data" / "documents", columns=["id", "status", "dup_of"])
    near = table.column("status").to_numpy(zero_copy_only=False) == "near_duplicate"
    ids, of = (_position(corpus, table.column(c).to_numpy()[near]) for c in ("id", "dup_of"))
    detail = {"phases": phases, "near_dedup": report["near_dedup"], "warmup_s": round(warmup_s, 2)}
    return MethodRun(phases["dedup_path"], startup, driver_peak, cluster_peak, ids, of, detail)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silences stdout/stderr at the file-descriptor level (Ray Data's progress output)."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1), os.dup2(devnull, 2), os.close(devnull)
    try:
        yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd), os.close(old)


def _position(corpus: Corpus, ids: np.ndarray) -> np.ndarray:
    """kiln record ids (file_index << 32 | line number from 1) to stream positions."""
    ids = np.asarray(ids, dtype=np.int64)
    return corpus.shard_offsets[ids >> 32] + (ids & 0xFFFFFFFF) - 1


def in_fresh_process(fn: Callable[..., MethodRun], *args: Any) -> MethodRun:
    """Run ``fn(*args)`` in a newly spawned process, so its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


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

# --peers names; the stage's one run gives two rows, NEAR_DEDUP and STAGE.
PEERS: dict[str, Callable[..., MethodRun]] = {
    "datasketch": run_datasketch, "datasketch x2": run_datasketch_2, "rensa": run_rensa,
    "kiln kernel": run_kiln_kernel, STAGE: run_kiln_stage,
}


@dataclass(frozen=True)
class Row:
    method: str
    docs: int
    run: MethodRun
    quality: Quality


def datasketch_baselines(rows: list[Row]) -> dict[int, tuple[float, int]]:
    """Corpus size -> (datasketch's docs/s to compare against, the size it was measured at): the
    same size where datasketch ran, else the largest size where it ran."""
    measured = {r.docs: r.docs / r.run.seconds for r in rows if r.method == "datasketch"}
    at = {r.docs: r.docs if r.docs in measured else max(measured) for r in rows} if measured else {}
    return {docs: (measured[a], a) for docs, a in at.items()}


def row_json(row: Row, baseline: tuple[float, int] | None) -> dict[str, Any]:
    """One row of ``dedup.json``; the stage's rows also carry its ``phases`` (seconds)."""
    docs_per_s = row.docs / row.run.seconds
    out: dict[str, Any] = {
        "method": row.method, "docs": row.docs, "seconds": round(row.run.seconds, 3),
        "docs_per_s": round(docs_per_s, 1),
        "vs_datasketch": round(docs_per_s / baseline[0], 3) if baseline else None,
        "recall": round(row.quality.recall, 4), "precision": round(row.quality.precision, 4),
        "driver_peak_mb": round(float(row.run.driver_peak_mb), 1),
        "cluster_peak_mb": round(float(row.run.cluster_peak_mb), 1), "startup_s": round(row.run.startup_s, 2),
    }  # fmt: skip
    if "phases" in row.run.detail:
        out["phases"] = {k: round(v, 3) for k, v in row.run.detail["phases"].items()}
    if "warmup_s" in row.run.detail:
        out["warmup_s"] = row.run.detail["warmup_s"]
    return out


def table(rows: list[Row]) -> str:
    """The markdown table of every row, with a footnote where a ratio is taken at another size."""
    baselines = datasketch_baselines(rows)
    lines = [
        "| method | docs | seconds | startup s | docs/s | vs datasketch | driver peak MB | cluster peak MB "
        "| recall | precision |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    elsewhere: set[int] = set()
    for r in rows:
        j = row_json(r, baselines.get(r.docs))
        ratio = "n/a"
        if j["vs_datasketch"] is not None:
            at = baselines[r.docs][1]
            ratio = f"{j['vs_datasketch']:,.2f}x" + ("" if at == r.docs else "*")
            elsewhere |= {at} - {r.docs}
        lines.append(f"| {r.method} | {r.docs:,} | {j['seconds']:,.2f} | {j['startup_s']:.1f} | {j['docs_per_s']:,.0f} "
                     f"| {ratio} | {j['driver_peak_mb']:,.0f} | {j['cluster_peak_mb']:,.0f} | {j['recall']:.3f} "
                     f"| {j['precision']:.3f} |")  # fmt: skip
    if elsewhere:
        lines.append(f"\n\\* vs datasketch at {max(elsewhere):,} docs (datasketch was not run at this size)")
    return "\n".join(lines)


def write_results(out: Path, rows: list[Row], load_before: list[float], command: str) -> str:
    """Writes ``out`` atomically (a temporary file, then os.replace); returns the table."""
    baselines = datasketch_baselines(rows)
    text = table(rows)
    payload = {"rows": [row_json(r, baselines.get(r.docs)) for r in rows], "table": text, "cpus": os.cpu_count(),
               "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()], "command": command}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, out)
    return text


def bench_size(num_docs: int, work_dir: Path, peers: list[str]) -> Iterator[Row]:
    """Generate one corpus, run the chosen methods on it (one at a time), score them."""
    t = time.perf_counter()
    corpus = generate_corpus(num_docs, work_dir)
    print(f"[{num_docs:,} docs] corpus generated in {time.perf_counter() - t:.1f} s "
          f"({corpus.num_bytes / MB:.0f} MB, {len(corpus.planted):,} planted copies)", flush=True)  # fmt: skip
    runs: dict[str, MethodRun] = {}
    for peer in peers:
        if peer == STAGE:
            warmup = generate_corpus(WARMUP_DOCS, work_dir / "warmup", SEED + 1, WARMUP_DOCS_PER_SHARD)
            run = in_fresh_process(run_kiln_stage, corpus, work_dir / "runs", warmup)
            runs[NEAR_DEDUP] = run
            runs[STAGE] = replace(run, seconds=run.detail["phases"]["total"])
        else:
            runs[peer] = in_fresh_process(PEERS[peer], corpus)
        print(f"[{num_docs:,} docs] {peer}: {runs[peer].seconds:.1f} s", flush=True)
    texts = read_texts(corpus)
    cache: dict[tuple[int, int], float] = {}
    rng = np.random.default_rng(SEED)
    true_pairs, random_true = true_pairs_sample(corpus, texts, cache, rng)
    print(f"[{num_docs:,} docs] {len(true_pairs):,} true pairs (J >= {THRESHOLD}) in the sample, "
          f"{random_true} of them among {RANDOM_PAIRS:,} random pairs", flush=True)  # fmt: skip
    for method, run in runs.items():
        yield Row(method, num_docs, run, score(run, true_pairs, texts, cache, rng))


def parse_peers(values: list[str]) -> dict[str, int | None]:
    """``--peers`` words to {method: largest size to run it at, None for every size}, in the
    canonical order. Commas separate names (``--peers kiln stage,kiln kernel`` works unquoted);
    ``name:N`` runs it only up to N documents. rensa is dropped if it is not installed."""
    names: dict[str, int | None] = {}
    for item in filter(None, (n.strip() for n in " ".join(values).split(","))):
        name, _, cap = item.partition(":")
        names[STAGE if name.strip() == NEAR_DEDUP else name.strip()] = int(cap) if cap else None
    if set(names) - set(PEERS):
        raise SystemExit(f"unknown --peers {sorted(set(names) - set(PEERS))}; choose from {list(PEERS)}")
    if "rensa" in names and importlib.util.find_spec("rensa") is None:
        print("rensa is not installed (pip install rensa==0.5.0, the dev extra): skipping it", flush=True)
        del names["rensa"]
    return {n: names[n] for n in PEERS if n in names}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", help="comma-separated corpus sizes in documents (default 100000,1000000)")
    parser.add_argument("--quick", action="store_true", help="sizes 20000,100000")
    parser.add_argument("--peers", nargs="+", default=[",".join(PEERS)],
                        help=f"comma-separated methods, NAME:N to stop at N docs (default all: {', '.join(PEERS)})")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/dedup.json"), help="JSON results")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else QUICK_SIZES if args.quick else DEFAULT_SIZES
    peers = parse_peers(args.peers)
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    command = shlex.join([python, "-m", "bench.dedup", *argv])
    load_before = [round(x, 2) for x in os.getloadavg()]
    methods = ", ".join(f"{p}:{c}" if c else p for p, c in peers.items())
    print(f"load average before: {', '.join(f'{x:.2f}' for x in load_before)} (1, 5, 15 min); "
          f"{os.cpu_count()} CPUs; methods: {methods}", flush=True)  # fmt: skip
    t = time.perf_counter()
    rows: list[Row] = []
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-dedup-"))
    try:
        for n in sizes:
            rows.extend(bench_size(n, root / str(n), [p for p, cap in peers.items() if cap is None or n <= cap]))
            shutil.rmtree(root / str(n))
            text = write_results(args.out, rows, load_before, command)  # kept after every size
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nkiln near-dedup benchmark: {NGRAM}-word shingles, {NUM_PERM} permutations, "
          f"{BANDS} bands x {ROWS} rows, threshold {THRESHOLD}; {os.cpu_count()} CPUs\n")  # fmt: skip
    print(text)
    for r in (r for r in rows if r.method == STAGE):
        nd, phases = r.run.detail["near_dedup"], r.run.detail["phases"]
        print(f"\nkiln stage at {r.docs:,} docs: " + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
              + f"; {nd['candidate_pairs']:,} candidate pairs, {nd['verified_pairs']:,} verified")  # fmt: skip
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nload average after: {load} (1, 5, 15 min); wall time {time.perf_counter() - t:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
