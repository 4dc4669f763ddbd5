"""Secrets are never written at rest, printed, sent in clear text or uploaded (issue 11).

The API key in the saved config and in error messages; ``kiln submit``'s transport and what it
uploads of the real project directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config import REDACTED, ConfigError, Secret, Section, format_errors, redacted_dump
from pipelines.cli import main
from pipelines.config import dump_config, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-kiln-0123456789abcdef"


def _config(tmp_path: Path, **serve: Any) -> dict[str, Any]:
    return {"run": {"name": "secret", "root": str(tmp_path / "runs")}, "serve": {"model": "m", **serve}}


def test_saved_config_redacts_the_api_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, api_key=KEY)))
    assert load_config(path).serve.api_key == KEY  # the process itself still has the key

    # The run directory's copy, written by the CLI as every command starts.
    assert main(["report", str(path)]) == 0
    saved = (tmp_path / "runs" / "secret" / "config.yaml").read_text()
    assert KEY not in saved
    assert yaml.safe_load(saved)["serve"]["api_key"] == REDACTED
    # Everything else is saved as before, defaults explicit.
    assert yaml.safe_load(saved)["serve"]["port"] == 8000 and yaml.safe_load(saved)["run"]["name"] == "secret"
    # No key, nothing to redact: null stays null.
    assert yaml.safe_load(dump_config(parse_config(_config(tmp_path))))["serve"]["api_key"] is None


@pytest.mark.parametrize(
    ("serve", "problem"),
    [
        ({"api_key": KEY[:5]}, r"serve\.api_key: String should have at least 8 characters \(got \*\*\*\)"),
        ({"api_key": 12345678901}, r"serve\.api_key: Input should be a valid string \(got \*\*\*\)"),
        ({"api_kee": KEY}, r"serve\.api_kee: Extra inputs are not permitted$"),  # a misspelt key is still a key
        ({"api_key": KEY, "max_queued_requests": 0}, r"serve: Value error, max_queued_requests"),  # whole section
    ],
)
def test_config_errors_never_echo_the_api_key(tmp_path: Path, serve: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_config(tmp_path, **serve), "c.yaml")
    assert re.search(problem, str(e.value), re.M), str(e.value)
    assert KEY[:5] not in str(e.value) and "12345678901" not in str(e.value)
    # Other values are still shown: they are how a user finds the mistake.
    with pytest.raises(ConfigError, match=r"serve\.port: Input should be less than or equal to 65535 \(got 70000\)"):
        parse_config(_config(tmp_path, api_key=KEY, port=70000), "c.yaml")


def test_yaml_errors_name_the_position_not_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  name: x\nserve:\n  api_key: {KEY}: oops\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:4:\d+: not valid YAML: mapping values are not allowed here") as e:
        load_config(path)
    assert KEY not in str(e.value)



@pytest.mark.parametrize(
    ("text", "problem"),
    [
        # A tag whose constructor fails quoted the value in its own exception (a traceback).
        (f"serve:\n  model: m\n  api_key: !!int {KEY}\n", r"c\.yaml: not valid YAML: a tagged value .*\(ValueError\)"),
        (f"serve:\n  model: m\n  api_key: !!float {KEY}\n", r"c\.yaml: not valid YAML: a tagged value .*\(ValueError\)"),
        # An indentation slip: serve becomes a list holding the key, shown as a list, not its items.
        (f"serve:\n  - api_key: {KEY}\n", r"serve: Input should be a valid dictionary .*\(got a list\)"),
        (f"serve: {KEY}\n", r"serve: Input should be a valid dictionary .*\(got '"),  # a scalar: shown
        # A second serve block replaced the first (and its key) without a word.
        (f"serve:\n  model: m\n  api_key: {KEY}\nserve:\n  model: n\n", r"c\.yaml:6:1: not valid YAML: .*key 'serve' given twice"),
    ],
)
def test_bad_yaml_never_echoes_a_secret_it_cannot_name(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  name: x\n" + text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert re.search(problem, str(e.value), re.M), str(e.value)
    if "got '" not in problem:
        assert KEY not in str(e.value)



@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"run": {"name": "x", "storage_path": "s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/kiln"}}, "run.storage_path"),
        # AWS secret keys often hold a "/": the check once stopped at it and let the URI through.
        ({"run": {"name": "x", "storage_path": "s3://AKIAEXAMPLE:wJalr/XUtnFEMI+K7@bucket/kiln"}}, "run.storage_path"),
        ({"run": {"name": "x"}, "data": {"input": {"paths": ["a.jsonl", "s3://AKIAEXAMPLE:wJalrXUtnFEMI@b/c"]}}},
         "data.input.paths.1"),
    ],
)
def test_a_uri_with_credentials_is_refused_without_being_shown(config: dict[str, Any], where: str) -> None:
    """pyarrow takes s3://key:secret@bucket; in a config it would be saved to the run directory."""
    with pytest.raises(ConfigError) as e:
        parse_config(config, "c.yaml")
    assert re.search(rf"^  {re.escape(where)}: Value error, a URI with credentials in it .* \(got \*\*\*\)$",
                     str(e.value), re.M), str(e.value)  # fmt: skip
    assert "wJalrXUtnFEMI" not in str(e.value) and "AKIAEXAMPLE" not in str(e.value)
    assert parse_config({"run": {"name": "x", "storage_path": "s3://bucket/kiln"}}).run.storage_path == "s3://bucket/kiln"
    odd_path = "s3://bucket/a:b/c@d"  # ":" and "@" in the path, no key before the ":": not credentials
    assert parse_config({"run": {"name": "x", "storage_path": odd_path}}).run.storage_path == odd_path

