"""The one JSONL reader: (line number, object) pairs, and errors that name ``file:line``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class BadRecord(ValueError):
    """A JSONL record that cannot be used; the message names the file and line."""


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line of ``path``.

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
                raise BadRecord(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            if not isinstance(record, dict):
                raise BadRecord(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record
