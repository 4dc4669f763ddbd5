"""Pack token streams into fixed-length sequences and write them as Parquet shards.

Documents are joined with EOS and cut into ``seq_len`` blocks in stream order, so every token
appears exactly once and in order; only the final partial block (fewer than ``seq_len`` tokens)
is left over, and its size is reported.

A split's stream may come in parts (one per input file, tokenised in parallel). As the parts'
sizes become known, in part order, ``plan_shards`` cuts the stream so far into its shards and
gives each complete shard to the part holding its first token, so the shards can be written in
parallel, one task per part, while later parts are still being tokenised, and are byte for byte
what one writer reading the parts in order would write.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.locations import resolve
from core.rundir import atomic_write_bytes


@numba.njit(cache=True)
def eos_streams(ids: np.ndarray, lens: np.ndarray, in_val: np.ndarray, eos: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids (back to back, ``lens`` each) as the two splits' streams: each document of a
    split in order, followed by ``eos``; ``in_val`` says which documents are validation."""
    sizes = np.zeros(2, dtype=np.int64)
    for d in range(lens.size):
        sizes[1 if in_val[d] else 0] += lens[d] + 1
    train = np.empty(sizes[0], dtype=np.int32)
    val = np.empty(sizes[1], dtype=np.int32)
    t = v = src = 0
    for d in range(lens.size):
        n = lens[d]
        if in_val[d]:
            val[v : v + n] = ids[src : src + n]
            val[v + n] = eos
            v += n + 1
        else:
            train[t : t + n] = ids[src : src + n]
            train[t + n] = eos
            t += n + 1
        src += n
    return train, val


class Packer:
    """Concatenates documents (each followed by EOS) and emits full ``seq_len`` blocks: the packing
    of one process reading a corpus in order. The data stage builds the same stream per part
    (``parts.finish_part``) and cuts it with ``plan_shards``; tests build shards with this."""

    def __init__(self, seq_len: int, eos_id: int) -> None:
        self.seq_len = seq_len
        self.eos = np.array([eos_id], dtype=np.int32)
        self._pending = np.zeros(0, dtype=np.int32)  # fewer than seq_len tokens

    def add(self, docs: list[np.ndarray]) -> np.ndarray:
        """Append documents; return the blocks completed so far as (N, seq_len) int32."""
        parts = [self._pending]
        for ids in docs:
            parts.extend((np.asarray(ids, dtype=np.int32), self.eos))
        stream = np.concatenate(parts)
        n = stream.size // self.seq_len
        self._pending = stream[n * self.seq_len :]
        return stream[: n * self.seq_len].reshape(n, self.seq_len)

    @property
    def leftover(self) -> int:
        """Tokens in the final partial block, not emitted."""
        return int(self._pending.size)


class ShardWriter:
    """Writes (N, seq_len) blocks into Parquet shards of ``rows_per_shard`` sequences.

    Schema: one column ``input_ids``, fixed-size list<int32>[seq_len]. Each shard is written
    atomically, named ``{prefix}-{index:05d}.parquet``, into a folder or an object-store URI.
    """

    def __init__(self, out_dir: Path | str, prefix: str, seq_len: int, rows_per_shard: int,
                 first_shard: int = 0) -> None:  # fmt: skip
        self.fs, self.out_dir = resolve(str(out_dir))
        self.prefix = prefix
        self.seq_len, self.rows_per_shard = seq_len, rows_per_shard
        self._rows: list[np.ndarray] = []
        self._buffered = 0
        self._next = first_shard  # the next shard's number
        self.shards = 0
        self.sequences = 0

    def add(self, blocks: np.ndarray) -> None:
        if not blocks.size:
            return
        if self._buffered:  # complete the buffered shard first
            take = min(self.rows_per_shard - self._buffered, len(blocks))
            self._rows.append(blocks[:take])
            self._buffered += take
            blocks = blocks[take:]
            if self._buffered < self.rows_per_shard:
                return
            self._write(np.concatenate(self._rows))
            self._rows, self._buffered = [], 0
        full = len(blocks) // self.rows_per_shard * self.rows_per_shard
        for lo in range(0, full, self.rows_per_shard):  # slices of ``blocks``: nothing copied
            self._write(blocks[lo : lo + self.rows_per_shard])
        if full < len(blocks):
            self._rows, self._buffered = [blocks[full:]], len(blocks) - full

    def close(self) -> None:
        if self._buffered:
            self._write(np.concatenate(self._rows))
            self._rows, self._buffered = [], 0

    def _write(self, rows: np.ndarray) -> None:
        flat = pa.array(rows.reshape(-1), type=pa.int32())
        column = pa.FixedSizeListArray.from_arrays(flat, self.seq_len)
        table = pa.table({"input_ids": column})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        name = f"{self.out_dir}/{self.prefix}-{self._next:05d}.parquet"
        if isinstance(self.fs, pafs.LocalFileSystem):
            atomic_write_bytes(Path(name), sink.getvalue().to_pybytes())
        else:  # an object store's put is atomic
            with self.fs.open_output_stream(name) as out:
                out.write(sink.getvalue())
        self._next += 1
        self.shards += 1
        self.sequences += len(rows)


