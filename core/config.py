"""The ground floor of the config tree: the strict section base and the settings that several
layers share (DeepSpeed-trained models, vLLM engines).

Every section of ``kiln``'s one config tree is a :class:`Section`: unknown keys and wrong types
are rejected with the key's full path, values are never silently rewritten. Each stage family
defines its own sections next to its code (``pipelines/data/config.py``, ``serving/config.py``,
...); ``pipelines/config.py`` is the root that imports them all. Nothing here imports the project.

Secrets (an API key, a token) are never written at rest or echoed: :func:`redacted_dump` is the
config as saved into a run directory, and :func:`format_errors` never shows a secret's value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key path."""


class Section(BaseModel):
    """Base of every config section: strict types, unknown keys rejected, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# What a secret's value is replaced with wherever the config is written or shown.
REDACTED = "***"


class SecretMark:
    """The annotation that makes a string field a :data:`Secret`."""


# A config string that must never be written at rest or printed: ``api_key: Secret | None = None``.
Secret = Annotated[str, SecretMark()]

# Fields named like a secret are treated as one even without the ``Secret`` type (a safety net
# for a field whose author forgot it): ``api_key``, ``token``, ``password``, ``secret`` and the
# names ending in ``_<one of those>``. ``api_key_env`` (a variable's name) and ``max_tokens`` are not.
_SECRET_NAME = re.compile(r"(^|_)(api_key|token|password|passwd|secret|credentials?)$")


# scheme://key:secret@...: how pyarrow's filesystems (s3://) take credentials in a URI. The secret
# runs to the first "@" whatever it holds (an AWS secret key often has a "/"); the key before the
# ":" has no "/", so a path with ":" and "@" in it (s3://bucket/a:b/c@d) is not taken for one.
_URI_CREDENTIALS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:[^@]*@")


def no_uri_credentials(uri: str) -> str:
    """A field validator: refuse a URI with credentials in it (the config is saved in the run
    directory and its values shown in errors and logs)."""
    if _URI_CREDENTIALS.match(uri):
        raise ValueError("a URI with credentials in it (scheme://key:secret@...) would be saved in the run "
                         "directory and shown in logs; give them to the filesystem through its environment "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS)")  # fmt: skip
    return uri


# A local path or a URI (s3://bucket/x), not empty, that carries no credentials (no_uri_credentials).
PathOrUri = Annotated[str, Field(min_length=1), AfterValidator(no_uri_credentials)]


def _marked(annotation: Any) -> bool:
    return any(isinstance(a, SecretMark) or _marked(a) for a in get_args(annotation))


def is_secret(name: str, field: Any) -> bool:
    """Whether the field ``name`` (a pydantic ``FieldInfo``) holds a secret: typed :data:`Secret`
    (also inside ``Secret | None``), or named like one."""
    marked = any(isinstance(m, SecretMark) for m in field.metadata) or _marked(field.annotation)
    return marked or bool(_SECRET_NAME.search(name))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds (``X`` of ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _model_in(a)) is not None), None)


def redacted_dump(config: BaseModel) -> dict[str, Any]:
    """``config.model_dump(mode="json")`` with every set secret replaced by ``REDACTED``: the form
    in which a config is written to disk or shown."""
    dumped = config.model_dump(mode="json")
    _redact(config, dumped)
    return dumped


def _redact(model: BaseModel, dumped: dict[str, Any]) -> None:
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None:
            continue
        if is_secret(name, field):
            dumped[name] = REDACTED
        elif isinstance(value, BaseModel):
            _redact(value, dumped[name])
        elif isinstance(value, (list, tuple)):
            for item, out in zip(value, dumped[name]):
                if isinstance(item, BaseModel):
                    _redact(item, out)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    _redact(item, dumped[name][key])


def _shows_secret(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> bool:
    """Whether an error at ``loc`` (a key path from ``model``) is at or inside a secret field."""
    for part in loc:
        if not isinstance(part, str):
            continue  # a list index
        field = model.model_fields.get(part) if model is not None else None
        if _SECRET_NAME.search(part) or (field is not None and is_secret(part, field)):
            return True
        model = _model_in(field.annotation) if field is not None else None
    return False


def format_errors(error: ValidationError, source: str, model: type[BaseModel] | None = None,
                  locate: Callable[[tuple[Any, ...]], str | None] | None = None) -> str:
    """A validation error as one line per problem: the key's path, the problem, the value given.

    The value is left out where it could be a secret: a :func:`is_secret` field (found from
    ``model``, the validated class, or by name), an unknown key (a misspelt ``api_kee`` is still a
    key), and anything but a scalar (a mapping or list may hold a secret under any name: an
    indentation slip turns ``serve`` into a list of ``api_key`` mappings); only its type is named.
    A shown value is cut at 200 characters (YAML aliases can expand a small file enormously).
    ``locate`` maps a key's path to where it was written (``file:line``), which then leads its line.
    """
    lines = [f"{source}: invalid config ({error.error_count()} problem(s))"]
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        got = item.get("input")
        if item["type"] in ("extra_forbidden", "missing") or isinstance(got, dict):
            shown = ""
        elif _shows_secret(model, item["loc"]) or (isinstance(got, str) and _URI_CREDENTIALS.match(got)):
            shown = f" (got {REDACTED})"
        elif not isinstance(got, str | int | float | bool | None):
            shown = f" (got a {type(got).__name__})"
        else:
            text = repr(got)
            shown = f" (got {text if len(text) <= 200 else text[:200] + '...'})"
        where = locate(tuple(item["loc"])) if locate is not None else None
        lines.append(f"  {where + ': ' if where else ''}{path}: {item['msg']}{shown}")
    return "\n".join(lines)


class DeepSpeedSettings(Section):
    """What every DeepSpeed-trained model shares: ranks and their resources, ZeRO, AdamW, clipping.

    The training stages (``TrainConfig``) and PPO's learner and critic
    (``pipelines.rlhf.config.OptimizedModelConfig``) build on it.
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


# Ranks a vLLM engine accepts as max_lora_rank (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``.

    Raises:
        ValueError: ``rank`` is above the largest (512).
    """
    for accepted in VLLM_LORA_RANKS:
        if accepted >= rank:
            return accepted
    raise ValueError(f"LoRA rank {rank} is above the largest vLLM accepts ({VLLM_LORA_RANKS[-1]})")


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
    seed: int = Field(default=0, ge=0)

    def vllm_env(self, **overrides: str) -> dict[str, str]:
        """Environment of a process running this engine: the CPU KV cache size, the caller's own
        ``VLLM_*`` settings (e.g. VLLM_CPU_OMP_THREADS_BIND), then ``overrides``. Never
        ``VLLM_API_KEY`` (vLLM's own server's key, no engine setting): a Ray runtime env is stored
        in the cluster's state in the clear."""
        env = {"VLLM_CPU_KVCACHE_SPACE": str(self.cpu_kv_cache_gib)}
        env.update({k: v for k, v in os.environ.items() if k.startswith("VLLM_") and k != "VLLM_API_KEY"})
        return {**env, **overrides}

    def vllm_args(self) -> dict[str, Any]:
        """These settings as vLLM engine arguments (``LLM(...)`` / ``AsyncEngineArgs(...)``);
        the CPU KV cache size goes through the VLLM_CPU_KVCACHE_SPACE environment variable instead."""
        return self.model_dump(exclude={"cpu_kv_cache_gib"})
