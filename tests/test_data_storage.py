"""Where the data stage's shards are found: in data/, or at the location its report names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipelines.data import storage
from pipelines.data.packing import ShardWriter


def _shards(folder: str) -> None:
    for split, n in (("train", 3), ("validation", 1)):
        writer = ShardWriter(folder, split, seq_len=4, rows_per_shard=2)
        writer.add(np.arange(n * 2 * 4, dtype=np.int32).reshape(-1, 4))
        writer.close()


def test_shards_in_data_without_a_storage_report(tmp_path: Path) -> None:
    _shards(str(tmp_path / "data" / "shards"))
    location = storage.shards_location(tmp_path)
    assert location == str(tmp_path / "data" / "shards")
    assert [Path(f).name for f in storage.shard_files(location, "train")] == [
        "train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]  # fmt: skip
    assert [Path(f).name for f in storage.shard_files(location, "validation")] == ["validation-00000.parquet"]
    assert storage.shard_files(str(tmp_path / "nowhere"), "train") == []


def test_shards_at_the_uri_the_report_names(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/store/run/data/abcd1234/shards"
    _shards(uri)  # ShardWriter writes through pyarrow's file systems
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / storage.REPORT).write_text(json.dumps({"outputs": {"shards": uri, "documents": "x"}}))
    assert storage.shards_location(tmp_path) == uri
    files = storage.shard_files(uri, "train")
    assert files == [f"{tmp_path}/store/run/data/abcd1234/shards/train-0000{i}.parquet" for i in range(3)]
    assert pq.read_table(files[0])["input_ids"].to_pylist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_other_attempts_are_removed(tmp_path: Path) -> None:
    versions = tmp_path / "versions"
    for tag in ("aaaa0000", "bbbb1111", "cccc2222"):
        (versions / tag / "shards").mkdir(parents=True)
    (versions / "cccc2222" / "shards" / "x.parquet").write_bytes(b"x")
    storage.remove_other_versions(f"file://{versions}", keep="cccc2222")
    assert [p.name for p in versions.iterdir()] == ["cccc2222"]
    storage.remove_other_versions(str(tmp_path / "absent"), keep="x")  # nothing there: nothing to do


def test_is_file_takes_paths_and_uris(tmp_path: Path) -> None:
    # The trainer checks its shards with it before any worker starts: URIs (s3://, file://) too.
    uri = f"file://{tmp_path}/store/shards"
    _shards(uri)
    assert storage.is_file(f"{uri}/train-00000.parquet") and storage.is_file(f"{tmp_path}/store/shards/train-00000.parquet")
    assert not storage.is_file(f"{uri}/train-00009.parquet") and not storage.is_file(f"{uri}")


def test_shards_past_five_digits_stay_in_shard_order(tmp_path: Path) -> None:
    """Names are padded to five digits and were sorted as strings: train-100000 came between
    train-10000 and train-10001 (~52B tokens of shards at the defaults)."""
    numbers = [2, 10000, 10001, 99999, 100000, 100001]
    for n in numbers:
        (tmp_path / f"train-{n:05d}.parquet").write_bytes(b"")
    (tmp_path / "validation-00000.parquet").write_bytes(b"")
    assert [Path(f).name for f in storage.shard_files(f"file://{tmp_path}", "train")] == [
        f"train-{n:05d}.parquet" for n in numbers]


def test_an_object_store_uri_keeps_its_query_through_display_and_join() -> None:
    """Found in review: s3://bucket/corpus/?endpoint_override=...&region=... listed on MinIO, but
    each file's name lost the query, so its reader resolved it to AWS (every file one rejected
    record); join put parts after the query. Resolving with a region touches no network."""
    from core.locations import resolve

    uri = "s3://bucket/corpus/?region=eu-west-1&endpoint_override=minio.local:9000&scheme=http"
    fs, path = resolve(uri)
    name = storage.display(uri, fs, f"{path.rstrip('/')}/a.jsonl")
    assert name == "s3://bucket/corpus/a.jsonl?region=eu-west-1&endpoint_override=minio.local:9000&scheme=http"
    again, again_path = resolve(name)
    assert again.equals(fs) and again_path == "bucket/corpus/a.jsonl"
    assert again.__reduce__()[1][0]["endpoint_override"] == "minio.local:9000"  # its settings, as pickled
    assert not resolve("s3://bucket/corpus/a.jsonl?region=eu-west-1")[0].equals(fs)  # the query matters
    assert storage.join("s3://b/runs?region=eu-west-1", "data", "x") == "s3://b/runs/data/x?region=eu-west-1"
    assert storage.join("/local/runs", "data") == "/local/runs/data"
    from pipelines.config import parse_config

    run = parse_config({"run": {"name": "q", "storage_path": "s3://b/runs?endpoint_override=minio:9000"}}).run
    assert run.stage_storage("data") == "s3://b/runs/q/data?endpoint_override=minio:9000"