def test_a_value_shown_in_an_error_is_cut_short(tmp_path: Path) -> None:
    """YAML aliases make a small file's values enormous; an error shows 200 characters of one."""
    with pytest.raises(ConfigError) as e:
        parse_config({"run": {"name": "x" * 10_000 + "/"}}, "c.yaml")
    line = str(e.value).splitlines()[1]
    assert line.startswith("  run.name: String should match pattern") and line.endswith("...)") and len(line) < 400

def test_serve_override_errors_never_echo_the_api_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, api_key=KEY)))
    assert main(["serve", str(path), "--port", "70000"]) == 1
    err = capsys.readouterr().err
    assert "kiln serve --host/--port/--ingress/--adapter: invalid config" in err and "port" in err and KEY not in err


class _Webhook(Section):
    url: str
    # Named like anything, marked by its type.
    signing: Secret | None = None
    nested: list[_Inner] = []


class _Inner(Section):
    password: str = "hunter22"  # by name


_Webhook.model_rebuild()


def test_secret_marker_and_names_are_redacted_everywhere_in_the_tree() -> None:
    from pydantic import ValidationError

    hook = _Webhook(url="https://x", signing="s3cr3t-value", nested=[_Inner()])
    assert hook.signing == "s3cr3t-value"  # a plain str to the code that uses it
    assert redacted_dump(hook) == {"url": "https://x", "signing": REDACTED, "nested": [{"password": REDACTED}]}
    with pytest.raises(ValidationError) as e:
        _Webhook(url=1, signing=42, nested=[{"password": 7}])
    message = format_errors(e.value, "hook.yaml", _Webhook)
    assert "url: Input should be a valid string (got 1)" in message
    assert "signing: Input should be a valid string (got ***)" in message and "42" not in message
    assert "nested.0.password: Input should be a valid string (got ***)" in message


# --- kiln submit -------------------------------------------------------------------------------


def test_plain_http_to_another_machine_is_refused_unless_insecure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray.job_submission

    def contacted(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("kiln submit contacted the cluster")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", contacted)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a-token-that-must-not-travel-in-clear")
    wd = tmp_path / "wd"
    wd.mkdir()
    config = {"run": {"name": "t", "root": "/shared/runs", "storage_path": "/shared/ckpt"}}
    (wd / "c.yaml").write_text(yaml.safe_dump(config))
    argv = ["submit", str(wd / "c.yaml"), "--working-dir", str(wd), "--address"]

    assert main([*argv, "http://192.0.2.10:8265"]) == 2
    err = capsys.readouterr().err
    assert "http://192.0.2.10:8265 is plain http to another machine" in err and "--insecure" in err
    assert "https://" in err and "ssh -L" in err
    # A host name is another machine too, until proven otherwise.
    assert main([*argv, "http://head.example.com:8265"]) == 2
    assert "plain http to another machine" in capsys.readouterr().err
    # https, loopback (a tunnel) and --insecure go on to contact the cluster.
    for address, extra in (("https://192.0.2.10:8265", []), ("http://127.0.0.1:8265", []), ("http://[::1]:8265", []),
                           ("http://localhost:8265", []), ("http://192.0.2.10:8265", ["--insecure"])):  # fmt: skip
        with pytest.raises(AssertionError, match="contacted the cluster"):
            main([*argv, address, *extra])


