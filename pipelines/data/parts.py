"""The data stage's per-part work: one Ray task per input file ("part") and pass.

A part is one input file, and a record's id is ``file_index << 32 | record_number``, so the part
that holds a document is ``id >> 32``: any task can route by id without a lookup. Each part goes
through three passes, each a Ray task that streams the file's records in batches (memory is one
batch plus what the pass returns):

1. ``annotate_part``: read, normalise, quality-filter, content-hash and MinHash; write the part's
   annotated records to scratch Parquet; return the grouping keys (content hash and LSH band keys)
   already split into the shuffle's partitions, one object each, so a reducer fetches only its own.
2. ``part_shingles``: the sorted shingle-hash sets of the part's documents that are in a candidate
   pair (near dedup's exact verification needs both sides' shingles).
3. ``finish_part``: the part's slice of the documents table (every record, its status and what it
   duplicates), its rejected records, and its kept documents tokenised into one token stream per
   split, left in the object store; as the parts' sizes come in, ``pack_shards`` tasks (one per
   part that holds a shard's first token, ``packing.plan_shards``) write the split's shards in
   parallel: the documents in id order, as one process reading the whole corpus would.

The output is a pure function of the input: parts are processed independently and named by index.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from core.locations import resolve
from pipelines.data import storage
from pipelines.data.config import DataConfig, FilterConfig, PackConfig, TokenizerConfig
from pipelines.data.corpus import REJECTED, CorpusFile, read_file
from pipelines.data.encode import CorpusEncoder
from pipelines.data.filters import any_filter_on, first_failure
from pipelines.data.minhash import EMPTY, MinHasher, band_keys, mix64, shingle_sets
from pipelines.data.packing import PackTask, eos_streams, write_planned_shards
from pipelines.data.text import normalize
from pipelines.data.tokenizer import train_bpe

KEPT, FILTERED, EXACT, NEAR = "kept", "filtered", "exact_duplicate", "near_duplicate"
DUPLICATE_KINDS = (EXACT, NEAR)  # the codes 0 and 1 of a duplicate map's ``kind``
_WORDLESS = np.uint64(0x5EED_0F_E3E7_D0C5)  # salts a wordless document's own LSH keys
ANNOTATED = pa.schema([("id", pa.int64()), ("source", pa.string()), ("text", pa.string()),
                       ("status", pa.string()), ("reason", pa.string())])  # fmt: skip
DOCUMENTS = pa.schema([*ANNOTATED, ("dup_of", pa.int64()), ("dup_of_source", pa.string())])


@dataclass
class PartCounts:
    """What ``annotate_part`` found in one part (small: no per-document state)."""

    records: int = 0
    rejected: int = 0
    filtered: Counter[str] = field(default_factory=Counter)
    # Rejected records by the kind of reason (its text up to the first ':'), at most 20 kinds:
    # what an error names when nothing is left to train on.
    rejected_why: Counter[str] = field(default_factory=Counter)

    def count_rejected(self, reasons: list[str]) -> None:
        self.rejected += len(reasons)
        for reason in reasons:
            kind = reason.split(":")[0][:80]
            if kind in self.rejected_why or len(self.rejected_why) < 20:
                self.rejected_why[kind] += 1

    @property
    def live(self) -> int:
        """Records that passed reading and the filters."""
        return self.records - self.rejected - sum(self.filtered.values())


def part_file(folder: str, index: int, suffix: str = "parquet") -> str:
    return storage.join(folder, f"part-{index:05d}.{suffix}")


# --- pass 1: read, filter, sign -----------------------------------------------------------------


def annotate(batch: dict[str, np.ndarray], filters: FilterConfig, hasher: MinHasher, num_bands: int,
             rows: int, exact: bool) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:  # fmt: skip
    """Normalise, filter, content-hash (if ``exact``: only exact dedup groups on it) and MinHash one
    batch of records.

    Returns:
        the batch with normalised text and updated status / reason; the content hash (B, 2)
        uint64 (128 bits: at a billion documents 64 would make two different ones the same key
        with odds of a few in a hundred) and the LSH band keys (B, bands) uint64 of each record,
        zero for rejected and filtered ones (and every content hash zero without ``exact``).
    """
    n = len(batch["id"])
    texts, status, reason = batch["text"].copy(), batch["status"].copy(), batch["reason"].copy()
    content_hash = np.zeros((n, 2), dtype=np.uint64)
    live = []
    check = any_filter_on(filters)
    for i in range(n):
        if status[i] == REJECTED:
            continue
        texts[i] = normalize(texts[i])
        # Nothing left (a "" text field, an empty file with text_unit: file): with the filters off it
        # was kept, and added a lone end-of-text token to the shards.
        failed = "empty" if not texts[i] else first_failure(texts[i], filters) if check else None
        if failed is not None:
            status[i], reason[i] = FILTERED, failed
            continue
        if exact:
            digest = hashlib.blake2b(texts[i].encode(), digest_size=16).digest()
            content_hash[i] = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")
        live.append(i)
    band_key = np.zeros((n, num_bands), dtype=np.uint64)
    if live:
        signatures = hasher.signatures([texts[i] for i in live])
        band_key[live] = band_keys(signatures, num_bands, rows)
        # A document without words has no shingles, and so the signature of every other one: it is
        # similar to nothing (identical ones are exact duplicates). Keys of its own (its id, salted
        # per band), or every such document of the corpus would be one bucket of candidate pairs.
        wordless = np.asarray(live)[(signatures == EMPTY).all(axis=1)]
        ids = batch["id"][wordless].astype(np.uint64)[:, None]
        band_key[wordless] = mix64(ids * np.uint64(num_bands) + np.arange(num_bands, dtype=np.uint64) + _WORDLESS)
    return {**batch, "text": texts, "status": status, "reason": reason}, content_hash, band_key


def group_keys(ids: np.ndarray, content_hash: np.ndarray, band_key: np.ndarray, exact: bool,
               near: bool) -> dict[str, np.ndarray]:  # fmt: skip
    """Rows to group on, two kinds in one shuffle: ``exact_*`` (if exact) one per document, keyed on
    the content hash's first 64 bits with the other 64 as ``exact_check`` (exact grouping compares
    both); ``near_*`` (if near) one per document and band, keyed on its LSH key. Keys are mixed
    with their kind (0 / 1), so the two kinds spread over the partitions independently."""
    none_u, none_i = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    return {
        "exact_key": mix64(content_hash[:, 0]) if exact else none_u,
        "exact_check": content_hash[:, 1] if exact else none_u,
        "exact_id": ids if exact else none_i,
        "near_key": mix64(band_key.reshape(-1) ^ np.uint64(1)) if near else none_u,
        "near_id": np.repeat(ids, band_key.shape[1]) if near else none_i,
    }


def split_by_partition(rows: dict[str, np.ndarray], partitions: int) -> list[dict[str, np.ndarray]]:
    """``group_keys``' rows cut into ``partitions`` slices by key, each kind (``exact_*``, ``near_*``)
    on its own ``<kind>_key``: equal keys always land in one slice."""
    slices: list[dict[str, np.ndarray]] = [{} for _ in range(partitions)]
    for kind in ("exact", "near"):
        which = (rows[f"{kind}_key"] % np.uint64(partitions)).astype(np.int64)
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(partitions + 1))
        for name in (n for n in rows if n.startswith(f"{kind}_")):
            column = rows[name][order]
            for p in range(partitions):
                slices[p][name] = column[bounds[p] : bounds[p + 1]]
    return slices


def _table(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    return pa.table({name: batch[name] for name in schema.names}, schema=schema)


def annotate_part_body(file: CorpusFile, dcfg: DataConfig, hasher: MinHasher, bands: tuple[int, int],
                       partitions: int, scratch: str) -> tuple[PartCounts, list[dict[str, np.ndarray]]]:  # fmt: skip
    counts = PartCounts()
    fs, path = resolve(part_file(scratch, file.index))
    ids, hashes, keys = [], [], []
    # Scratch is read back three times: on a local disk it is not compressed (snappy cost pass 1 7 %
    # of its time at 25k documents a part); in object storage the bytes cost more than the CPU.
    compression = "none" if isinstance(fs, pafs.LocalFileSystem) else "snappy"
    with pq.ParquetWriter(path, ANNOTATED, filesystem=fs, compression=compression) as writer:
        for raw in read_file(file, dcfg.input, dcfg.bad_records, dcfg.batch_size):
            batch, content_hash, band_key = annotate(raw, dcfg.filters, hasher, *bands, exact=dcfg.dedup.exact)
            writer.write_table(_table(batch, ANNOTATED))
            live = batch["status"] == ""
            counts.records += len(batch["id"])
            counts.count_rejected(batch["reason"][batch["status"] == REJECTED].tolist())
            counts.filtered.update(batch["reason"][batch["status"] == FILTERED].tolist())
            ids.append(batch["id"][live])
            hashes.append(content_hash[live])
            keys.append(band_key[live])
    rows = group_keys(np.concatenate(ids or [np.zeros(0, np.int64)]),
                      np.concatenate(hashes or [np.zeros((0, 2), np.uint64)]),
                      np.concatenate(keys or [np.zeros((0, bands[0]), np.uint64)]),
                      dcfg.dedup.exact, dcfg.dedup.near)  # fmt: skip
    return counts, split_by_partition(rows, partitions)


@ray.remote(num_cpus=1)
def annotate_part(file: CorpusFile, dcfg: DataConfig, hasher: MinHasher, bands: tuple[int, int],
                  partitions: int, scratch: str) -> tuple[Any, ...]:  # fmt: skip
    """Pass 1 of one part; returns ``partitions + 1`` objects: the counts, then one slice of
    grouping keys per shuffle partition (call with ``.options(num_returns=partitions + 1)``)."""
    counts, slices = annotate_part_body(file, dcfg, hasher, bands, partitions, scratch)
    return (counts, *slices)


# --- pass 2: shingle sets of candidate documents --------------------------------------------------


def _annotated_batches(scratch: str, index: int, columns: list[str], size: int = 4096) -> Iterator[pa.RecordBatch]:
    fs, path = resolve(part_file(scratch, index))
    with fs.open_input_file(path) as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=size, columns=columns)


def in_sorted(ids: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Whether each id is in ``sorted_ids`` (ascending): a binary search each. ``np.isin`` hashes
    its second argument on every call: with the duplicate map of a million documents (~95k dropped
    ids) that took 11 ms a 512-document batch, half of a part's tokenising."""
    if not sorted_ids.size:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return sorted_ids[pos] == ids


