"""Dashboard metrics (``cluster/dashboard.py``): names, filtering, and the real Prometheus export.

The export test records gauges from a Ray actor on the shared test cluster (``ray_local``; every
Ray node runs a metrics agent on its metrics export port, dashboard or not) and reads them back
over HTTP the way Prometheus scrapes them. It reuses the session cluster rather than starting one
with its own port: a second ``ray.init`` in this process would break the shared fixture.
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.dashboard import StageGauges, metric_name

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>.*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def test_metric_names() -> None:
    assert metric_name("pretrain", "loss") == "kiln_train_loss"
    assert metric_name("reward_model", "val_accuracy") == "kiln_train_val_accuracy"
    assert metric_name("ppo", "reward_mean") == "kiln_ppo_reward_mean"
    assert metric_name("ppo", "time_generate_s") == "kiln_ppo_time_generate_s"
    assert metric_name("my-stage", "val/loss") == "kiln_my_stage_val_loss"  # Prometheus-safe


def test_record_keeps_finite_numbers_only() -> None:
    gauges = StageGauges("ppo")
    names = gauges.record({"step": 3, "reward_mean": 0.5, "kl": float("nan"), "entropy": math.inf,
                           "done": True, "note": "text", "clip_fraction": 0})
    assert names == ["kiln_ppo_step", "kiln_ppo_reward_mean", "kiln_ppo_clip_fraction"]
    assert gauges.record({"event": "start", "step": 0, "time": 1.0, "pid": 7}) == []
    with pytest.raises(ValueError, match="stage name is empty"):
        StageGauges("")


def _scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample on a Prometheus text endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        if (m := _SAMPLE.match(line)) is not None:
            samples.append((m["name"], dict(_LABEL.findall(m["labels"])), float(m["value"])))
    return samples


def test_gauges_reach_the_metrics_endpoint(ray_local: None, tmp_path: Path) -> None:
    import ray

    @ray.remote(num_cpus=0)
    class Recorder:
        """Records like the PPO controller (the helper) and like a training worker (the trainer's sink)."""

        def record(self, stage_dir: str) -> str:
            from core.metrics import MetricsSink

            StageGauges("ppo").record({"step": 7, "reward_mean": 0.625, "kl": 0.03125, "eval_accuracy": 0.5})
            sink = MetricsSink(Path(stage_dir), enabled=True, gauges=StageGauges("sft").record)
            sink.write({"event": "start", "step": 0, "time": time.time(), "pid": 1})
            sink.write({"step": 5, "loss": 1.25, "tokens_per_s": 4321.0, "val_loss": float("nan")})
            return ray.get_runtime_context().get_worker_id()

    recorder = Recorder.remote()
    try:
        worker_id = ray.get(recorder.record.remote(str(tmp_path / "sft")), timeout=60)
        assert (tmp_path / "sft" / "metrics.jsonl").is_file()  # the sink's own job still done
        port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
        # Ray exports custom metrics with a "ray_" prefix. Other tests in the session may export the
        # same names from other workers: only this actor's samples (its WorkerId) count.
        wanted = {
            ("ray_kiln_ppo_step", "ppo"): 7.0,
            ("ray_kiln_ppo_reward_mean", "ppo"): 0.625,
            ("ray_kiln_ppo_kl", "ppo"): 0.03125,
            ("ray_kiln_ppo_eval_accuracy", "ppo"): 0.5,
            ("ray_kiln_train_step", "sft"): 5.0,
            ("ray_kiln_train_loss", "sft"): 1.25,
            ("ray_kiln_train_tokens_per_s", "sft"): 4321.0,
        }
        found: dict[tuple[str, str], float] = {}
        deadline = time.monotonic() + 45  # the agent exports on an interval (~10 s here)
        while time.monotonic() < deadline:
            found = {(name, labels.get("stage", "")): value for name, labels, value in _scrape(port)
                     if name.startswith("ray_kiln_") and labels.get("WorkerId") == worker_id}
            if wanted.keys() <= found.keys():
                break
            time.sleep(1)
        assert {key: found.get(key) for key in wanted} == wanted, found
        # Not measurements: the start event's time and pid, and the NaN held-out loss.
        assert not {name for name, _ in found} & {"ray_kiln_train_time", "ray_kiln_train_pid",
                                                  "ray_kiln_train_val_loss"}, found
    finally:
        ray.kill(recorder)