def _uploaded(working_dir: Path, scratch: Path) -> set[str]:
    """The files ``kiln submit`` uploads from ``working_dir``: its runtime env, packaged by Ray's
    own code as the job SDK runs it (Ray's default excludes, kiln's, and .gitignore files)."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    from cluster.submit import job_runtime_env

    names: set[str] = set()

    def upload(path: str, excludes: list[str] | None = None, is_file: bool = False) -> None:
        package = scratch / f"package-{len(names)}.zip"
        create_package(path, package, include_gitignore=True, excludes=excludes)
        names.update(n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/"))

    cfg = parse_config({"run": {"name": "t"}})
    upload_working_dir_if_needed(job_runtime_env(cfg, working_dir), include_gitignore=True, upload_fn=upload)
    return names


_SECRET_LOOKING = re.compile(r"(^|/)(\.env(\..*)?|[^/]*\.(env|pem|key|p12|pfx)|id_(rsa|dsa|ecdsa|ed25519)[^/]*|[^/]*auth_token[^/]*|"
                             r"\.netrc|\.git-credentials|\.pypirc)$|(^|/)\.(ssh|aws|kube)/")  # fmt: skip
_LOCAL_STATE = re.compile(r"^(\.venv|runs|\.git|\.pytest_cache|\.hypothesis|\.ruff_cache|build)/|(^|/)__pycache__/|\.egg-info/")


def test_default_upload_of_the_project_is_its_sources_and_nothing_secret(tmp_path: Path) -> None:
    uploaded = _uploaded(ROOT, tmp_path)
    assert not [n for n in uploaded if _LOCAL_STATE.search(n)], sorted(n for n in uploaded if _LOCAL_STATE.search(n))[:20]
    assert not [n for n in uploaded if _SECRET_LOOKING.search(n)]
    # Every tracked source the job may need goes (the stages, the configs, the packaging).
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert {"pipelines/cli.py", "core/config.py", "configs/quickstart.yaml", "pyproject.toml"} <= uploaded
    missing = {f for f in tracked if (ROOT / f).is_file()} - uploaded
    assert not {f for f in missing if not _SECRET_LOOKING.search(f)}, sorted(missing)[:20]


def test_secret_files_in_the_working_dir_are_never_uploaded(tmp_path: Path) -> None:
    # The real project's sources, then secrets planted where people leave them; no .gitignore
    # (a working directory need not have one), and local state next to them.
    wd = tmp_path / "project"
    shutil.copytree(ROOT, wd, ignore=shutil.ignore_patterns(".venv", "runs", ".git", "__pycache__", "*.egg-info",
                                                             ".pytest_cache", ".hypothesis", ".ruff_cache"))  # fmt: skip
    (wd / ".gitignore").unlink()
    planted = [".env", ".env.production", "configs/prod.env", "server.pem", "cluster/tls.key", "id_rsa", "id_rsa.pub",
               "id_ed25519", ".ray/auth_token", "configs/auth_token", "cluster/kuberay/auth_token.txt", ".ssh/config",
               ".aws/credentials", ".kube/config", ".netrc", ".git-credentials", "deploy/client.p12",
               ".venv/bin/python", "runs/old/config.yaml", ".git/config", "pipelines/__pycache__/cli.cpython-311.pyc",
               ".envrc", "gcp-credentials.json", "deploy/my-service-account.json", "secrets.yaml", ".npmrc",
               ".docker/config.json", ".huggingface/token"]  # fmt: skip
    for name in planted:
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text("secret\n")
    uploaded = _uploaded(wd, tmp_path)
    assert not set(planted) & uploaded, sorted(set(planted) & uploaded)
    assert {"pipelines/cli.py", "configs/quickstart.yaml", "cluster/kuberay/rayjob.yaml"} <= uploaded



@pytest.mark.parametrize(
    "address",
    [
        "http://192.0.2.2:18265\\@127.0.0.1:8265",  # urllib reads loopback, requests sends to 192.0.2.2
        "http://user:pass@127.0.0.1:8265",
        "http://127.0.0.1:8265/api",
        "http://127.0.0.1:8265?x=1",
        "http://127.0.0.1 :8265",
        "ray://127.0.0.1:10001",
    ],
)
def test_an_address_read_two_ways_is_refused(address: str) -> None:
    """kiln checked the host urllib.parse read; Ray's client (requests) sends to the host urllib3
    reads: with a backslash they differ, and the token went in clear text to another machine."""
    from cluster.submit import SubmitError, dashboard_address

    with pytest.raises(SubmitError, match="expected the Ray dashboard's URL alone"):
        dashboard_address(address)
    assert dashboard_address("HTTPS://Head.Example:8265/") == "https://head.example:8265"  # Ray wants lowercase
    assert dashboard_address("http://[::1]:8265") == "http://[::1]:8265"


def test_plain_http_to_this_machine_skips_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """With HTTP_PROXY set, requests sent http://127.0.0.1 through the proxy: the token in clear."""
    import requests

    from cluster.submit import bypass_proxy

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    monkeypatch.delenv("no_proxy", raising=False)
    assert requests.utils.get_environ_proxies("http://127.0.0.1:8265/api/version")  # the proxy, before
    bypass_proxy("http://127.0.0.1:8265")
    assert not requests.utils.get_environ_proxies("http://127.0.0.1:8265/api/version")
    assert requests.utils.get_environ_proxies("http://internal.example/") == {}  # what was there stays
    bypass_proxy("https://head.example:8265")  # https through a proxy is a tunnel: left alone
    assert "head.example" not in requests.utils.get_environ_proxies("https://x") and "head" not in os.environ["NO_PROXY"]


