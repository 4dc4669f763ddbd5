"""What the evaluation reads: the models to compare, held-out prompts and preference pairs, and the
data stage's validation sequences. Every reader checks its input and names the file and line (or
the command-line item) that is wrong, before any actor starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from core.chat import check_messages
from core.jsonl import BadRecord, read_jsonl
from pipelines.data.storage import shard_files, shards_location

# Default models of a run, in pipeline order: (name, folder under the run directory).
STAGE_MODELS = (("base", "pretrain"), ("sft", "sft"), ("ppo", "ppo"), ("grpo", "grpo"), ("rlhf", "rlhf"),
                ("dpo", "dpo"))
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class Target:
    """One model to evaluate: its name in the summary and its Hugging Face directory."""

    name: str
    path: Path


def stage_models(run_dir: Path) -> list[Target]:
    """Every stage model the run has written (``<run>/<stage>/model`` with a ``config.json``), in
    pipeline order, named ``base``, ``sft``, ``ppo``, ``grpo``, ``rlhf``, ``dpo``."""
    found = [Target(name, (run_dir / folder / "model").resolve()) for name, folder in STAGE_MODELS]
    return [t for t in found if (t.path / "config.json").is_file()]


def parse_models(items: list[str]) -> list[Target]:
    """``--models name=path ...`` as targets, in the order given.

    Raises:
        ValueError: an item is not ``name=path``, its name is not ``[A-Za-z0-9._-]+``, or a name
            repeats; the message quotes the item.
    """
    targets: list[Target] = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--models: {item!r} is not name=path (e.g. sft=runs/quickstart/sft/model)")
        if not _NAME.match(name):
            raise ValueError(f"--models: {item!r}: the name may use only letters, digits, '.', '_' and '-'")
        if any(t.name == name for t in targets):
            raise ValueError(f"--models: {item!r}: the name {name!r} is given twice")
        targets.append(Target(name, Path(path).resolve()))
    if not targets:
        raise ValueError("--models: give at least one name=path")
    return targets


@dataclass(frozen=True)
class PreferencePair:
    """A held-out preference pair; ``same_format``: chosen and rejected share their surface form, so
    only the content (e.g. the answer's correctness) separates them."""

    prompt: Any
    chosen: str
    rejected: str
    same_format: bool = False


def read_preferences(path: Path) -> list[PreferencePair]:
    """Preference pairs of a JSONL file: ``{"prompt", "chosen", "rejected", optional "same_format"}``.

    Raises:
        FileNotFoundError: the file does not exist (naming it).
        BadRecord: a record misses a key, has a wrong type or a chat prompt with an unknown role
            (naming ``file:line``).
    """
    if not path.is_file():
        raise FileNotFoundError(f"eval preferences {path} not found")
    pairs = []
    for lineno, record in read_jsonl(path):
        missing = {"prompt", "chosen", "rejected"} - set(record)
        if missing:
            raise BadRecord(f"{path}:{lineno}: missing {sorted(missing)}")
        if not all(isinstance(record[k], str) for k in ("chosen", "rejected")):
            raise BadRecord(f"{path}:{lineno}: 'chosen' and 'rejected' must be strings")
        if not isinstance(record["prompt"], str):
            check_messages(record["prompt"], f"{path}:{lineno}")
        same = record.get("same_format", False)
        if not isinstance(same, bool):
            raise BadRecord(f"{path}:{lineno}: 'same_format' must be true or false, got {same!r}")
        pairs.append(PreferencePair(record["prompt"], record["chosen"], record["rejected"], same))
    return pairs


def pretraining_data(cfg: Any) -> tuple[str, Path]:
    """Where the run's pretraining read its shards (``pretrain.shards``, else the data stage's) and
    the tokenizer they were written with (``pretrain.tokenizer``, else ``pretrain.model.path``'s,
    else ``<run>/tokenizer``), as ``kiln pretrain`` resolves them: perplexity is measured on those
    validation shards (with ``pretrain.shards`` set it was null, or an older run's data)."""
    pcfg = cfg.pretrain
    shards = pcfg.shards if pcfg is not None and pcfg.shards else shards_location(cfg.run.dir)
    tokenizer = (pcfg.tokenizer or pcfg.model.path) if pcfg is not None else None
    return shards, Path(tokenizer or cfg.run.dir / "tokenizer").resolve()


def validation_sequences(location: str, count: int) -> np.ndarray | None:
    """The first ``count`` rows of the validation shards in ``location`` (``pretraining_data``),
    (N, seq_len) int64, in shard order (deterministic); None when there are none or ``count`` is 0."""
    files = shard_files(location, "validation")  # a folder, or object storage
    if not files or count == 0:
        return None
    rows: list[np.ndarray] = []
    have = 0
    for f in files:
        column = pq.read_table(f, columns=["input_ids"]).column("input_ids").combine_chunks()
        block = column.flatten().to_numpy().reshape(len(column), -1)  # fixed_size_list<int32>[seq_len]
        rows.append(block[: count - have])
        have += len(rows[-1])
        if have >= count:
            break
    out = np.concatenate(rows).astype(np.int64)
    return out if len(out) else None
