"""Connecting to Ray: the embedded local cluster by default, or an existing one by address."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import ray

from cluster.config import RayConfig

# Environment every Ray worker needs: DeepSpeed must pick its CPU accelerator on CPU-only nodes,
# and Ray Data's per-operator progress bars are noise in a log. Serve's HTTP proxies, started in
# the cluster, load kiln's middleware that gives their own refusals OpenAI's error shape
# (``serving/proxy_errors.py``, whose ``CALLBACK`` this is).
_WORKER_ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serving.proxy_errors:middlewares",
}

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


def _job_runtime_env() -> dict[str, Any]:
    """The runtime env of the Ray job this process is the driver of ({} outside a job)."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    return dict(json.loads(raw).get("runtime_env") or {}) if raw else {}


def _job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this process is the driver of ({} outside a job)."""
    return dict(_job_runtime_env().get("env_vars") or {})


# kiln's top-level packages, and the directory they are in. Ray's workers put the driver's working
# directory, and its script's directory when that is on the driver's path, first on their import
# path, ahead of the installed kiln (ray/_private/worker.py, unless the job has a runtime-env
# working_dir): a package of one of these names there is what every worker would import.
_KILN_PACKAGES = ("actors", "bench", "cluster", "core", "pipelines", "serving")
_KILN_ROOT = Path(__file__).resolve().parents[1]


class ShadowedPackages(ValueError):
    """A directory Ray puts first on its workers' import path has a package named like kiln's."""


def shadowing_packages(directory: Path) -> list[str]:
    """kiln's packages that ``directory`` (unless it is kiln's own) has one of the same name of: a
    regular package or a module. A folder without ``__init__.py`` is a namespace portion, which a
    regular package later on the path wins over, so it does not count."""
    if directory.resolve() == _KILN_ROOT:
        return []
    return [name for name in _KILN_PACKAGES
            if (directory / name / "__init__.py").is_file() or (directory / f"{name}.py").is_file()]  # fmt: skip


def _worker_code_paths() -> list[Path]:
    """The directories Ray will put first on every worker's import path for this driver."""
    if _job_runtime_env().get("working_dir"):
        return []  # a submitted job: its working directory is what Ray ships, and nothing is added
    paths = [Path.cwd()]
    script = Path(os.path.realpath(sys.argv[0])).parent if sys.argv and sys.argv[0] else None
    if script is not None and str(script) in sys.path:
        paths.append(script)
    return paths


def check_worker_imports() -> None:
    """Refuse to start Ray where its workers would import another project's ``core`` (or any of
    kiln's package names) instead of kiln's own: the driver would run kiln and every task
    something else.

    Raises:
        ShadowedPackages: naming the directory, the packages and what to do.
    """
    for directory in _worker_code_paths():
        names = shadowing_packages(directory)
        if names:
            listed = ", ".join(f"{n}/" if (directory / n / "__init__.py").is_file() else f"{n}.py" for n in names)
            raise ShadowedPackages(
                f"{directory} has {listed} of its own, and Ray's workers put the directory kiln runs in "
                f"(and its script's) first on their import path: every Ray task would import "
                f"{'that' if len(names) == 1 else 'those'} instead of kiln's. Run kiln from another "
                f"directory (the kiln checkout, or one without packages named {', '.join(_KILN_PACKAGES)})."
            )


def init_ray(cfg: RayConfig) -> None:
    """Start or join a Ray cluster once per process; a second call is a no-op.

    ``address: null`` starts an embedded cluster of ``num_cpus`` CPUs, except where Ray itself
    names a cluster to join: inside a submitted job (``kiln submit``, ``ray job submit``, a KubeRay
    RayJob) Ray sets ``RAY_ADDRESS`` and the driver joins the job's cluster, whose size is fixed.

    Raises:
        ShadowedPackages: the workers would import another project's package instead of kiln's
            (``check_worker_imports``); nothing is started.
    """
    _apply_log_levels()
    if ray.is_initialized():
        return
    check_worker_imports()
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
