"""``kiln submit`` against a real Ray head node started on loopback, with token authentication.

A whole pipeline submitted and followed to SUCCEEDED is tests/test_two_nodes.py (a head and a
second node); here: a failing job, refused tokens, and the checks made before submitting.

The head is this test module's own: a unique temp dir and free ports (so it neither joins nor
disturbs any other Ray instance on the machine), ``RAY_AUTH_MODE=token`` with a fresh token (so
``~/.ray/auth_token`` is neither read nor written), stopped by its process id at the end. It is
not stopped with ``ray stop``, which kills every Ray process on the machine.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_helpers import client_env, kiln_cli, start_node, stop_node, tiny_config, wait_for_head, working_dir

from pipelines.cli import main

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Head:
    address: str
    token: str
    temp_dir: Path


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """A 2-CPU Ray head node with the dashboard and token authentication, on loopback."""
    # Short path: Ray's Unix sockets live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="kiln-ray-", dir="/tmp"))
    token = secrets.token_hex(32)
    node = start_node(temp_dir, token, num_cpus=2)
    try:
        wait_for_head(node, token)
        yield Head(node.dashboard, token, temp_dir)
    finally:
        stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_failed_job_exits_nonzero(head: Head, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "broken")
    del config["generate"]  # the data stage then finds no corpus: the job fails on the cluster
    wd = working_dir(tmp_path, config)
    done = kiln_cli(["submit", str(wd / "config.yaml"), "--address", head.address, "--working-dir", str(wd)],
                 client_env(RAY_AUTH_TOKEN=head.token), timeout=180)  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no corpus files match" in done.stdout
    assert " FAILED" in done.stdout.splitlines()[-1]


def test_missing_or_wrong_token_is_refused_with_instructions(head: Head, tmp_path: Path) -> None:
    wd = working_dir(tmp_path, tiny_config(tmp_path, "tiny"))
    args = ["submit", str(wd / "config.yaml"), "--address", head.address, "--working-dir", str(wd)]
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token\n")
    for env, problem in (
        (client_env(RAY_AUTH_MODE="disabled"), "needs a token and none was sent"),
        (client_env(RAY_AUTH_TOKEN_PATH=str(token_file)), "rejected the token"),
    ):
        done = kiln_cli(args, env, timeout=60)
        assert done.returncode == 2, done.stdout + done.stderr
        assert problem in done.stderr and "RAY_AUTH_TOKEN" in done.stderr, done.stderr


def test_remote_address_without_storage_path_is_refused_before_submitting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray.job_submission

    def no_connection(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("kiln submit contacted the cluster")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", no_connection)
    config = tiny_config(tmp_path, "remote")
    wd = working_dir(tmp_path, config)
    # 192.0.2.0/24 is reserved for documentation: nothing answers there. https: plain http to
    # another machine is refused first (tests/test_secrets.py).
    argv = ["submit", str(wd / "config.yaml"), "--address", "https://192.0.2.10:8265", "--working-dir", str(wd)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "https://192.0.2.10:8265 is a remote cluster, and run.storage_path is not set" in err

    # With shared storage the check passes, and only then does kiln try to connect.
    config["run"]["storage_path"] = "s3://bucket/kiln"
    (wd / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(AssertionError, match="contacted the cluster"):
        main(argv)


def test_config_outside_the_working_dir_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wd = working_dir(tmp_path, tiny_config(tmp_path, "outside"))
    outside = tmp_path / "elsewhere.yaml"
    shutil.copy(wd / "config.yaml", outside)
    assert main(["submit", str(outside), "--address", "http://127.0.0.1:1", "--working-dir", str(wd)]) == 2
    assert "is outside the working directory" in capsys.readouterr().err
    # A config inside that extends one outside: the job could not read the file it extends.
    (wd / "child.yaml").write_text(f"extends: {outside}\nrun: {{name: child}}\n")
    assert main(["submit", str(wd / "child.yaml"), "--address", "http://127.0.0.1:1", "--working-dir", str(wd)]) == 2
    assert f"{outside} is outside the working directory" in capsys.readouterr().err


def test_invalid_config_is_reported_before_submitting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tiny_config(tmp_path, "bad")
    config["data"]["dedup"]["treshold"] = 0.5
    wd = working_dir(tmp_path, config)
    assert main(["submit", str(wd / "config.yaml"), "--address", "http://127.0.0.1:1", "--working-dir", str(wd)]) == 2
    assert "data.dedup.treshold: Extra inputs are not permitted" in capsys.readouterr().err


def test_token_lookup_follows_rays_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.submit import SubmitError, auth_token

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert auth_token() == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert auth_token() is None
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(SubmitError, match="cannot read the token"):
        auth_token()


def test_gpu_configs_run_deepspeed_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.submit import _trains_on_gpu, job_env_vars
    from pipelines.config import load_config, parse_config

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    quickstart = load_config(ROOT / "configs" / "quickstart.yaml")
    assert job_env_vars(quickstart)["DS_ACCELERATOR"] == "cpu"
    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    raw["sft"]["use_gpu"] = True
    assert job_env_vars(parse_config(raw))["DS_ACCELERATOR"] == "cuda"
    # Nested sections count too: PPO's learner and critic are DeepSpeed trainers.
    assert _trains_on_gpu({"ppo": {"learner": {"use_gpu": False}, "critic": {"use_gpu": True}}})
    assert not _trains_on_gpu({"ppo": {"learner": {"use_gpu": False}}, "serve": {"num_gpus": 1.0}})
    # The user's own value wins, as in worker_env().
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert job_env_vars(parse_config(raw))["DS_ACCELERATOR"] == "cpu"
