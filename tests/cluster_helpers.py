"""Real Ray nodes and kiln jobs for tests: a head (``ray start --head``) and more raylets joining it,
on loopback; a tiny kiln config and the ``kiln`` command as a user runs it.

Each node runs ``ray start --block`` in a process group of its own, with free ports (so it neither
joins nor disturbs any other Ray instance on the machine) and token authentication with the
cluster's own token (``~/.ray/auth_token`` is neither read nor written). Nodes are stopped by
process id, never with ``ray stop``, which kills every Ray process on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Ports `ray start` would otherwise take at fixed defaults (6379, 8265, 10001, 52365, ...).
_HEAD_PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port")
_NODE_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
    "node-manager-port",
    "object-manager-port",
)


@dataclass
class RayNode:
    """One ``ray start --block`` process and what it was started with."""

    proc: subprocess.Popen[bytes]
    temp_dir: Path
    ports: dict[str, int]
    log: Path

    @property
    def gcs_address(self) -> str:
        """``host:port`` of the head's GCS (head nodes only): what ``ray start --address`` joins."""
        return f"127.0.0.1:{self.ports['port']}"

    @property
    def dashboard(self) -> str:
        """The head's job-submission address (head nodes only)."""
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start_node(temp_dir: Path, token: str, num_cpus: int, head: RayNode | None = None) -> RayNode:
    """Start a head node (``head`` None: with the dashboard) or a raylet joining ``head``.

    ``temp_dir`` is short on purpose: Ray's Unix sockets live under it (108-byte limit).
    """
    flags = _NODE_PORT_FLAGS + (_HEAD_PORT_FLAGS if head is None else ())
    ports = dict(zip(flags, free_ports(len(flags))))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    if head is None:
        role = ["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
    else:
        role = [f"--address={head.gcs_address}"]
    cmd = [str(BIN / "ray"), "start", *role, "--block", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", *(f"--{flag}={port}" for flag, port in ports.items())]  # fmt: skip
    temp_dir.mkdir(parents=True, exist_ok=True)
    log = temp_dir / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return RayNode(proc, temp_dir, ports, log)


def wait_for_head(node: RayNode, token: str, timeout: float = 90.0) -> None:
    """Until the head's job API answers (its dashboard is up)."""
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + timeout
    while True:
        try:
            JobSubmissionClient(node.dashboard, headers=auth(token))
            return
        except ConnectionError:
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray head did not start: {node.log.read_text()[-3000:]}") from None
            time.sleep(0.5)


def stop_node(node: RayNode, graceful: bool = True) -> None:
    """Stop a node by process id: SIGTERM to ``ray start --block`` shuts it down (``graceful``),
    and whatever is left after a few seconds (of its processes, or any naming its unique temp dir)
    is killed. ``graceful=False`` kills at once, as a machine that dies does. A raylet may take
    half a minute to drain gracefully, and a test cluster's state is thrown away anyway."""
    proc = node.proc
    tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if graceful:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
    tagged = [p for p in psutil.process_iter(["cmdline"]) if any(str(node.temp_dir) in a for a in p.info["cmdline"] or [])]
    victims = [*tree, *tagged]
    if proc.poll() is None:
        victims.append(psutil.Process(proc.pid))
    for p in victims:
        try:
            p.kill()  # psutil checks the process is still the one it saw (no pid reuse)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)
    psutil.wait_procs(victims, timeout=10)


def working_dir(tmp_path: Path, config: dict[str, Any]) -> Path:
    """A job working directory holding just the config: the job imports kiln from this venv, as
    on a cluster whose image has kiln installed (and keeps numba's compiled-kernel cache, which a
    fresh copy of the sources would rebuild for most of a minute)."""
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return wd


def tiny_config(tmp_path: Path, name: str) -> dict[str, Any]:
    """generate + data at a tiny size, the data section copied from the quickstart. ``ray.address``
    stays null as in the quickstart: inside the job, kiln must join the job's cluster."""
    quickstart = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    runs = tmp_path / "runs"
    corpus = runs / name / "corpus"
    data = quickstart["data"]
    data["input"]["paths"] = [str(corpus / "pretrain")]
    data["tokenizer"]["vocab_size"] = 512
    data["pack"].update(seq_len=64, sequences_per_shard=256)
    data.update(batch_size=64, shuffle_partitions=2)
    # Near duplicates are still found and dropped; only their exact-Jaccard check (one more
    # distributed shuffle, ~10 s here) is skipped.
    data["dedup"]["verify_candidates"] = False
    return {
        "run": {"name": name, "root": str(runs)},
        "ray": quickstart["ray"],
        "generate": {"out_dir": str(corpus), "num_documents": 100, "exact_duplicates": 5, "near_duplicates": 6,
                     "junk_documents": 5, "sft_examples": 10, "preference_pairs": 10, "ppo_prompts": 10,
                     "eval_prompts": 10},  # fmt: skip
        "data": data,
    }


def kiln_cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    # A process of its own, as a user runs it: the token comes from its environment only.
    return subprocess.run([str(BIN / "kiln"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def client_env(**extra: str) -> dict[str, str]:
    # This process's RAY_* settings (an embedded cluster's auth mode, say) are not the user's.
    return {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **extra}
