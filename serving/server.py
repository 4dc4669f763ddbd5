"""Run a built Serve application until Ctrl-C, and ask it one question over HTTP.

The CLI (``kiln serve``, ``kiln run --serve``) resolves what to serve and connects to Ray; this
module only needs the ``serve:`` section.
"""

from __future__ import annotations

import contextlib
import errno
import json
import signal
import socket
import time
import urllib.request
from pathlib import Path

import psutil
import ray
from ray import serve
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
from ray.serve.deployment import Application
from ray.util.client import ray as ray_client

from serving.auth import resolve_api_key
from serving.config import ServeConfig


def ask(cfg: ServeConfig, prompt: str, timeout_s: float = 60.0) -> str:
    """Send one greedy chat request to the running endpoint and return the answer's text."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    body = {"model": cfg.model_name or Path(cfg.model or "").resolve().name, "max_tokens": 32, "temperature": 0.0,
            "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if key := resolve_api_key(cfg.api_key, cfg.api_key_env):
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"http://{host}:{cfg.port}/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)["choices"][0]["message"]["content"]


def stop_on_signals() -> None:
    """Turn SIGINT and SIGTERM into ``KeyboardInterrupt`` in this (the main) thread.

    A shell starts a background job (``kiln serve ... &``) with SIGINT ignored, and Python then
    never installs its own handler: ``kill -INT`` did nothing, and a supervisor's SIGTERM killed
    the process without shutting Serve down. Both now end ``serve_forever`` the same way as Ctrl-C.
    """

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def shutdown_serve(timeout_s: float = 30.0) -> None:
    """``serve.shutdown()`` without Ray's "(raylet) Task ServeController.graceful_shutdown failed
    ... will be retried" line on the terminal: the controller's graceful shutdown ends in its own
    ``ray.kill``, and Serve makes that call with the controller's infinite task retries, so Ray
    reports the killed call as one it will retry. Made first with no retries, the same call stops
    the controller the same way, and ``serve.shutdown()`` then finds nothing left to stop. (The
    controller's name and namespace are Serve's private constants: Serve has no public handle.)"""
    with contextlib.suppress(ValueError):  # no controller: Serve never started, or already stopped
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            ray.get(controller.graceful_shutdown.options(max_task_retries=0).remote(), timeout=timeout_s)
    serve.shutdown()


def check_port_free(host: str, port: int) -> None:
    """Refuse ``host:port`` when it cannot be bound on this machine, naming why (Serve's own error,
    after its start-up, is a 40-line traceback from its proxy actor).

    Raises:
        ValueError: naming the address; for one in use, what commonly holds it.
    """
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is no owner
            s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            holder = port_holder(port)
            if holder is None:
                who = ("another server listens there, or the HAProxy of a kiln serve whose Ray cluster was killed "
                       "under it (its process is named haproxy)")  # fmt: skip
            else:
                pid, name = holder
                who = f"{name} (pid {pid}) listens there"
                if name == "haproxy":
                    who += ", most likely the HAProxy of a kiln serve whose Ray cluster was killed under it"
            raise ValueError(f"serve.port: {host}:{port} is in use on this machine: {who}. Stop it or choose "
                             "another port (--port, serve.port)") from None  # fmt: skip
        raise ValueError(f"serve.host / serve.port: cannot listen on {host}:{port} on this machine "
                         f"({e.strerror or e}); choose an address of this machine (--host, --port)") from None  # fmt: skip


def port_holder(port: int) -> tuple[int, str] | None:
    """(pid, process name) of a process listening on TCP ``port`` here, if the OS tells us (another
    user's processes, and every process on some systems, need privileges to see)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid, psutil.Process(conn.pid).name()
    except (psutil.Error, OSError):
        pass
    return None


def _on_head_node() -> bool:
    """Whether this driver runs on the cluster's head node, where Serve's ingress always binds."""
    if not ray.is_initialized():  # no cluster joined (nothing to ask; and asking would start one)
        return False
    here = ray.get_runtime_context().get_node_id()
    return any(n["NodeID"] == here and "node:__internal_head__" in n["Resources"] for n in ray.nodes())


def serve_running() -> bool:
    """Whether Ray Serve's controller already runs on the connected cluster: another driver's, or
    one a killed ``kiln serve`` left (it is a detached actor)."""
    if not ray.is_initialized():
        return False
    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def serve_forever(app: Application, cfg: ServeConfig, first_prompt: str | None = None) -> None:
    """Start Serve on ``cfg.host:cfg.port``, run ``app`` (from ``build_app(cfg)``), block until
    Ctrl-C, SIGINT or SIGTERM, then shut Serve down.

    Ray must already be initialised (``cluster.runtime.init_ray``).

    Args:
        app: the application ``serving.app.build_app(cfg)`` returned.
        cfg: the ``serve:`` section it was built from.
        first_prompt: once the endpoint is up, ask it this over HTTP and print the answer.

    Raises:
        ValueError: Serve already runs on the cluster. Serve would keep its own host and port (a
            key-less app checked for 127.0.0.1 could listen on 0.0.0.0, and the URL printed would
            be wrong), and stopping kiln's app would stop every other Serve app there.
    """
    if serve_running():
        raise ValueError("Ray Serve is already running on this cluster (another driver's, or one a stopped kiln "
                         "serve left): kiln serve would not choose its host and port, and its shutdown would stop "
                         "the other Serve applications. Stop it first (`serve shutdown -y`, with RAY_ADDRESS set "
                         "to the cluster) or serve on a cluster of its own")  # fmt: skip
    if not ray_client.is_connected() and _on_head_node():  # Serve's ingress binds here (among other nodes)
        check_port_free(cfg.host, cfg.port)
    stop_on_signals()
    try:
        # Serve's controller starts the ingress: HAProxy if its environment says so.
        controller = {"runtime_env": {"env_vars": env}} if (env := cfg.ingress_env()) else None
        serve.start(http_options={"host": cfg.host, "port": cfg.port}, controller_options=controller)
        print(f"kiln serve: starting {cfg.model} (the first start takes a minute) ...", flush=True)
        serve.run(app, name="kiln", route_prefix="/")
        name = cfg.model_name or Path(cfg.model or "").resolve().name
        print(f"kiln serve: model '{name}' at http://{cfg.host}:{cfg.port}/v1 (OpenAI API); Ctrl-C stops", flush=True)
        if cfg.adapters:
            print(f"kiln serve: LoRA adapters of '{name}', each a model of its own: {', '.join(cfg.adapters)}",
                  flush=True)  # fmt: skip
        if first_prompt is not None:
            try:
                said = f"the model answered {ask(cfg, first_prompt)!r}"
            except (OSError, ValueError, KeyError) as e:  # urllib's errors are OSErrors; a body not OpenAI's
                said = f"no answer ({e}); the server keeps serving"
            print(f"kiln serve: asked {first_prompt!r}, {said}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("kiln serve: shutting down", flush=True)
    finally:
        shutdown_serve()