def test_a_config_the_upload_leaves_out_is_refused_before_submitting(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A run's saved runs/<name>/config.yaml passed every check, and the job failed on the cluster
    after the upload: runs/ is never uploaded."""
    from cluster.submit import left_out_of_upload

    wd = tmp_path / "wd"
    config = {"run": {"name": "t"}}
    for name in ("runs/exp/config.yaml", "configs/build/gpu.yaml", "configs/ok.yaml", "ignored/c.yaml"):
        (wd / name).parent.mkdir(parents=True, exist_ok=True)
        (wd / name).write_text(yaml.safe_dump(config))
    (wd / ".gitignore").write_text("ignored/\n")
    assert [left_out_of_upload(wd / n, wd) for n in ("runs/exp/config.yaml", "configs/build/gpu.yaml", "configs/ok.yaml",
                                                     "ignored/c.yaml")] == [True, True, False, True]  # fmt: skip
    assert main(["submit", str(wd / "runs/exp/config.yaml"), "--address", "http://127.0.0.1:1", "--working-dir", str(wd)]) == 2
    assert "runs/exp/config.yaml is not uploaded with" in capsys.readouterr().err


# --- checkpoints -------------------------------------------------------------------------------

# Runs in a process of its own: DeepSpeed's engine needs a torch.distributed group (one rank, gloo).
_CHECKPOINT_SCRIPT = r"""
import json, os, pickle, socket, sys
from pathlib import Path

import torch

from core.checkpoint import load_deepspeed_checkpoint
from core.config import DeepSpeedSettings
from pipelines.train.engine import deepspeed_config, import_deepspeed, param_groups

deepspeed = import_deepspeed()

out, marker = Path(sys.argv[1]), Path(sys.argv[2])
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")


def engine(stage, seed):
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
    cfg = DeepSpeedSettings(num_workers=1, zero_stage=stage, micro_batch_per_worker=2)
    e, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, 0.1),
                                 config=deepspeed_config(cfg, 2, 1, 1), dist_init_required=False)
    return e