@ray.remote(num_cpus=1)
def part_shingles(scratch: str, index: int, candidates: np.ndarray, ngram: int) -> dict[str, np.ndarray]:
    """The shingle-hash sets of part ``index``'s documents that appear in ``candidates`` (E, 2).

    Returns:
        ``ids`` (M,) sorted, ``offsets`` (M + 1,) and ``hashes`` (S,) uint64: document ``ids[j]``'s
        sorted, unique shingle hashes are ``hashes[offsets[j]:offsets[j + 1]]``.
    """
    wanted = np.unique(candidates.reshape(-1))
    wanted = wanted[(wanted >> 32) == index]
    ids, texts = [], []
    if wanted.size:
        for batch in _annotated_batches(scratch, index, ["id", "text"]):
            batch_ids = batch.column(0).to_numpy()
            hit = np.flatnonzero(in_sorted(batch_ids, wanted))
            if hit.size:
                ids.append(batch_ids[hit])
                texts.extend(batch.column(1).take(pa.array(hit)).to_pylist())
    if not texts:
        return {"ids": np.zeros(0, np.int64), "offsets": np.zeros(1, np.int64), "hashes": np.zeros(0, np.uint64)}
    hashes, offsets = shingle_sets(texts, ngram)
    return {"ids": np.concatenate(ids), "offsets": offsets, "hashes": hashes}


