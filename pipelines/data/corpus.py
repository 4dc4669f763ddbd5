"""Find corpus files and stream their records, with bad input named by file and line.

Files are resolved through pyarrow's filesystems, so local paths and object-store URIs (``s3://``,
``gs://``, ...) work alike. Reading is a generator of small batches: a file of any size is read
with bounded memory. Every record gets a deterministic id ``file_index << 32 | record_number``
that also orders documents by (file, position), and a human-readable ``source`` (``path:line``).
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data.config import InputConfig

Format = Literal["jsonl", "parquet", "text"]
REJECTED = "rejected"
_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text",
}  # fmt: skip
_RAW_KEEP = 2000  # characters of a rejected record kept for the user to inspect
_MAX_RECORDS_PER_FILE = 1 << 32


class BadRecordError(ValueError):
    """A record that cannot be read, with the file and line in the message."""


class CorpusNotFound(FileNotFoundError):
    """A configured input path that matches no file."""


@dataclass(frozen=True)
class CorpusFile:
    """One input file. ``index`` is its position in the sorted list of all inputs."""

    index: int
    uri: str
    format: Format


def _format_of(path: str, configured: str) -> Format | None:
    if configured != "auto":
        return configured  # type: ignore[return-value]
    name = path[:-3] if path.endswith(".gz") else path
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return None


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def _display(uri: str, fs: pafs.FileSystem, path: str) -> str:
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{uri.split('://', 1)[0]}://{path}"


def list_corpus_files(cfg: InputConfig) -> list[CorpusFile]:
    """Every file the configured paths name: files, directories (recursively) or globs.

    Raises:
        CorpusNotFound: a path matches no readable file (the message names the config key).
    """
    found: list[tuple[str, Format]] = []
    for i, entry in enumerate(cfg.paths):
        fs, path = _resolve(entry)
        glob_at = min((path.find(c) for c in "*?[" if c in path), default=-1)
        if glob_at >= 0:
            base = path[: path.rfind("/", 0, glob_at) + 1] or "/"
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            matches = [f.path for f in infos if f.is_file and fnmatch.fnmatch(f.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                matches = [f.path for f in infos if f.is_file and _format_of(f.path, cfg.format)]
            elif info.type == pafs.FileType.File:
                matches = [path]
            else:
                matches = []
        files = []
        for m in sorted(matches):
            fmt = _format_of(m, cfg.format)
            if fmt is None:
                raise CorpusNotFound(
                    f"data.input.paths[{i}]: cannot tell the format of {m!r} from its extension; "
                    "set data.input.format"
                )
            files.append((_display(entry, fs, m), fmt))
        if not files:
            raise CorpusNotFound(f"data.input.paths[{i}]: no corpus files match {entry!r}")
        found.extend(files)
    unique = sorted(set(found))
    return [CorpusFile(index=i, uri=uri, format=fmt) for i, (uri, fmt) in enumerate(unique)]


class _Batcher:
    """Accumulates records into column batches of ``size`` rows."""

    def __init__(self, file: CorpusFile, size: int) -> None:
        self.file, self.size = file, size
        self.ids: list[int] = []
        self.sources: list[str] = []
        self.texts: list[str] = []
        self.status: list[str] = []
        self.reasons: list[str] = []

    def add(self, number: int, text: str, status: str = "", reason: str = "") -> None:
        if number >= _MAX_RECORDS_PER_FILE:
            raise BadRecordError(f"{self.file.uri}: more than 2**32 records in one file")
        self.ids.append((self.file.index << 32) | number)
        self.sources.append(f"{self.file.uri}:{number}")
        self.texts.append(text)
        self.status.append(status)
        self.reasons.append(reason)

    def full(self) -> bool:
        return len(self.ids) >= self.size

    def take(self) -> dict[str, np.ndarray]:
        batch = {
            "id": np.array(self.ids, dtype=np.int64),
            "source": np.array(self.sources, dtype=object),
            "text": np.array(self.texts, dtype=object),
            "status": np.array(self.status, dtype=object),
            "reason": np.array(self.reasons, dtype=object),
        }
        self.__init__(self.file, self.size)  # type: ignore[misc]
        return batch


def _parse_json_line(raw: bytes, field: str) -> tuple[str | None, str]:
    """(text, "") for a good line, (None, reason) for a bad one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} (column {e.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if field not in obj:
        return None, f"no {field!r} field"
    value = obj[field]
    if not isinstance(value, str):
        return None, f"field {field!r} is {type(value).__name__}, expected a string"
    return value, ""


def _records(file: CorpusFile, cfg: InputConfig) -> Iterator[tuple[int, str | None, str, bytes]]:
    """(record number, text or None, reason if bad, raw bytes) for every record of one file."""
    fs, path = _resolve(file.uri)
    if file.format == "parquet":
        with fs.open_input_file(path) as f:
            reader = pq.ParquetFile(f)
            if cfg.text_field not in reader.schema_arrow.names:
                raise BadRecordError(
                    f"{file.uri}: no column {cfg.text_field!r} (columns: {reader.schema_arrow.names})"
                )
            column_type = reader.schema_arrow.field(cfg.text_field).type
            if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
                raise BadRecordError(
                    f"{file.uri}: column {cfg.text_field!r} is {column_type}, expected a string"
                )
            row = 0
            for batch in reader.iter_batches(batch_size=1024, columns=[cfg.text_field]):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if value is None:
                        yield row, None, f"{cfg.text_field!r} is null", b""
                    else:
                        yield row, value, "", b""
        return
    with fs.open_input_stream(path, compression="detect") as raw_stream:
        stream = io.BufferedReader(raw_stream)  # type: ignore[arg-type]
        if file.format == "text" and cfg.text_unit == "file":
            raw = stream.read()
            try:
                yield 1, raw.decode("utf-8"), "", raw
            except UnicodeDecodeError as e:
                yield 1, None, f"not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})", raw
            return
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            if file.format == "jsonl":
                text, reason = _parse_json_line(raw, cfg.text_field)
            else:
                try:
                    text, reason = raw.decode("utf-8").rstrip("\n"), ""
                except UnicodeDecodeError as e:
                    text, reason = None, f"not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
            yield number, text, reason, raw


def read_file(
    file: CorpusFile, cfg: InputConfig, bad_records: str, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Stream one file as column batches: id, source, text, status ("" or "rejected"), reason.

    Raises:
        BadRecordError: with ``bad_records == "fail"``, at the first bad record, naming the
            file and line (or row); with either policy, for a file that cannot be read at all.
    """
    out = _Batcher(file, batch_size)
    try:
        for number, text, reason, raw in _records(file, cfg):
            if text is None:
                if bad_records == "fail":
                    raise BadRecordError(f"{file.uri}:{number}: {reason}")
                kept = raw.decode("utf-8", errors="replace")[:_RAW_KEEP]
                out.add(number, kept, REJECTED, reason)
            else:
                out.add(number, text)
            if out.full():
                yield out.take()
    except (OSError, pa.ArrowInvalid, EOFError) as e:
        # Unreadable as a whole (corrupt gzip, not Parquet, ...): one rejected record for it.
        if bad_records == "fail":
            raise BadRecordError(f"{file.uri}: cannot read file: {e}") from e
        out.add(0, "", REJECTED, f"cannot read file: {e}")
    if out.ids:
        yield out.take()
