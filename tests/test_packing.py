"""Tokenizer round trip and packing: every token kept, in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.chat import CHAT_TEMPLATE, EOS
from pipelines.data.packing import (
    Packer,
    PackTask,
    ShardWriter,
    eos_streams,
    plan_shards,
    write_planned_shards,
)
from pipelines.data.tokenizer import load_tokenizer


def test_tokenizer_round_trip_and_specials(tiny_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tiny_tokenizer_dir)
    for text in ["What is 12 + 7? 19.", "héllo wörld\n\ttabs", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.eos_token == EOS and tok.pad_token_id is not None
    digits = tok.encode("1234", add_special_tokens=False)
    assert len(digits) == 4  # digits are split one per token
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 1 + 2?"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    assert chat == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.chat_template == CHAT_TEMPLATE


def test_packer_keeps_every_token_in_order() -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(10, 100, size=rng.integers(1, 40)).astype(np.int32) for _ in range(200)]
    packer = Packer(seq_len=16, eos_id=1)
    blocks = [packer.add(docs[i : i + 7]) for i in range(0, len(docs), 7)]
    stream = np.concatenate([b.reshape(-1) for b in blocks])
    expected = np.concatenate([np.append(d, 1) for d in docs])
    assert all(b.shape[1] == 16 for b in blocks)
    assert stream.size + packer.leftover == expected.size
    assert np.array_equal(stream, expected[: stream.size])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(4, 99), max_size=6), st.booleans()), max_size=12))
def test_eos_streams_are_each_splits_documents_with_eos_after_each(docs: list[tuple[list[int], bool]]) -> None:
    ids = np.array([t for doc, _ in docs for t in doc], dtype=np.int32)
    lens = np.array([len(doc) for doc, _ in docs], dtype=np.int64)
    in_val = np.array([val for _, val in docs], dtype=bool)
    train, val = eos_streams(ids, lens, in_val, 0)
    assert train.dtype == val.dtype == np.int32
    for stream, split in ((train, False), (val, True)):
        assert stream.tolist() == [t for doc, v in docs if v == split for t in [*doc, 0]]


def test_shard_writer_splits_and_round_trips(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "train", seq_len=4, rows_per_shard=3)
    rows = np.arange(7 * 4, dtype=np.int32).reshape(7, 4)
    writer.add(rows[:2])
    writer.add(rows[2:])
    writer.close()
    files = sorted(tmp_path.glob("train-*.parquet"))
    assert [f.name for f in files] == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    back = np.concatenate([np.array(pq.read_table(f)["input_ids"].to_pylist()) for f in files])
    assert np.array_equal(back, rows) and writer.sequences == 7
    assert not list(tmp_path.glob(".*"))  # no temporaries left behind


def _shards(folder: Path) -> dict[str, np.ndarray]:
    return {f.name: np.array(pq.read_table(f)["input_ids"].to_pylist()) for f in sorted(folder.glob("*.parquet"))}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 90), min_size=1, max_size=6), seq_len=st.integers(1, 8),
       rows=st.integers(1, 5), chunk=st.integers(1, 7))  # fmt: skip
def test_planned_parallel_shards_equal_one_writer(tmp_path_factory: pytest.TempPathFactory, sizes: list[int],
                                                  seq_len: int, rows: int, chunk: int) -> None:  # fmt: skip
    """Parts' shards written per plan (any order) are byte for byte one writer's over the whole stream."""
    rng = np.random.default_rng(sum(sizes))
    streams = [rng.integers(0, 1000, size=n).astype(np.int32) for n in sizes]
    whole = np.concatenate(streams)
    one, planned = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("planned")
    num_rows = whole.size // seq_len
    blocks, leftover = whole[: num_rows * seq_len].reshape(num_rows, seq_len), whole.size - num_rows * seq_len
    writer = ShardWriter(one, "train", seq_len, rows)
    for lo in range(0, num_rows, chunk):  # the single writer fed in arbitrary pieces
        writer.add(blocks[lo : lo + chunk])
    writer.close()

    plan = plan_shards(sizes, seq_len, rows)
    written = sum(write_planned_shards(t, [streams[p] for p in t.parts], planned, "train", seq_len, rows)
                  for t in reversed(plan.tasks))  # fmt: skip
    expected, got = _shards(one), _shards(planned)
    assert list(got) == list(expected) and all(np.array_equal(got[k], expected[k]) for k in expected)
    assert (plan.sequences, plan.shards, plan.leftover) == (writer.sequences, writer.shards, leftover)
    assert written == plan.sequences
    assert len(plan.tasks) == len({t.parts[0] for t in plan.tasks})  # at most one task per part

    # As the stage does it: planned as the parts' sizes come in, each shard exactly once.
    streamed, done, tasks = tmp_path_factory.mktemp("streamed"), 0, []
    for k in range(1, len(sizes) + 1):
        for t in plan_shards(sizes[:k], seq_len, rows, first_shard=done, more=k < len(sizes)).tasks:
            assert max(t.parts) < k  # only parts already in
            write_planned_shards(t, [streams[p] for p in t.parts], streamed, "train", seq_len, rows)
            tasks.append(t)
            done = t.first_shard + t.shards
    got = _shards(streamed)
    assert list(got) == list(expected) and all(np.array_equal(got[k], expected[k]) for k in expected)
    assert [t.first_shard for t in tasks] == sorted({t.first_shard for t in tasks}) and done == plan.shards


def test_planned_shards_refuse_streams_of_other_sizes(tmp_path: Path) -> None:
    plan = plan_shards([10, 10], seq_len=4, rows_per_shard=2)  # 5 sequences: shards of 2, 2, 1
    assert plan.tasks == [PackTask(0, 2, 0, 16, (0, 1), (0, 10)), PackTask(2, 1, 16, 20, (1,), (10,))]
    assert (plan.sequences, plan.shards, plan.leftover) == (5, 3, 0)
    with pytest.raises(RuntimeError, match="hold 15 of the 16 tokens planned"):
        write_planned_shards(plan.tasks[0], [np.zeros(10, np.int32), np.zeros(5, np.int32)], tmp_path, "train", 4, 2)


# Run in a fresh interpreter: unpickle each pickled remote function as a Ray worker does, and name
# the numba kernels its body reaches directly whose disk cache is off.
_UNCACHED_KERNELS = """
import sys
import numba
import ray.cloudpickle
found = []
for module, name, payload in ray.cloudpickle.loads(sys.stdin.buffer.read()):
    function = ray.cloudpickle.loads(payload)
    for global_name in function.__code__.co_names:
        value = function.__globals__.get(global_name)
        if isinstance(value, numba.core.dispatcher.Dispatcher) and value.stats.cache_path is None:
            found.append(f"{module}.{name} -> {global_name}")
