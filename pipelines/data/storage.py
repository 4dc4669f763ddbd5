"""Where the data stage's outputs live, local or in object storage, and how later stages find them.

Paths and URIs both go through pyarrow's filesystems: a plain path or ``file://`` URI is the local
file system (what a shared mount looks like), ``s3://``, ``gs://`` ... an object store. A local
location is handed on as a plain path, a remote one as a URI, so readers (``pyarrow.parquet``) take
either.

Without ``run.storage_path`` the shards and the documents table are folders of ``<run>/data/``
and move into place with it. With it they are written to ``<storage_path>/<run name>/data/<tag>/``,
a fresh ``tag`` per attempt (an object store has no atomic rename of a folder); the attempt
commits when the local ``data/`` holding its ``data_report.json`` (which names the location) is
renamed into place, and older tags are deleted only after that.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import BinaryIO

import pyarrow.fs as pafs

from core.locations import join, resolve

REPORT = "data_report.json"


def display(uri: str, fs: pafs.FileSystem, path: str) -> str:
    """A path in ``fs`` as users and readers see it: plain when local, else with ``uri``'s scheme and
    its query (``?endpoint_override=...&region=...``: without it a reader resolved the name to
    another endpoint, AWS's for a MinIO bucket)."""
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    query = uri.partition("?")[2] if "://" in uri else ""
    return f"{uri.split('://', 1)[0]}://{path}" + (f"?{query}" if query else "")


def is_file(uri: str) -> bool:
    """Whether a local path or a URI names an existing file."""
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def files_in(location: str, suffix: str = "") -> list[str]:
    """The files directly in a folder (path or URI) whose name ends with ``suffix``, by name with
    numbers in order (``train-99999`` before ``train-100000``: shard and part numbers are padded to
    five digits, and a larger corpus passes that); [] when the folder does not exist."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = [display(location, fs, f.path) for f in infos if f.is_file and f.base_name.endswith(suffix)]
    return sorted(names, key=lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)])


def make_dirs(*locations: str) -> None:
    """Create folders (paths or URIs) and their parents; an object store needs none."""
    for location in locations:
        fs, path = resolve(location)
        fs.create_dir(path, recursive=True)


def concatenate(files: list[str], out: BinaryIO, chunk: int = 1 << 20) -> None:
    """Stream the bytes of ``files`` (paths or URIs), in order, into ``out`` (bounded memory)."""
    for name in files:
        fs, path = resolve(name)
        with fs.open_input_stream(path) as src:
            while data := src.read(chunk):
                out.write(data)


def remove_other_versions(versions: str, keep: str) -> None:
    """Delete every ``versions/<tag>`` folder but ``keep`` (attempts that crashed, or were replaced)."""
    fs, path = resolve(versions)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name != keep:
            fs.delete_dir(info.path)


def shards_location(run_dir: Path) -> str:
    """Where the data stage of the run in ``run_dir`` put its shards: the location its report
    names (object storage), else ``<run>/data/shards``."""
    report = run_dir / "data" / REPORT
    if report.is_file():
        outputs = json.loads(report.read_text()).get("outputs")
        if outputs:
            return str(outputs["shards"])
    return str(run_dir / "data" / "shards")


def shard_files(location: str, split: str) -> list[str]:
    """The ``<split>-NNNNN.parquet`` shards in a folder (path or URI), in shard order."""
    return [f for f in files_in(location, ".parquet") if f.rsplit("/", 1)[-1].startswith(f"{split}-")]
