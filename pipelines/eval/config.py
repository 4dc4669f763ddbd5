"""The ``eval:`` section: which held-out data every stage's model is measured on, and how.

Unset inputs fall back to the ``ppo:`` section's (prompts, metric, reward function) and to the run's
own reward model; ``pipelines.eval.stage`` resolves them and fails, naming the key, when neither is
set.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from core.config import EngineConfig, Section


class EvalConfig(Section):
    """``kiln eval``: every stage's model on held-out prompts, with intervals and paired tests."""

    # JSONL of {"prompt": str or chat messages, ...}; the other fields go to the metric and reward
    # functions as keyword arguments (null: ppo.eval_prompts).
    prompts: str | None = None
    # Task metric "module:function"(prompt, response, **fields) -> bool (or 0/1): accuracy,
    # pass@k and McNemar's test need a right/wrong grade (null: ppo.metric_function).
    metric_function: str | None = None
    # Reward "module:function"(prompt, response, **fields) -> float (null: ppo.reward_function).
    reward_function: str | None = None
    # Seconds one metric or reward function call may take; a hung call stops the evaluation with
    # an error naming the function, the prompt's line and the response.
    function_timeout_s: float = Field(default=60.0, gt=0.0)
    # Reward model directory scored on the greedy responses (null: <run>/reward_model/model if it exists).
    reward_model: str | None = None
    # Held-out preference pairs JSONL {"prompt", "chosen", "rejected", optional "same_format": bool}
    # for the reward model's pairwise accuracy (null: not measured).
    preferences: str | None = None
    # Responses sampled per prompt: the n (and k) of pass@k.
    samples_per_prompt: int = Field(default=8, ge=1)
    # Temperature of the sampled responses (the greedy ones use 0).
    temperature: float = Field(default=1.0, gt=0.0)
    # Prompts longer than this (tokens, chat template included) are left out for every model.
    max_prompt_tokens: int = Field(default=128, ge=1)
    # Most tokens per response.
    max_response_tokens: int = Field(default=32, ge=1)
    # Validation sequences for perplexity, from the shards pretraining read (pretrain.shards, else
    # <run>/data/shards: validation-*.parquet); 0: skip it.
    perplexity_sequences: int = Field(default=64, ge=0)
    # Seed of the sampled responses (prompt i draws its k samples from seed + i * k onwards).
    seed: int = Field(default=0, ge=0)
    # Name of the model that is the KL reference (its own kl_to_ref is 0).
    reference: str = Field(default="sft", min_length=1)
    # The vLLM engine that generates every model's responses.
    engine: EngineConfig = EngineConfig(dtype="float32")
    # Ray CPUs and GPUs of each generation actor (a GPU engine needs num_gpus >= 1).
    num_cpus: float = Field(default=1.0, gt=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    # Engines (actors) that share each model's prompts, data-parallel; with a reward model, leave
    # its scorer 0.25 CPU beside them (num_replicas x num_cpus + 0.25 <= the cluster's CPUs).
    num_replicas: int = Field(default=1, ge=1)

    @field_validator("metric_function", "reward_function")
    @classmethod
    def _function_spec(cls, value: str | None) -> str | None:
        if value is not None and value.count(":") != 1:
            raise ValueError(f"expected 'module:function', got {value!r}")
        return value

    @model_validator(mode="after")
    def _room(self) -> "EvalConfig":
        # vLLM refuses a prompt that fills the context mid-evaluation and cuts a response short
        # without a word (graded wrong): every kept prompt must have room for a whole response.
        room = self.engine.max_model_len
        if room is not None and room < self.max_prompt_tokens + self.max_response_tokens:
            raise ValueError(f"engine.max_model_len ({room}) is shorter than max_prompt_tokens + max_response_tokens "
                             f"({self.max_prompt_tokens} + {self.max_response_tokens})")  # fmt: skip
        return self
