"""The ``data:`` section: which corpus to read, and how to filter, deduplicate, tokenise and pack it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import PathOrUri, Section


class InputConfig(Section):
    """Which corpus files to read and how to find the text in them."""

    # Files, directories or globs (* within a folder, ** across folders; hidden names, .git or
    # .x.jsonl, only when named or matched by a part that starts with "."); local paths or URIs
    # pyarrow's filesystems accept (s3://, gs://).
    paths: list[PathOrUri] = Field(min_length=1)
    # auto: from the file extension (.jsonl/.json/.ndjson, .parquet, .txt); JSONL and text may be
    # .gz, .zst or .zstd, decompressed as they are read (Parquet compresses its own pages). Files
    # of another extension in a directory or glob are left unread, counted and named in the report;
    # a file named on its own must have a known one.
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    # Field (JSONL) or column (Parquet) holding the document text.
    text_field: str = "text"
    # Plain text: one document per file, or one per non-empty line.
    text_unit: Literal["file", "line"] = "file"
    # Largest record, in bytes as stored (a JSONL line, a text line or file, a Parquet value); a
    # larger one is rejected and never read whole into memory. 8 MiB is ~15x what the default
    # max_words filter keeps (100k words of English, ~0.6 MB) and bounds a reader's memory.
    max_document_bytes: int = Field(default=8 << 20, ge=1)


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
    seed: int = Field(default=42, ge=0)

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
    # The tokenizer trains on the first kept documents in id order, up to both bounds (null: no
    # bound): training time grows with the text (~1 s for 20 MB on 2 cores), vocabulary quality
    # hardly (held-out bytes per token on Python source: 22 MB -0.2 %, 86 MB -0.07 % against 171 MB).
    max_training_documents: int | None = Field(default=20_000, ge=1)
    # In UTF-8 bytes of text; the document that reaches the bound is the last one taken.
    max_training_bytes: int | None = Field(default=32 << 20, ge=1)


class PackConfig(Section):
    """Tokenise and pack documents into fixed-length training sequences."""

    seq_len: int = Field(default=256, ge=8)
    # Sequences per Parquet shard.
    sequences_per_shard: int = Field(default=2048, ge=1)
    # Fraction of documents held out for validation (chosen by a hash of the document id).
    validation_fraction: float = Field(default=0.02, ge=0.0, lt=0.5)


class DataConfig(Section):
    """The data stage: stream, clean, deduplicate, tokenise, pack."""

    input: InputConfig
    # Bad records (malformed or too deeply nested JSON, missing text field or Parquet column,
    # undecodable bytes, over max_document_bytes): skip them (counted, written to data/rejected/
    # with the reason) or fail with the file and line.
    bad_records: Literal["skip", "fail"] = "skip"
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    # Records per batch inside each part's tasks (memory per task is about one batch).
    batch_size: int = Field(default=512, ge=1)
    # Partitions of the shuffle that groups duplicates (null: 2 x cluster CPUs).
    shuffle_partitions: int | None = Field(default=None, ge=1)