print("\\n".join(found))
"""


def test_ray_tasks_use_the_numba_kernels_disk_cache() -> None:
    """Ray ships a remote function by value (its module's attribute is Ray's wrapper, not the
    function), and with it every numba kernel the body names; numba rebuilds such a copy without
    its disk cache, so each worker compiled the kernel at its first call (``eos_streams`` in
    ``finish_part``: ~4 s in every fresh worker). Each of kiln's remote functions, unpickled in
    another process as a worker unpickles it, must reach only cached kernels."""
    import importlib
    import pkgutil
    import subprocess
    import sys

    import numba
    import ray.cloudpickle
    from ray.remote_function import RemoteFunction

    import pipelines

    functions = []
    for info in pkgutil.walk_packages(pipelines.__path__, "pipelines."):
        namespace = vars(importlib.import_module(info.name))
        # A body can name only the kernels in its module's namespace: modules without one are skipped.
        if any(isinstance(value, numba.core.dispatcher.Dispatcher) for value in namespace.values()):
            functions += [(info.name, name, ray.cloudpickle.dumps(value._function)) for name, value in namespace.items()
                          if isinstance(value, RemoteFunction)]  # fmt: skip
    assert any(name == "finish_part" for _, name, _ in functions)
    out = subprocess.run([sys.executable, "-c", _UNCACHED_KERNELS], input=ray.cloudpickle.dumps(functions),
                         capture_output=True, check=True).stdout.decode()  # fmt: skip
    assert out.strip() == "", f"remote functions that name a numba kernel (compiled again in every worker):\n{out}"
