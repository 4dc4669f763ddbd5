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
    # Shared storage for checkpoints: a path every node mounts, or an object-store URI
    # (s3://bucket/kiln). Required on multi-node clusters, where a node's local disk is not seen
    # by the others (``kiln submit`` refuses a remote cluster without it); null: under root.
    storage_path: str | None = Field(default=None, min_length=1)

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name

    def stage_storage(self, stage: str) -> str | None:
        """Ray Train storage of one stage's checkpoints: ``<storage_path>/<name>/<stage>``, or None."""
        if self.storage_path is None:
            return None
        return f"{self.storage_path.rstrip('/')}/{self.name}/{stage}"


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


class ModelConfig(Section):
    """A Llama-style decoder: built from these sizes and initialised from scratch, or loaded."""

    # A local Hugging Face model directory to start from; null builds a new model from the sizes.
    path: str | None = None
    hidden_size: int = Field(default=256, ge=8)
    intermediate_size: int = Field(default=688, ge=8)
    num_layers: int = Field(default=4, ge=1)
    num_heads: int = Field(default=4, ge=1)
    # Grouped-query attention: key/value heads (num_heads must be a multiple).
    num_kv_heads: int = Field(default=4, ge=1)
    # Longest sequence the model accepts (rotary embeddings are defined up to it).
    max_position_embeddings: int = Field(default=2048, ge=8)
    rope_theta: float = Field(default=10_000.0, gt=0.0)
    tie_word_embeddings: bool = False

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("hidden_size / num_heads (the head size) must be even for rotary embeddings")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        return self


class DeepSpeedSettings(Section):
    """What every DeepSpeed-trained model shares: ranks and their resources, ZeRO, AdamW, clipping.

    The training stages (``TrainConfig``) and PPO's learner and critic
    (``pipelines.ppo_config.OptimizedModelConfig``) build on it.
    """

    # Data-parallel ranks (workers) and the resources each one holds.
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    use_gpu: bool = False
    # torch intra-op threads per worker on CPU (null: leave torch's default).
    threads_per_worker: int | None = Field(default=1, ge=1)
    # DeepSpeed ZeRO stage; offloading moves optimizer state (any stage) or parameters (stage 3) to CPU.
    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    # Sequences per forward/backward on one worker.
    micro_batch_per_worker: int = Field(default=8, ge=1)
    # Peak learning rate, reached after warmup_steps of linear warm-up.
    learning_rate: float = Field(default=3.0e-4, gt=0.0)
    warmup_steps: int = Field(default=100, ge=0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    adam_beta1: float = Field(default=0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(default=0.95, ge=0.0, lt=1.0)
    adam_eps: float = Field(default=1.0e-8, gt=0.0)
    # Global gradient-norm clip (null: no clipping).
    grad_clip: float | None = Field(default=1.0, gt=0.0)

    @model_validator(mode="after")
    def _offload(self) -> "DeepSpeedSettings":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self


class TrainConfig(DeepSpeedSettings):
    """The training machinery shared by pretrain, SFT and reward model (Ray Train + DeepSpeed).

    ``micro_batch_per_worker``: sequences_per_step must be a multiple of it x num_workers (the
    quotient is the gradient-accumulation steps). The learning rate decays (cosine) after the
    warm-up to learning_rate x min_lr_ratio at max_steps.
    """

    # Sequences per optimizer step, summed over workers and gradient-accumulation micro steps.
    sequences_per_step: int = Field(default=32, ge=1)
    max_steps: int = Field(default=1000, ge=1)
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    # Recompute activations in the backward pass: less memory, about a third more compute.
    activation_checkpointing: bool = False
    # Optimizer steps between metric lines (metrics.jsonl, TensorBoard, ray.train.report).
    log_every_steps: int = Field(default=10, ge=1)
    # Optimizer steps between held-out evaluations, and micro batches per worker each one uses.
    eval_every_steps: int = Field(default=100, ge=1)
    eval_batches: int = Field(default=4, ge=1)
    # Optimizer steps between checkpoints, and how many of the latest to keep.
    checkpoint_every_steps: int = Field(default=100, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    # Worker failures Ray Train recovers from (restarting from the latest checkpoint); -1: no limit.
    max_failures: int = Field(default=3, ge=-1)
    seed: int = 0

    @property
    def grad_accum_steps(self) -> int:
        """Micro steps per optimizer step on each worker."""
        return self.sequences_per_step // (self.micro_batch_per_worker * self.num_workers)

    @model_validator(mode="after")
    def _batch_divides(self) -> "TrainConfig":
        per_micro_step = self.micro_batch_per_worker * self.num_workers
        if self.sequences_per_step % per_micro_step:
            raise ValueError(
                f"sequences_per_step ({self.sequences_per_step}) must be a multiple of "
                f"micro_batch_per_worker x num_workers ({self.micro_batch_per_worker} x {self.num_workers})"
            )
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        return self


class PretrainConfig(TrainConfig):
    """``kiln pretrain``: next-token prediction on the data stage's packed shards."""

    model: ModelConfig = ModelConfig()
    # Folder of train-*.parquet / validation-*.parquet shards (null: <run>/data/shards).
    shards: str | None = None
    # Tokenizer directory saved with the model (null: <run>/tokenizer).
    tokenizer: str | None = None


class SftConfig(TrainConfig):
    """``kiln sft``: chat-formatted instruction tuning, loss on response tokens only."""

    # JSONL of {"messages": [...]} or {"prompt": ..., "response": ...} records.
    data: str
    # Model directory to start from (null: <run>/pretrain/model); its tokenizer is used.
    init_from: str | None = None
    # Tokens per training sequence.
    seq_len: int = Field(default=256, ge=8)
    # Examples longer than seq_len: truncated (and counted), or the stage fails naming the record.
    overlong: Literal["truncate", "reject"] = "truncate"
    # Pack several examples into each sequence (prompt tokens of each still masked).
    packing: bool = False
    # Share of records held out for validation (every k-th record, deterministic).
    validation_fraction: float = Field(default=0.05, ge=0.0, lt=0.5)


class RewardModelConfig(TrainConfig):
    """``kiln reward-model``: a scalar-head model trained with the Bradley–Terry loss on pairs."""

    # JSONL of {"prompt", "chosen", "rejected"} records (strings, or chat message lists).
    data: str
    # Model directory to start from (null: <run>/sft/model); the scalar head is new.
    init_from: str | None = None
    # Tokens per sequence (prompt + one response).
    seq_len: int = Field(default=256, ge=8)
    overlong: Literal["truncate", "reject"] = "truncate"
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)


class KilnConfig(Section):
    """The root of the tree: one file describes a whole run."""

    run: RunConfig
    ray: RayConfig = RayConfig()
    generate: GenerateConfig | None = None
    data: DataConfig | None = None
    pretrain: PretrainConfig | None = None
    sft: SftConfig | None = None
    reward_model: RewardModelConfig | None = None
    # Defined in pipelines/ppo_config.py and serving/config.py; resolved by the model_rebuild()
    # at the end of this module.
    ppo: PpoConfig | None = None
    serve: ServeConfig | None = None

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


# The serving stage owns its section. Imported last because serving.config imports Section from
# here (serving/__init__.py imports this module first, so either import order works).
from serving.config import ServeConfig  # noqa: E402
from pipelines.ppo_config import PpoConfig  # noqa: E402

KilnConfig.model_rebuild()
