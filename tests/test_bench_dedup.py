"""Fast checks of the near-dedup benchmark (bench/dedup.py), no Ray: the shared shingler is the
project's shingle definition, the peers find the planted near copies, the JSON rows have the
documented keys."""

from __future__ import annotations

import numpy as np
import pytest

from bench import dedup as bench
from pipelines.data.text import shingles

ROW_KEYS = {"method", "docs", "seconds", "docs_per_s", "vs_datasketch", "recall", "precision",
            "driver_peak_mb", "cluster_peak_mb", "startup_s"}  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog, and the dog sleeps on.",
        "Größe Straße: naïve CAFÉ déjà vu — 東京 は 大きい 都市 です; ünïcödé wörds stay whole",
        "three words only",
        "",
        "  ...  !!! ",
        "snake_case and CamelCase 42 x_1\n\nnew paragraph with tabs\tand more words here",
    ],
)
def test_shingle_set_is_the_projects_shingles_joined(text: str) -> None:
    assert bench.shingle_set(text) == {b" ".join(s) for s in shingles(text, bench.NGRAM)}


def test_shingle_set_on_generated_documents(tmp_path) -> None:
    corpus = bench.generate_corpus(50, tmp_path)
    for text in bench.read_texts(corpus):
        assert bench.shingle_set(text) == {b" ".join(s) for s in shingles(text, bench.NGRAM)}


def _planted_recall(run: bench.MethodRun, corpus: bench.Corpus) -> float:
    texts = bench.read_texts(corpus)
    true_pairs = corpus.planted[corpus.planted_jaccard >= bench.THRESHOLD]
    assert len(true_pairs) >= 20
    quality = bench.score(run, true_pairs, texts, {}, np.random.default_rng(0))
    return quality.recall


@pytest.mark.parametrize("peer", ["datasketch", "rensa"])
def test_peer_finds_planted_copies(peer: str, tmp_path) -> None:
    pytest.importorskip(peer)
    corpus = bench.generate_corpus(600, tmp_path)
    run = bench.PEERS[peer](corpus)
    assert _planted_recall(run, corpus) >= 0.9
    assert run.seconds > 0 and run.driver_peak_mb == run.cluster_peak_mb > 0
    assert np.all(run.kept < run.dropped)  # each dropped document points at its cluster's earliest


def test_two_process_datasketch_finds_what_datasketch_finds(tmp_path) -> None:
    """The peer on both cores (a pool sketches shards, this process indexes) decides as the
    one-process recipe does: the same hash, the same sketches, the same LSH."""
    corpus = bench.generate_corpus(600, tmp_path, docs_per_shard=150)
    one, two = bench.PEERS["datasketch"](corpus), bench.PEERS["datasketch x2"](corpus)
    assert np.array_equal(one.dropped, two.dropped) and np.array_equal(one.kept, two.kept)
    assert _planted_recall(two, corpus) >= 0.9 and two.cluster_peak_mb > two.driver_peak_mb > 0


def _row(method: str, docs: int, seconds: float, detail: dict | None = None) -> bench.Row:
    run = bench.MethodRun(seconds, 0.5, 100.0, 150.0, np.zeros(0, np.int64), np.zeros(0, np.int64), detail or {})
    return bench.Row(method, docs, run, bench.Quality(0.95, 0.9, 10, 10))


def test_row_json_keys_and_ratios() -> None:
    phases = bench.stage_phases({"read_filter_minhash": 1.0, "group": 2.0, "near_dedup": 3.0, "documents": 1.0,
                                 "tokenizer": 1.0, "tokenize_pack": 1.0, "total": 9.0})  # fmt: skip
    assert phases["dedup_path"] == 6.0
    new = {"read_minhash": 1.0, "group": 1.0, "verify": 1.0, "components": 1.0, "dedup_path": 4.5, "total": 8.0}
    assert bench.stage_phases(new)["dedup_path"] == 4.5
    rows = [
        _row("datasketch", 1000, 10.0),
        _row("rensa", 1000, 1.0),
        _row(bench.NEAR_DEDUP, 1000, 2.0, {"phases": phases}),
        _row("rensa", 5000, 2.0),  # datasketch skipped at this size
    ]
    baselines = bench.datasketch_baselines(rows)
    out = [bench.row_json(r, baselines.get(r.docs)) for r in rows]
    assert set(out[0]) == set(out[1]) == set(out[3]) == ROW_KEYS
    assert set(out[2]) == ROW_KEYS | {"phases"} and out[2]["phases"]["dedup_path"] == 6.0
    assert out[0]["vs_datasketch"] == 1.0 and out[1]["vs_datasketch"] == 10.0
    assert out[3]["vs_datasketch"] == 25.0  # 2,500 docs/s against datasketch's 100 docs/s at 1,000
    assert "vs datasketch at 1,000 docs" in bench.table(rows)
    assert bench.row_json(rows[1], None)["vs_datasketch"] is None


def test_peers_flag_takes_names_with_spaces_unquoted_and_size_caps() -> None:
    assert bench.parse_peers(["kiln", "stage,kiln", "kernel"]) == {"kiln kernel": None, bench.STAGE: None}
    assert bench.parse_peers(["kiln near-dedup, datasketch:100000"]) == {"datasketch": 100_000, bench.STAGE: None}
    with pytest.raises(SystemExit):
        bench.parse_peers(["nope"])
