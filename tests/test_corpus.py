"""Reading corpora: formats, paths, and every bad-input case named by file and line."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.config import InputConfig
from pipelines.data.corpus import REJECTED, BadRecordError, CorpusNotFound, list_corpus_files, read_file


def _read_all(path: Path, policy: str = "skip", **kw: object) -> list[dict]:
    cfg = InputConfig(paths=[str(path)], **kw)
    rows = []
    for f in list_corpus_files(cfg).files:
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


def test_lines_pythons_json_parses_but_cannot_keep_are_rejected_not_a_crash(tmp_path: Path) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text(
        '{"text": "an emoji cut in half \\ud83d by a scraper"}\n'  # a lone surrogate: no UTF-8 form
        '{"text": ' + "1" * 5000 + "}\n"  # past Python's 4,300-digit int parsing limit
        '{"text": "kept", "n": ' + "1" * 5000 + "}\n"  # the same in a field that is never read
        '{"text": "good"}\n'
    )
    rows = _read_all(p)
    assert [r["text"] for r in rows if r["status"] == ""] == ["kept", "good"]
    bad = [(r["source"].rsplit(":", 1)[1], r["reason"]) for r in rows if r["status"] == REJECTED]
    assert bad[0] == ("1", "field 'text' is not valid Unicode (a lone surrogate \\ud83d at character 21)")
    assert bad[1][0] == "2" and bad[1][1].startswith("malformed JSON: Exceeds the limit (4300 digits)")
    assert len(bad) == 2
    with pytest.raises(BadRecordError, match=rf"{p}:1: field 'text' is not valid Unicode"):
        _read_all(p, policy="fail")


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


def test_parquet_without_a_string_text_column_is_a_bad_record_under_either_policy(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "missing.parquet")
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "numbers.parquet")
    pq.write_table(pa.table({"text": ["fine"]}), tmp_path / "ok.parquet")
    rows = _read_all(tmp_path)
    bad = {r["source"]: r["reason"] for r in rows if r["status"] == REJECTED}
    assert [r["text"] for r in rows if r["status"] == ""] == ["fine"]
    assert bad == {
        f"{tmp_path / 'missing.parquet'}:0": "no column 'text' (columns: ['body']); set data.input.text_field "
        "(2 rows not read)",
        f"{tmp_path / 'numbers.parquet'}:0": "column 'text' is int64, expected a string (3 rows not read)",
    }
    with pytest.raises(BadRecordError, match=r"missing\.parquet: no column 'text' \(columns: \['body'\]\)"):
        _read_all(tmp_path / "missing.parquet", policy="fail")
    with pytest.raises(BadRecordError, match=r"numbers\.parquet: column 'text' is int64, expected a string"):
        _read_all(tmp_path / "numbers.parquet", policy="fail")


def test_dictionary_encoded_parquet_text_is_read(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}), tmp_path / "d.parquet")
    assert [r["text"] for r in _read_all(tmp_path)] == ["a", "b", "a"]


def test_unreadable_file_is_one_rejected_record_or_an_error(tmp_path: Path) -> None:
    (tmp_path / "broken.jsonl.gz").write_bytes(b"this is not gzip data at all")
    rows = _read_all(tmp_path)
    assert len(rows) == 1 and rows[0]["status"] == REJECTED and "cannot read file" in rows[0]["reason"]
    with pytest.raises(BadRecordError, match="broken.jsonl.gz: cannot read file"):
        _read_all(tmp_path, policy="fail")


def test_a_file_cut_short_keeps_what_was_read_and_names_where_it_stopped(tmp_path: Path) -> None:
    """A compressed file cut short (an interrupted download) was "cannot read file", record 0, while
    the records before the cut went into the shards: the reason now says where reading stopped."""
    lines = b"".join(json.dumps({"text": f"document number {i} " + "word " * 20}).encode() + b"\n" for i in range(4000))
    whole = gzip.compress(lines)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    rows = _read_all(tmp_path)
    kept, bad = [r for r in rows if r["status"] == ""], [r for r in rows if r["status"] == REJECTED]
    assert 0 < len(kept) < 4000 and [r["text"] for r in kept] == [f"document number {i} " + "word " * 20
                                                                  for i in range(len(kept))]  # fmt: skip
    assert len(bad) == 1 and bad[0]["source"].endswith(f"cut.jsonl.gz:{len(kept) + 1}")
    assert f"cannot read past record {len(kept)}, the rest of the file is lost" in bad[0]["reason"]
    with pytest.raises(BadRecordError, match=rf"cut\.jsonl\.gz:{len(kept) + 1}: cannot read past record {len(kept)}"):
        _read_all(tmp_path, policy="fail")


def test_paths_that_match_nothing_name_the_config_key(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(CorpusNotFound, match=r"data.input.paths\[1\]: no corpus files match"):
        list_corpus_files(InputConfig(paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "*.parquet")]))
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(CorpusNotFound, match=r"paths\[0\]: cannot tell the format of '.*notes\.md'.*data.input.format"):
        list_corpus_files(InputConfig(paths=[str(tmp_path / "notes.md")]))
    with pytest.raises(CorpusNotFound, match=r"1 file\(s\), none of a known extension .*notes\.md.*data.input.format"):
        list_corpus_files(InputConfig(paths=[str(tmp_path / "*.md")]))
    globbed = list_corpus_files(InputConfig(paths=[str(tmp_path / "*.jsonl")]))
    assert [Path(f.uri).name for f in globbed.files] == ["a.jsonl"]


def test_globs_match_as_pythons_glob_and_existing_names_are_taken_literally(tmp_path: Path) -> None:
    for name in ("a.jsonl", "old/b.jsonl", "old/deeper/c.jsonl", "data[1].jsonl", "corpus [v2]/d.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')

    def names(pattern: str) -> list[str]:
        files = list_corpus_files(InputConfig(paths=[str(tmp_path / pattern)])).files
        return [str(Path(f.uri).relative_to(tmp_path)) for f in files]

    assert names("*.jsonl") == ["a.jsonl", "data[1].jsonl"]  # "*" stays within its folder
    assert names("*/*.jsonl") == ["corpus [v2]/d.jsonl", "old/b.jsonl"]
    assert names("**/*.jsonl") == ["a.jsonl", "corpus [v2]/d.jsonl", "data[1].jsonl", "old/b.jsonl",
                                   "old/deeper/c.jsonl"]  # fmt: skip
    assert names("data[1].jsonl") == ["data[1].jsonl"]  # an existing name, though "[1]" is a pattern
    assert names("corpus [v2]") == ["corpus [v2]/d.jsonl"]


def test_hidden_files_and_folders_are_read_only_when_named(tmp_path: Path) -> None:
    """As Python's glob and Hugging Face datasets: ``*`` and ``**`` skip names starting with ".",
    and so does a directory's listing (a checkout's .git, an editor's .swp, a cache)."""
    for name in ("a.jsonl", ".b.jsonl", ".cache/c.jsonl", "sub/.d.jsonl", "sub/e.jsonl", ".hidden/f.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n')

    def names(pattern: str) -> list[str]:
        files = list_corpus_files(InputConfig(paths=[str(tmp_path / pattern)])).files
        return [str(Path(f.uri).relative_to(tmp_path)) for f in files]

    assert names("*.jsonl") == ["a.jsonl"]
    assert names("**/*.jsonl") == ["a.jsonl", "sub/e.jsonl"]
    assert names("") == ["a.jsonl", "sub/e.jsonl"]  # the directory itself
    assert names(".*.jsonl") == [".b.jsonl"]  # a pattern part that starts with "." matches them
    assert names(".cache/*.jsonl") == [".cache/c.jsonl"]
    assert names(".hidden") == [".hidden/f.jsonl"]  # a hidden folder named on its own is read
    assert names("sub/.d.jsonl") == ["sub/.d.jsonl"]


def test_a_glob_lists_only_the_folders_it_can_match_and_an_unlistable_one_is_named(tmp_path: Path) -> None:
    """Found in review: "dir/*.jsonl" walked every subfolder of dir, so one it could not list (a
    lost+found, here a file name that is not UTF-8) failed the stage with a bare UnicodeDecodeError
    / PermissionError naming no config key, though "*" never crosses a "/"."""
    import os

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "odd").mkdir()
    with open(os.path.join(bytes(tmp_path / "odd"), b"\xff.jsonl"), "wb") as f:
        f.write(b'{"text": "y"}\n')
    files = list_corpus_files(InputConfig(paths=[str(tmp_path / "*.jsonl")])).files
    assert [Path(f.uri).name for f in files] == ["a.jsonl"]
    for entry in (str(tmp_path / "odd"), str(tmp_path / "*/*.jsonl"), str(tmp_path)):
        with pytest.raises(CorpusNotFound, match=r"data.input.paths\[1\]: cannot list .*a name in it is not UTF-8"):
            list_corpus_files(InputConfig(paths=[str(tmp_path / "a.jsonl"), entry]))


