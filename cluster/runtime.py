"""Connecting to Ray: the embedded local cluster by default, or an existing one by address."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import ray

from cluster.config import RayConfig

# Environment every Ray worker needs: DeepSpeed must pick its CPU accelerator on CPU-only nodes,
# and Ray Data's per-operator progress bars are noise in a log.
_WORKER_ENV_DEFAULTS = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}

# Worker output (vLLM, DeepSpeed, Ray Data progress) on the driver's terminal: off by default, so a
# stage shows its own progress bar and summary; `kiln --verbose` turns it on. Either way every
# worker's output is in the Ray session's log directory (``ray_log_dir``).
_VERBOSE = False


def configure_output(verbose: bool) -> None:
    """Show Ray workers' output and Ray Data's progress on the terminal (``--verbose``), or not."""
    global _VERBOSE
    _VERBOSE = verbose
    _apply_log_levels()
    if not verbose:
        # Hugging Face's own bars ("Loading weights" each time eval loads a model): read from the
        # environment when huggingface_hub is imported; a user's explicit setting wins.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            sys.modules["transformers"].utils.logging.disable_progress_bar()


# Ray's notice, at each ray.init of a local cluster, that token authentication is on (Ray's
# default): kept off the terminal unless --verbose. Its warning that authentication is OFF is
# left alone: that one matters.
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_AUTH_ON = "Token authentication is enabled"


def _quiet_notices(record: logging.LogRecord) -> bool:
    return _VERBOSE or not record.getMessage().startswith(_TOKEN_AUTH_ON)


def _apply_log_levels() -> None:
    # Ray Data configures its loggers when it is imported, which may be after configure_output:
    # init_ray applies the levels again.
    level = logging.INFO if _VERBOSE else logging.WARNING
    for name in ("ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(level)
    auth = logging.getLogger(_TOKEN_AUTH_LOGGER)
    if _quiet_notices not in auth.filters:
        auth.addFilter(_quiet_notices)


def ray_log_dir() -> str | None:
    """This node's Ray session log directory (every worker's stdout and stderr), once Ray is up."""
    if not ray.is_initialized():
        return None
    # Ray has no public accessor for it; a local session's logs are under its session directory.
    node = getattr(ray._private.worker, "_global_node", None)
    return node.get_logs_dir_path() if node is not None else None


# Set by Ray's job supervisor in the environment of a submitted job's driver: the job's runtime
# environment (working_dir, env_vars, ...) as JSON. ray.init() merges it with the one we pass.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def worker_env() -> dict[str, str]:
    """Environment variables passed to every Ray worker (the caller's values win)."""
    return {k: os.environ.get(k, v) for k, v in _WORKER_ENV_DEFAULTS.items()}


def export_worker_env() -> None:
    """Put ``worker_env`` into this process's environment, where an embedded cluster's raylet, and
    so every worker, inherits it. Not a runtime env: Ray's pre-started workers lack one, so the
    first tasks would wait for new worker processes (~0.65 s on 2 CPUs)."""
    for k, v in worker_env().items():
        os.environ.setdefault(k, v)


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this process is the driver of ({} outside a job)."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return {}
    return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})


def init_ray(cfg: RayConfig) -> None:
    """Start or join a Ray cluster once per process; a second call is a no-op.

    ``address: null`` starts an embedded cluster of ``num_cpus`` CPUs, except where Ray itself
    names a cluster to join: inside a submitted job (``kiln submit``, ``ray job submit``, a KubeRay
    RayJob) Ray sets ``RAY_ADDRESS`` and the driver joins the job's cluster, whose size is fixed.
    """
    _apply_log_levels()
    if ray.is_initialized():
        return
    joins = cfg.address is not None or bool(os.environ.get("RAY_ADDRESS"))
    # Ray refuses to merge a driver's env var with one the job's runtime env already sets (even
    # to the same value), and the job's value is already in this process's environment anyway.
    job_env = _job_env_vars()
    env_vars = {k: v for k, v in worker_env().items() if k not in job_env}
    runtime_env: dict[str, Any] | None = {"env_vars": env_vars}
    if not joins:
        export_worker_env()
        runtime_env = None
    ray.init(
        address=cfg.address,
        # Only an embedded cluster can be sized; Ray rejects num_cpus when joining one.
        num_cpus=None if joins else cfg.num_cpus,
        runtime_env=runtime_env,
        include_dashboard=None,
        logging_level=logging.WARNING,
        log_to_driver=_VERBOSE,
    )
