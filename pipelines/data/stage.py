"""``kiln data CONFIG``: stream a corpus through Ray tasks into clean, deduplicated, packed shards.

A *part* is one input file; every pass runs one Ray task per part (``pipelines/data/parts.py``)
and the duplicate graph is built in Ray tasks too (``pipelines/data/dedup.py``). Read top to bottom:
  1. per part: read + normalise + quality-filter + content-hash + MinHash LSH keys, the records
     streamed to scratch Parquet, the keys returned already split by shuffle partition;
  2. one shuffle for both dedups: documents sharing a content hash (exact) or an LSH band key
     (near candidates); exact components, candidates re-pointed at exact survivors;
  3. candidates verified by the exact Jaccard of their shingle sets;
  4. near components; the duplicate map (dropped id -> kept id) stays in Ray's object store;
  5. the BPE tokenizer, trained on the first kept documents (a bounded sample by default); on the
     other cores meanwhile, per part, its slice of the documents table (every record, its status
     and what it duplicates) and its rejected records;
  6. per part: its kept documents tokenised; then, from the parts' stream sizes, each split's
     shards planned and written in parallel (one task per part that holds a shard's first
     token), byte for byte what one writer in id order would write;
  7. data_report.json and the stage marker.
The driver holds object references and counts, never documents, pairs or the duplicate map: its
memory does not grow with the corpus. Everything is built inside a temporary directory renamed
into place at the end, so a crash leaves the previous output (or none), and the output is a pure
function of the input (parts are named by index), so a rerun gives the same result. The tokenizer
is built in there too (``data/tokenizer``; ``<run>/tokenizer`` is a link to it), so one rename
installs the shards and their tokenizer together. With ``run.storage_path`` the shards and the
documents table go to object storage instead (``pipelines/data/storage.py``), named by the report
in ``data/``. Without it, on a multi-node cluster the run directory must be on a shared mount.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tokenizers import Tokenizer

from cluster.runtime import init_ray
from core.chat import EOS
from core.locations import remove
from core.rundir import (
    atomic_dir,
    atomic_write_json,
    files_stamp,
    finished_summary,
    inputs_changed,
    mark_finished,
    record_inputs,
    recover_interrupted,
)
from pipelines.config import KilnConfig
from pipelines.data import dedup, parts, storage
from pipelines.data.config import DataConfig, DedupConfig
from pipelines.data.corpus import Corpus, list_corpus_files
from pipelines.data.minhash import MinHasher, optimal_bands
from pipelines.data.packing import ShardPlan, plan_shards
from pipelines.data.parts import EXACT, FILTERED, KEPT, NEAR
from pipelines.data.tokenizer import (
    check_hf_tokenizer,
    copy_hf_tokenizer,
    load_tokenizer,
    save_hf_tokenizer,
)

STAGE = "data"
__all__ = ["EXACT", "FILTERED", "KEPT", "NEAR", "run"]


# --- driver helpers -----------------------------------------------------------------------------


def _bands(cfg: DedupConfig) -> tuple[int, int]:
    if cfg.num_bands is not None and cfg.rows_per_band is not None:
        return cfg.num_bands, cfg.rows_per_band
    return optimal_bands(cfg.threshold, cfg.num_perm)


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
    rows = [
        *([("files not read", f"{unknown['count']:>10,}  (unknown extension)")] if unknown["count"] else []),
        ("documents in", f"{d['in']:>10,}"),
        ("rejected (bad)", f"{d['rejected']:>10,}"),
        *((f"filter {k}", f"{v:>10,}") for k, v in report["filtered"].items()),
        ("exact duplicates", f"{d['exact_duplicates']:>10,}"),
        ("near duplicates", f"{d['near_duplicates']:>10,}  ({report['near_dedup']['components']:,} components)"),
        ("kept", f"{d['kept']:>10,}"),
        ("tokens out", f"{t['packed']:>10,}  ({report['sequences']['train']:,} train + "
                       f"{report['sequences']['validation']:,} val sequences of {report['seq_len']})"),
        ("time", f"{report['seconds']['total']:>10.1f} s"),
        *([("shards", report["outputs"]["shards"])] if report["outputs"] else []),
    ]
    width = max(len(label) for label, _ in rows) + 2
    lines = ["kiln data: summary", *(f"  {label:<{width}}{value}" for label, value in rows)]
    print("\n".join(lines), flush=True)


def _collect_rejected(scratch: str, work: Path) -> None:
    """The parts' rejected records into ``data/rejected/rejected.jsonl``, streamed in part order."""
    (work / "rejected").mkdir()
    with open(work / "rejected" / "rejected.jsonl", "wb") as rejected:
        storage.concatenate(storage.files_in(storage.join(scratch, "rejected"), ".jsonl"), rejected)


