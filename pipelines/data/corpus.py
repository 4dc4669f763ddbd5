"""Find corpus files and stream their records, with bad input named by file and line.

Files are resolved through pyarrow's filesystems, so local paths and object-store URIs (``s3://``,
``gs://``, ...) work alike; ``.gz`` and ``.zst`` files are decompressed as they stream. Reading is
a generator of small batches, and no record is read past ``data.input.max_document_bytes``: a
file of any size, or a line of any length, is read with bounded memory. Every record gets a
deterministic id ``file_index << 32 | record_number`` that also orders documents by (file,
position), and a human-readable ``source`` (``path:line``).
"""

from __future__ import annotations

import errno
import fnmatch
import functools
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.jsonl import not_utf8, parse_json
from core.locations import resolve
from pipelines.data.config import InputConfig
from pipelines.data.storage import display

Format = Literal["jsonl", "parquet", "text"]
REJECTED = "rejected"
_EXTENSIONS: dict[str, Format] = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "text",
}  # fmt: skip
_COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
_BOM = b"\xef\xbb\xbf"
_RAW_KEEP = 2000  # characters of a rejected record kept for the user to inspect
_MAX_RECORDS_PER_FILE = 1 << 32


class BadRecordError(ValueError):
    """A record that cannot be read, with the file and line in the message."""


class CorpusNotFound(FileNotFoundError):
    """A configured input path that matches no file."""


class CorpusUnreadable(OSError):
    """A listed file whose reading failed on the medium (a disk's I/O error, a connection lost past
    the object store's retries), not on its bytes: the stage stops; a rerun reads it whole."""


class CorpusFileGone(FileNotFoundError):
    """A file listed at the start that cannot be opened now (deleted, or its permissions changed):
    the stage stops rather than finish without its records."""


@dataclass(frozen=True)
class CorpusFile:
    """One input file. ``index`` is its position in the sorted list of all inputs."""

    index: int
    uri: str
    format: Format


def _compression(path: str) -> tuple[str, str | None]:
    """(the name without its compression suffix, the pyarrow codec or None)."""
    for suffix, codec in _COMPRESSION.items():
        if path.endswith(suffix):
            return path[: -len(suffix)], codec
    return path, None


def _format_of(path: str, configured: str) -> Format | None:
    """The file's format, or None: an unknown extension, or compressed Parquet (Parquet
    compresses its own pages, and its reader needs random access: not a compressed stream)."""
    name, codec = _compression(path)
    fmt = configured if configured != "auto" else next((f for ext, f in _EXTENSIONS.items() if name.endswith(ext)), None)
    return None if fmt == "parquet" and codec is not None else fmt  # type: ignore[return-value]


_KNOWN = f"{', '.join(_EXTENSIONS)}; JSONL and text optionally {' or '.join(_COMPRESSION)}"


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """Whether a path's ``/``-separated parts match a pattern's, as Python's ``glob(recursive=True)``
    does: ``*``, ``?`` and ``[...]`` within one part, never across ``/``; a ``**`` part matches any
    number of folders; a hidden name (``.git``, ``.cache.jsonl``) only a pattern part that starts
    with ``.`` (``**`` never descends into a hidden folder)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[k:], pattern[1:]) for k in range(len(parts) + 1) if not _hidden(parts[:k]))
    visible = not parts or not parts[0].startswith(".") or pattern[0].startswith(".")
    return bool(parts) and visible and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _hidden(parts: list[str]) -> bool:
    """Whether a name among ``parts`` is hidden (starts with ``.``, as ``.git`` or ``.DS_Store``)."""
    return any(p.startswith(".") for p in parts)


@dataclass(frozen=True)
class Corpus:
    """The files to read, and those a directory or glob holds that are left unread because
    their extension names no known format (``format: auto``), to be reported."""

    files: list[CorpusFile]
    unknown: list[str]


def _listing(fs: pafs.FileSystem, folder: str, recursive: bool, i: int, entry: str) -> list[str]:
    """The files in ``folder`` (or below it), or ``CorpusNotFound`` naming the config key when it
    cannot be listed: a folder it may not read, a name that is not UTF-8 (pyarrow decodes a name
    when it is read)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))
        return [f.path for f in infos if f.is_file]
    except UnicodeDecodeError as e:
        name = e.object[: e.end].decode("utf-8", errors="replace") if isinstance(e.object, bytes) else "?"
        raise CorpusNotFound(f"data.input.paths[{i}]: cannot list {entry!r}: a name in it is not UTF-8 "
                             f"({name!r}); rename it or name the files to read") from None  # fmt: skip
    except OSError as e:
        raise CorpusNotFound(f"data.input.paths[{i}]: cannot list {entry!r}: {e}") from None


