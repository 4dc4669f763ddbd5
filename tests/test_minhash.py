"""MinHash / LSH math on hand-built inputs, checked against exact brute force."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from pipelines.data.minhash import (
    EMPTY,
    MinHasher,
    band_keys,
    bucket_pairs,
    components,
    estimated_jaccard,
    optimal_bands,
    shingle_hashes,
    shingle_sets,
)
from pipelines.data.text import jaccard, normalize, shingles, words

VOCAB = [f"w{i}q" for i in range(3000)]


def _doc(rng: random.Random, n: int = 150) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _mutate(rng: random.Random, text: str, rate: float) -> str:
    return " ".join(rng.choice(VOCAB) if rng.random() < rate else w for w in text.split())


def test_words_and_normalize() -> None:
    assert words("Hello, World! héllo_x 42") == [b"hello", b"world", "héllo_x".encode(), b"42"]
    assert normalize("a\u00a0 b  \r\nc\n\n\n\nd ") == "a b\nc\n\nd"
    assert normalize("e\u0301") == "\u00e9"  # NFC


@pytest.mark.parametrize("text", ["", "one", "a b c", "Hello, World! héllo wörld again and again", "x " * 40])
def test_shingle_hashes_match_reference_sets(text: str) -> None:
    hashes, docs = shingle_hashes([text, "padding doc with several words here"], 5)
    assert len(set(hashes[docs == 0].tolist())) == len(shingles(text, 5))


def test_shingle_sets_are_each_documents_sorted_unique_hashes() -> None:
    rng = random.Random(3)
    texts = ["", "x " * 40, "one", *(_doc(rng, rng.randrange(1, 60)) for _ in range(30)), "", "a a a a a a a"]
    hashes, docs = shingle_hashes(texts, 5)
    sets, offsets = shingle_sets(texts, 5)
    assert offsets.shape == (len(texts) + 1,) and offsets[0] == 0 and offsets[-1] == sets.size
    for j in range(len(texts)):
        assert sets[offsets[j] : offsets[j + 1]].tolist() == sorted(set(hashes[docs == j].tolist()))


def test_empty_document_gets_empty_signature() -> None:
    sig = MinHasher(16, 5).signatures(["", "some words here"])
    assert (sig[0] == EMPTY).all() and (sig[1] != EMPTY).all()


def test_signature_estimates_jaccard_without_bias() -> None:
    rng = random.Random(0)
    pairs = [(d, _mutate(rng, d, p)) for d in (_doc(rng) for _ in range(150)) for p in (0.01, 0.04, 0.1)]
    mh = MinHasher(128, 5, seed=1)
    est = estimated_jaccard(mh.signatures([a for a, _ in pairs]), mh.signatures([b for _, b in pairs]))
    exact = np.array([jaccard(a, b, 5) for a, b in pairs])
    sigma = np.sqrt(exact * (1 - exact) / 128)
    assert abs(np.mean(est - exact)) < 0.01  # unbiased
    assert np.mean(np.abs(est - exact) <= 3 * sigma + 1e-9) > 0.97  # variance as theory says


def test_signatures_are_each_documents_minimum_of_every_hash_function() -> None:
    """The kernel against the definition, in numpy's wrapping uint64 arithmetic: out[d, p] is the
    minimum over document d's shingle hashes x of (a[p] * x + b[p]) mod 2**64 >> 32."""
    rng = random.Random(5)
    texts = ["", "one", "x " * 40, *(_doc(rng, rng.randrange(1, 200)) for _ in range(25)), "", "a b c d e f"]
    mh = MinHasher(112, 5, seed=9)
    hashes, docs = shingle_hashes(texts, 5)
    a, b = mh._a, mh._b  # type: ignore[attr-defined]
    expected = np.full((len(texts), 112), EMPTY, dtype=np.uint32)
    for d in range(len(texts)):
        x = hashes[docs == d]
        if x.size:
            expected[d] = ((a[None, :] * x[:, None] + b[None, :]) >> np.uint64(32)).min(axis=0).astype(np.uint32)
    assert np.array_equal(mh.signatures(texts), expected)


def test_signatures_are_deterministic_and_batch_independent() -> None:
    rng = random.Random(3)
    docs = [_doc(rng) for _ in range(20)]
    mh = MinHasher(32, 5, seed=7)
    whole = mh.signatures(docs)
    assert np.array_equal(whole, np.concatenate([mh.signatures(docs[:7]), mh.signatures(docs[7:])]))
    assert not np.array_equal(whole, MinHasher(32, 5, seed=8).signatures(docs))


