"""``kiln submit CONFIG --address http://HEAD:8265``: ``kiln run CONFIG`` as a Ray job on a cluster.

The equivalent of ``ray job submit --working-dir . --runtime-env-json '{...}' -- kiln run CONFIG``
through Ray's Job Submission SDK: the project directory is uploaded as the job's working
directory (without ``.venv``, ``runs`` and other local state), the job's workers get kiln's
environment variables (``cluster.runtime.worker_env``), the job id is printed and the job's logs
are followed until it ends. The exit status is 0 only if the job SUCCEEDED.

Everything that can be checked here is checked before anything is submitted: the address is
https, or plain http only to this machine (or with ``--insecure``), since the token and the
project travel in it; the config parses, it lies inside the working directory (the job reads it
from there), and a multi-node cluster has shared storage for checkpoints (``run.storage_path``).
Secret-looking files in the working directory (``.env``, keys, tokens) are never uploaded.

Token authentication (Ray >= 2.52; on by default for clusters Ray 2.60 starts): the token is read
the way Ray reads it, first found wins: ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``. ``RAY_AUTH_MODE=disabled`` sends none.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlparse

from cluster.runtime import worker_env
from pipelines.config import KilnConfig, config_files, load_config

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# The repository root: the default working directory uploaded with the job.
PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Never uploaded, wherever they sit in the working directory (gitignore syntax): files that hold
# secrets. The job needs none of them (its environment comes from env_vars), and what is uploaded
# is stored in the cluster's GCS, readable by every job on it.
SECRET_EXCLUDES = [
    ".env",
    ".env.*",
    "*.env",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "*auth_token*",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".ssh/",
    ".aws/",
    ".kube/",
    ".envrc",
    "*credentials*.json",
    "*service-account*.json",
    "secrets.*",
    ".npmrc",
    ".docker/",
    ".huggingface/",
]

# Never uploaded either: local environment, run outputs and caches. Ray caps a working directory
# at a few hundred MiB, and none of these belong on the cluster (the nodes have their own
# environment; outputs go to run.root there). Ray honours a .gitignore too, but a working
# directory need not have one (or may be run with RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1).
WORKING_DIR_EXCLUDES = [
    ".venv/",
    "runs/",
    ".git/",
    "__pycache__/",
    "*.egg-info/",
    ".pytest_cache/",
    ".hypothesis/",
    ".ruff_cache/",
    ".mypy_cache/",
    "build/",
    "/.whl/",
    "/.gl/",
    *SECRET_EXCLUDES,
]

_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """The job cannot be submitted (nothing was submitted); the message says why and what to do."""


def dashboard_address(address: str) -> str:
    """``--address`` checked and rebuilt as ``scheme://host[:port]``, read with the parser the HTTP
    client uses (urllib3's): nothing else in it, so the host kiln checks is the host the request,
    and the token with it, goes to (``http://REMOTE\\@127.0.0.1`` read as loopback by one parser
    and sent to REMOTE by the other).

    Raises:
        SubmitError: not ``http(s)://HOST[:PORT]`` alone.
    """
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    refused = SubmitError(f"--address {address!r}: expected the Ray dashboard's URL alone, http(s)://HOST:PORT "
                          "(no user, path, query, backslash or space)")  # fmt: skip
    if any(c in address for c in "\\@") or any(c.isspace() for c in address):
        raise refused
    try:
        url = parse_url(address)
    except LocationParseError:
        raise refused from None
    if (url.scheme or "").lower() not in ("http", "https") or not url.host or url.path not in (None, "", "/") \
            or url.query is not None or url.fragment is not None:  # fmt: skip
        raise refused
    return f"{url.scheme.lower()}://{url.host.lower()}{f':{url.port}' if url.port is not None else ''}"


def bypass_proxy(address: str) -> None:
    """Plain http to this machine must not go through ``HTTP_PROXY`` (the token would reach the
    proxy host in clear text): its host joins ``NO_PROXY`` for this process."""
    if urlparse(address).scheme != "http" or not is_loopback(address):
        return
    hosts = [h.strip() for name in ("no_proxy", "NO_PROXY") for h in os.environ.get(name, "").split(",") if h.strip()]
    joined = ",".join(dict.fromkeys([*hosts, urlparse(address).hostname or ""]))  # both spellings: either may be read
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = joined


def is_loopback(address: str) -> bool:
    """Whether a dashboard address (``http://HOST:PORT``) names this machine."""
    host = urlparse(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(address: str, insecure: bool) -> None:
    """Refuse to send the cluster's token and the project in clear text to another machine.

    Raises:
        SubmitError: ``address`` is plain ``http://`` to a host that is not loopback, and
            ``insecure`` (``--insecure``) is False.
    """
    if urlparse(address).scheme == "http" and not is_loopback(address) and not insecure:
        raise SubmitError(
            f"--address {address} is plain http to another machine: the Ray token and the uploaded project "
            f"would cross the network unencrypted. Use an https:// address (a TLS proxy in front of the "
            f"dashboard), or a tunnel to the head (`ray dashboard CLUSTER.yaml`, or `ssh -L 8265:localhost:8265 "
            f"HEAD`) and --address http://127.0.0.1:8265; or pass --insecure on a network you trust."
        )


def _storage_refusal(where: str) -> SubmitError:
    return SubmitError(
        f"{where}, and run.storage_path is not set: each node would keep its checkpoints on its "
        f"own disk, where a restarted worker or the next stage cannot find them. Set run.storage_path "
        f"in the config to a path every node mounts (e.g. /mnt/shared/kiln) or an object-store URI "
        f"(e.g. s3://bucket/kiln)."
    )


def check_storage(cfg: KilnConfig, address: str) -> None:
    """Refuse a remote cluster when the config has no shared storage for checkpoints.

    Raises:
        SubmitError: ``address`` is not a loopback address and ``run.storage_path`` is null.
    """
    if cfg.run.storage_path is None and not is_loopback(address):
        raise _storage_refusal(f"{address} is a remote cluster")


def auth_token() -> str | None:
    """The Ray cluster token, looked up as Ray does (None: no token, or auth disabled).

    Raises:
        SubmitError: ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty (Ray
            treats that as a fatal misconfiguration too, rather than falling back).
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token: {e.strerror}") from None
        if not token:
            raise SubmitError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    if not default.is_file():
        return None
    return default.read_text().strip() or None


def _trains_on_gpu(tree: Any) -> bool:
    """Whether any section of a (dumped) config sets ``use_gpu: true``: the training stages'
    and PPO's learner and critic alike."""
    if isinstance(tree, dict):
        return tree.get("use_gpu") is True or any(_trains_on_gpu(v) for v in tree.values())
    return False


def job_env_vars(cfg: KilnConfig) -> dict[str, str]:
    """Environment of every process of the job: ``worker_env()``, with DeepSpeed on CUDA for a
    config that trains on GPUs (``worker_env``'s CPU accelerator would break it there)."""
    env = worker_env()
    if "DS_ACCELERATOR" not in os.environ and _trains_on_gpu(cfg.model_dump()):
        env["DS_ACCELERATOR"] = "cuda"
    return env


def job_runtime_env(cfg: KilnConfig, working_dir: Path) -> dict[str, Any]:
    """The job's runtime environment: ``working_dir`` uploaded without ``WORKING_DIR_EXCLUDES``
    (nor what its .gitignore files ignore), and kiln's environment variables."""
    return {"working_dir": str(working_dir), "excludes": WORKING_DIR_EXCLUDES, "env_vars": job_env_vars(cfg)}


def _relative_config(config_path: Path, working_dir: Path) -> str:
    try:
        return config_path.resolve().relative_to(working_dir).as_posix()
    except ValueError:
        raise SubmitError(
            f"{config_path} is outside the working directory {working_dir}: the job reads its config "
            f"from its copy of that directory. Move the config into it, or pass --working-dir."
        ) from None


def left_out_of_upload(path: Path, working_dir: Path) -> bool:
    """Whether Ray's upload of ``working_dir`` leaves ``path`` out, asked of Ray's own matchers as its
    upload walks: kiln's excludes, then each folder's .gitignore / .rayignore on the way down
    (a run's saved ``runs/<name>/config.yaml`` is one: ``runs/`` is never uploaded)."""
    from ray._private.runtime_env.packaging import _get_excludes, get_excludes_from_ignore_files

    gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    excludes = [_get_excludes(working_dir, WORKING_DIR_EXCLUDES)]
    current = working_dir
    for part in ("", *path.relative_to(working_dir).parts):
        current = current / part if part else current
        if current.is_dir():
            excludes += get_excludes_from_ignore_files(current, include_gitignore=gitignore)
        if current != working_dir and any(exclude(current) for exclude in excludes):
            return True
    return False


def _client(address: str, token: str | None) -> JobSubmissionClient:
    # Ray's job and state SDKs are imported only when submitting: `kiln --help` stays fast.
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Passed explicitly: Ray's client only adds the token when this process runs with
    # RAY_AUTH_MODE=token, which its job CLI leaves unset ("Missing authentication token").
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise SubmitError(_auth_help(address, token)) from None
    except (ConnectionError, RuntimeError) as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {e}") from None


def _auth_help(address: str, token: str | None) -> str:
    problem = "rejected the token" if token else "needs a token and none was sent"
    return (
        f"the Ray cluster at {address} {problem}. Give kiln the cluster's token in RAY_AUTH_TOKEN, "
        f"in a file named by RAY_AUTH_TOKEN_PATH, or in ~/.ray/auth_token (on the head node: "
        f"`ray get-auth-token`; KubeRay: the RayCluster's auth Secret, key auth_token)."
    )


def _alive_nodes(address: str, token: str | None) -> int:
    from ray.util.state import StateApiClient  # see _client
    from ray.util.state.common import ListApiOptions, StateResource

    headers = {"Authorization": f"Bearer {token}"} if token else None
    nodes = StateApiClient(address, headers=headers).list(
        StateResource.NODES,
        options=ListApiOptions(filters=[("state", "=", "ALIVE")]),
        raise_on_missing_output=False,
    )
    return len(nodes)


async def _follow(client: JobSubmissionClient, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def _wait(client: JobSubmissionClient, job_id: str) -> str:
    # The log stream ends when the job does; the status can lag it by a moment.
    while (status := str(client.get_job_status(job_id).value)) not in _TERMINAL:
        time.sleep(0.5)
    return status


def submit(
    config_path: str | Path,
    address: str,
    *,
    working_dir: str | Path | None = None,
    follow: bool = True,
    insecure: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Submit ``kiln run CONFIG`` to the cluster whose dashboard is at ``address``.

    Args:
        config_path: the kiln config; it must lie inside ``working_dir``.
        address: the Ray dashboard, ``http://HOST:8265``.
        working_dir: uploaded as the job's working directory (default: the kiln project).
        follow: print the job's logs until it ends; otherwise return once it is submitted.
        insecure: allow a plain ``http://`` address to another machine (the token travels unencrypted).
        out: where the job id, the logs and the final status are written.

    Returns:
        0 if the job SUCCEEDED (or was submitted, without ``follow``), 1 if it FAILED or was
        STOPPED, 130 if following was interrupted (the job keeps running).

    Raises:
        ConfigError: the config is invalid (nothing submitted).
        SubmitError: the job cannot be submitted (nothing submitted).
    """
    address = dashboard_address(address)
    check_transport(address, insecure)
    bypass_proxy(address)
    config_path = Path(config_path)
    cfg = load_config(config_path)
    check_storage(cfg, address)
    wd = Path(working_dir).resolve() if working_dir is not None else PROJECT_ROOT
    rel_config = _relative_config(config_path, wd)
    for file in config_files(config_path):  # the job reads the files a config extends too
        _relative_config(file, wd)
        if left_out_of_upload(file.resolve(), wd):
            raise SubmitError(f"{file} is not uploaded with {wd} (WORKING_DIR_EXCLUDES, or a .gitignore / "
                              ".rayignore on its way): the job could not read it. Move it, e.g. into configs/")  # fmt: skip
    token = auth_token()
    client = _client(address, token)
    # A loopback address can still reach a multi-node cluster (a port-forward to its head).
    if cfg.run.storage_path is None and (n := _alive_nodes(address, token)) > 1:
        raise _storage_refusal(f"the cluster at {address} has {n} nodes")

    try:
        job_id = client.submit_job(
            entrypoint=f"kiln run {shlex.quote(rel_config)}",
            runtime_env=job_runtime_env(cfg, wd),
            submission_id=f"kiln-{cfg.run.name}-{uuid.uuid4().hex[:8]}",
            metadata={"kiln_config": rel_config, "kiln_run": cfg.run.name},
        )
    except (RuntimeError, ValueError) as e:
        # Ray's own words: an oversized working directory, a rejected runtime env, an HTTP error.
        raise SubmitError(f"the cluster at {address} did not accept the job: {e}") from None
    print(f"kiln submit: job {job_id} submitted to {address} (kiln run {rel_config})", file=out)
    if not Path(cfg.run.root).is_absolute():
        print(
            f"kiln submit: note: run.root {cfg.run.root!r} is relative, so on the cluster the run's outputs land "
            f"in the job's copy of the working directory; an absolute path on shared storage keeps them",
            file=out,
        )
    # Ray's job CLI sends the token only in token mode (it reads it from the same places).
    ray_cli = "RAY_AUTH_MODE=token ray" if token else "ray"
    print(f"  logs: {ray_cli} job logs {job_id} --address {address} --follow", file=out)
    print(f"  stop: {ray_cli} job stop {job_id} --address {address}", file=out, flush=True)
    if not follow:
        return 0
    try:
        asyncio.run(_follow(client, job_id, out))
        status = _wait(client, job_id)
    except KeyboardInterrupt:
        print(f"\nkiln submit: stopped following; job {job_id} keeps running", file=out)
        return 130
    detail = ""
    if status != "SUCCEEDED" and (message := client.get_job_info(job_id).message):
        # Its first clause only: Ray appends the log tail, which was just printed.
        detail = ": " + message.splitlines()[0].split(", last available logs")[0]
    print(f"kiln submit: job {job_id} {status}{detail}", file=out, flush=True)
    return 0 if status == "SUCCEEDED" else 1
