"""Connecting to Ray: the embedded local cluster by default, or an existing one by address."""

from __future__ import annotations

import logging
import os

import ray

from pipelines.config import RayConfig

# Environment every Ray worker needs: DeepSpeed must pick its CPU accelerator on CPU-only nodes,
# and Ray Data's per-operator progress bars are noise in a log.
_WORKER_ENV_DEFAULTS = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}


def worker_env() -> dict[str, str]:
    """Environment variables passed to every Ray worker (the caller's values win)."""
    return {k: os.environ.get(k, v) for k, v in _WORKER_ENV_DEFAULTS.items()}


def init_ray(cfg: RayConfig) -> None:
    """Start or join a Ray cluster once per process; a second call is a no-op."""
    if ray.is_initialized():
        return
    ray.init(
        address=cfg.address,
        num_cpus=cfg.num_cpus if cfg.address is None else None,
        runtime_env={"env_vars": worker_env()},
        include_dashboard=None,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
