"""The driver side of the one training machinery behind pretrain, SFT and reward model.

``fit`` checks inputs, starts a Ray Train ``TorchTrainer`` whose workers run
``pipelines.train.worker.train_worker`` (DeepSpeed ZeRO; entered through ``pipelines.train.entry``),
and copies the exported model into the run directory. The stage drivers (``pretrain.py``,
``sft.py``, ``reward_model.py``, ``dpo.py``) build a ``TrainJob`` and call it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.train
from ray.train.torch import TorchTrainer

from cluster.config import RayConfig
from cluster.runtime import init_ray
from core.locations import resolve
from core.metrics import read_metrics
from core.progress import StageProgress
from core.rundir import atomic_dir
from pipelines.data import storage
from pipelines.train.config import TrainConfig
from pipelines.train.entry import pack_job, train_loop
from pipelines.train.modeling import check_model_dir
from pipelines.train.rows import RowStream
from pipelines.train.worker import EXPORT_DIR, Objective, TrainJob


# Ray Train V2's controller takes a worker's report when it polls the workers (every 2 s by
# default), and a worker's next report waits until the previous one is taken: with a report every
# few steps of a small model, training stalls at one report per poll. Polling every 0.2 s costs a
# few small RPCs a second. The controller reads it from the driver's environment (propagated by
# Ray Train); a value already set there wins.
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_S = "0.2"


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


@dataclass
class TrainOutcome:
    """What ``fit`` returns: the exported model directory and the run's metric lines."""

    model_dir: Path
    metrics: list[dict[str, Any]]
    seconds: float


