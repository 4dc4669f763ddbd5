"""What the terminal shows: kiln's own lines and bars; libraries' progress bars only with --verbose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

from cluster.runtime import configure_output


@pytest.fixture
def restore_output(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was = hf_logging.is_progress_bar_enabled()
    yield
    configure_output(False)  # kiln's default, as the other tests run
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_hugging_face_bars_are_off_unless_verbose(restore_output: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    hf_logging.enable_progress_bar()
    configure_output(True)
    assert hf_logging.is_progress_bar_enabled() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    configure_output(False)  # the default: "Loading weights" bars would interleave with kiln's own
    assert not hf_logging.is_progress_bar_enabled() and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"

    # A user's explicit choice wins.
    hf_logging.enable_progress_bar()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    configure_output(False)
    assert hf_logging.is_progress_bar_enabled()


_EMBEDDED_ENV_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
for k in ("DS_ACCELERATOR", "TOKENIZERS_PARALLELISM", "RAY_ADDRESS"):
    os.environ.pop(k, None)
import ray
from cluster.config import RayConfig
from cluster.runtime import init_ray
init_ray(RayConfig(num_cpus=1))
@ray.remote(num_cpus=1)
def env():
    return {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "TOKENIZERS_PARALLELISM")}
print("RESULT " + json.dumps({"worker": ray.get(env.remote()), "runtime_env": ray.get_runtime_context().runtime_env}))
"""


def test_an_embedded_clusters_workers_get_kilns_environment_without_a_runtime_env(tmp_path: Path) -> None:
    """Real Ray in a fresh process: the variables reach the workers through the raylet's
    environment, and no runtime env keeps the pre-started workers from being used."""
    script = tmp_path / "embedded_env.py"
    script.write_text(_EMBEDDED_ENV_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, str(script), root], capture_output=True, text=True, timeout=120, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["worker"] == {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    assert not result["runtime_env"].get("env_vars")
    # Ray's notice that token authentication is on (its default) is not on the terminal.
    assert "Token authentication is enabled" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_ray_token_auth_notice_only_with_verbose_its_off_warning_always(restore_output: None) -> None:
    import logging

    from cluster.runtime import _TOKEN_AUTH_LOGGER

    logger, seen = logging.getLogger(_TOKEN_AUTH_LOGGER), []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        for verbose in (False, True):
            configure_output(verbose)
            logger.warning("Token authentication is enabled for this Ray cluster.")
            logger.warning("Token authentication is disabled for this Ray cluster.")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage().split()[3] for r in seen] == ["disabled", "enabled", "disabled"]


def test_a_stages_done_line_is_short_and_keeps_what_a_user_reads() -> None:
    """The ``done`` line of a PPO stage, as the quickstart printed it before (1,500 characters of
    float noise and Ray node ids): four significant digits (whole numbers from 10,000 up), run
    paths relative, nodes counted; the numbers a user reads (held-out accuracy, the rollout-reward
    trend) still there."""
    from core.progress import summary_text

    node = "be9e619598c301cbbdf3e8f58856721772d329a7962842c357e95b83"
    summary = {
        "model": "/home/u/kiln/runs/quickstart/ppo/model", "seconds": 94.0, "steps": 30,
        "eval_before": {"reward": 0.5299999713897705, "prompts": 200, "accuracy": 0.53},
        "eval_after": {"reward": 0.8349999785423279, "prompts": 200, "accuracy": 0.835},
        "nodes": {"rollout": [node], "reward scorer": [node], "learner rank 0": [node, "other"]},
        "reward_last_steps": {"steps": 10, "mean": 0.76875, "ci95": [0.7244143405957507, 0.8130856594042494]},
        "reward_gain_p": 1.4336596946035117e-07, "tokens_per_s": 15349.6, "resumed": False, "lora": None,
    }  # fmt: skip
    line = summary_text(summary, Path("/home/u/kiln"))
    assert line == (
        "model=runs/quickstart/ppo/model, seconds=94, steps=30, "
        "eval_before={reward=0.53, prompts=200, accuracy=0.53}, eval_after={reward=0.835, prompts=200, accuracy=0.835}, "
        "nodes=2, reward_last_steps={steps=10, mean=0.7688, ci95=[0.7244, 0.8131]}, reward_gain_p=1.434e-07, "
        "tokens_per_s=15,350, resumed=false, lora=null"
    )
    assert summary_text({"model": "/elsewhere/model", "nodes": [node, node]}, Path("/home/u/kiln")) == "model=/elsewhere/model, nodes=1"