def weights(e):
    with deepspeed.zero.GatheredParameters(list(e.module.parameters())):
        return [p.detach().clone() for p in e.module.parameters()]


result = {}
for stage in (2, 3):
    trained = engine(stage, seed=0)
    trained.backward(trained(torch.randn(2, 8)).sum())
    trained.step()
    trained.save_checkpoint(str(out / f"z{stage}"), tag="state", save_latest=False, client_state={"optimizer_steps": 7})
    fresh = engine(stage, seed=1)
    client = load_deepspeed_checkpoint(fresh, out / f"z{stage}", "state")
    same = all(torch.equal(a, b) for a, b in zip(weights(trained), weights(fresh)))
    result[f"zero{stage}"] = {"optimizer_steps": client.get("optimizer_steps"), "same_weights": same,
                              "same_optimizer_step": fresh.global_steps == trained.global_steps}


class Payload:
    def __reduce__(self):
        return (os.makedirs, (str(marker),))


# Someone with write access to the storage replaces an optimizer partition with a pickle that runs code.
optim = next((out / "z2" / "state").glob("*optim_states.pt"))
torch.save({"optimizer_state_dict": Payload()}, optim)
try:
    load_deepspeed_checkpoint(engine(2, seed=1), out / "z2", "state")
    result["tampered"] = "loaded"
except pickle.UnpicklingError as e:
    result["tampered"] = "refused: " + str(e).splitlines()[0]
result["ran_after_safe_load"] = marker.exists()
if sys.argv[3:] == ["control"]:  # DeepSpeed's own load runs the payload: the file above is a real threat
    try:
        engine(2, seed=1).load_checkpoint(str(out / "z2"), tag="state")
    except Exception:
        pass
    result["ran_after_deepspeed_load"] = marker.exists()
print("RESULT " + json.dumps(result))
"""


def test_checkpoints_load_weights_only_and_a_planted_pickle_never_runs(tmp_path: Path) -> None:
    import json
    import os
    import sys

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _CHECKPOINT_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path / "pwned"),
                           "control"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(line.removeprefix("RESULT "))
    # What kiln saves loads back whole under weights_only=True: weights, optimizer, client state.
    for stage in ("zero2", "zero3"):
        assert result[stage] == {"optimizer_steps": 7, "same_weights": True, "same_optimizer_step": True}
    # A planted pickle is refused before anything in it runs; DeepSpeed's own load would have run it.
    assert result["tampered"].startswith("refused: Weights only load failed"), result["tampered"]
    assert result["ran_after_safe_load"] is False
    assert result["ran_after_deepspeed_load"] is True


def test_random_states_round_trip_through_json() -> None:
    import json
    import random

    import numpy as np
    import torch

    from core.checkpoint import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)  # somewhere mid-stream
    saved = json.loads(json.dumps(rng_state()))
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(saved)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws


def test_a_gpu_runs_random_state_resumes_on_cpus() -> None:
    """A checkpoint written on a GPU carries the device generator's state; resuming it on a machine
    without CUDA restores the rest and leaves that key alone."""
    import json

    import torch

    from core.checkpoint import rng_state, set_rng_state

    torch.manual_seed(5)
    saved = json.loads(json.dumps(rng_state()))
    if not torch.cuda.is_available():
        assert "cuda" not in saved  # this process never touched a device
        saved["cuda"] = [0] * 16  # as a GPU worker wrote it
    draw = float(torch.rand(1))
    torch.manual_seed(9)
    set_rng_state(saved)
    assert float(torch.rand(1)) == draw


@pytest.mark.gpu
def test_cuda_random_state_round_trips() -> None:
    """Dropout on a GPU (a LoRA adapter's) draws from the device's generator: a resumed step must
    draw the same mask as the uninterrupted one."""
    import json

    import torch

    from core.checkpoint import rng_state, set_rng_state

    torch.cuda.manual_seed(3)
    torch.rand(4, device="cuda")  # mid-stream; CUDA initialised
    saved = json.loads(json.dumps(rng_state()))
    assert "cuda" in saved
    draws = torch.rand(4, device="cuda").cpu()
    torch.cuda.manual_seed(9)
    set_rng_state(saved)
    assert torch.equal(torch.rand(4, device="cuda").cpu(), draws)