def test_compressed_parquet_is_refused_by_name(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a document"]}), tmp_path / "t.parquet")
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress((tmp_path / "t.parquet").read_bytes()))
    with pytest.raises(CorpusNotFound, match=r"paths\[0\]: '.*t\.parquet\.gz' is compressed Parquet, which is not read"):
        list_corpus_files(InputConfig(paths=[str(tmp_path / "t.parquet.gz")]))
    corpus = list_corpus_files(InputConfig(paths=[str(tmp_path)]))  # in a folder: listed as unread
    assert [Path(f.uri).name for f in corpus.files] == ["t.parquet"]
    assert [Path(u).name for u in corpus.unknown] == ["t.parquet.gz"]


def test_directory_files_of_unknown_extension_are_listed_not_dropped(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "README.md").write_text("# about this corpus")
    (tmp_path / "sub" / "b.jsonl.bz2").write_bytes(b"BZh9")
    (tmp_path / "sub" / "_SUCCESS").write_bytes(b"")
    corpus = list_corpus_files(InputConfig(paths=[str(tmp_path)]))
    assert [Path(f.uri).name for f in corpus.files] == ["a.jsonl"]
    assert corpus.unknown == [str(tmp_path / "README.md"), str(tmp_path / "sub" / "_SUCCESS"),
                              str(tmp_path / "sub" / "b.jsonl.bz2")]  # fmt: skip
    forced = list_corpus_files(InputConfig(paths=[str(tmp_path)], format="jsonl"))
    assert len(forced.files) == 4 and forced.unknown == []


