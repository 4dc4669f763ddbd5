"""A deterministic, resumable stream of training rows from Parquet shards.

Data order is a pure function of (seed, epoch, position): every optimizer step reads a fixed
slice of a seeded permutation of the Parquet rows, each rank its own stride of it. The
checkpoint stores the step, so a resumed run reads exactly the rows an uninterrupted run would
have read next: none skipped, none repeated. (Ray Data's ``streaming_split`` hands blocks to
whichever worker asks first, so it cannot promise that.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.train.config import TrainConfig
from pipelines.train.losses import IGNORE


class RowStream:
    """Rows of Parquet files in an order fixed by (seed, epoch): files permuted, rows permuted.

    Position ``p`` of epoch ``e`` maps to one (file, row); a reader asks for positions, and keeps
    only the file(s) it is reading in memory, so the stream never loads the whole corpus.
    Every rank reads the same files and keeps its own stride of rows.
    """

    def __init__(self, files: tuple[str, ...], columns: tuple[str, ...], seed: int, shuffle: bool) -> None:
        self.files = files
        self.seed, self.shuffle = seed, shuffle
        schema = pq.read_schema(files[0]) if files else None
        self.columns = tuple(c for c in columns if schema is not None and c in schema.names)
        self.counts = np.array([pq.ParquetFile(f).metadata.num_rows for f in files], dtype=np.int64)
        self.total = int(self.counts.sum())
        self._cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def _file_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.files))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def _file_rows(self, epoch: int, file_index: int) -> dict[str, np.ndarray]:
        key = (epoch, file_index)
        if key not in self._cache:
            if len(self._cache) >= 2:  # a step touches at most two files
                self._cache.pop(next(iter(self._cache)))
            table = pq.read_table(self.files[file_index], columns=list(self.columns))
            rows = {c: _fixed_rows(table.column(c)) for c in self.columns}
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, file_index]).permutation(int(self.counts[file_index]))
                rows = {c: a[order] for c, a in rows.items()}
            self._cache[key] = rows
        return self._cache[key]

    def rows(self, epoch: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``positions`` (within ``epoch``) as {column: (len(positions), L) int64}; a
        scalar float column (DPO's reference log-probs) as (len(positions),) float64."""
        order = self._file_order(epoch)
        ends = np.cumsum(self.counts[order])
        slot = np.searchsorted(ends, positions, side="right")
        out: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        for s, p in zip(slot, positions):
            file_rows = self._file_rows(epoch, int(order[s]))
            row = int(p - (ends[s] - self.counts[order[s]]))
            for c in self.columns:
                out[c].append(file_rows[c][row])
        return {c: np.stack(v).astype(np.int64 if v[0].ndim else np.float64) for c, v in out.items()}


def trim_padding(rows: dict[str, np.ndarray], pad_id: int | None) -> dict[str, np.ndarray]:
    """Dynamic padding: cut a micro batch's right-padded token columns to its longest row.

    Rows are stored padded to ``seq_len``; the columns past every row's last real token only cost
    compute. Cutting them changes no result beyond float rounding: the models are causal (no real
    token attends to a later column), padding carries no loss (IGNORE labels) and the reward head
    reads each row's last real token. (The rounding does differ, as matrix shapes change: over 600
    SFT steps at LR 2e-3 it led to another model; docs/history.md.) The token columns are the 2-D ones: ``*labels`` pad with IGNORE, the others
    with ``pad_id``. A packed pretraining batch has no padding and comes back whole.

    Args:
        rows: {column: (B, L) tokens or (B,) scalars}, as ``RowStream.rows`` returns them.
        pad_id: The tokenizer's padding id (None: no padding to find; nothing is cut).

    Returns:
        The same columns, every 2-D one cut to the same width (at least one column).
    """
    if pad_id is None:
        return rows
    width = max(
        (_width((column != (IGNORE if name.endswith("labels") else pad_id)).any(axis=0))
         for name, column in rows.items() if column.ndim == 2),
        default=1,
    )  # fmt: skip
    return {name: column[:, :width] if column.ndim == 2 else column for name, column in rows.items()}


def _width(real_columns: np.ndarray) -> int:
    """Columns up to and including the last one holding a real token, at least one."""
    real = np.flatnonzero(real_columns)
    return int(real[-1]) + 1 if real.size else 1


def cut_to_longest(ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Right-padded (B, L) token ids cut to their longest row (at least one column), on any device:
    ``trim_padding`` for one column already in a tensor."""
    if pad_id is None:
        return ids
    return ids[:, : _width((ids != pad_id).any(dim=0).cpu().numpy())]


def _fixed_rows(column: Any) -> np.ndarray:
    """A fixed_size_list<int32>[L] column as an (N, L) array; a scalar column as (N,)."""
    col = column.combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        return col.to_numpy()
    return col.flatten().to_numpy().reshape(len(col), -1)


def step_positions(step: int, micro: int, rank: int, cfg: TrainConfig, epoch_rows: int) -> tuple[int, np.ndarray]:
    """(epoch, row positions) of one worker's micro batch: a pure function of the step.

    Optimizer step ``s`` consumes positions [s·G, (s+1)·G) of the epoch-concatenated stream,
    G = ``sequences_per_step``; each epoch uses its first ``epoch_rows`` (a multiple of G) rows.
    Within a step, micro batch k of rank r is the slice starting at (k·W + r)·M.
    """
    per_step = cfg.sequences_per_step
    steps_per_epoch = epoch_rows // per_step
    epoch, in_epoch = divmod(step, steps_per_epoch)
    start = in_epoch * per_step + (micro * cfg.num_workers + rank) * cfg.micro_batch_per_worker
    return epoch, np.arange(start, start + cfg.micro_batch_per_worker)