def list_corpus_files(cfg: InputConfig) -> Corpus:
    """Every file the configured paths name: files, directories (recursively) or globs.

    With ``format: auto`` a file named on its own must have a known extension; a directory's or a
    glob's files of another extension are left out and listed in ``Corpus.unknown``.

    Raises:
        CorpusNotFound: a path matches no readable file, or names one file of an unknown
            extension (the message names the config key).
    """
    found: list[tuple[str, Format]] = []
    unknown: list[str] = []
    for i, entry in enumerate(cfg.paths):
        fs, path = resolve(entry)
        info = fs.get_file_info(path)  # a name that exists is that file or folder, "[" in it or not
        glob_at = min((path.find(c) for c in "*?[" if c in path), default=-1)
        if info.type == pafs.FileType.Directory:  # its hidden files and folders are not read, as glob's "**"
            below = len(path.rstrip("/").split("/"))
            matches = [f for f in _listing(fs, path, True, i, entry) if not _hidden(f.split("/")[below:])]
        elif info.type == pafs.FileType.File:
            if _format_of(path, cfg.format) is None:
                shown = display(entry, fs, path)
                if _format_of(_compression(path)[0], cfg.format) == "parquet":
                    raise CorpusNotFound(f"data.input.paths[{i}]: {shown!r} is compressed Parquet, which is not read: "
                                         "Parquet compresses its own pages; decompress the file")  # fmt: skip
                raise CorpusNotFound(
                    f"data.input.paths[{i}]: cannot tell the format of {shown!r} from its "
                    f"extension (known: {_KNOWN}); set data.input.format"
                )
            matches = [path]
        elif glob_at >= 0:
            base = path[: path.rfind("/", 0, glob_at) + 1] or "/"
            # Only a pattern with a folder part (dir/*/x, **) looks below the base's own files: a
            # walk of every subfolder failed on one it could not read (lost+found at a mount's root).
            rest = path[len(base) :]
            files_below = _listing(fs, base, "/" in rest or "**" in rest, i, entry)
            matches = [f for f in files_below if _glob_match(f.split("/"), path.split("/"))]
        else:
            matches = []
        files = [(display(entry, fs, m), fmt) for m in sorted(matches) if (fmt := _format_of(m, cfg.format))]
        skipped = [display(entry, fs, m) for m in sorted(matches) if _format_of(m, cfg.format) is None]
        if not files and skipped:
            raise CorpusNotFound(
                f"data.input.paths[{i}]: {entry!r} holds {len(skipped)} file(s), none of a known extension "
                f"(known: {_KNOWN}), e.g. {skipped[0]!r}; set data.input.format to read them"
            )
        if not files:
            raise CorpusNotFound(f"data.input.paths[{i}]: no corpus files match {entry!r}")
        found.extend(files)
        unknown.extend(skipped)
    unique = sorted(set(found))
    return Corpus([CorpusFile(index=i, uri=uri, format=fmt) for i, (uri, fmt) in enumerate(unique)],
                  sorted(set(unknown)))  # fmt: skip


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


@functools.cache
def _text_decoder(field: str) -> msgspec.json.Decoder[Any]:
    """A decoder of one JSON object's string ``field`` (its other fields skipped, never built)."""
    record = msgspec.defstruct("Record", [("value", str)], rename={"value": field})
    return msgspec.json.Decoder(record)


def _parse_json_line(raw: bytes, field: str) -> tuple[str | None, str]:
    """(text, "") for a good line, (None, reason) for a bad one.

    A line that msgspec reads as an object with a string ``field`` is done there: other fields are
    checked as JSON but not turned into Python objects (4x ``json.loads``' speed on ~1 KB records:
    0.023 s against 0.097 s for 25,000). Every other line goes through ``parse_json`` and the checks
    below, whose reasons name what is wrong. A number in another field longer than Python's
    4,300-digit limit is then no reason to drop the record: the text is all that is read.
    """
    try:
        return _text_decoder(field).decode(raw).value, ""
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        pass
    obj, reason = parse_json(raw)
    if reason:
        return None, reason
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if field not in obj:
        return None, f"no {field!r} field"
    value = obj[field]
    if not isinstance(value, str):
        return None, f"field {field!r} is {type(value).__name__}, expected a string"
    try:
        value.isascii() or value.encode("utf-8")  # isascii: a flag in CPython, so no cost for most text
    except UnicodeEncodeError as e:  # a \ud83d escape alone (an emoji cut in half): no UTF-8 form
        return None, f"field {field!r} is not valid Unicode (a lone surrogate \\u{ord(value[e.start]):04x} at character {e.start})"
    return value, ""