def _zstd(path: Path, data: bytes) -> None:
    with pa.CompressedOutputStream(str(path), "zstd") as out:
        out.write(data)
    assert path.read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # a real zstd frame


def test_zstd_compressed_jsonl_and_text(tmp_path: Path) -> None:
    _zstd(tmp_path / "a.jsonl.zst", b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(3)))
    _zstd(tmp_path / "b.ndjson.zstd", b'{"text": "long suffix"}\n{"text": \n')
    _zstd(tmp_path / "c.txt.zst", "zstd text \u00e9\n".encode())
    (tmp_path / "d.jsonl.zst").write_bytes(b"not zstd at all")
    rows = _read_all(tmp_path)
    assert [r["text"] for r in rows if r["status"] == ""] == ["doc 0", "doc 1", "doc 2", "long suffix",
                                                              "zstd text \u00e9\n"]  # fmt: skip
    bad = {Path(r["source"]).name: r["reason"] for r in rows if r["status"] == REJECTED}
    assert bad.keys() == {"b.ndjson.zstd:2", "d.jsonl.zst:0"}
    assert "malformed JSON" in bad["b.ndjson.zstd:2"] and "cannot read file" in bad["d.jsonl.zst:0"]


def test_deeply_nested_json_is_a_rejected_record_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text('{"text": "before"}\n' + "[" * 100_000 + "]" * 100_000 + "\n"
                    + '{"text": {"a": ' * 50_000 + "1" + "}" * 50_000 + "\n" + '{"text": "after"}\n')  # fmt: skip
    rows = _read_all(path)
    assert [r["text"] for r in rows if r["status"] == ""] == ["before", "after"]
    bad = {r["source"]: r["reason"] for r in rows if r["status"] == REJECTED}
    assert bad == {f"{path}:2": "JSON nested too deeply to parse", f"{path}:3": "JSON nested too deeply to parse"}
    with pytest.raises(BadRecordError, match=rf"{path}:2: JSON nested too deeply"):
        _read_all(path, policy="fail")


