"""One typed config tree for every kiln stage, loaded from YAML.

Every section is a strict pydantic model: unknown keys and wrong types are rejected with the
key's full path (``data.dedup.threshold: Input should be a valid number``). Values are never
silently rewritten; cross-field rules (divisibility, ranges) are checked where they are defined.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key path."""


class Section(BaseModel):
    """Base of every config section: strict types, unknown keys rejected, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RunConfig(Section):
    """Where a run writes. All stages of one run share ``<root>/<name>/``."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    root: str = "runs"

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


class RayConfig(Section):
    """How to reach Ray. ``address: null`` starts an embedded local cluster."""

    address: str | None = None
    # CPUs for the embedded local cluster (null: all of this machine's).
    num_cpus: int | None = Field(default=None, ge=1)


class GenerateConfig(Section):
    """The deterministic quickstart corpus and task data (``kiln generate``)."""

    out_dir: str
    seed: int = 0
    # Unique pretraining documents before duplicates and junk are planted.
    num_documents: int = Field(default=4000, ge=100)
    # Exact copies planted into the corpus.
    exact_duplicates: int = Field(default=200, ge=0)
    # Near-duplicate copies planted, spread over a range of Jaccard similarities.
    near_duplicates: int = Field(default=300, ge=0)
    # Low-quality documents the quality filters should drop.
    junk_documents: int = Field(default=200, ge=0)
    # Addition task: operands are drawn from [0, max_operand].
    max_operand: int = Field(default=49, ge=1)
    sft_examples: int = Field(default=3000, ge=10)
    preference_pairs: int = Field(default=2000, ge=10)
    ppo_prompts: int = Field(default=512, ge=10)
    eval_prompts: int = Field(default=200, ge=10)


class InputConfig(Section):
    """Which corpus files to read and how to find the text in them."""

    # Files, directories or globs; local paths or URIs pyarrow's filesystems accept (s3://, gs://).
    paths: list[str] = Field(min_length=1)
    # auto: from the file extension (.jsonl/.json/.ndjson, .parquet, .txt); .gz is read transparently.
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    # Field (JSONL) or column (Parquet) holding the document text.
    text_field: str = "text"
    # Plain text: one document per file, or one per non-empty line.
    text_unit: Literal["file", "line"] = "file"


class FilterConfig(Section):
    """Gopher / C4-style quality filters; set a threshold to null to switch that filter off."""

    min_words: int | None = 20
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    # Symbols ('#', '...', '…') per word.
    max_symbol_word_ratio: float | None = 0.1
    # Share of lines that are exact repeats of an earlier line in the same document.
    max_duplicate_line_fraction: float | None = 0.3
    # Share of words that contain at least one alphabetic character.
    min_alpha_word_fraction: float | None = 0.8
    # Share of lines that start with a bullet.
    max_bullet_line_fraction: float | None = 0.9
    # Share of lines that end with an ellipsis.
    max_ellipsis_line_fraction: float | None = 0.3


class DedupConfig(Section):
    """Exact (content hash) and near (MinHash + LSH) deduplication."""

    exact: bool = True
    near: bool = True
    # Word n-gram size of the shingles.
    ngram: int = Field(default=5, ge=1)
    # Documents whose Jaccard similarity reaches this are near duplicates.
    threshold: float = Field(default=0.8, gt=0.0, lt=1.0)
    # LSH bands x rows per band = MinHash permutations. Null for both: derived from threshold
    # and num_perm by minimising false positive + false negative probability mass.
    num_bands: int | None = Field(default=14, ge=1)
    rows_per_band: int | None = Field(default=8, ge=1)
    # Permutations when bands/rows are derived.
    num_perm: int = Field(default=112, ge=2)
    # Keep only LSH candidate pairs whose exact Jaccard (on their shingle sets, computed in a
    # distributed shuffle keyed by pair) reaches the threshold. Off: every candidate is a duplicate.
    verify_candidates: bool = True
    seed: int = 42

    @model_validator(mode="after")
    def _bands_together(self) -> "DedupConfig":
        if (self.num_bands is None) != (self.rows_per_band is None):
            raise ValueError("num_bands and rows_per_band are set together, or both null")
        return self


class TokenizerConfig(Section):
    """Train a byte-level BPE tokenizer, or use an existing Hugging Face tokenizer directory."""

    # An existing HF tokenizer directory; null trains one on the cleaned corpus.
    path: str | None = None
    vocab_size: int = Field(default=4096, ge=300)
    min_frequency: int = Field(default=2, ge=1)
    # Documents used to train the tokenizer (null: all kept documents).
    max_training_documents: int | None = Field(default=None, ge=1)


class PackConfig(Section):
    """Tokenise and pack documents into fixed-length training sequences."""

    seq_len: int = Field(default=256, ge=8)
    # Sequences per Parquet shard.
    sequences_per_shard: int = Field(default=2048, ge=1)
    # Fraction of sequences held out for validation (the tail of the stream).
    validation_fraction: float = Field(default=0.02, ge=0.0, lt=0.5)


class DataConfig(Section):
    """The data stage: stream, clean, deduplicate, tokenise, pack."""

    input: InputConfig
    # Bad records (malformed JSON, missing text field, undecodable bytes): skip them (counted,
    # written to data/rejected/ with the reason) or fail with the file and line.
    bad_records: Literal["skip", "fail"] = "skip"
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    # Documents per Ray Data batch in the map stages.
    batch_size: int = Field(default=512, ge=1)
    # Partitions of the hash shuffles that group duplicates (null: 2 x cluster CPUs).
    shuffle_partitions: int | None = Field(default=None, ge=1)


class KilnConfig(Section):
    """The root of the tree: one file describes a whole run."""

    run: RunConfig
    ray: RayConfig = RayConfig()
    generate: GenerateConfig | None = None
    data: DataConfig | None = None

    def digest(self, section: str) -> str:
        """A stable hash of one section, recorded with a finished stage to detect config drift."""
        payload = json.dumps(getattr(self, section).model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({error.error_count()} problem(s))"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        got = item.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {path}: {item['msg']}{shown}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> KilnConfig:
    """Validate a plain mapping (as loaded from YAML) into the typed tree.

    Raises:
        ConfigError: naming ``source`` and each offending key's path.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return KilnConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def load_config(path: str | Path) -> KilnConfig:
    """Read and validate a YAML config file.

    Raises:
        ConfigError: the file is missing, is not YAML, or does not match the tree.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data, str(path))


def dump_config(config: KilnConfig) -> str:
    """The config as YAML, every default made explicit (saved into the run directory)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