@dataclass(frozen=True)
class PackTask:
    """Shards ``first_shard`` ... ``first_shard + shards - 1`` of a split: tokens ``[start, stop)``
    of its whole stream, which lie in the parts ``parts`` (their indices), whose streams begin at
    ``offsets`` of the whole stream."""

    first_shard: int
    shards: int
    start: int
    stop: int
    parts: tuple[int, ...]
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class ShardPlan:
    """How a split's stream, given its parts' sizes, becomes shards."""

    tasks: list[PackTask]
    sequences: int
    shards: int
    leftover: int  # tokens after the last full sequence


def plan_shards(sizes: Sequence[int], seq_len: int, rows_per_shard: int, first_shard: int = 0,
                more: bool = False) -> ShardPlan:  # fmt: skip
    """Cut the concatenation of streams of ``sizes`` tokens into ``seq_len`` sequences and those into
    shards of ``rows_per_shard`` (the last may be shorter); one task per part that holds the first
    token of at least one of the shards from ``first_shard`` on writes those shards, reading ahead
    into later parts for the tail of its last one.

    With ``more``, ``sizes`` are the first parts only and others follow: only the full shards
    these parts complete are planned (a full shard's tokens do not depend on later parts), so
    shards can be written as the parts come in; the plan's counts are then those of these parts.
    """
    offsets = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
    total = int(offsets[-1])
    sequences = total // seq_len
    shard_tokens = rows_per_shard * seq_len
    num_shards = -(-sequences // rows_per_shard)
    ids = np.arange(first_shard, total // shard_tokens if more else num_shards, dtype=np.int64)
    starts = ids * shard_tokens
    stops = np.minimum(starts + shard_tokens, sequences * seq_len)
    owner = np.searchsorted(offsets, starts, side="right") - 1  # the part holding each shard's first token
    tasks = []
    for part in np.unique(owner):
        mine = np.flatnonzero(owner == part)
        start, stop = int(starts[mine[0]]), int(stops[mine[-1]])
        last = int(np.searchsorted(offsets, stop - 1, side="right") - 1)
        span = range(int(part), last + 1)
        tasks.append(PackTask(int(ids[mine[0]]), mine.size, start, stop, tuple(span),
                              tuple(int(offsets[p]) for p in span)))  # fmt: skip
    return ShardPlan(tasks, sequences, num_shards, total - sequences * seq_len)


def write_planned_shards(task: PackTask, streams: Sequence[np.ndarray], out_dir: Path | str, prefix: str,
                         seq_len: int, rows_per_shard: int) -> int:  # fmt: skip
    """Write ``task``'s shards from its parts' streams (in ``task.parts`` order); returns the rows."""
    pieces = [s[max(task.start - off, 0) : max(task.stop - off, 0)] for s, off in zip(streams, task.offsets)]
    tokens = np.concatenate([np.asarray(p, dtype=np.int32) for p in pieces])
    if tokens.size != task.stop - task.start:
        raise RuntimeError(f"{prefix} shards {task.first_shard}+: the parts' streams hold {tokens.size} of the "
                           f"{task.stop - task.start} tokens planned")  # fmt: skip
    writer = ShardWriter(out_dir, prefix, seq_len, rows_per_shard, first_shard=task.first_shard)
    writer.add(tokens.reshape(-1, seq_len))
    writer.close()
    return writer.sequences