def _peak_bytes_while_reading(path: Path, **kw: object) -> tuple[list[dict], int]:
    tracemalloc.start()
    try:
        rows = _read_all(path, **kw)
        return rows, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_oversize_documents_are_rejected_without_being_read_whole(tmp_path: Path) -> None:
    limit = 1000
    huge = tmp_path / "huge.txt"
    huge.write_bytes(b"word " * (8 << 20))  # 40 MB
    rows, peak = _peak_bytes_while_reading(huge, max_document_bytes=limit)
    assert [(Path(r["source"]).name, r["status"], r["reason"]) for r in rows] == [
        ("huge.txt:1", REJECTED, "larger than data.input.max_document_bytes (1,000 bytes)")
    ]
    assert len(rows[0]["text"]) <= 2000 and peak < 8 << 20, peak

    lines = tmp_path / "lines.jsonl"
    lines.write_bytes(b'{"text": "short"}\n{"text": "' + b"x" * (30 << 20) + b'"}\n'
                      + b'{"text": "' + b"y" * (limit - 12) + b'"}\n{"text": "last"}')  # fmt: skip
    rows, peak = _peak_bytes_while_reading(lines, max_document_bytes=limit)
    assert [(Path(r["source"]).name, r["status"]) for r in rows] == [
        ("lines.jsonl:1", ""), ("lines.jsonl:2", REJECTED), ("lines.jsonl:3", ""), ("lines.jsonl:4", "")]
    assert rows[2]["text"] == "y" * (limit - 12) and rows[3]["text"] == "last"  # a line of exactly the limit
    assert peak < 8 << 20, peak
    with pytest.raises(BadRecordError, match=rf"{lines}:2: larger than data.input.max_document_bytes"):
        _read_all(lines, policy="fail", max_document_bytes=limit)

    by_line = _read_all(huge, text_unit="line", max_document_bytes=limit)
    assert [r["status"] for r in by_line] == [REJECTED]
    pq.write_table(pa.table({"text": ["ok", "z" * (limit + 1), None]}), tmp_path / "t.parquet")
    parquet = _read_all(tmp_path / "t.parquet", max_document_bytes=limit)
    assert [(r["status"], r["reason"][:11]) for r in parquet] == [("", ""), (REJECTED, "larger than"),
                                                                  (REJECTED, "'text' is n")]  # fmt: skip



@pytest.mark.parametrize("column_type", [pa.string(), pa.large_string(), pa.dictionary(pa.int32(), pa.string())])
def test_an_oversize_parquet_value_never_becomes_a_python_object(tmp_path: Path, column_type: pa.DataType) -> None:
    """Arrow decodes the page that holds it (2-4x the value: README), but the reader copies only
    its first bytes out: a Python copy of the value (the scalar, the string) came on top of that."""
    limit = 1000
    texts = ["before", "a" * 600 + "\u00e9" * (15 << 20), "after", None]
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()).cast(column_type)}), tmp_path / "t.parquet")
    rows, peak = _peak_bytes_while_reading(tmp_path / "t.parquet", max_document_bytes=limit)
    assert [(r["status"], r["reason"][:11]) for r in rows] == [
        ("", ""), (REJECTED, "larger than"), ("", ""), (REJECTED, "'text' is n")]
    assert [rows[0]["text"], rows[2]["text"]] == ["before", "after"]
    assert rows[1]["text"].startswith("a" * 600 + "\u00e9") and len(rows[1]["text"].encode()) <= 2000
    assert peak < 8 << 20, peak  # Python's allocations (tracemalloc); the value is 30 MiB

