"""Tokenizer round trip and packing: every token kept, in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from core.chat import CHAT_TEMPLATE, EOS
from pipelines.data.packing import Packer, ShardWriter
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