def test_band_keys_equal_exactly_when_band_rows_equal() -> None:
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [5, 2, 3, 4]], dtype=np.uint32)
    keys = band_keys(sig, num_bands=2, rows_per_band=2)
    assert keys[0, 0] == keys[1, 0] and keys[0, 0] != keys[2, 0]
    assert keys[0, 1] == keys[2, 1] and keys[0, 1] != keys[1, 1]
    assert keys[0, 0] != keys[0, 1]  # the band index is mixed in


def test_bucket_pairs_cliques_and_stars() -> None:
    keys = np.array([5, 5, 5, 7, 7, 9], dtype=np.uint64)
    ids = np.array([3, 1, 2, 8, 4, 6])
    assert bucket_pairs(keys, ids).tolist() == [[1, 2], [1, 3], [2, 3], [4, 8]]
    big = bucket_pairs(np.zeros(5, dtype=np.uint64), np.array([9, 8, 7, 6, 5]), max_clique=3)
    assert big.tolist() == [[5, 6], [5, 7], [5, 8], [5, 9]]  # a star to the smallest id
    window = bucket_pairs(np.zeros(5, dtype=np.uint64), np.array([9, 8, 7, 6, 5]), max_clique=3, neighbours=2)
    assert window.tolist() == [[5, 6], [5, 7], [5, 8], [5, 9], [6, 7], [6, 8], [7, 8], [7, 9], [8, 9]]
    wide = np.array([[5, 1], [5, 2], [5, 1], [7, 1]], dtype=np.uint64)  # (N, 2): a bucket needs both words equal
    assert bucket_pairs(wide, np.array([4, 3, 2, 1])).tolist() == [[2, 4]]


def test_exact_dedup_compares_all_128_bits_of_the_content_hash() -> None:
    """Two different documents whose content hashes share their first 64 bits (at a billion
    documents a few-in-a-hundred chance with 64-bit keys) are not exact duplicates; the same
    content is, through the shuffle's slices, whatever partition slice each row comes in."""
    from pipelines.data.dedup import partition_pairs
    from pipelines.data.parts import group_keys, split_by_partition

    ids = np.array([10, 11, 12, 13], dtype=np.int64)
    content = np.array([[1, 100], [1, 200], [1, 100], [2, 100]], dtype=np.uint64)  # 10 and 12 the same text
    rows = group_keys(ids, content, np.zeros((4, 0), np.uint64), exact=True, near=False)
    (part,) = split_by_partition(rows, 1)
    halves = [{k: v[:2] for k, v in part.items()}, {k: v[2:] for k, v in part.items()}]
    exact_pairs, candidates = partition_pairs(*halves)
    assert exact_pairs.tolist() == [[10, 12]] and candidates.size == 0


def test_components_keep_smallest_id() -> None:
    dropped, kept = components(np.array([[4, 2], [2, 9], [10, 11], [30, 20]]))
    assert dict(zip(dropped.tolist(), kept.tolist())) == {4: 2, 9: 2, 11: 10, 30: 20}
    empty = components(np.zeros((0, 2), dtype=np.int64))
    assert empty[0].size == 0 and empty[1].size == 0


def test_every_dup_of_is_a_kept_document_through_exact_then_near_chains() -> None:
    """Found in review: doc 3 is an exact copy of doc 2, which is a near copy of doc 1; doc 3's
    dup_of was doc 2, itself dropped (near). The Ray tasks' own functions, called directly."""
    from pipelines.data.dedup import duplicate_map, exact_and_candidates

    exact_pairs, lsh_pairs = np.array([[2, 3]]), np.array([[1, 3], [1, 2], [2, 3]])
    exact_map, candidates, _ = exact_and_candidates._function((exact_pairs, lsh_pairs))
    merged, stats = duplicate_map._function(exact_map, candidates)
    assert merged["dropped"].tolist() == [2, 3] and merged["dup_of"].tolist() == [1, 1]
    assert merged["kind"].tolist() == [1, 0]  # 2 near, 3 exact (of what was kept for it)
    assert not set(merged["dup_of"].tolist()) & set(merged["dropped"].tolist())
    assert (stats["exact_duplicates"], stats["near_duplicates"]) == (1, 1)


def test_optimal_bands_near_datasketch_defaults() -> None:
    b, r = optimal_bands(0.8, 112)
    assert b * r <= 112
    # The S-curve's midpoint (1/b)^(1/r) sits near the threshold.
    assert 0.7 < (1 / b) ** (1 / r) < 0.85


