"""The ``serve:`` section of the kiln config: which model, where it listens, how it scales.

Defined here rather than in ``pipelines/config.py`` so the serving code owns its own settings;
``pipelines.config`` imports :class:`ServeConfig` at its end to hang it on ``KilnConfig``.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from pipelines.config import Section


class EngineConfig(Section):
    """vLLM engine settings of each replica (the CPU backend needs the small memory values)."""

    # auto: the model's own dtype; tiny CPU models run best in float32.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Context length in tokens (prompt + completion); null: the model's max_position_embeddings.
    max_model_len: int | None = Field(default=None, ge=16)
    # GPU: fraction of GPU memory vLLM reserves. CPU: fraction of NUMA node 0's memory, checked
    # at start-up (the default 0.92 of vLLM fails on small machines).
    gpu_memory_utilization: float = Field(default=0.3, gt=0.0, le=1.0)
    # CPU backend only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); ignored on GPUs.
    cpu_kv_cache_gib: int = Field(default=1, ge=1)
    # Skip CUDA-graph / torch.compile capture: much faster start-up, a little slower decoding.
    enforce_eager: bool = True
    # Sequences one engine step may batch.
    max_num_seqs: int = Field(default=128, ge=1)
    # GPUs one replica shards the model over.
    tensor_parallel_size: int = Field(default=1, ge=1)
    # Most top log-probabilities a request may ask for.
    max_logprobs: int = Field(default=20, ge=0)
    # Engine seed (requests without their own seed sample from this stream).
    seed: int = 0

    def vllm_env(self, **overrides: str) -> dict[str, str]:
        """Environment of a process running this engine: the CPU KV cache size, the caller's own
        ``VLLM_*`` settings (e.g. VLLM_CPU_OMP_THREADS_BIND), then ``overrides``."""
        env = {"VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gib)}
        env.update({k: v for k, v in os.environ.items() if k.startswith("VLLM_")})
        return {**env, **overrides}

    def vllm_args(self) -> dict[str, Any]:
        """These settings as vLLM engine arguments (``LLM(...)`` / ``AsyncEngineArgs(...)``);
        the CPU KV cache size goes through the VLLM_CPU_KVCACHE_SPACE environment variable instead."""
        return self.model_dump(exclude={"cpu_kv_cache_gib"})


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of the replica count on ongoing requests per replica."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    # Serve adds replicas when the mean ongoing requests per replica stays above this.
    target_ongoing_requests: float = Field(default=32.0, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class ServeConfig(Section):
    """An OpenAI-compatible HTTP endpoint for one Hugging Face-format model directory."""

    # Model directory (HF format); null: the run's final model (the last stage that wrote one).
    model: str | None = None
    # Name clients pass as "model"; null: the model directory's name.
    model_name: str | None = None
    # Interface the HTTP proxy binds to; 127.0.0.1 keeps the endpoint local to this machine.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Environment variable holding the API key; when it (or api_key) is set, requests need
    # "Authorization: Bearer <key>".
    api_key_env: str = "KILN_API_KEY"
    # The API key itself (prefer api_key_env: a config file is easy to leak).
    api_key: str | None = Field(default=None, min_length=8)
    # Fixed replica count; ignored when autoscaling is set.
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    # Requests one replica works on at once (vLLM batches them; too low starves the batch).
    max_ongoing_requests: int = Field(default=64, ge=1)
    # Requests waiting for a replica beyond that; more are refused at once with 503 (-1: no limit).
    max_queued_requests: int = Field(default=64, ge=-1)
    # Seconds a request may run before it is aborted and answered 408.
    request_timeout_s: float = Field(default=120.0, gt=0.0)
    # Ray resources of each replica (the vLLM engine process runs beside it).
    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    engine: EngineConfig = EngineConfig()

    @model_validator(mode="after")
    def _queue_limit(self) -> "ServeConfig":
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests: -1 (no limit) or at least 1 (Ray Serve has no 0)")
        return self
