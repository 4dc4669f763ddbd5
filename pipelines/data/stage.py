"""``kiln data CONFIG``: stream a corpus through Ray Data into clean, deduplicated, packed shards.

Read top to bottom:
  1. read + normalise + quality-filter + content-hash + MinHash LSH keys, streamed to scratch;
  2. exact duplicates: hash-shuffle on the content hash, connected components;
  3. near duplicates: LSH bucket keys hash-shuffled, candidate pairs verified by exact Jaccard,
     connected components; one document (the earliest) kept per component;
  4. the documents table (every input record with its status and what it duplicates);
  5. the BPE tokenizer, trained on the kept documents;
  6. tokenise (Ray Data) and pack (in stream order) into train/validation Parquet shards;
  7. data_report.json and the stage marker.
The corpus itself never sits in one process: only duplicate pairs do.
Everything is built inside a temporary directory renamed into place at the end, so a crash
leaves the previous output (or none) and a rerun gives the same result. The tokenizer is built in
there too (``data/tokenizer``; ``<run>/tokenizer`` is a link to it), so one rename installs the
shards and their tokenizer together. With ``run.storage_path`` the shards and the documents table
go to object storage instead (``pipelines/data/storage.py``), named by the report in ``data/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.data import DataContext, Dataset

from cluster.runtime import init_ray
from core.rundir import (
    atomic_dir,
    atomic_write_json,
    finished_summary,
    mark_finished,
    recover_interrupted,
)
from pipelines.config import KilnConfig
from pipelines.data import storage
from pipelines.data.config import DataConfig, DedupConfig, FilterConfig, InputConfig
from pipelines.data.corpus import REJECTED, Corpus, CorpusFile, list_corpus_files, read_file
from pipelines.data.filters import first_failure
from pipelines.data.minhash import (
    MinHasher,
    band_keys,
    bucket_pairs,
    components,
    mix64,
    optimal_bands,
    shingle_hashes,
)
from pipelines.data.packing import Packer, ShardWriter
from pipelines.data.text import normalize
from pipelines.data.tokenizer import copy_hf_tokenizer, load_tokenizer, save_hf_tokenizer, train_bpe

STAGE = "data"
KEPT, FILTERED, EXACT, NEAR = "kept", "filtered", "exact_duplicate", "near_duplicate"


# --- Ray Data UDFs (module level so workers import them by name) --------------------------------


def _read_files(batch: dict[str, np.ndarray], input_cfg: InputConfig, bad_records: str, batch_size: int):
    for index, uri, fmt in zip(batch["index"], batch["uri"], batch["format"]):
        yield from read_file(CorpusFile(int(index), str(uri), str(fmt)), input_cfg, bad_records, batch_size)


def _annotate(
    batch: dict[str, np.ndarray], filters: FilterConfig, hasher: MinHasher, num_bands: int, rows: int
) -> dict[str, np.ndarray]:
    """Normalise, filter, content-hash and MinHash one batch, keeping only the LSH band keys
    (B, bands) of the signature: 8 bytes a band instead of 4 a permutation. Rejected and filtered
    rows get zero keys and are never grouped."""
    n = len(batch["id"])
    texts = batch["text"].copy()
    status = batch["status"].copy()
    reason = batch["reason"].copy()
    content_hash = np.zeros(n, dtype=np.uint64)
    live = []
    for i in range(n):
        if status[i] == REJECTED:
            continue
        texts[i] = normalize(texts[i])
        failed = first_failure(texts[i], filters)
        if failed is not None:
            status[i], reason[i] = FILTERED, failed
            continue
        content_hash[i] = int.from_bytes(hashlib.blake2b(texts[i].encode(), digest_size=8).digest(), "little")
        live.append(i)
    band_key = np.zeros((n, num_bands), dtype=np.uint64)
    if live:
        band_key[live] = band_keys(hasher.signatures([texts[i] for i in live]), num_bands, rows)
    return {**batch, "text": texts, "status": status, "reason": reason,
            "content_hash": content_hash, "band_key": band_key}  # fmt: skip


def _live(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows that passed reading and the quality filters."""
    mask = batch["status"] == ""
    return {k: v[mask] for k, v in batch.items()}