def test_a_parquet_value_that_is_not_utf8_is_a_rejected_row(tmp_path: Path) -> None:
    """Arrow does not check a string column's UTF-8 when it reads one: a bad value crashed the
    reader (naming no file) whatever bad_records said."""
    data = b"good\xff\xfebad"
    offsets = pa.py_buffer(bytes(pa.array([0, 4, 9], pa.int32()).buffers()[1]))
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])}),
                   tmp_path / "t.parquet")  # fmt: skip
    rows = _read_all(tmp_path / "t.parquet")
    assert [(r["source"].rsplit(":", 1)[1], r["status"], r["reason"]) for r in rows] == [
        ("1", "", ""), ("2", REJECTED, "not valid UTF-8 (byte 0xff at offset 0)")]  # fmt: skip
    with pytest.raises(BadRecordError, match=r"t\.parquet:2: not valid UTF-8"):
        _read_all(tmp_path / "t.parquet", policy="fail")


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path: Path) -> None:
    """Windows tools start UTF-8 files with a BOM: JSON's parser refused line 1, and a text file's
    document began with U+FEFF."""
    (tmp_path / "c.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    (tmp_path / "d.txt").write_bytes(b"\xef\xbb\xbfa whole file\n")
    assert [r["text"] for r in _read_all(tmp_path / "c.jsonl")] == ["first", "second"]
    assert [r["text"] for r in _read_all(tmp_path / "d.txt", text_unit="file")] == ["a whole file\n"]
    assert [r["text"] for r in _read_all(tmp_path / "d.txt", text_unit="line")] == ["a whole file"]


def test_a_file_gone_after_listing_stops_the_stage(tmp_path: Path) -> None:
    """It was one rejected record ("cannot read file"), the stage finished without its records and
    a rerun skipped it as done."""
    from pipelines.data.corpus import CorpusFileGone

    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    cfg = InputConfig(paths=[str(tmp_path)])
    files = list_corpus_files(cfg).files
    (tmp_path / "b.jsonl").unlink()
    assert [b["text"].tolist() for b in read_file(files[0], cfg, "skip", batch_size=2)] == [["a"]]
    with pytest.raises(CorpusFileGone, match=r"b\.jsonl: listed as an input but cannot be opened now"):
        list(read_file(files[1], cfg, "skip", batch_size=2))


def test_a_read_failing_on_the_medium_stops_the_stage_and_a_corrupt_file_does_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Found in review: a connection reset or a disk's EIO mid-file was taken for a corrupt file: the
    rest of the file became one rejected record and the stage finished without it, for good (a
    rerun skips a finished stage). Fakes, named so: a line reader that fails after two lines."""
    import errno

    from pipelines.data import corpus as corpus_module
    from pipelines.data.corpus import CorpusUnreadable

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(5)))
    real_lines = corpus_module._lines

    def failing_lines(failure: OSError):  # noqa: ANN202
        def lines(stream: object, limit: int):  # noqa: ANN202
            for k, item in enumerate(real_lines(stream, limit)):
                if k == 2:
                    raise failure
                yield item
        return lines

    for failure in (OSError(errno.ECONNRESET, "Connection reset by peer"), OSError(errno.EIO, "Input/output error"),
                    OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56")):  # fmt: skip
        monkeypatch.setattr(corpus_module, "_lines", failing_lines(failure))
        with pytest.raises(CorpusUnreadable, match=r"a\.jsonl: reading failed after record 2 .*rerun it"):
            _read_all(tmp_path / "a.jsonl")
    # The file's own bytes (a corrupt stream) stay one rejected record, as before.
    monkeypatch.setattr(corpus_module, "_lines", failing_lines(OSError("zlib inflate failed: invalid block type")))
    rows = _read_all(tmp_path / "a.jsonl")
    assert [r["status"] for r in rows] == ["", "", REJECTED] and "the rest of the file is lost" in rows[2]["reason"]


def test_a_parquet_file_with_two_text_columns_is_one_rejected_record(tmp_path: Path) -> None:
    pq.write_table(pa.table([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), tmp_path / "t.parquet")
    rows = _read_all(tmp_path / "t.parquet")
    assert [(r["status"], r["reason"]) for r in rows] == [(REJECTED, "2 columns are named 'text' (1 rows not read)")]


def test_a_rejected_parquet_values_kept_text_is_its_own(tmp_path: Path) -> None:
    """With max_document_bytes under 2,000 the kept head of an oversize value ran into the next rows."""
    pq.write_table(pa.table({"text": ["a", "C" * 100, "d" * 10]}), tmp_path / "t.parquet")
    rows = _read_all(tmp_path / "t.parquet", max_document_bytes=50)
    assert [(r["status"], r["text"]) for r in rows] == [("", "a"), (REJECTED, "C" * 100), ("", "d" * 10)]