def check_inputs(job: TrainJob) -> None:
    """Fail before any worker starts if data or model inputs are missing or unusable.

    Raises:
        FileNotFoundError: naming the missing path.
        ValueError: too little data for one optimizer step.
    """
    if job.init_from is not None:
        check_model_dir(job.init_from)
    if not (Path(job.tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer directory {job.tokenizer_dir} not found (no tokenizer.json)")
    for f in job.train_files + job.validation_files:
        if not storage.is_file(f):  # a path, or a URI under run.storage_path
            raise FileNotFoundError(f"training data {f} not found")
    stream = RowStream(job.train_files, job.columns, 0, shuffle=False)
    if stream.total < job.train.sequences_per_step:
        raise ValueError(
            f"{job.stage}: {stream.total} training rows, fewer than sequences_per_step ({job.train.sequences_per_step})"
        )
    if job.validation_files:
        held_out = RowStream(job.validation_files, job.columns, 0, shuffle=False).total
        per_batch = job.train.micro_batch_per_worker * job.train.num_workers
        if held_out < per_batch:  # the workers evaluate whole batches (worker._evaluate): none here
            print(f"kiln {job.stage}: {held_out} held-out rows, fewer than one evaluation batch (micro_batch_per_worker "
                  f"x num_workers = {per_batch}): no val_ figures; raise validation_fraction or lower "
                  "micro_batch_per_worker", flush=True)  # fmt: skip
    seq_len = pq.read_schema(job.train_files[0]).field(stream.columns[0]).type.list_size
    if job.arch is not None:
        max_positions = job.arch.max_position_embeddings
    else:
        max_positions = json.loads((Path(job.init_from) / "config.json").read_text()).get("max_position_embeddings", seq_len)
    if seq_len > max_positions:
        raise ValueError(f"{job.stage}: sequences of {seq_len} tokens exceed the model's max_position_embeddings ({max_positions})")


def check_resumable(train_storage: str) -> None:
    """Refuse, before any worker starts, checkpoints that kiln cannot resume: those written before
    random states were saved as JSON (``rng-rank*.pt``, pickles that ``core.checkpoint`` does not
    load). Each worker would fail on them, and Ray Train retry it ``max_failures`` times.

    Raises:
        ValueError: naming the checkpoint and the way out (``--force``).
    """
    fs, root = resolve(train_storage)
    for ckpt in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if ckpt.type != pafs.FileType.Directory or not ckpt.base_name.startswith("step-"):
            continue
        names = {f.base_name for f in fs.get_file_info(pafs.FileSelector(ckpt.path))}
        if "rng-rank0.pt" in names and "rng-rank0.json" not in names:
            raise ValueError(f"{storage.display(train_storage, fs, ckpt.path)} is a checkpoint of an older kiln "
                             "(its random states are pickles, rng-rank*.pt) and cannot be resumed; rerun the "
                             "stage with --force")  # fmt: skip


def fit(job: TrainJob, ray_cfg: RayConfig) -> TrainOutcome:
    """Train (or resume) with Ray Train and copy the exported HF model to ``<stage_dir>/model``.

    Raises:
        TrainingDiverged: the loss became non-finite (the last good checkpoint is kept).
        ray.train.TrainingFailedError: workers failed more than ``max_failures`` times.
    """
    check_inputs(job)
    stage_dir = Path(job.stage_dir)
    train_storage = job.storage_path or str(stage_dir / "ray")
    check_resumable(storage.join(train_storage, "train"))
    init_ray(ray_cfg)
    cfg = job.train
    t0 = time.perf_counter()
    os.environ.setdefault(POLL_ENV, POLL_S)
    trainer = TorchTrainer(
        train_loop,  # pipelines.train.entry: the controller does not import torch (see there)
        train_loop_config=pack_job(job),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=train_storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    # The workers append to metrics.jsonl; the terminal shows one bar that follows it.
    with StageProgress(job.stage, cfg.max_steps, ("loss", "val_loss", "accuracy"), stage_dir=stage_dir):
        result = trainer.fit()
    seconds = time.perf_counter() - t0
    lines = read_metrics(stage_dir)
    last_event = next((m for m in reversed(lines) if "event" in m), {})
    if last_event.get("event") == "non_finite_loss":
        kept = result.checkpoint.path if result.checkpoint is not None else "none"
        raise TrainingDiverged(
            f"{job.stage}: loss became {last_event['loss']} at step {last_event['step']}; training stopped. "
            f"Last good checkpoint kept: {kept}. Lower the learning rate or check the data, then rerun."
        )
    assert result.checkpoint is not None, "training finished without a checkpoint"
    with result.checkpoint.as_directory() as ckpt_dir:
        export = Path(ckpt_dir) / EXPORT_DIR
        if not export.is_dir():
            raise RuntimeError(f"{job.stage}: final checkpoint {result.checkpoint.path} has no exported model")
        with atomic_dir(stage_dir / "model") as tmp:
            shutil.copytree(export, tmp, dirs_exist_ok=True)
    return TrainOutcome(model_dir=stage_dir / "model", metrics=lines, seconds=seconds)


def summary(outcome: TrainOutcome) -> dict[str, Any]:
    """A stage's closing numbers from its metric lines: first/last loss, held-out figures, time."""
    steps = [m for m in outcome.metrics if "loss" in m and "event" not in m]
    evals = [m for m in outcome.metrics if "val_loss" in m]
    out: dict[str, Any] = {"model": str(outcome.model_dir), "seconds": round(outcome.seconds, 1)}
    if steps:
        out.update(first_loss=steps[0]["loss"], final_loss=steps[-1]["loss"], steps=steps[-1]["step"])
        out["tokens_per_s"] = steps[-1]["tokens_per_s"]
    if evals:
        out.update({k: v for k, v in evals[-1].items() if k.startswith("val_")})
    # Every (re)start of the workers: the Ray nodes they ran on, and how often they resumed.
    starts = [m for m in outcome.metrics if m.get("event") in ("start", "resume")]
    out["nodes"] = list(dict.fromkeys(node for m in starts for node in m.get("nodes", ())))
    out["resumes"] = sum(m["event"] == "resume" for m in starts)
    return out


def finetune_job(
    stage: str, objective: Objective, train: TrainConfig, stage_dir: Path, init_from: Path, dataset: Path,
    digest: str, storage_path: str | None,
) -> TrainJob:
    """The ``TrainJob`` of a stage that trains ``init_from`` (with its tokenizer) on a ``write_dataset`` folder."""
    return TrainJob(
        stage=stage,
        objective=objective,
        train=train,
        stage_dir=str(stage_dir),
        tokenizer_dir=str(init_from),
        train_files=(str(dataset / "train.parquet"),),
        validation_files=tuple(str(p) for p in [dataset / "validation.parquet"] if p.exists()),
        init_from=str(init_from),
        config_digest=digest,
        storage_path=storage_path,
    )