# --- pass 3: documents table, tokenise, pack ------------------------------------------------------


def mark_duplicates(batch: dict[str, np.ndarray], dup_map: dict[str, np.ndarray],
                    files: list[str]) -> dict[str, np.ndarray]:  # fmt: skip
    """Final per-document status: kept, rejected, filtered, or a duplicate of which document."""
    n = len(batch["id"])
    status = np.where(batch["status"] == "", KEPT, batch["status"]).astype(object)
    of = np.full(n, -1, dtype=np.int64)
    dropped = dup_map["dropped"]
    if dropped.size:
        pos = np.minimum(np.searchsorted(dropped, batch["id"]), dropped.size - 1)
        hit = dropped[pos] == batch["id"]
        status[hit] = np.array(DUPLICATE_KINDS, dtype=object)[dup_map["kind"][pos[hit]]]
        of[hit] = dup_map["dup_of"][pos[hit]]
    of_source = np.array([f"{files[i >> 32]}:{i & 0xFFFFFFFF}" if i >= 0 else "" for i in of], dtype=object)
    return {**batch, "status": status, "dup_of": of, "dup_of_source": of_source}


_ENCODERS: dict[str, CorpusEncoder] = {}


def tokenize(texts: list[str], tokenizer_json: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the documents, back to back, and each one's count (no special tokens added;
    "<|endoftext|>" written in a document is ordinary text: only the packer puts the EOS id between
    documents). The tokenizer travels with the task as its JSON (a worker on another node cannot
    read the driver's temporary directory) and is built once per worker process."""
    key = hashlib.blake2b(tokenizer_json.encode(), digest_size=16).hexdigest()
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = CorpusEncoder(tokenizer_json)
    return _ENCODERS[key].encode_ragged(texts)


def in_validation(ids: np.ndarray, fraction: float) -> np.ndarray:
    """A document's split is a pure function of its id: deterministic and streaming-friendly."""
    return (mix64(ids.astype(np.uint64)) % np.uint64(1_000_000)) < np.uint64(round(fraction * 1_000_000))


def _rejected_lines(batch: dict[str, np.ndarray]) -> str:
    bad = batch["status"] == REJECTED
    return "".join(json.dumps({"source": s, "reason": r, "raw": t}) + "\n"
                   for s, r, t in zip(batch["source"][bad], batch["reason"][bad], batch["text"][bad]))  # fmt: skip


@ray.remote(num_cpus=1)
def document_part(index: int, scratch: str, out: str, dup_map: dict[str, np.ndarray], files: list[str],
                  dcfg: DataConfig) -> int:  # fmt: skip
    """Pass 3a of one part: its slice of the documents table (every record, its status and what it
    duplicates) and its rejected records. It needs no tokenizer, so it runs while one is trained.
    Returns the records written."""
    fs, path = resolve(part_file(storage.join(out, "documents"), index))
    rejected_fs, rejected_path = resolve(part_file(storage.join(scratch, "rejected"), index, "jsonl"))
    written = 0
    with pq.ParquetWriter(path, DOCUMENTS, filesystem=fs) as writer, \
            rejected_fs.open_output_stream(rejected_path) as rejected:  # fmt: skip
        for record_batch in _annotated_batches(scratch, index, ANNOTATED.names, dcfg.batch_size):
            batch = {name: record_batch.column(name).to_numpy(zero_copy_only=False) for name in ANNOTATED.names}
            batch = mark_duplicates(batch, dup_map, files)
            writer.write_table(_table(batch, DOCUMENTS))
            rejected.write(_rejected_lines(batch).encode())
            written += len(batch["id"])
    return written


@ray.remote(num_cpus=1, num_returns=3)
def finish_part(index: int, scratch: str, dup_map: dict[str, np.ndarray], tokenizer_json: str, dcfg: DataConfig,
                eos_id: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:  # fmt: skip
    """Pass 3b of one part: ``finish_part_body`` in a Ray task."""
    return finish_part_body(index, scratch, dup_map, tokenizer_json, dcfg, eos_id)


def finish_part_body(index: int, scratch: str, dup_map: dict[str, np.ndarray], tokenizer_json: str, dcfg: DataConfig,
                     eos_id: int) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:  # fmt: skip
    """Pass 3b of one part: its kept documents tokenised (those ``document_part`` marks kept).
    Returns the sizes of its two token streams (small: the driver plans the packing from them) and
    the streams, per split (train, validation) in id order: each document's ids followed by EOS.

    A module function, not the task's own body, because of what it calls: Ray ships a remote
    function by value, with every numba kernel its body names, and numba rebuilds such a copy
    without its disk cache, so each worker compiled ``eos_streams`` anew (~4 s on 2 CPUs, in every
    fresh worker's first part). Named from here, the kernel is the module's, cached
    (``tests/test_packing.py`` checks every remote function).
    """
    streams: dict[bool, list[np.ndarray]] = {False: [], True: []}  # in validation?
    dropped = dup_map["dropped"]
    for record_batch in _annotated_batches(scratch, index, ["id", "text", "status"], dcfg.batch_size):
        ids_col = record_batch.column(0).to_numpy()
        status = record_batch.column(2).to_numpy(zero_copy_only=False)
        kept = np.flatnonzero((status == "") & ~in_sorted(ids_col, dropped))
        texts = record_batch.column(1).take(pa.array(kept)).to_pylist()
        ids, lens = tokenize(texts, tokenizer_json)
        in_val = in_validation(ids_col[kept], dcfg.pack.validation_fraction)
        for split, stream in zip((False, True), eos_streams(ids, lens, in_val, eos_id)):
            streams[split].append(stream)
    train, val = (np.concatenate(streams[v]) if streams[v] else np.zeros(0, np.int32) for v in (False, True))
    return (train.size, val.size), train, val


@ray.remote(num_cpus=1)
def pack_shards(out: str, split: str, task: PackTask, pack: PackConfig, *streams: np.ndarray) -> int:
    """Write one planned run of a split's shards (``shards/<split>-NNNNN.parquet``) from the streams
    of the parts it spans (read zero-copy from the object store); returns the sequences written."""
    return write_planned_shards(task, streams, storage.join(out, "shards"), split, pack.seq_len,
                                pack.sequences_per_shard)  # fmt: skip


# --- the tokenizer's training documents -----------------------------------------------------------


def training_documents(scratch: str, parts: list[int], dropped: np.ndarray, max_documents: int | None,
                       max_bytes: int | None, taken: list[int]) -> Iterator[str]:  # fmt: skip
    """The tokenizer's training documents, streamed from scratch: the first kept documents in id
    order up to ``max_documents`` and ``max_bytes`` of UTF-8 (the document reaching it is the last;
    null: no bound). ``taken`` gets [documents, bytes] as they are yielded."""
    docs_left = math.inf if max_documents is None else max_documents
    bytes_left = math.inf if max_bytes is None else max_bytes
    taken[:] = [0, 0]
    for index in parts:
        for batch in _annotated_batches(scratch, index, ["id", "text", "status"]):
            status = batch.column(2).to_numpy(zero_copy_only=False)
            keep = np.flatnonzero((status == "") & ~in_sorted(batch.column(0).to_numpy(), dropped))
            sizes = np.cumsum(pc.binary_length(batch.column(1)).to_numpy(zero_copy_only=False)[keep])
            n = min(keep.size, docs_left, int(np.searchsorted(sizes, bytes_left, side="left")) + 1)
            yield from batch.column(1).take(pa.array(keep[:n])).to_pylist()
            size = int(sizes[n - 1]) if n else 0
            docs_left, bytes_left = docs_left - n, bytes_left - size
            taken[0], taken[1] = taken[0] + n, taken[1] + size
            if docs_left <= 0 or bytes_left <= 0:
                return


@ray.remote(num_cpus=1)
def train_tokenizer(scratch: str, parts: list[int], dup_map: dict[str, np.ndarray],
                    cfg: TokenizerConfig) -> tuple[str, int, int]:  # fmt: skip
    """Train the BPE tokenizer on ``training_documents`` (the config's bounds); returns the
    tokenizer's JSON and the documents and bytes it was trained on."""
    taken: list[int] = []
    docs = training_documents(scratch, parts, dup_map["dropped"], cfg.max_training_documents, cfg.max_training_bytes,
                              taken)  # fmt: skip
    tokenizer_json = train_bpe(docs, cfg).to_str()
    return tokenizer_json, taken[0], taken[1]