def _get(refs: list[Any], siblings: list[Any] = ()) -> list[Any]:
    """``ray.get`` that, when one task fails, cancels the others and waits for them to stop before
    raising: none may still be writing into the temporary output folder once it is removed. The
    failed tasks' other results (``siblings``) are read and dropped, so Ray does not log each of
    them again as an unhandled error."""
    try:
        return ray.get(refs)
    except BaseException:
        _stop(refs, siblings)
        raise


def _stop(refs: list[Any], siblings: list[Any] = ()) -> None:
    """Cancel the tasks of ``refs`` and wait until they and the tasks of ``siblings`` have ended."""
    for ref in refs:
        ray.cancel(ref)
    for ref in [*refs, *siblings]:
        with contextlib.suppress(Exception):
            ray.get(ref, timeout=60)


def _finish_and_pack(files: list[Any], scratch: str, out: str, dup_map: Any, tokenizer_json: str,
                     dcfg: DataConfig, eos_id: int) -> tuple[dict[str, ShardPlan], int]:  # fmt: skip
    """Pass 3 and the shards. Every part's ``finish_part`` is started at once; as their stream sizes
    come in, in part order, each split's shards that the parts so far complete are planned and
    written (one task per part holding a shard's first token), and a part's streams are let go
    once no later shard reads them, so the object store holds a few parts' tokens, not all.
    Returns each split's plan of the whole stream (its counts) and the tokens read."""
    splits = ("train", "validation")  # finish_part returns ((train, validation) sizes, their two streams)
    sizes_refs, streams = [], []  # streams[part][split]: None once no later shard needs it
    for f in files:
        size, *split_streams = parts.finish_part.remote(f.index, scratch, dup_map, tokenizer_json, dcfg, eos_id)
        sizes_refs.append(size)
        streams.append(split_streams)
    seq_len, rows = dcfg.pack.seq_len, dcfg.pack.sequences_per_shard
    sizes: tuple[list[int], list[int]] = ([], [])  # per split: the parts' stream sizes so far
    planned = [0, 0]  # per split: shards given to a task so far
    kept = [0, 0]  # per split: the first part whose stream is still held
    packing: list[Any] = []
    try:
        for k, ref in enumerate(sizes_refs):
            more = k + 1 < len(sizes_refs)
            for j, (split, size) in enumerate(zip(splits, ray.get(ref))):
                sizes[j].append(size)
                for task in plan_shards(sizes[j], seq_len, rows, planned[j], more).tasks:
                    packing.append(parts.pack_shards.remote(out, split, task, dcfg.pack,
                                                            *[streams[i][j] for i in task.parts]))  # fmt: skip
                    planned[j] = task.first_shard + task.shards
                ends = np.cumsum(sizes[j])
                while kept[j] <= k and ends[kept[j]] <= planned[j] * rows * seq_len:  # wholly before the next shard
                    streams[kept[j]][j] = None
                    kept[j] += 1
        ray.get(packing)
    except BaseException:
        _stop([*sizes_refs, *packing], [r for s in streams for r in s if r is not None])
        raise
    plans = {s: plan_shards(sizes[j], seq_len, rows) for j, s in enumerate(splits)}
    return plans, sum(map(sum, sizes))


def _why(reasons: Counter[str]) -> str:
    """The most common reasons of rejected records, for an error message ("" if none)."""
    return f" (most often: {dict(reasons.most_common(3))}; see data.input.text_field / format)" if reasons else ""


def corpus_stamps(run_dir: Path, corpus: Corpus) -> dict[str, str]:
    """What ``data/inputs.json`` records of a local corpus: one stamp of its files as listed, under
    a key inside the run (``<run>/data/corpus-files``, whatever the working directory)."""
    return {str(run_dir / "data" / "corpus-files"): files_stamp(run_dir, (Path(f.uri) for f in corpus.files))}


# --- the stage ----------------------------------------------------------------------------------