def _too_large(limit: int) -> str:
    return f"larger than data.input.max_document_bytes ({limit:,} bytes)"


def _lines(stream: io.BufferedReader, limit: int) -> Iterator[tuple[bytes, bool]]:
    """(line, too_long) for each line. No more than ``limit + 1`` bytes of a line are held: a longer
    line is returned cut there, and the rest of it is read past in bounded chunks."""
    while line := stream.readline(limit + 1):
        too_long = len(line) > limit and not line.endswith(b"\n")
        while too_long and (rest := stream.readline(1 << 20)) and not rest.endswith(b"\n"):
            pass
        yield line, too_long


def _is_text(column_type: pa.DataType) -> bool:
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or pa.types.is_string_view(
        column_type
    )


def _parquet_records(file: CorpusFile, cfg: InputConfig) -> Iterator[tuple[int, str | None, str, bytes]]:
    """Rows of a Parquet file's text column; a file without a string text column is one bad
    record (row 0) whose reason names the column and the rows left unread."""
    fs, path = resolve(file.uri)
    limit = cfg.max_document_bytes
    with fs.open_input_file(path) as f:
        reader = pq.ParquetFile(f)
        schema, rows = reader.schema_arrow, reader.metadata.num_rows
        if (columns := schema.names.count(cfg.text_field)) > 1:
            yield 0, None, f"{columns} columns are named {cfg.text_field!r} ({rows:,} rows not read)", b""
            return
        if cfg.text_field not in schema.names:
            reason = f"no column {cfg.text_field!r} (columns: {schema.names}); set data.input.text_field"
            yield 0, None, f"{reason} ({rows:,} rows not read)", b""
            return
        column_type = schema.field(cfg.text_field).type
        if not _is_text(column_type):
            reason = f"column {cfg.text_field!r} is {column_type}, expected a string"
            yield 0, None, f"{reason} ({rows:,} rows not read)", b""
            return
        row = 0
        for batch in reader.iter_batches(batch_size=1024, columns=[cfg.text_field]):
            column = batch.column(0)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                column = pc.cast(column, pa.large_string())  # dictionary or view: plain values
            sizes = pc.fill_null(pc.binary_length(column), 0).to_numpy()
            for value in _python_values(column, sizes > limit):
                row += 1
                if value is None:
                    yield row, None, f"{cfg.text_field!r} is null", b""
                elif isinstance(value, UnicodeDecodeError):
                    yield row, None, not_utf8(value.object, value), value.object[:_RAW_KEEP]
                elif isinstance(value, bytes):  # the first bytes of a value over the limit
                    yield row, None, _too_large(limit), value
                else:
                    yield row, value, "", b""


