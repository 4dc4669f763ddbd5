"""Instruction and preference data → fixed-length token rows (pure functions, no Ray, no model).

SFT rows: ``input_ids`` (L,) and ``labels`` (L,), where ``labels[t]`` is ``input_ids[t]`` on the
tokens the model learns to produce (each assistant message's content and its ``<|im_end|>``)
and ``IGNORE`` elsewhere (system/user turns, the role headers, padding). The loss shifts them
itself: position t predicts ``labels[t + 1]``.

Preference rows: ``chosen_ids`` (L,) and ``rejected_ids`` (L,), each the chat rendering of
prompt + one response, right-padded with PAD. A reward model scores the last non-pad token, so
overlong pairs lose their *beginning* (left truncation), never the response's end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from core.chat import check_messages, tokenize_chat
from core.jsonl import BadRecord, read_jsonl
from core.rundir import atomic_dir, atomic_write_bytes
from pipelines.train.losses import IGNORE  # label of a token that carries no loss

Overlong = Literal["truncate", "reject"]
Message = dict[str, str]


@dataclass
class EncodeStats:
    """What encoding did to the records: how many were kept, truncated, and how many tokens."""

    records: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rows: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def to_messages(record: dict[str, Any], where: str) -> list[Message]:
    """A chat: ``messages`` as given, or ``prompt``/``response`` as one user and one assistant turn."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise BadRecord(f"{where}: needs 'messages' or 'prompt' and 'response' (got keys {sorted(record)})")
    check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"{where}: no assistant message to learn from")
    return messages


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> tuple[list[int], list[int]]:
    """Token ids of the chat-template rendering, and labels that keep only assistant tokens.

    Contents are tokenised as text (``tokenize_chat``): ``<|im_end|>`` typed in a message is not
    a control token, so a record cannot forge a turn.

    The rendering of ``messages[:i]`` with a generation prompt is a prefix of the rendering of
    ``messages[:i+1]`` (ChatML and every incremental template), so assistant message i spans the
    characters between the two; its trailing whitespace is not trained. Tokens are matched to
    spans by their character offsets, so the masking is right whatever the BPE merges.

    Returns:
        (ids, labels), equal length; ``labels[t]`` is ``ids[t]`` or ``IGNORE``.
    """
    chat = tokenize_chat(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        end = len(_render(tokenizer, messages[: i + 1]).rstrip())
        spans.append((start, end))
    ids = chat.ids
    labels = [IGNORE] * len(ids)
    for t, (lo, hi) in enumerate(chat.offsets):
        if hi > lo and any(s <= lo and hi <= e for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


def _fit(ids: list[int], seq_len: int, overlong: Overlong, where: str, keep: Literal["head", "tail"]) -> tuple[list[int], bool]:
    if len(ids) <= seq_len:
        return ids, False
    if overlong == "reject":
        raise BadRecord(f"{where}: {len(ids)} tokens exceed seq_len {seq_len} (overlong: reject)")
    return (ids[:seq_len] if keep == "head" else ids[-seq_len:]), True


def sft_rows(
    tokenizer: PreTrainedTokenizerBase,
    records: list[tuple[str, dict[str, Any]]],
    seq_len: int,
    overlong: Overlong,
    packing: bool,
) -> tuple[dict[str, np.ndarray], EncodeStats]:
    """Encode (where, record) pairs into SFT rows, one example per row or greedily packed.

    Packing concatenates whole examples into a row while they fit; each keeps its own label mask
    (attention is not blocked between packed examples, as in most SFT packers).

    Returns:
        ({"input_ids": (N, seq_len) int32, "labels": (N, seq_len) int32}, stats)
    """
    stats = EncodeStats()
    rows: list[tuple[list[int], list[int]]] = []
    for where, record in records:
        ids, labels = encode_chat(tokenizer, to_messages(record, where))
        ids, cut = _fit(ids, seq_len, overlong, where, keep="head")
        labels = labels[: len(ids)]
        stats.records += 1
        stats.truncated += cut
        stats.tokens += len(ids)
        stats.trained_tokens += sum(label != IGNORE for label in labels)
        if packing and rows and len(rows[-1][0]) + len(ids) <= seq_len:
            rows[-1][0].extend(ids)
            rows[-1][1].extend(labels)
        else:
            rows.append((list(ids), list(labels)))
    input_ids = np.full((len(rows), seq_len), tokenizer.pad_token_id, dtype=np.int32)
    label_arr = np.full((len(rows), seq_len), IGNORE, dtype=np.int32)
    for i, (ids, labels) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        label_arr[i, : len(labels)] = labels
    stats.rows = len(rows)
    return {"input_ids": input_ids, "labels": label_arr}, stats


def _conversation(prompt: Any, response: Any, where: str) -> list[Message]:
    """Prompt (string or messages) + response (string or assistant message(s)) as one chat."""
    head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    tail = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    messages = list(head) + list(tail)
    check_messages(messages, where)
    return messages


def preference_rows(
    tokenizer: PreTrainedTokenizerBase,
    records: list[tuple[str, dict[str, Any]]],
    seq_len: int,
    overlong: Overlong,
) -> tuple[dict[str, np.ndarray], EncodeStats]:
    """Encode preference records into right-padded chosen/rejected rows.

    Returns:
        ({"chosen_ids": (N, seq_len) int32, "rejected_ids": (N, seq_len) int32}, stats)
    """
    stats = EncodeStats()
    pad = tokenizer.pad_token_id
    out = {k: np.full((len(records), seq_len), pad, dtype=np.int32) for k in ("chosen_ids", "rejected_ids")}
    for i, (where, record) in enumerate(records):
        missing = {"prompt", "chosen", "rejected"} - set(record)
        if missing:
            raise BadRecord(f"{where}: missing {sorted(missing)}")
        for side in ("chosen", "rejected"):
            messages = _conversation(record["prompt"], record[side], where)
            ids = tokenize_chat(tokenizer, messages).ids
            ids, cut = _fit(ids, seq_len, overlong, where, keep="tail")
            stats.truncated += cut
            stats.tokens += len(ids)
            out[f"{side}_ids"][i, : len(ids)] = ids
        stats.records += 1
    stats.rows = len(records)
    return out, stats


def split_validation(items: list[Any], fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, validation): every k-th item (k = round(1 / fraction)) is held out."""
    if fraction <= 0:
        return items, []
    k = max(2, round(1 / fraction))
    return [x for i, x in enumerate(items) if i % k != k - 1], [x for i, x in enumerate(items) if i % k == k - 1]


def write_rows(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Write equal-length (N, L) int32 arrays as one Parquet file of fixed-size-list columns."""
    table = {}
    for name, arr in columns.items():
        flat = pa.array(np.ascontiguousarray(arr, dtype=np.int32).reshape(-1), type=pa.int32())
        table[name] = pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(table), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def write_dataset(
    stage_dir: Path, data: Path, encode: Callable[[list[tuple[str, dict[str, Any]]]], tuple[dict[str, np.ndarray], EncodeStats]],
    validation_fraction: float,
) -> tuple[Path, EncodeStats, int]:
    """Read a JSONL file, hold out every k-th record, encode both parts, write ``<stage_dir>/dataset/``.

    Args:
        stage_dir: the stage's folder.
        data: the JSONL records (each named ``file:line`` in errors).
        encode: records -> (rows, stats), e.g. ``sft_rows`` or ``preference_rows`` with their settings.
        validation_fraction: share of records held out.

    Returns:
        (the dataset folder with ``train.parquet`` and maybe ``validation.parquet``, the training
        part's stats, the number of held-out records).
    """
    records = [(f"{data}:{lineno}", record) for lineno, record in read_jsonl(data)]
    train_records, val_records = split_validation(records, validation_fraction)
    train_rows, stats = encode(train_records)
    val_rows, _ = encode(val_records)
    with atomic_dir(stage_dir / "dataset") as tmp:
        write_rows(tmp / "train.parquet", train_rows)
        if val_records and len(next(iter(val_rows.values()))):
            write_rows(tmp / "validation.parquet", val_rows)
    return stage_dir / "dataset", stats, len(val_records)