def test_lsh_pipeline_against_brute_force_exact_jaccard() -> None:
    """Signatures -> band keys -> bucket pairs -> exact verification finds the brute-force set."""
    rng = random.Random(11)
    base = [_doc(rng) for _ in range(120)]
    docs = base + [_mutate(rng, base[i], rng.choice([0.005, 0.01, 0.02, 0.08, 0.15])) for i in range(120)]
    ids = np.arange(len(docs), dtype=np.int64)
    truth = {(i, j) for i, j in itertools.combinations(range(len(docs)), 2) if jaccard(docs[i], docs[j], 5) >= 0.8}
    assert len(truth) > 30  # the test has positives to find
    keys = band_keys(MinHasher(112, 5).signatures(docs), 14, 8)  # (N, 14)
    cand = bucket_pairs(keys.reshape(-1), np.repeat(ids, 14))
    found = {(int(a), int(b)) for a, b in cand if jaccard(docs[a], docs[b], 5) >= 0.8}
    recall = len(found & truth) / len(truth)
    assert found <= truth  # verified pairs are exact
    assert recall >= 0.95


def test_a_large_bucket_of_edited_copies_is_found_whole() -> None:
    """Found in review: an LSH bucket of more than 16 documents gave only a star to its smallest
    id, and verification kept just the members >= 0.8 to that one document. 60 edited copies of a
    page (the page itself absent) are >= 0.8 to some of the others, not all: the star lost 11 of
    the 57 the exact-Jaccard graph drops. The stage's own grouping (``partition_pairs``) now adds
    a window of each member's next 15 and finds all 57."""
    from pipelines.data.dedup import partition_pairs

    rng = random.Random(0)
    page = _doc(rng, 400)
    docs = [_mutate(rng, page, 0.012) for _ in range(60)]
    ids = np.arange(len(docs), dtype=np.int64)
    truth = [(i, j) for i, j in itertools.combinations(range(len(docs)), 2) if jaccard(docs[i], docs[j], 5) >= 0.8]
    should_drop, _ = components(np.array(truth, dtype=np.int64))
    keys = band_keys(MinHasher(112, 5).signatures(docs), 14, 8)  # (N, 14), the band mixed into each key
    none = np.zeros(0, dtype=np.uint64)

    def dropped(candidates: np.ndarray) -> np.ndarray:
        verified = [(a, b) for a, b in candidates.tolist() if jaccard(docs[a], docs[b], 5) >= 0.8]
        return components(np.array(verified, dtype=np.int64).reshape(-1, 2))[0]

    exact, candidates = partition_pairs({"exact_key": none, "exact_check": none, "exact_id": ids[:0],
                                         "near_key": keys.reshape(-1), "near_id": np.repeat(ids, 14)})  # fmt: skip
    assert exact.size == 0
    assert dropped(candidates).tolist() == should_drop.tolist() and should_drop.size == 57
    star = bucket_pairs(keys.reshape(-1), np.repeat(ids, 14))
    assert dropped(star).size == 46  # what the star alone found


def test_wordless_documents_get_lsh_keys_of_their_own() -> None:
    """With the word filters off (a code corpus, say), documents of punctuation alone have no
    shingles and so one and the same signature: they all shared every bucket, and verification
    (Jaccard of two empty sets) made them near duplicates of each other. Identical ones are still
    exact duplicates; worded documents still meet in their buckets."""
    from pipelines.data.config import FilterConfig
    from pipelines.data.parts import annotate

    texts = ["!!! ??? ...", "--- *** +++ === ///", "(){}[]<>"] + ["the quick brown fox jumps over the lazy dog again"] * 2
    n = len(texts)
    batch = {"id": np.arange(n, dtype=np.int64) + (7 << 32), "source": np.array(["s"] * n, dtype=object),
             "text": np.array(texts, dtype=object), "status": np.array([""] * n, dtype=object),
             "reason": np.array([""] * n, dtype=object)}  # fmt: skip
    off = FilterConfig(**{name: None for name in FilterConfig.model_fields})
    _, _, keys = annotate(batch, off, MinHasher(112, 5), 14, 8, exact=True)
    assert len({k for row in keys[:3] for k in row.tolist()}) == 3 * 14  # no bucket shared, none within a document
    assert (keys[3] == keys[4]).all()


def test_an_empty_document_is_filtered_even_with_the_filters_off() -> None:
    """Found in review: a "" text field (or a blank file with text_unit: file) was kept with the
    filters off and added a lone end-of-text token to the shards."""
    from pipelines.data.config import FilterConfig
    from pipelines.data.parts import FILTERED, annotate

    texts = ["", "  \n\n \t ", "a real document"]
    batch = {"id": np.arange(3, dtype=np.int64), "source": np.array(["s"] * 3, dtype=object),
             "text": np.array(texts, dtype=object), "status": np.array([""] * 3, dtype=object),
             "reason": np.array([""] * 3, dtype=object)}  # fmt: skip
    off = FilterConfig(**{name: None for name in FilterConfig.model_fields})
    out, _, keys = annotate(batch, off, MinHasher(112, 5), 14, 8, exact=True)
    assert out["status"].tolist() == [FILTERED, FILTERED, ""] and out["reason"].tolist() == ["empty", "empty", ""]
    assert not keys[:2].any() and keys[2].all()
