"""The one JSONL reader: (line number, object) pairs, and errors that name ``file:line``."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class BadRecord(ValueError):
    """A JSONL record that cannot be used; the message names the file and line."""


def read_jsonl(path: str | Path, torn_tail_ok: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line of ``path``.

    Args:
        path: the file.
        torn_tail_ok: for a file this program appends to (``metrics.jsonl``): a last line that
            is not JSON and has no newline is a record cut short by a crash (disk full, a kill
            mid-write); it is skipped with a warning. A broken line anywhere else, or one that
            was written whole (it ends with a newline), is still an error; and so is every broken
            line of an input file, whose last record may matter.

    Raises:
        BadRecord: a line is not JSON, or not a JSON object (``path:line: ...``).
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if torn_tail_ok and not line.endswith("\n"):  # only the last line can lack it
                    warnings.warn(f"{path}:{lineno}: skipped a record cut short by a crash ({e.msg})", stacklevel=2)
                    return
                raise BadRecord(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise BadRecord(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record
