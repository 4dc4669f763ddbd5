"""Pack token streams into fixed-length sequences and write them as Parquet shards.

Documents are joined with EOS and cut into ``seq_len`` blocks in stream order, so every token
appears exactly once and in order; only the final partial block (fewer than ``seq_len`` tokens)
is left over, and its size is reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.rundir import atomic_write_bytes
from pipelines.data.storage import resolve


class Packer:
    """Concatenates documents (each followed by EOS) and emits full ``seq_len`` blocks."""

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

    def add_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Append a raw token stream (each document's ids already followed by EOS)."""
        stream = np.concatenate([self._pending, np.asarray(tokens, dtype=np.int32)])
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

    def __init__(self, out_dir: Path | str, prefix: str, seq_len: int, rows_per_shard: int) -> None:
        self.fs, self.out_dir = resolve(str(out_dir))
        self.prefix = prefix
        self.seq_len, self.rows_per_shard = seq_len, rows_per_shard
        self._rows: list[np.ndarray] = []
        self._buffered = 0
        self.shards = 0
        self.sequences = 0

    def add(self, blocks: np.ndarray) -> None:
        if blocks.size:
            self._rows.append(blocks)
            self._buffered += len(blocks)
        while self._buffered >= self.rows_per_shard:
            all_rows = np.concatenate(self._rows)
            self._write(all_rows[: self.rows_per_shard])
            rest = all_rows[self.rows_per_shard :]
            self._rows, self._buffered = ([rest] if len(rest) else []), len(rest)

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
        name = f"{self.out_dir}/{self.prefix}-{self.shards:05d}.parquet"
        if isinstance(self.fs, pafs.LocalFileSystem):
            atomic_write_bytes(Path(name), sink.getvalue().to_pybytes())
        else:  # an object store's put is atomic
            with self.fs.open_output_stream(name) as out:
                out.write(sink.getvalue())
        self.shards += 1
        self.sequences += len(rows)
