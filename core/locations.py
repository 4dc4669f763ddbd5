"""Folders and files named by a local path or a URI, through pyarrow's filesystems: a plain path or
``file://`` URI is the local file system (a shared mount looks like one), ``s3://``, ``gs://`` ...
an object store. The data stage's outputs and the training stages' checkpoints under
``run.storage_path`` live in either."""

from __future__ import annotations

import os

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The file system and the path in it of a local path or a URI."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(location: str, *parts: str) -> str:
    """``location`` (a path or URI) and ``parts`` below it; a URI's query (``?endpoint_override=...``)
    stays at the end, where pyarrow reads it."""
    base, mark, query = location.partition("?") if "://" in location else (location, "", "")
    return "/".join([base.rstrip("/"), *parts]) + mark + query


def remove(location: str) -> None:
    """Delete a folder (path or URI) and everything in it, if it exists."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
