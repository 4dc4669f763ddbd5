"""The data stage's duplicate graph, built in Ray tasks: nothing per document reaches the driver.

  grouping keys (one slice per part and shuffle partition, from ``parts.annotate_part``)
    → ``group_partition`` × P    documents sharing a key: exact pairs and LSH candidate pairs
    → ``exact_and_candidates``    exact components; candidates re-pointed at exact survivors
    → ``verify_candidates`` × V  exact Jaccard of each candidate pair (shingles from ``part_shingles``)
    → ``duplicate_map``           near components; one sorted map: dropped id → kept id, kind

Every object lives in Ray's object store; the driver holds references and a few counts.
The shuffle is a plain map-reduce over object references (each part's keys are already split by
partition, so a reducer fetches exactly its slices): for this stage Ray Data's hash shuffle cost
~45 s of fixed start-up per shuffle on 2 CPUs (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import ray

from pipelines.data.minhash import MAX_CLIQUE, bucket_pairs, components

EMPTY_PAIRS = np.zeros((0, 2), dtype=np.int64)


def empty_map() -> dict[str, np.ndarray]:
    return {"dropped": np.zeros(0, np.int64), "dup_of": np.zeros(0, np.int64), "kind": np.zeros(0, np.int8)}


def partition_pairs(*slices: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """All pairs sharing a key within one shuffle partition (a key never spans partitions): exact
    pairs share all 128 bits of the content hash (``exact_key`` and ``exact_check``), candidates an
    LSH key (``near_key``); ``slices`` are ``parts.split_by_partition``'s, one per part. A large
    exact bucket is a star (its members are all one text); a large LSH bucket adds each member's
    next ``MAX_CLIQUE - 1`` members (its members need not all be near the smallest id).

    Returns:
        exact pairs (E0, 2) and LSH candidate pairs (E1, 2), int64, smaller id first.
    """
    def column(name: str) -> np.ndarray:
        return np.concatenate([s[name] for s in slices])

    exact_keys = np.stack([column("exact_key"), column("exact_check")], axis=1)
    near = bucket_pairs(column("near_key"), column("near_id"), neighbours=MAX_CLIQUE - 1)
    return bucket_pairs(exact_keys, column("exact_id")), near


group_partition = ray.remote(num_cpus=1)(partition_pairs)


def repoint(pairs: np.ndarray, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """Pairs with each dropped id replaced by the id it duplicates; self-pairs and repeats removed."""
    if dropped.size and pairs.size:
        pos = np.minimum(np.searchsorted(dropped, pairs), dropped.size - 1)
        pairs = np.where(dropped[pos] == pairs, kept[pos], pairs)
    pairs = np.unique(np.sort(pairs, axis=1), axis=0).reshape(-1, 2)
    return pairs[pairs[:, 0] != pairs[:, 1]]


@ray.remote(num_cpus=1, num_returns=3)
def exact_and_candidates(*grouped: tuple[np.ndarray, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Exact-duplicate components, the near-duplicate candidates among their survivors (E, 2), and E."""
    exact = np.concatenate([g[0] for g in grouped] or [EMPTY_PAIRS])
    dropped, kept = components(np.unique(exact, axis=0).reshape(-1, 2))
    candidates = repoint(np.concatenate([g[1] for g in grouped] or [EMPTY_PAIRS]), dropped, kept)
    exact_map = {"dropped": dropped, "dup_of": kept, "kind": np.zeros(dropped.size, np.int8)}
    return exact_map, candidates, len(candidates)


@numba.njit(cache=True)
def _jaccard_kernel(a_start: np.ndarray, a_end: np.ndarray, b_start: np.ndarray, b_end: np.ndarray,
                    hashes: np.ndarray) -> np.ndarray:  # fmt: skip
    """Jaccard of sorted, unique runs ``hashes[a_start[i]:a_end[i]]`` and ``hashes[b_start[i]:b_end[i]]``."""
    out = np.empty(a_start.size)
    for i in range(a_start.size):
        p, q, pe, qe = a_start[i], b_start[i], a_end[i], b_end[i]
        inter = 0
        while p < pe and q < qe:
            if hashes[p] == hashes[q]:
                inter += 1
                p += 1
                q += 1
            elif hashes[p] < hashes[q]:
                p += 1
            else:
                q += 1
        union = (a_end[i] - a_start[i]) + (b_end[i] - b_start[i]) - inter
        out[i] = inter / union if union else 1.0
    return out


def pair_jaccard(pairs: np.ndarray, shingles: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Exact Jaccard of each pair (E, 2), from the parts' shingle sets (ids ascending by part)."""
    ids = np.concatenate([s["ids"] for s in shingles])
    sizes = np.cumsum([0] + [s["hashes"].size for s in shingles[:-1]])
    starts = np.concatenate([s["offsets"][:-1] + base for s, base in zip(shingles, sizes)])
    ends = np.concatenate([s["offsets"][1:] + base for s, base in zip(shingles, sizes)])
    hashes = np.concatenate([s["hashes"] for s in shingles])
    a, b = np.searchsorted(ids, pairs[:, 0]), np.searchsorted(ids, pairs[:, 1])
    return _jaccard_kernel(starts[a], ends[a], starts[b], ends[b], hashes)


@ray.remote(num_cpus=1)
def verify_candidates(candidates: np.ndarray, lo: int, hi: int, threshold: float,
                      *shingles: dict[str, np.ndarray]) -> np.ndarray:  # fmt: skip
    """Which of ``candidates[lo:hi]`` have exact Jaccard >= ``threshold``: (hi - lo,) bool."""
    return pair_jaccard(candidates[lo:hi], list(shingles)) >= threshold


@ray.remote(num_cpus=1, num_returns=2)
def duplicate_map(exact: dict[str, np.ndarray], candidates: np.ndarray,
                  *verified: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:  # fmt: skip
    """Near-duplicate components of the verified candidates, merged with the exact map.

    Near dedup ran on exact-dedup survivors, and an exact duplicate whose original was then dropped
    as a near duplicate points at what that one duplicates: every ``dup_of`` is a kept document.

    Returns:
        the map (``dropped`` sorted, ``dup_of``, ``kind`` 0 exact / 1 near) and its counts.
    """
    similar = np.concatenate(verified) if verified else np.ones(len(candidates), dtype=bool)
    near_dropped, near_kept = components(candidates[similar])
    exact_of = exact["dup_of"]
    if near_dropped.size and exact_of.size:  # near_dropped is sorted (components)
        pos = np.minimum(np.searchsorted(near_dropped, exact_of), near_dropped.size - 1)
        exact_of = np.where(near_dropped[pos] == exact_of, near_kept[pos], exact_of)
    dropped = np.concatenate([exact["dropped"], near_dropped])
    order = np.argsort(dropped, kind="stable")
    merged = {"dropped": dropped[order], "dup_of": np.concatenate([exact_of, near_kept])[order],
              "kind": np.concatenate([exact["kind"], np.ones(near_dropped.size, np.int8)])[order]}  # fmt: skip
    stats = {"candidate_pairs": int(len(candidates)), "verified_pairs": int(similar.sum()),
             "components": int(np.unique(near_kept).size), "exact_duplicates": int(exact["dropped"].size),
             "near_duplicates": int(near_dropped.size)}  # fmt: skip
    return merged, stats
