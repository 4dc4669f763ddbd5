"""A real two-node Ray cluster on this machine: ``kiln submit`` a tiny full pipeline to it, and kill
the second node in the middle of pretraining.

The head (2 CPUs, the dashboard, the job's driver) and a second raylet (2 CPUs of its own) are
``ray start`` processes with the cluster's own token, temp dirs and ports (tests/cluster_helpers.py).
``run.storage_path`` is a directory both nodes use, as a shared file system would be. Training
stages spread their two workers over the nodes (``placement_strategy: SPREAD``) and PPO its actors
(``scheduling_strategy: SPREAD``); every stage records the Ray node ids it ran on.

Killing the second node (SIGKILL to its raylet and every process it started, as a machine that
dies) during pretraining costs the steps since the latest checkpoint: Ray Train restarts the worker
group where resources are (the head alone has room for both workers, or the node once it rejoins)
and resumes. The test restarts the node at once, as a cluster's autoscaler or a machine's service
manager would, so the later stages have two nodes again.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cluster_helpers import (
    BIN,
    ROOT,
    RayNode,
    auth,
    client_env,
    start_node,
    stop_node,
    tiny_config,
    wait_for_head,
    working_dir,
)

from core.metrics import read_metrics


@dataclass
class TwoNodes:
    head: RayNode
    token: str
    root: Path
    second: list[RayNode] = field(default_factory=list)  # the second node, then its replacement

    def restart_second(self) -> None:
        """Kill the second node as a dying machine would, then start a new one in its place."""
        stop_node(self.second[-1], graceful=False)
        self.second.append(start_node(self.root / f"n{len(self.second) + 1}", self.token, num_cpus=2, head=self.head))


def _alive_nodes(cluster: TwoNodes) -> list[str]:
    """Node ids of the cluster's live nodes, from the head's state API (as ``ray list nodes``)."""
    query = "filter_keys=state&filter_predicates=%3D&filter_values=ALIVE&limit=100"
    request = urllib.request.Request(f"{cluster.head.dashboard}/api/v0/nodes?{query}", headers=auth(cluster.token))
    with urllib.request.urlopen(request, timeout=30) as answer:
        return [n["node_id"] for n in json.load(answer)["data"]["result"]["result"]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[TwoNodes]:
    root = Path(tempfile.mkdtemp(prefix="kiln-2n-", dir="/tmp"))  # short: Ray's Unix sockets live below
    token = secrets.token_hex(32)
    head = start_node(root / "h", token, num_cpus=2)
    two = TwoNodes(head, token, root)
    try:
        wait_for_head(head, token)
        two.second.append(start_node(root / "n1", token, num_cpus=2, head=head))
        deadline = time.monotonic() + 90
        while len(_alive_nodes(two)) < 2:
            assert time.monotonic() < deadline, two.second[-1].log.read_text()[-3000:]
            time.sleep(1.0)
        yield two
    finally:
        for node in [*two.second, head]:
            stop_node(node)
        shutil.rmtree(root, ignore_errors=True)


def _pipeline_config(tmp_path: Path, name: str) -> dict[str, Any]:
    """data → pretrain → SFT → PPO at a tiny size; sections from the quickstart. No reward-model
    stage: the quickstart's PPO scores with its reward function only, and the stage would train on
    the nodes exactly as SFT does (the same trainer, ~25 s more)."""
    quickstart = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    config = tiny_config(tmp_path, name)
    corpus = Path(config["generate"]["out_dir"])
    config["run"]["storage_path"] = str(tmp_path / "storage")
    config["generate"].update(sft_examples=64, preference_pairs=64, ppo_prompts=16, eval_prompts=10)
    # The data stage reads, filters, tokenizes and packs over both nodes; deduplication (two more
    # distributed shuffles, ~1 min here) is scored against ground truth in test_data_stage.py.
    config["data"]["dedup"].update(exact=False, near=False)
    # Two workers, one per node where the nodes have room (1 CPU each: the head alone has 2).
    train = {"num_workers": 2, "cpus_per_worker": 1.0, "placement_strategy": "SPREAD", "sequences_per_step": 8,
             "micro_batch_per_worker": 4, "warmup_steps": 0, "eval_batches": 1}  # fmt: skip
    # 300 steps of 50-100 ms: long enough to kill the node after the first checkpoint (step 50).
    config["pretrain"] = {**quickstart["pretrain"], **train, "max_steps": 300, "log_every_steps": 10,
                          "eval_every_steps": 300, "checkpoint_every_steps": 50,
                          "model": {**quickstart["pretrain"]["model"], "hidden_size": 64, "intermediate_size": 128,
                                    "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
                                    "max_position_embeddings": 128}}  # fmt: skip
    short = {**train, "max_steps": 4, "log_every_steps": 2, "eval_every_steps": 4, "checkpoint_every_steps": 4}
    config["sft"] = {**quickstart["sft"], **short, "data": str(corpus / "sft.jsonl")}
    ppo = quickstart["ppo"]
    config["ppo"] = {**ppo, "prompts": str(corpus / "ppo_prompts.jsonl"), "eval_prompts": str(corpus / "eval_prompts.jsonl"),
                     "scheduling_strategy": "SPREAD", "max_steps": 2, "revisit_steps": 0, "prompts_per_step": 4, "samples_per_prompt": 2,
                     "eval_every_steps": 2, "checkpoint_every_steps": 2,
                     "learner": {**ppo["learner"], "micro_batch_per_worker": 4},
                     "critic": {**ppo["critic"], "init_from": None, "micro_batch_per_worker": 4}}  # fmt: skip
    return config


def _latest_checkpoint_step(storage: Path) -> int:
    """The newest checkpoint Ray Train's controller has registered (0: none yet)."""
    try:
        latest = json.loads((storage / "train" / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    return int(latest["checkpoint_dir_name"].split("-")[1])


def _train_controller_logs(cluster: TwoNodes, tail: int = 4000) -> str:
    """The tail of each Ray Train controller's output on the head (worker-group starts, restarts,
    placement): what a failed placement check needs to be understood."""
    out = []
    for path in sorted(cluster.head.temp_dir.glob("session_latest/logs/worker-*.err")):
        text = path.read_text(errors="replace")
        if ":actor_name:TrainController" in text[:200]:
            out.append(f"--- {path.name}\n{text[-tail:]}")
    return "\n".join(out) or "(no TrainController log found)"


def _summary(run_dir: Path, stage: str) -> dict[str, Any]:
    return json.loads((run_dir / stage / "stage.json").read_text())["summary"]


@pytest.mark.slow
def test_pipeline_runs_on_two_nodes_and_survives_losing_one(cluster: TwoNodes, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    config = _pipeline_config(tmp_path, "twonodes")
    run_dir = tmp_path / "runs" / "twonodes"
    wd = working_dir(tmp_path, config)
    job = subprocess.Popen(
        [str(BIN / "kiln"), "submit", str(wd / "config.yaml"), "--address", cluster.head.dashboard, "--working-dir", str(wd)],
        env=client_env(RAY_AUTH_TOKEN=cluster.token), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(job.stdout or ()), daemon=True)
    reader.start()
    before = set(_alive_nodes(cluster))

    # Kill the second node once pretraining has a checkpoint to resume from, and well before its end.
    pretrain_storage = tmp_path / "storage" / "twonodes" / "pretrain"
    deadline = time.monotonic() + 1500  # a guard against a hang, not a timing goal
    while _latest_checkpoint_step(pretrain_storage) < 50:
        assert job.poll() is None and time.monotonic() < deadline, "".join(output)[-5000:]
        time.sleep(0.1)
    steps = [m["step"] for m in read_metrics(run_dir / "pretrain") if "loss" in m]
    assert steps[-1] < 200, f"pretraining almost done ({steps[-1]} of 300) when the node was to be killed"
    cluster.restart_second()

    assert job.wait(timeout=1800) == 0, "".join(output)[-8000:]
    reader.join(timeout=10)
    log = "".join(output)
    client = JobSubmissionClient(cluster.head.dashboard, headers=auth(cluster.token))
    job_id = re.search(r"^kiln submit: job (\S+)", log, re.M).group(1)  # type: ignore[union-attr]
    # kiln submit followed the job: the stages' own output, then the final status. The same through
    # the job API: status, logs without a driver traceback, the runtime environment kiln gave the job.
    assert "kiln generate: wrote" in log and "kiln data: summary" in log and "kiln ppo: done" in log
    assert _summary(run_dir, "data")["documents"]["exact_duplicates"] == 0  # dedup off: no grouping pass
    assert log.rstrip().endswith(f"job {job_id} SUCCEEDED")
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    logs = client.get_job_logs(job_id)
    assert "kiln run: " in logs and not re.search(r"^Traceback", logs, re.M), logs[-3000:]
    info = client.get_job_info(job_id)
    assert info.entrypoint == "kiln run config.yaml" and info.runtime_env["env_vars"]["DS_ACCELERATOR"] == "cpu"
    after = set(_alive_nodes(cluster))
    assert len(before) == len(after) == 2 and len(before & after) == 1, (before, after)
    (head,) = before & after
    first, second = before - after, after - before

    # Pretraining: both nodes at first; one resume after the node died, from the checkpoint at 50
    # (or later), and every step to the end. The loss kept falling.
    pretrain = _summary(run_dir, "pretrain")
    starts = [m for m in read_metrics(run_dir / "pretrain") if m.get("event") in ("start", "resume")]
    assert set(starts[0]["nodes"]) == {head, *first}, (starts, _train_controller_logs(cluster))
    assert pretrain["resumes"] >= 1 and starts[1]["step"] >= 50, starts
    assert pretrain["steps"] == 300 and pretrain["final_loss"] < pretrain["first_loss"], pretrain
    assert (run_dir / "pretrain" / "model" / "config.json").is_file()

    # The later stages ran on the head and the node that replaced the dead one.
    assert set(_summary(run_dir, "sft")["nodes"]) == {head, *second}, _summary(run_dir, "sft")
    ppo = _summary(run_dir, "ppo")
    assert {node for nodes in ppo["nodes"].values() for node in nodes} == {head, *second}, ppo["nodes"]
    assert set(ppo["nodes"]) == {"rollout", "reward scorer", "reference", "learner rank 0", "critic rank 0"}
    assert (run_dir / "ppo" / "model" / "config.json").is_file()
