"""Instruction and preference data → fixed-length token rows (pure functions, no Ray, no model).

SFT rows: ``input_ids`` (L,) and ``labels`` (L,), where ``labels[t]`` is ``input_ids[t]`` on the
tokens the model learns to produce (each assistant message's content and its ``<|im_end|>``)
and ``IGNORE`` elsewhere (system/user turns, the role headers, padding). The loss shifts them
itself: position t predicts ``labels[t + 1]``.

Preference rows: ``chosen_ids`` (L,) and ``rejected_ids`` (L,), each the chat rendering of
prompt + one response, right-padded with PAD. A reward model scores the last non-pad token, so
overlong pairs lose their *beginning* (left truncation), never the response's end.

DPO rows: the preference rows plus ``chosen_labels`` / ``rejected_labels`` (L,), SFT-style masks
that keep only the response's tokens (the log-probs DPO compares are summed over them); the DPO
stage adds the reference's summed log-probs as float columns.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from core.chat import check_messages, template_refusals, tokenize_chat
from core.jsonl import BadRecord, read_jsonl
from core.rundir import atomic_dir, atomic_write_bytes
from pipelines.train.losses import IGNORE  # label of a token that carries no loss

Overlong = Literal["truncate", "reject"]
_MARK = "\ue000"  # a private-use character, to find where a template puts a message's content
Message = dict[str, str]


DATASET_STATS = "stats.json"  # beside the Parquet files: what write_dataset returns, for a resumed stage


@dataclass
class EncodeStats:
    """What encoding did to the records: how many were kept, truncated, and how many tokens."""

    records: int = 0
    truncated: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    rows: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token id, or a ValueError naming the tokenizer: rows are padded with it
    and the reward model reads its score at the last token before it, so none cannot be guessed
    (the end-of-sequence token, the usual stand-in, also ends real responses)."""
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {tokenizer.name_or_path} has no pad token, which kiln pads rows with: "
                         "add one to it (tokenizer.add_special_tokens({'pad_token': '<pad>'}), then save it with the "
                         "model, resizing the embeddings) or start from a model whose tokenizer has one")  # fmt: skip
    return int(tokenizer.pad_token_id)