def _kept(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mask = batch["status"] == KEPT
    return {"id": batch["id"][mask], "text": batch["text"][mask]}


def _group_keys(batch: dict[str, np.ndarray], exact: bool, near: bool) -> dict[str, np.ndarray]:
    """Rows to group on: the content hash (kind 0) and, if near, one LSH key per band (kind 1)."""
    keys, ids, kinds = [], [], []
    if exact:
        keys.append(batch["content_hash"])
        ids.append(batch["id"])
        kinds.append(np.zeros(len(batch["id"]), dtype=np.int8))
    if near:
        band = np.asarray(batch["band_key"])  # (B, bands)
        keys.append(band.reshape(-1))
        ids.append(np.repeat(batch["id"], band.shape[1]))
        kinds.append(np.ones(band.size, dtype=np.int8))
    # Mixing the kind into the key keeps the two groupings apart in one shuffle.
    kind = np.concatenate(kinds)
    return {"key": mix64(np.concatenate(keys) ^ kind.astype(np.uint64)), "id": np.concatenate(ids), "kind": kind}


def _pairs_in_partition(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All pairs sharing a key, within one hash partition (a key never spans partitions)."""
    out = []
    for kind in (0, 1):
        mask = batch["kind"] == kind
        pairs = bucket_pairs(batch["key"][mask], batch["id"][mask])  # (E, 2)
        out.append(np.concatenate([pairs, np.full((len(pairs), 1), kind)], axis=1))
    both = np.concatenate(out)
    return {"a": both[:, 0], "b": both[:, 1], "kind": both[:, 2].astype(np.int8)}


def _pair_sides(batch: dict[str, np.ndarray], pairs: np.ndarray, ngram: int) -> dict[str, np.ndarray]:
    """For each document in a candidate pair: (pair index, its shingle hashes), once per pair."""
    flat = pairs.reshape(-1)  # (2E,) side j of pair i at 2i + j
    order = np.argsort(flat, kind="stable")
    sorted_ids = flat[order]
    lo = np.searchsorted(sorted_ids, batch["id"], side="left")
    hi = np.searchsorted(sorted_ids, batch["id"], side="right")
    rows = np.flatnonzero(hi > lo)
    pair_index, shingle_sets = [], []
    if rows.size:
        hashes, doc = shingle_hashes([batch["text"][r] for r in rows], ngram)
        bounds = np.searchsorted(doc, np.arange(rows.size + 1))
        for j, r in enumerate(rows):
            own = np.unique(hashes[bounds[j] : bounds[j + 1]])
            for slot in order[lo[r] : hi[r]]:
                pair_index.append(slot // 2)
                shingle_sets.append(own)
    sets = np.empty(len(shingle_sets), dtype=object)
    sets[:] = shingle_sets
    return {"pair": np.array(pair_index, dtype=np.int64), "shingles": sets}


def _pair_jaccard(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exact Jaccard of each pair whose two sides landed in this partition."""
    order = np.argsort(batch["pair"], kind="stable")
    pair, sets = batch["pair"][order], batch["shingles"][order]
    first = np.flatnonzero((pair[1:] == pair[:-1]))  # (P,) index of side 0 of each pair
    jac = np.empty(first.size)
    for k, i in enumerate(first):
        a, b = np.asarray(sets[i]), np.asarray(sets[i + 1])
        inter = np.intersect1d(a, b, assume_unique=True).size
        jac[k] = inter / (a.size + b.size - inter) if (a.size + b.size) else 1.0
    return {"pair": pair[first], "jaccard": jac}


def _mark_duplicates(
    batch: dict[str, np.ndarray], dropped: np.ndarray, dup_of: np.ndarray, kind: np.ndarray, files: list[str]
) -> dict[str, np.ndarray]:
    """Final per-document status: kept, rejected, filtered, or a duplicate of which document."""
    n = len(batch["id"])
    status = np.where(batch["status"] == "", KEPT, batch["status"]).astype(object)
    of = np.full(n, -1, dtype=np.int64)
    if dropped.size:
        pos = np.minimum(np.searchsorted(dropped, batch["id"]), dropped.size - 1)
        hit = dropped[pos] == batch["id"]
        status[hit] = kind[pos[hit]]
        of[hit] = dup_of[pos[hit]]
    of_source = np.array([f"{files[i >> 32]}:{i & 0xFFFFFFFF}" if i >= 0 else "" for i in of], dtype=object)
    return {"id": batch["id"], "source": batch["source"], "text": batch["text"], "status": status,
            "reason": batch["reason"], "dup_of": of, "dup_of_source": of_source}  # fmt: skip


def _tokenize(batch: dict[str, np.ndarray], tokenizer_json: str) -> dict[str, np.ndarray]:
    tok = _cached_tokenizer(tokenizer_json)
    ids = [np.asarray(e.ids, dtype=np.int32) for e in tok.encode_batch(list(batch["text"]), add_special_tokens=False)]
    out = np.empty(len(ids), dtype=object)
    out[:] = ids
    return {"id": batch["id"], "input_ids": out}


_TOKENIZERS: dict[str, Any] = {}


def _cached_tokenizer(tokenizer_json: str) -> Any:
    """The tokenizer from its JSON, which travels with the task: a worker on another node cannot
    read the driver's (temporary) tokenizer directory."""
    from tokenizers import Tokenizer  # in the Ray Data worker that runs the UDF, once per process

    key = hashlib.blake2b(tokenizer_json.encode(), digest_size=16).hexdigest()
    if key not in _TOKENIZERS:
        tok = Tokenizer.from_str(tokenizer_json)
        # Corpus text is text: "<|endoftext|>" written in a document is split into ordinary pieces,
        # not read as the end of a document (only the packer puts the EOS id between documents).
        tok.encode_special_tokens = True
        _TOKENIZERS[key] = tok
    return _TOKENIZERS[key]


# --- driver helpers -----------------------------------------------------------------------------


def _parquet_files(folder: str) -> list[str]:
    """The Parquet files one ``write_parquet`` wrote (into a folder: a path or a URI), in write order.

    Ray Data names them ``<dataset uuid>_<write uuid>_<task index>-<block index>.parquet``. A
    directory given to ``read_parquet`` is read in the file system's listing order, which follows
    the random uuids: the document stream, hence the shards, changed between reruns of the same
    input. Sorted by (task index, block index), the files come back in the order they were written.
    """

    def write_order(path: str) -> tuple[int, int]:
        task, _, block = path.removesuffix(".parquet").rpartition("_")[2].partition("-")
        return int(task), int(block or 0)

    return sorted(storage.files_in(folder, ".parquet"), key=write_order)


def _collect(ds: Dataset, columns: list[str]) -> dict[str, np.ndarray]:
    """Pull a (small) dataset's columns into the driver."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in ds.iter_batches(batch_size=65536, batch_format="numpy"):
        for c in columns:
            parts[c].append(batch[c])
    return {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}


def _grouped(rows: Dataset, key: str, fn: Any, partitions: int, columns: list[str]) -> dict[str, np.ndarray]:
    """Hash-shuffle ``rows`` on ``key`` so equal keys share a partition, apply ``fn`` to each
    partition, and collect the (small) result."""
    out = rows.repartition(partitions, keys=[key]).map_batches(fn, batch_size=None, batch_format="numpy")
    return _collect(out, columns)


def _file_boundaries(num_files: int, partitions: int) -> list[int]:
    """Sort boundaries on document ids (``file_index << 32 | record``): contiguous runs of files,
    at most ``partitions`` of them. Without boundaries Ray Data samples the keys first and sorts
    into as many partitions as it guesses input blocks (200 for a Parquet folder), whatever the
    data size. (On a hundred documents the pass took 9-12 s either way: its cost there is fixed.)
    One file: one boundary past it, the second run empty."""
    runs = max(1, min(num_files, partitions))
    return [((k * num_files) // runs) << 32 for k in range(1, runs)] or [num_files << 32]


def _bands(cfg: DedupConfig) -> tuple[int, int]:
    if cfg.num_bands is not None and cfg.rows_per_band is not None:
        return cfg.num_bands, cfg.rows_per_band
    return optimal_bands(cfg.threshold, cfg.num_perm)


def _in_validation(ids: np.ndarray, fraction: float) -> np.ndarray:
    """A document's split is a pure function of its id: deterministic and streaming-friendly."""
    return (mix64(ids.astype(np.uint64)) % np.uint64(1_000_000)) < np.uint64(round(fraction * 1_000_000))


def _warn_unknown(corpus: Corpus) -> None:
    if corpus.unknown:
        shown = ", ".join(corpus.unknown[:5]) + (", ..." if len(corpus.unknown) > 5 else "")
        print(f"kiln data: warning: {len(corpus.unknown)} file(s) not read, of an unknown extension "
              f"(set data.input.format to read them): {shown}", flush=True)  # fmt: skip


def _link_tokenizer(run_dir: Path) -> None:
    """Make ``<run>/tokenizer`` a relative link to ``data/tokenizer``, once: a link into the folder
    that is renamed into place always finds the tokenizer of whatever data/ is there. An older
    run's real tokenizer directory is removed (until the new data/ is in place the link finds no
    tokenizer, never one that does not belong to data/)."""
    link, target = run_dir / "tokenizer", os.path.join("data", "tokenizer")
    if link.is_symlink() and os.readlink(link) == target:
        return
    # Temporaries that a crash leaves are removed by recover_interrupted.
    tmp, gone = (run_dir / f".tokenizer.tmp-{uuid.uuid4().hex[:8]}" for _ in range(2))
    tmp.symlink_to(target)
    if link.is_symlink() or link.exists():
        os.replace(link, gone)
    os.replace(tmp, link)
    if gone.is_dir() and not gone.is_symlink():
        shutil.rmtree(gone)
    else:
        gone.unlink(missing_ok=True)


def _print_summary(report: dict[str, Any]) -> None:
    d, t = report["documents"], report["tokens"]
    unknown = report["unread_files"]
    lines = [
        "kiln data: summary",
        *([f"  files not read      {unknown['count']:>10,}  (unknown extension)"] if unknown["count"] else []),
        f"  documents in        {d['in']:>10,}",
        f"  rejected (bad)      {d['rejected']:>10,}",
        *(f"  filter {k:<13}{v:>10,}" for k, v in report["filtered"].items()),
        f"  exact duplicates    {d['exact_duplicates']:>10,}",
        f"  near duplicates     {d['near_duplicates']:>10,}  ({report['near_dedup']['components']:,} components)",
        f"  kept                {d['kept']:>10,}",
        f"  tokens out          {t['packed']:>10,}  ({report['sequences']['train']:,} train + "
        f"{report['sequences']['validation']:,} val sequences of {report['seq_len']})",
        f"  time                {report['seconds']['total']:>10.1f} s",
        *([f"  shards              {report['outputs']['shards']}"] if report["outputs"] else []),
    ]
    print("\n".join(lines), flush=True)


# --- the stage ----------------------------------------------------------------------------------


def run(cfg: KilnConfig, force: bool = False) -> dict[str, Any]:
    """Run the data stage; returns its report. A finished stage is skipped unless ``force``."""
    if cfg.data is None:
        raise ValueError("config has no 'data' section")
    dcfg: DataConfig = cfg.data
    run_dir = cfg.run.dir
    out_dir, tok_dir = run_dir / "data", run_dir / "tokenizer"
    digest = cfg.digest("data")
    if (done := finished_summary(out_dir, "data", digest, force)) is not None:
        return done

    # Everything that can be checked without a cluster fails here, before any work starts.
    corpus = list_corpus_files(dcfg.input)
    files = corpus.files
    _warn_unknown(corpus)
    if dcfg.tokenizer.path is not None:
        load_tokenizer(dcfg.tokenizer.path)
    num_bands, rows = _bands(dcfg.dedup)
    hasher = MinHasher(num_bands * rows, dcfg.dedup.ngram, dcfg.dedup.seed)

    init_ray(cfg.ray)
    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic shards and tokenizer input
    partitions = dcfg.shuffle_partitions or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    recover_interrupted(run_dir)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    print(f"kiln data: {len(files)} file(s), MinHash {num_bands} bands x {rows} rows, "
          f"{dcfg.dedup.ngram}-gram shingles", flush=True)  # fmt: skip

    # Object storage: this attempt's own folder, committed by the rename of data/ (which names it).
    versions = cfg.run.stage_storage(STAGE)
    attempt = uuid.uuid4().hex[:8]
    with atomic_dir(out_dir) as work:
        out = str(work) if versions is None else storage.join(versions, attempt)
        scratch = storage.join(out, "_scratch")

        # 1. Read, normalise, filter, hash, sign: one streaming pass written to scratch.
        t = time.perf_counter()
        (
            ray.data.from_items([asdict(f) for f in files], override_num_blocks=len(files))
            .map_batches(_read_files, batch_size=1, batch_format="numpy",
                         fn_kwargs={"input_cfg": dcfg.input, "bad_records": dcfg.bad_records,
                                    "batch_size": dcfg.batch_size})  # fmt: skip
            .map_batches(_annotate, batch_size=dcfg.batch_size, batch_format="numpy",
                         fn_kwargs={"filters": dcfg.filters, "hasher": hasher, "num_bands": num_bands,
                                    "rows": rows})  # fmt: skip
            .write_parquet(storage.join(scratch, "annotated"))
        )
        annotated = _parquet_files(storage.join(scratch, "annotated"))
        seconds["read_filter_minhash"] = time.perf_counter() - t

        # 2. Group on content hashes and LSH band keys in one hash shuffle: exact duplicate pairs
        #    and near-duplicate candidate pairs.
        t = time.perf_counter()
        if dcfg.dedup.exact or dcfg.dedup.near:
            got = _grouped(
                ray.data.read_parquet(annotated, columns=["id", "status", "content_hash", "band_key"])
                .map_batches(_live, batch_format="numpy")
                .map_batches(_group_keys, batch_format="numpy",
                             fn_kwargs={"exact": dcfg.dedup.exact, "near": dcfg.dedup.near}),  # fmt: skip
                "key", _pairs_in_partition, partitions, ["a", "b", "kind"],
            )
        else:  # deduplication off: nothing to group, every live document is kept
            got = {"a": np.zeros(0, np.int64), "b": np.zeros(0, np.int64), "kind": np.zeros(0, np.int8)}
        pairs = np.stack([got["a"], got["b"]], axis=1).astype(np.int64).reshape(-1, 2)
        exact_dropped, exact_kept = components(np.unique(pairs[got["kind"] == 0], axis=0))
        seconds["group"] = time.perf_counter() - t

        # 3. Near duplicates among exact-dedup survivors: candidates (each exact duplicate
        #    replaced by the document it duplicates), verified by exact Jaccard, then components.
        t = time.perf_counter()
        candidates = pairs[got["kind"] == 1]
        if exact_dropped.size and candidates.size:
            pos = np.minimum(np.searchsorted(exact_dropped, candidates), exact_dropped.size - 1)
            candidates = np.where(exact_dropped[pos] == candidates, exact_kept[pos], candidates)
        candidates = np.unique(np.sort(candidates, axis=1), axis=0).reshape(-1, 2)
        candidates = candidates[candidates[:, 0] != candidates[:, 1]]
        near_stats = {"bands": num_bands, "rows_per_band": rows, "threshold": dcfg.dedup.threshold,
                      "candidate_pairs": len(candidates), "verified_pairs": len(candidates), "components": 0}  # fmt: skip
        if dcfg.dedup.verify_candidates and len(candidates):
            jac = _grouped(
                ray.data.read_parquet(annotated, columns=["id", "text", "status"])
                .map_batches(_live, batch_format="numpy")
                .map_batches(_pair_sides, batch_format="numpy",
                             fn_kwargs={"pairs": candidates, "ngram": dcfg.dedup.ngram}),  # fmt: skip
                "pair", _pair_jaccard, partitions, ["pair", "jaccard"],
            )
            similar = np.zeros(len(candidates), dtype=bool)
            similar[jac["pair"].astype(np.int64)] = jac["jaccard"] >= dcfg.dedup.threshold
            candidates = candidates[similar]
            near_stats["verified_pairs"] = len(candidates)
        near_dropped, near_kept = components(candidates)
        near_stats["components"] = int(np.unique(near_kept).size)
        seconds["near_dedup"] = time.perf_counter() - t

        # 4. The documents table: every record, its status, and what it duplicates, sorted by id
        #    (= file, line). The sort is what makes the stream below (tokenizer input, packing
        #    order) a function of the input: Ray Data's preserve_order still let the blocks of the
        #    first pass come back in another order now and then, and a rerun packed other shards.
        t = time.perf_counter()
        dropped = np.concatenate([exact_dropped, near_dropped])
        order = np.argsort(dropped)
        kind = np.array([EXACT] * exact_dropped.size + [NEAR] * near_dropped.size, dtype=object)
        # Near dedup ran on exact-dedup survivors only, so every dup_of is a kept document.
        dup_of = np.concatenate([exact_kept, near_kept])
        (
            ray.data.read_parquet(annotated, columns=["id", "source", "text", "status", "reason"])
            .map_batches(_mark_duplicates, batch_format="numpy",
                         fn_kwargs={"dropped": dropped[order], "dup_of": dup_of[order], "kind": kind[order],
                                    "files": [f.uri for f in files]})  # fmt: skip
            .sort("id", boundaries=_file_boundaries(len(files), partitions))
            .write_parquet(storage.join(out, "documents"))
        )
        storage.remove(scratch)
        documents = ray.data.read_parquet(_parquet_files(storage.join(out, "documents")))
        status_counts: Counter[str] = Counter()
        filter_counts: Counter[str] = Counter()
        # Rejected records are streamed to the file (inside the temporary data/ directory, so the
        # rename at the end keeps it atomic): memory stays flat however many records are bad.
        (work / "rejected").mkdir()
        with open(work / "rejected" / "rejected.jsonl", "w", encoding="utf-8") as rejected:
            for batch in documents.select_columns(["source", "text", "status", "reason"]).iter_batches(
                batch_size=65536, batch_format="numpy"
            ):
                status_counts.update(batch["status"].tolist())
                filter_counts.update(batch["reason"][batch["status"] == FILTERED].tolist())
                bad = batch["status"] == REJECTED
                for source, reason, raw in zip(batch["source"][bad], batch["reason"][bad], batch["text"][bad]):
                    rejected.write(json.dumps({"source": source, "reason": reason, "raw": raw}) + "\n")
        seconds["documents"] = time.perf_counter() - t

        # 5. Tokenizer: trained on the kept documents (streamed), or an existing one copied.
        t = time.perf_counter()
        kept = documents.select_columns(["id", "text", "status"]).map_batches(_kept, batch_format="numpy")
        if dcfg.tokenizer.path is not None:
            copy_hf_tokenizer(Path(dcfg.tokenizer.path), work / "tokenizer")
        else:
            limit = dcfg.tokenizer.max_training_documents
            source = kept.limit(limit) if limit else kept
            texts = (text for b in source.iter_batches(batch_size=1024, batch_format="numpy") for text in b["text"])
            save_hf_tokenizer(train_bpe(texts, dcfg.tokenizer, length=status_counts[KEPT]), work / "tokenizer")
        tokenizer = load_tokenizer(work / "tokenizer")
        tokenizer_json = (work / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8")
        seconds["tokenizer"] = time.perf_counter() - t

        # 6. Tokenise in parallel, pack in stream order into train / validation shards.
        t = time.perf_counter()
        seq_len = dcfg.pack.seq_len
        shard_dir = storage.join(out, "shards")
        packers = {s: Packer(seq_len, tokenizer.eos_token_id) for s in ("train", "validation")}
        writers = {s: ShardWriter(shard_dir, s, seq_len, dcfg.pack.sequences_per_shard) for s in packers}
        tokens_in = 0
        for batch in kept.map_batches(_tokenize, batch_size=dcfg.batch_size, batch_format="numpy",
                                      fn_kwargs={"tokenizer_json": tokenizer_json}).iter_batches(
                batch_size=None, batch_format="numpy"):  # fmt: skip
            val = _in_validation(batch["id"], dcfg.pack.validation_fraction)
            docs = list(batch["input_ids"])
            tokens_in += sum(len(d) + 1 for d in docs)  # +1: the EOS after each document
            for split, mask in (("train", ~val), ("validation", val)):
                writers[split].add(packers[split].add([d for d, m in zip(docs, mask) if m]))
        for w in writers.values():
            w.close()
        seconds["tokenize_pack"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0

        # 7. Report and marker, inside the directory that is renamed into place.
        report = {
            "inputs": [f.uri for f in files],
            # Files of a directory or glob left unread (unknown extension): the first 100 named.
            "unread_files": {"count": len(corpus.unknown), "names": corpus.unknown[:100]},
            # Object storage: where the shards and the documents table are (null: in data/).
            "outputs": None if versions is None else {"shards": shard_dir, "documents": storage.join(out, "documents")},
            "documents": {
                "in": sum(status_counts.values()),
                "rejected": status_counts[REJECTED],
                "filtered": status_counts[FILTERED],
                "exact_duplicates": status_counts[EXACT],
                "near_duplicates": status_counts[NEAR],
                "kept": status_counts[KEPT],
            },
            "filtered": dict(sorted(filter_counts.items())),
            "near_dedup": near_stats,
            "tokenizer": {"path": str(tok_dir), "vocab_size": len(tokenizer)},
            "tokens": {
                "in": tokens_in,
                "packed": sum(w.sequences for w in writers.values()) * seq_len,
                "leftover": sum(p.leftover for p in packers.values()),
            },
            "seq_len": seq_len,
            "sequences": {s: w.sequences for s, w in writers.items()},
            "shards": {s: w.shards for s, w in writers.items()},
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }
        atomic_write_json(work / storage.REPORT, report)
        mark_finished(work, STAGE, digest, report)
        _link_tokenizer(run_dir)
    if versions is not None:
        storage.remove_other_versions(versions, keep=attempt)  # only once data/ names this attempt
    _print_summary(report)
    return report
