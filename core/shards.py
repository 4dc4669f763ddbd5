"""Cutting ``range(n)`` into contiguous, near-equal shards: one rule for data-parallel ranks
(``actors/trainable.py``) and for a pool of generators (``pipelines/eval/generation.py``)."""

from __future__ import annotations


def split(n: int, parts: int) -> list[slice]:
    """Contiguous, near-equal slices of ``range(n)``, the longer first: rank ``r`` of ``parts``
    takes slice ``r`` (empty when ``n < parts``)."""
    base, extra = divmod(n, parts)
    bounds = [0]
    for r in range(parts):
        bounds.append(bounds[-1] + base + (r < extra))
    return [slice(bounds[r], bounds[r + 1]) for r in range(parts)]
