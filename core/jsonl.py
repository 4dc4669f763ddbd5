"""The one JSONL reader: (line number, object) pairs, and errors that name ``file:line``."""

from __future__ import annotations

import json
import math
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
        BadRecord: a line is not UTF-8, not JSON (or JSON Python cannot hold: nested too deeply, an
            integer of more than 4,300 digits), or not a JSON object (``path:line: ...``).
    """
    with open(path, "rb") as f:  # lines end at "\n" only: a stray "\r" does not shift the line numbers
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            record, reason = parse_json(raw)
            if reason:
                if torn_tail_ok and not raw.endswith(b"\n"):  # only the last line can lack it
                    warnings.warn(f"{path}:{lineno}: skipped a record cut short by a crash ({reason})", stacklevel=2)
                    return
                raise BadRecord(f"{path}:{lineno}: {reason}")
            if not isinstance(record, dict):
                raise BadRecord(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def not_utf8(raw: bytes, e: UnicodeDecodeError) -> str:
    """Why ``raw`` is not text, in words: the first bad byte and where it is."""
    return f"not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"


def parse_json(raw: bytes) -> tuple[Any, str]:
    """(value, "") for one line of UTF-8 JSON, (None, why not) otherwise: also for JSON that Python
    cannot hold (nested too deeply, an integer of more than 4,300 digits). The one parser of a
    line, for this reader and the data stage's corpus reader."""
    try:
        return json.loads(raw.decode("utf-8")), ""
    except UnicodeDecodeError as e:
        return None, not_utf8(raw, e)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} (column {e.colno})"
    except RecursionError:  # json's decoder recurses once per nested array/object: ~1,000 levels
        return None, "JSON nested too deeply to parse"
    except ValueError as e:  # Python's limit on the digits of an integer
        return None, f"malformed JSON: {str(e).split(';')[0]}"


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) as None: JSON has no NaN, and the ``NaN`` that
    Python writes by default is refused by strict parsers (``jq``, JavaScript's ``JSON.parse``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
