"""Reading corpora: formats, paths, and every bad-input case named by file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.config import InputConfig
from pipelines.data.corpus import REJECTED, BadRecordError, CorpusNotFound, list_corpus_files, read_file


def _read_all(path: Path, policy: str = "skip", **kw: object) -> list[dict]:
    cfg = InputConfig(paths=[str(path)], **kw)
    rows = []
    for f in list_corpus_files(cfg):
        for batch in read_file(f, cfg, policy, batch_size=2):
            rows += [dict(zip(batch, vals)) for vals in zip(*batch.values())]
    return rows


def _bad_jsonl(tmp_path: Path) -> Path:
    p = tmp_path / "c.jsonl"
    p.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": "broken\n'
        b"\n"
        b'{"body": "no text field"}\n'
        b'{"text": 42}\n'
        b'{"text": "bad byte \xff here"}\n'
        b'["not", "an", "object"]\n'
        b'{"text": "good two"}\n'
    )
    return p


def test_jsonl_skip_policy_keeps_good_and_names_every_bad_line(tmp_path: Path) -> None:
    rows = _read_all(_bad_jsonl(tmp_path))
    good = [r for r in rows if r["status"] == ""]
    bad = {int(r["source"].rsplit(":", 1)[1]): r["reason"] for r in rows if r["status"] == REJECTED}
    assert [r["text"] for r in good] == ["good one", "good two"]
    assert set(bad) == {2, 4, 5, 6, 7}  # line 3 is blank and skipped silently
    assert "malformed JSON" in bad[2]
    assert bad[4] == "no 'text' field"
    assert bad[5] == "field 'text' is int, expected a string"
    assert "not valid UTF-8" in bad[6] and "0xff" in bad[6]
    assert bad[7] == "expected a JSON object, got list"


def test_jsonl_fail_policy_names_file_and_line(tmp_path: Path) -> None:
    path = _bad_jsonl(tmp_path)
    with pytest.raises(BadRecordError, match=rf"{path}:2: malformed JSON"):
        _read_all(path, policy="fail")


def test_ids_are_unique_and_ordered_by_file_then_line(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(3)))
    rows = _read_all(tmp_path)
    assert [r["text"] for r in rows] == [f"{n} {i}" for n in ("a.jsonl", "b.jsonl") for i in range(3)]
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    assert rows[0]["source"].endswith("a.jsonl:1")


def test_gzip_parquet_and_text_formats(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write('{"text": "zipped"}\n')
    pq.write_table(pa.table({"text": ["p1", None, "p3"]}), tmp_path / "t.parquet")
    (tmp_path / "doc.txt").write_text("line one\nline two\n")
    rows = _read_all(tmp_path)
    texts = [r["text"] for r in rows if r["status"] == ""]
    assert texts == ["line one\nline two\n", "p1", "p3", "zipped"]
    null = [r for r in rows if r["status"] == REJECTED]
    assert len(null) == 1 and null[0]["source"].endswith("t.parquet:2") and "null" in null[0]["reason"]
    by_line = _read_all(tmp_path / "doc.txt", text_unit="line")
    assert [r["text"] for r in by_line] == ["line one", "line two"]


def test_parquet_without_the_text_column_fails_with_columns_named(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(BadRecordError, match=r"no column 'text' \(columns: \['body'\]\)"):
        _read_all(tmp_path / "t.parquet")


def test_unreadable_file_is_one_rejected_record_or_an_error(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl.gz").write_bytes(b"this is not gzip data at all")
    rows = _read_all(tmp_path)
    assert len(rows) == 1 and rows[0]["status"] == REJECTED and "cannot read file" in rows[0]["reason"]
    with pytest.raises(BadRecordError, match="broken.jsonl.gz: cannot read file"):
        _read_all(tmp_path, policy="fail")


def test_paths_that_match_nothing_name_the_config_key(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(CorpusNotFound, match=r"data.input.paths\[1\]: no corpus files match"):
        list_corpus_files(InputConfig(paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "*.parquet")]))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(CorpusNotFound, match="cannot tell the format"):
        list_corpus_files(InputConfig(paths=[str(tmp_path / "notes.md")]))
    globbed = list_corpus_files(InputConfig(paths=[str(tmp_path / "*.jsonl")]))
    assert [Path(f.uri).name for f in globbed] == ["a.jsonl"]
