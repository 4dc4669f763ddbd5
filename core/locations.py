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


def remove(location: str) -> None:
    """Delete a folder (path or URI) and everything in it, if it exists."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)