def run(cfg: KilnConfig, force: bool = False) -> dict[str, Any]:
    """Run the data stage; returns its report. A finished stage is skipped unless ``force``."""
    if cfg.data is None:
        raise ValueError("config has no 'data' section")
    dcfg: DataConfig = cfg.data
    run_dir = cfg.run.dir
    out_dir, tok_dir = run_dir / "data", run_dir / "tokenizer"
    digest = cfg.digest("data")
    recover_interrupted(run_dir)  # a kill during the last run's final rename: roll it forward first
    # An edited, added or removed local corpus file redoes the stage, as an edited input does any
    # stage's; a corpus gone since a finished run (deleted to save space), or in object storage (not
    # listed again for this: no network at a finished stage), is no evidence either way.
    t_stamp, corpus, stamps = time.perf_counter(), None, {}
    if all("://" not in p or p.startswith("file://") for p in dcfg.input.paths):
        try:
            corpus = list_corpus_files(dcfg.input)
        except OSError:  # CorpusNotFound among them
            corpus = None
        stamps = corpus_stamps(run_dir, corpus) if corpus else {}
    stamp_s = time.perf_counter() - t_stamp
    force = force or inputs_changed(out_dir, "data", stamps)
    if (done := finished_summary(out_dir, "data", digest, force)) is not None:
        return done

    # Everything that can be checked without a cluster fails here, before any work starts.
    corpus = corpus or list_corpus_files(dcfg.input)  # gone: raises, naming the path
    files = corpus.files
    uris = [f.uri for f in files]
    _warn_unknown(corpus)
    if dcfg.tokenizer.path is not None:
        check_hf_tokenizer(dcfg.tokenizer.path)
    bands = _bands(dcfg.dedup)
    hasher = MinHasher(bands[0] * bands[1], dcfg.dedup.ngram, dcfg.dedup.seed)

    init_ray(cfg.ray)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    partitions = dcfg.shuffle_partitions or 2 * cpus
    seconds: dict[str, float] = {"stamp_inputs": stamp_s}
    t0 = time.perf_counter()
    print(f"kiln data: {len(files)} file(s), MinHash {bands[0]} bands x {bands[1]} rows, "
          f"{dcfg.dedup.ngram}-gram shingles", flush=True)  # fmt: skip

    # Object storage: this attempt's own folder, committed by the rename of data/ (which names it).
    versions = cfg.run.stage_storage(STAGE)
    attempt = uuid.uuid4().hex[:8]
    with atomic_dir(out_dir) as work:
        out = str(work) if versions is None else storage.join(versions, attempt)
        scratch = storage.join(out, "_scratch")
        storage.make_dirs(scratch, storage.join(scratch, "rejected"), storage.join(out, "documents"),
                          storage.join(out, "shards"))  # fmt: skip

        # 1. Read, normalise, filter, hash, sign: one task per part, keys split for the shuffle.
        t = time.perf_counter()
        pass1 = [parts.annotate_part.options(num_returns=partitions + 1).remote(
                 f, dcfg, hasher, bands, partitions, scratch) for f in files]  # fmt: skip
        counts: list[parts.PartCounts] = _get([p[0] for p in pass1], [r for p in pass1 for r in p[1:]])
        seconds["read_minhash"] = time.perf_counter() - t

        # 2. Group on content hashes and LSH band keys (one shuffle): exact components, and the
        #    near-duplicate candidates among their survivors.
        t = time.perf_counter()
        dedup_on = dcfg.dedup.exact or dcfg.dedup.near
        if dedup_on:
            grouped = [dedup.group_partition.remote(*[p[1 + j] for p in pass1]) for j in range(partitions)]
            exact_map, candidates, num_ref = dedup.exact_and_candidates.remote(*grouped)
            num_candidates = _get([num_ref])[0]
        seconds["group"] = time.perf_counter() - t
        del pass1  # the key slices are no longer needed

        # 3. Verify candidates by exact Jaccard of their shingle sets.
        t = time.perf_counter()
        verified: list[Any] = []
        if dedup_on and dcfg.dedup.verify_candidates:
            shingles = [parts.part_shingles.remote(scratch, f.index, candidates, dcfg.dedup.ngram) for f in files]
            cuts = np.linspace(0, num_candidates, min(cpus, max(1, num_candidates)) + 1).astype(int)
            verified = [dedup.verify_candidates.remote(candidates, int(lo), int(hi), dcfg.dedup.threshold, *shingles)
                        for lo, hi in zip(cuts[:-1], cuts[1:])]  # fmt: skip
            _get(verified)
        seconds["verify"] = time.perf_counter() - t

        # 4. Near components; the duplicate map (dropped id -> kept id, kind) stays in Ray.
        t = time.perf_counter()
        if dedup_on:
            dup_map, stats_ref = dedup.duplicate_map.remote(exact_map, candidates, *verified)
            dup_stats = ray.get(stats_ref)
        else:  # deduplication off: nothing to group, every live document is kept
            dup_map = ray.put(dedup.empty_map())
            dup_stats = {"candidate_pairs": 0, "verified_pairs": 0, "components": 0, "exact_duplicates": 0,
                         "near_duplicates": 0}  # fmt: skip
        seconds["components"] = time.perf_counter() - t
        seconds["dedup_path"] = time.perf_counter() - t0

        live = sum(c.live for c in counts)
        kept = live - dup_stats["exact_duplicates"] - dup_stats["near_duplicates"]

        # 5. Tokenizer: trained on the kept documents (a bounded sample by default), or copied;
        #    meanwhile, on the other cores, each part's slice of the documents table.
        t = time.perf_counter()
        training: list[int | None] = [None, None]  # documents, bytes: none when copied
        trained = None
        if dcfg.tokenizer.path is None:  # submitted first: it is on the critical path
            trained = parts.train_tokenizer.remote(scratch, [f.index for f in files], dup_map, dcfg.tokenizer)
        tables = [parts.document_part.remote(f.index, scratch, out, dup_map, uris, dcfg) for f in files]
        if trained is None:
            copy_hf_tokenizer(Path(dcfg.tokenizer.path), work / "tokenizer")
            hf = load_tokenizer(work / "tokenizer")
            eos_id, vocab_size = hf.eos_token_id, len(hf)
        else:
            trained_json, *training = _get([trained], tables)[0]
            tok = Tokenizer.from_str(trained_json)
            save_hf_tokenizer(tok, work / "tokenizer")
            # Ours: its EOS is known, and AutoTokenizer's import (seconds) is not needed to find it.
            eos_id, vocab_size = tok.token_to_id(EOS), tok.get_vocab_size(with_added_tokens=True)
        tokenizer_json = (work / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8")
        seconds["tokenizer"] = time.perf_counter() - t

        # 6. Per part: its kept documents' tokens; each split's shards written in id order as the
        #    parts' sizes come in. Then the documents table's parts are all written.
        t = time.perf_counter()
        try:
            plans, tokens_in = _finish_and_pack(files, scratch, out, dup_map, tokenizer_json, dcfg, eos_id)
        except BaseException:
            _stop(tables)
            raise
        _get(tables)
        splits = tuple(plans)
        _collect_rejected(scratch, work)
        remove(scratch)
        seconds["documents_pack"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0 + stamp_s

        # 7. Report and marker, inside the directory that is renamed into place.
        sequences = {s: plans[s].sequences for s in splits}
        seq_len = dcfg.pack.seq_len
        filtered: Counter[str] = sum((c.filtered for c in counts), Counter())
        rejected_why: Counter[str] = sum((c.rejected_why for c in counts), Counter())
        if not sequences.get("train"):  # nothing is marked finished: pretraining would have no data
            raise ValueError(
                f"kiln data: no training sequence of {seq_len} tokens to write: {sum(c.records for c in counts):,} "
                f"records in, {sum(c.rejected for c in counts):,} rejected{_why(rejected_why)}, filtered {dict(filtered) or 0}, "
                f"{kept:,} kept with {tokens_in:,} tokens. Add data or loosen data.filters / data.pack.seq_len, then rerun"
            )
        if not sequences.get("validation"):
            print(f"kiln data: warning: no validation sequence (data.pack.validation_fraction "
                  f"{dcfg.pack.validation_fraction} of {kept:,} kept documents): no held-out loss", flush=True)  # fmt: skip
        report = {
            "inputs": uris,
            # Files of a directory or glob left unread (unknown extension): the first 100 named.
            "unread_files": {"count": len(corpus.unknown), "names": corpus.unknown[:100]},
            # Object storage: where the shards and the documents table are (null: in data/).
            "outputs": None if versions is None else {"shards": storage.join(out, "shards"),
                                                      "documents": storage.join(out, "documents")},  # fmt: skip
            "documents": {
                "in": sum(c.records for c in counts),
                "rejected": sum(c.rejected for c in counts),
                "filtered": sum(filtered.values()),
                "exact_duplicates": dup_stats["exact_duplicates"],
                "near_duplicates": dup_stats["near_duplicates"],
                "kept": kept,
            },
            "filtered": dict(sorted(filtered.items())),
            "near_dedup": {"bands": bands[0], "rows_per_band": bands[1], "threshold": dcfg.dedup.threshold,
                           **{k: dup_stats[k] for k in ("candidate_pairs", "verified_pairs", "components")}},
            # Trained here: the documents and UTF-8 bytes it was trained on (null: copied).
            "tokenizer": {"path": str(tok_dir), "vocab_size": vocab_size, "training_documents": training[0],
                          "training_bytes": training[1]},  # fmt: skip
            "tokens": {
                "in": tokens_in,
                "packed": sum(sequences.values()) * seq_len,
                "leftover": sum(plans[s].leftover for s in splits),
            },
            "seq_len": seq_len,
            "sequences": sequences,
            "shards": {s: plans[s].shards for s in splits},
            "parts": len(files),
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
        }
        atomic_write_json(work / storage.REPORT, report)
        record_inputs(work, stamps)
        mark_finished(work, STAGE, digest, report)
        _link_tokenizer(run_dir)
    if versions is not None:
        storage.remove_other_versions(versions, keep=attempt)  # only once data/ names this attempt
    _print_summary(report)
    return report

