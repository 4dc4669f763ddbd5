"""The training sections: the model's sizes, the shared trainer settings, and ``pretrain:``,
``sft:``, ``reward_model:`` and ``dpo:``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import DeepSpeedSettings, Section


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


class LoraSettings(Section):
    """A LoRA adapter (``peft``): only the low-rank matrices A (r x in) and B (out x r) train; the
    base weights stay frozen. The update to a target weight W is (alpha / rank) * B @ A.

    Used by ``sft.lora``, ``reward_model.lora``, ``dpo.lora`` and ``ppo.learner.lora`` (null there: full fine-tuning).
    """

    # Rank r of each adapter (vLLM serves ranks up to 512).
    rank: int = Field(default=8, ge=1, le=512)
    # Scale: the adapter's output is multiplied by alpha / rank.
    alpha: float = Field(default=16.0, gt=0.0)
    # Dropout on the adapter's input while training (PPO's learner needs 0).
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Names of the linear modules that get an adapter, matched as peft does: the whole module
    # path or its last parts (``q_proj`` matches every layer's ``self_attn.q_proj``). An entry
    # matching no linear module fails before any worker starts, naming those that exist.
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )


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
    # torch.compile the model (DeepSpeed's engine.compile, in place) with this backend: "inductor"
    # fuses kernels (worth it on GPU; the first steps pay the compile); "aot_eager" traces without
    # code generation (a check that the model compiles). null: eager.
    torch_compile: Literal["inductor", "aot_eager", "eager"] | None = None
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
    # Where Ray Train places the workers' placement group bundles: PACK fills one node first,
    # SPREAD puts them on different nodes where it can (STRICT_*: must, or wait for nodes).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    seed: int = Field(default=0, ge=0)

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
    # Share of prompts held out for validation, with all their records (deterministic: see
    # datasets.split_validation; with distinct prompts, the share of records).
    validation_fraction: float = Field(default=0.05, ge=0.0, lt=0.5)
    # Train a LoRA adapter instead of every weight (null: full fine-tuning). The export holds the
    # merged model in model/ (as without LoRA) and the adapter alone in model/adapter/.
    lora: LoraSettings | None = None


class RewardModelConfig(TrainConfig):
    """``kiln reward-model``: a scalar-head model trained with the Bradley–Terry loss on pairs."""

    # JSONL of {"prompt", "chosen", "rejected"} records (strings, or chat message lists), or a list
    # of such files, read in order (e.g. written pairs and kiln preferences' pairs of the policy's answers).
    data: str | list[str] = Field(min_length=1)
    # Model directory to start from (null: <run>/sft/model); the scalar head is new.
    init_from: str | None = None
    # Tokens per sequence (prompt + one response).
    seq_len: int = Field(default=256, ge=8)
    overlong: Literal["truncate", "reject"] = "truncate"
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    # Train LoRA adapters on the starting model and the new score head in full, instead of every
    # weight (null: full fine-tuning); model/ is the merged model, model/adapter/ the PEFT adapter
    # (with the head). The trunk stays close to the SFT model's: what it knows about the task.
    lora: LoraSettings | None = None
    # Weight of an auxiliary next-token loss on the chosen responses, added to the Bradley-Terry
    # loss (0: none). The starting model's LM head trains beside the score head on the same trunk,
    # and only the reward model is exported: the language-modelling signal keeps the trunk's
    # knowledge of the task while the score head learns (text-generation regularisation, as in
    # Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward Model
    # for LLMs"). Needs a starting model with an LM head (a causal LM); not with lora.
    lm_loss_weight: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _lm_loss_without_lora(self) -> "RewardModelConfig":
        if self.lm_loss_weight > 0 and self.lora is not None:
            raise ValueError("lm_loss_weight > 0 trains the LM head in full; it is not supported with lora")
        return self


class DpoConfig(TrainConfig):
    """``kiln dpo``: direct preference optimisation of the SFT policy on preference pairs.

    The frozen reference is the starting model; its summed response log-probs are computed once,
    before training, and stored with the dataset. ``sequences_per_step`` and
    ``micro_batch_per_worker`` count pairs (each pair is two sequences in one forward pass).
    """

    # JSONL of {"prompt", "chosen", "rejected"} records (strings, or chat message lists).
    data: str
    # Policy and reference to start from (null: <run>/sft/model).
    init_from: str | None = None
    # Use only the first max_pairs records of data (null: all): the reference's log-probs are
    # computed for every pair used, so a run of a few steps need not pay for a large file.
    max_pairs: int | None = Field(default=None, ge=1)
    # Tokens per sequence (prompt + one response).
    seq_len: int = Field(default=256, ge=8)
    # Longer sequences: truncated from the left (the response's end is kept; counted) or rejected.
    overlong: Literal["truncate", "reject"] = "truncate"
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)
    # sigmoid (DPO), ipo (Azar et al.) or cdpo (conservative DPO: label_smoothing > 0).
    loss: Literal["sigmoid", "ipo", "cdpo"] = "sigmoid"
    # Strength of the pull towards the reference (DPO's beta; IPO's tau).
    beta: float = Field(default=0.1, gt=0.0)
    # cdpo only: the assumed probability that a pair's preference label is wrong.
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=0.5)
    # Train a LoRA adapter instead of every weight (null: full fine-tuning); as sft.lora. The
    # reference stays the starting model (its stored log-probs do not change).
    lora: LoraSettings | None = None

    @model_validator(mode="after")
    def _smoothing_is_cdpo(self) -> "DpoConfig":
        if self.loss == "cdpo" and self.label_smoothing == 0.0:
            raise ValueError("loss cdpo needs label_smoothing > 0 (with 0 it is the sigmoid loss)")
        if self.loss != "cdpo" and self.label_smoothing != 0.0:
            raise ValueError(f"label_smoothing applies to loss cdpo only (loss is {self.loss})")
        return self