def _python_values(column: pa.Array, oversize: np.ndarray) -> list[Any]:
    """A string column's values as Python: str, None for a null, the UnicodeDecodeError of an
    undecodable value, and for a value over the size limit only its first ``_RAW_KEEP`` bytes, read
    from Arrow's buffer without a Python copy of the rest (one 300 MiB value: the process grew 1.27 GB
    instead of 1.57 GB; Arrow's decoded page is what is left)."""
    if not oversize.any():
        try:
            return column.to_pylist()
        except UnicodeDecodeError:  # Arrow does not check UTF-8 on read: find the bad values below
            pass
    # The values' byte offsets into the data buffer (a scalar of an oversize value would copy it).
    _, offsets_buffer, data = column.buffers()
    offset_type = np.int64 if pa.types.is_large_string(column.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[column.offset:]
    values: list[Any] = []
    for i in range(len(column)):
        if oversize[i]:
            start = int(offsets[i])
            values.append(data[start : min(start + _RAW_KEEP, int(offsets[i + 1]))].to_pybytes())
            continue
        try:
            values.append(column[i].as_py())
        except UnicodeDecodeError as e:
            values.append(e)
    return values


def _records(file: CorpusFile, cfg: InputConfig) -> Iterator[tuple[int, str | None, str, bytes]]:
    """(record number, text or None, reason if bad, raw bytes) for every record of one file."""
    if file.format == "parquet":
        yield from _parquet_records(file, cfg)
        return
    fs, path = resolve(file.uri)
    limit = cfg.max_document_bytes
    with fs.open_input_stream(path, compression=_compression(path)[1]) as raw_stream:
        stream = io.BufferedReader(raw_stream)  # type: ignore[arg-type]
        if stream.peek(3)[:3] == _BOM:  # a UTF-8 byte-order mark (Windows tools write one): not text
            stream.read(3)
        if file.format == "text" and cfg.text_unit == "file":
            raw = stream.read(limit + 1)  # never the whole of a huge file
            if len(raw) > limit:
                yield 1, None, _too_large(limit), raw[:_RAW_KEEP]
                return
            try:
                yield 1, raw.decode("utf-8"), "", raw
            except UnicodeDecodeError as e:
                yield 1, None, not_utf8(raw, e), raw
            return
        for number, (raw, too_long) in enumerate(_lines(stream, limit), start=1):
            if too_long:
                yield number, None, _too_large(limit), raw[:_RAW_KEEP]
                continue
            if not raw.strip():
                continue
            if file.format == "jsonl":
                text, reason = _parse_json_line(raw, cfg.text_field)
            else:
                try:
                    text, reason = raw.decode("utf-8").rstrip("\n"), ""
                except UnicodeDecodeError as e:
                    text, reason = None, not_utf8(raw, e)
            yield number, text, reason, raw


def read_file(
    file: CorpusFile, cfg: InputConfig, bad_records: str, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Stream one file as column batches: id, source, text, status ("" or "rejected"), reason.

    A record the file as a whole makes bad (unreadable, no text column) is record 0 of the file; a
    file unreadable past record n (cut short) keeps records 1..n and rejects record n + 1.

    Raises:
        BadRecordError: with ``bad_records == "fail"``, at the first bad record, naming the
            file and line (or row).
    """
    out = _Batcher(file, batch_size)
    number = 0  # the last record read
    try:
        for number, text, reason, raw in _records(file, cfg):
            if text is None:
                if bad_records == "fail":
                    raise BadRecordError(f"{file.uri}{f':{number}' if number else ''}: {reason}")
                kept = raw[: 4 * _RAW_KEEP].decode("utf-8", errors="replace")[:_RAW_KEEP]
                out.add(number, kept, REJECTED, reason)
            else:
                out.add(number, text)
            if out.full():
                yield out.take()
    except (FileNotFoundError, PermissionError) as e:
        raise CorpusFileGone(f"{file.uri}: listed as an input but cannot be opened now ({type(e).__name__}: "
                             f"{e.strerror or e}); the stage stops rather than finish without its records") from e
    except OSError as e:
        if not _transport_error(e):
            _reject_rest(file, out, number, bad_records, e)
        else:  # the disk or the network failed, not the file: a rerun can read it whole
            raise CorpusUnreadable(f"{file.uri}: reading failed after record {number} ({type(e).__name__}: {e}); the "
                                   "stage stops rather than finish without the rest of the file: rerun it") from e
    except (pa.ArrowInvalid, EOFError) as e:
        _reject_rest(file, out, number, bad_records, e)
    if out.ids:
        yield out.take()


# An I/O failure of the medium, not the file's bytes: the errno of a failed disk or connection, or
# an object store's transport error after its own retries (pyarrow's S3 and GCS errors carry no errno).
_TRANSPORT_ERRNOS = {errno.EIO, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ESTALE}  # fmt: skip
_TRANSPORT_WORDS = ("AWS Error", "NETWORK_CONNECTION", "Couldn't connect", "Connection reset", "timed out",
                    "google::cloud::Status")  # fmt: skip


def _transport_error(e: OSError) -> bool:
    return e.errno in _TRANSPORT_ERRNOS or any(w in str(e) for w in _TRANSPORT_WORDS)


def _reject_rest(file: CorpusFile, out: _Batcher, number: int, bad_records: str, e: Exception) -> None:
    """The file's bytes cannot be read as a whole (corrupt gzip or zstd, not Parquet, ...): one
    rejected record for it; or past a point (a compressed file cut short, a corrupt page): the
    records before it are kept, and the rejected record is the next one, saying the rest is lost."""
    where, why = (("", f"cannot read file: {e}") if not number else
                  (f":{number + 1}", f"cannot read past record {number}, the rest of the file is lost: {e}"))  # fmt: skip
    if bad_records == "fail":
        raise BadRecordError(f"{file.uri}{where}: {why}") from e
    out.add(number + 1 if number else 0, "", REJECTED, why)