def to_messages(record: dict[str, Any], where: str) -> list[Message]:
    """A chat: ``messages`` as given, or ``prompt``/``response`` as one user and one assistant turn."""
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        for key in ("prompt", "response"):  # named here: check_messages would name 'messages'
            if not isinstance(record[key], str):
                raise BadRecord(f"{where}: {key} must be a string, got {type(record[key]).__name__}")
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise BadRecord(f"{where}: needs 'messages' or 'prompt' and 'response' (got keys {sorted(record)})")
    check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"{where}: no assistant message to learn from")
    # An empty answer would train only its end-of-turn token: the model learns to say nothing.
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise BadRecord(f"{where}: {'response' if 'messages' not in record else f'messages[{i}] (assistant)'} is empty")
    return messages


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], train_from: int = 0
) -> tuple[list[int], list[int]]:
    """Token ids of the chat-template rendering, and labels that keep only assistant tokens.

    Contents are tokenised as text (``tokenize_chat``): ``<|im_end|>`` typed in a message is not
    a control token, so a record cannot forge a turn.

    The rendering of ``messages[:i]`` with a generation prompt is a prefix of the rendering of
    ``messages[:i+1]`` (ChatML and every incremental template), so assistant message i spans the
    characters between the two; its trailing whitespace is not trained. Tokens are matched to
    spans by their character offsets, so the masking is right whatever the BPE merges.

    Args:
        train_from: assistant messages before this index are context, not labelled (a preference
            pair's prompt may hold earlier assistant turns; only the response is compared).

    Returns:
        (ids, labels), equal length; ``labels[t]`` is ``ids[t]`` or ``IGNORE``.
    """
    chat = tokenize_chat(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        if i:
            start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        else:  # no earlier turn to render: the content starts where a marker's rendering puts it
            start = _render(tokenizer, [{**message, "content": _MARK}]).index(_MARK)
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
    pad = pad_id(tokenizer)
    rows: list[tuple[list[int], list[int]]] = []
    for where, record in records:
        with template_refusals(where):
            ids, labels = encode_chat(tokenizer, to_messages(record, where))
        ids, cut = _fit(ids, seq_len, overlong, where, keep="head")
        labels = labels[: len(ids)]
        if all(label == IGNORE for label in labels):  # its prompt fills seq_len: nothing to learn
            stats.extra["no_target"] = stats.extra.get("no_target", 0) + 1
            continue
        stats.records += 1
        stats.truncated += cut
        stats.tokens += len(ids)
        stats.trained_tokens += sum(label != IGNORE for label in labels)
        if packing and rows and len(rows[-1][0]) + len(ids) <= seq_len:
            rows[-1][0].extend(ids)
            rows[-1][1].extend(labels)
        else:
            rows.append((list(ids), list(labels)))
    input_ids = np.full((len(rows), seq_len), pad, dtype=np.int32)
    label_arr = np.full((len(rows), seq_len), IGNORE, dtype=np.int32)
    for i, (ids, labels) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        label_arr[i, : len(labels)] = labels
    stats.rows = len(rows)
    return {"input_ids": input_ids, "labels": label_arr}, stats


def _check_pair(record: dict[str, Any], where: str) -> None:
    """A preference record's keys and values, before encoding (reward-model and DPO rows alike).

    Raises:
        BadRecord: naming ``file:line``: a key is missing, a value is neither text nor a list of
            messages, a response is empty or has no assistant message, or the two responses are
            identical (the pair prefers nothing).
    """
    missing = {"prompt", "chosen", "rejected"} - set(record)
    if missing:
        raise BadRecord(f"{where}: missing {sorted(missing)}")
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(record[key], str | list):
            raise BadRecord(f"{where}: {key} must be a string or a list of messages, got {type(record[key]).__name__}")
    if record["chosen"] == record["rejected"]:
        raise BadRecord(f"{where}: chosen and rejected are identical (the pair prefers nothing)")
    for side in ("chosen", "rejected"):
        if _is_empty(record[side]):
            raise BadRecord(f"{where}: {side} is empty")
        if isinstance(record[side], list) and not any(isinstance(m, dict) and m.get("role") == "assistant"
                                                      for m in record[side]):  # fmt: skip
            raise BadRecord(f"{where}: {side} has no assistant message to compare")


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

    Raises:
        BadRecord: naming ``file:line`` (``_check_pair``), or a sequence longer than ``seq_len``
            under ``overlong: reject``.

    Returns:
        ({"chosen_ids": (N, seq_len) int32, "rejected_ids": (N, seq_len) int32}, stats)
    """
    stats = EncodeStats()
    pad = pad_id(tokenizer)
    out = {k: np.full((len(records), seq_len), pad, dtype=np.int32) for k in ("chosen_ids", "rejected_ids")}
    for i, (where, record) in enumerate(records):
        _check_pair(record, where)
        for side in ("chosen", "rejected"):
            messages = _conversation(record["prompt"], record[side], where)
            with template_refusals(where):
                ids = tokenize_chat(tokenizer, messages).ids
            ids, cut = _fit(ids, seq_len, overlong, where, keep="tail")
            stats.truncated += cut
            stats.tokens += len(ids)
            out[f"{side}_ids"][i, : len(ids)] = ids
        stats.records += 1
    stats.rows = len(records)
    return out, stats


def _is_empty(response: Any) -> bool:
    if isinstance(response, str):
        return not response.strip()
    if isinstance(response, list):
        return all(not (isinstance(m, dict) and isinstance(m.get("content"), str) and m["content"].strip()) for m in response)
    return False  # a wrong type is named by _check_pair


def dpo_rows(
    tokenizer: PreTrainedTokenizerBase,
    records: list[tuple[str, dict[str, Any]]],
    seq_len: int,
    overlong: Overlong,
) -> tuple[dict[str, np.ndarray], EncodeStats]:
    """Encode preference records into DPO rows: each side's ids and a response-only label mask.

    The mask comes from the chat template as SFT's does (``encode_chat``): the response's content
    and its end-of-turn token, nothing of the prompt. Overlong sequences lose their beginning
    (the response's end is kept) or, with ``overlong: reject``, fail naming the record.

    Raises:
        BadRecord: naming ``file:line``: what ``_check_pair`` refuses, a response with nothing
            left to compare after truncation, or a sequence longer than ``seq_len`` under
            ``overlong: reject``.

    Returns:
        ({"chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels": (N, seq_len) int32}, stats);
        ``stats.trained_tokens`` counts response tokens, ``stats.truncated`` cut sequences.
    """
    stats = EncodeStats()
    pad = pad_id(tokenizer)
    out = {f"{side}_{kind}": np.full((len(records), seq_len), pad if kind == "ids" else IGNORE, dtype=np.int32)
           for side in ("chosen", "rejected") for kind in ("ids", "labels")}  # fmt: skip
    for i, (where, record) in enumerate(records):
        _check_pair(record, where)
        for side in ("chosen", "rejected"):
            messages = _conversation(record["prompt"], record[side], where)
            prompt_messages = 1 if isinstance(record["prompt"], str) else len(record["prompt"])
            with template_refusals(where):
                ids, labels = encode_chat(tokenizer, messages, train_from=prompt_messages)
            kept, cut = _fit(ids, seq_len, overlong, f"{where}: {side}", keep="tail")
            labels = labels[len(labels) - len(kept) :]
            if all(label == IGNORE for label in labels):
                raise BadRecord(f"{where}: {side} has no assistant message to compare")
            stats.truncated += cut
            stats.tokens += len(kept)
            stats.trained_tokens += sum(label != IGNORE for label in labels)
            out[f"{side}_ids"][i, : len(kept)] = kept
            out[f"{side}_labels"][i, : len(kept)] = labels
        stats.records += 1
    stats.rows = len(records)
    return out, stats


def split_validation(items: list[Any], fraction: float,
                     key: Callable[[Any], Hashable] | None = None) -> tuple[list[Any], list[Any]]:  # fmt: skip
    """(train, validation), each in the items' order. Items are grouped by ``key`` (none: each item
    is its own group), groups numbered by first appearance, and group g is held out where
    ``floor((g + 1) * fraction)`` steps up: the share of groups held out is ``fraction`` (0.4 holds
    out 2 of 5, not every 2nd), spread evenly; ``1/k`` holds out every k-th group. In exact
    arithmetic: ``fraction`` as the decimal it was written. Items of one group are all on one
    side, so with ``key`` = the prompt no held-out prompt is ever trained on."""
    if fraction <= 0:
        return items, []
    num, den = Fraction(str(fraction)).as_integer_ratio()
    groups: dict[Hashable, int] = {}
    numbers = [groups.setdefault(i if key is None else key(x), len(groups)) for i, x in enumerate(items)]
    held = [(g + 1) * num // den > g * num // den for g in numbers]
    return [x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h]


def prompt_key(item: tuple[str, Any]) -> Hashable:
    """What a ``(file:line, record)``'s validation group is: its prompt (``prompt``, or a chat's
    messages before its last assistant turn), as canonical JSON. SFT examples and preference pairs
    often repeat a prompt (several answers, several pairs): held out by record, 93 % of the
    quickstart's SFT validation prompts were also trained on, and the "held-out" loss measured
    recall. A record of no known shape is a group of its own (its encoder names the problem)."""
    where, record = item
    if isinstance(record, dict):
        if "prompt" in record:
            return json.dumps(record["prompt"], sort_keys=True)
        messages = record.get("messages")
        if isinstance(messages, list):
            last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                       default=len(messages))  # fmt: skip
            return json.dumps(messages[:last], sort_keys=True, default=str)
    return ("record", where)


def write_rows(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Write columns of N rows as one Parquet file: (N, L) int arrays as fixed-size lists of
    int32, (N,) float arrays (DPO's reference log-probs) as float64."""
    table = {}
    for name, arr in columns.items():
        if arr.ndim == 1:
            table[name] = pa.array(np.asarray(arr, dtype=np.float64), type=pa.float64())
            continue
        flat = pa.array(np.ascontiguousarray(arr, dtype=np.int32).reshape(-1), type=pa.int32())
        table[name] = pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(table), sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def write_dataset(
    stage_dir: Path, data: Path | list[Path],
    encode: Callable[[list[tuple[str, dict[str, Any]]]], tuple[dict[str, np.ndarray], EncodeStats]],
    validation_fraction: float, add_columns: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    max_records: int | None = None,
) -> tuple[Path, EncodeStats, int]:
    """Read JSONL records, hold out a share of their prompts (``split_validation`` by ``prompt_key``:
    every record of a held-out prompt), encode both parts, write ``<stage_dir>/dataset/``.

    Args:
        stage_dir: the stage's folder.
        data: the JSONL file, or files read one after another (each record named ``file:line`` in errors).
        encode: records -> (rows, stats), e.g. ``sft_rows`` or ``preference_rows`` with their settings.
        validation_fraction: share of distinct prompts held out, with all their records.
        add_columns: rows -> more columns of the same rows, computed once every record of both
            parts has encoded (DPO's reference log-probs: no model runs on a file with a bad record).
        max_records: read only the first this many records (None: all); the rest are not read.

    Returns:
        (the dataset folder with ``train.parquet`` and maybe ``validation.parquet``, the training
        part's stats (``extra``'s counts of records left out cover both parts), the number of
        held-out records encoded).

    A dataset already in ``stage_dir`` is kept (a resumed stage; ``prepare_stage`` removes it when
    the stage is forced or an input changed): encoding again cost DPO its whole reference pass.
    """
    folder = stage_dir / "dataset"
    if (folder / DATASET_STATS).is_file():
        saved = json.loads((folder / DATASET_STATS).read_text())
        return folder, EncodeStats(**saved["stats"]), int(saved["held_out"])
    files = [data] if isinstance(data, Path) else data
    every = ((f"{f}:{lineno}", record) for f in files for lineno, record in read_jsonl(f))
    records = list(itertools.islice(every, max_records))
    train_records, val_records = split_validation(records, validation_fraction, key=prompt_key)
    train_rows, stats = encode(train_records)
    val_rows, val_stats = encode(val_records)
    for key, count in val_stats.extra.items():  # records left out (SFT's no_target): counted in both parts
        stats.extra[key] = stats.extra.get(key, 0) + count
    if add_columns is not None:
        train_rows = {**train_rows, **add_columns(train_rows)}
        val_rows = {**val_rows, **add_columns(val_rows)}
    with atomic_dir(folder) as tmp:
        write_rows(tmp / "train.parquet", train_rows)
        if val_records and len(next(iter(val_rows.values()))):
            write_rows(tmp / "validation.parquet", val_rows)
        (tmp / DATASET_STATS).write_text(json.dumps({"stats": asdict(stats), "held_out": val_stats.records}))
    return folder, stats, val_stats.records
