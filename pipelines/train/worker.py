"""The Ray Train worker loop behind pretrain, SFT and reward model (DeepSpeed ZeRO).

Each worker (``train_worker``) reads top to bottom:

  1. build the model (new, or from a HF directory) and wrap it in a DeepSpeed engine;
  2. restore the latest Ray Train checkpoint, if any: weights, optimizer, step (= data position), RNG;
  3. loop: gradient-accumulated micro batches → step → metrics / eval / checkpoint;
  4. at the last step, gather the full weights (ZeRO-3 included) and export them in HF format
     inside the final checkpoint.

Objectives: ``lm`` (next-token loss on ``labels``, or on ``input_ids`` when the shards have no
labels: pretraining) and ``reward`` (Bradley–Terry on ``chosen_ids``/``rejected_ids``).
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from cluster.dashboard import StageGauges
from core.checkpoint import load_deepspeed_checkpoint, rng_state, set_rng_state
from core.metrics import MetricsSink
from pipelines.train.config import ModelConfig, TrainConfig
from pipelines.train.engine import deepspeed_config, full_state_dict, param_groups
from pipelines.train.losses import bradley_terry_loss, lm_loss_sum, lr_multiplier, pairwise_correct
from pipelines.train.modeling import build_model, save_hf_model
from pipelines.train.rows import RowStream, step_positions

Objective = Literal["lm", "reward"]
CHECKPOINT_TAG = "state"  # DeepSpeed tag inside every checkpoint: ds/state/...
EXPORT_DIR = "hf"  # the final checkpoint's consolidated Hugging Face model


@dataclass(frozen=True)
class TrainJob:
    """Everything a training worker needs; built by a stage driver, pickled to the workers.

    Attributes:
        stage: the run-directory folder (``pretrain``, ``sft``, ``reward_model``).
        objective: ``lm`` or ``reward``.
        train: the stage's training section.
        stage_dir: absolute ``runs/<name>/<stage>``; rank 0 appends ``metrics.jsonl`` there
            (on a multi-node cluster it must be on shared storage, like the checkpoints).
        tokenizer_dir: tokenizer saved with the exported model.
        train_files / validation_files: Parquet files of fixed-length int32 rows.
        arch: sizes of a new model (with ``init_from`` None).
        init_from: a HF model directory to start from.
        config_digest: the stage config's digest, to refuse resuming under another config.
        storage_path: Ray Train storage for the checkpoints (``RunConfig.stage_storage``: a
            shared path or object-store URI); None keeps them in ``<stage_dir>/ray``.
    """

    stage: str
    objective: Objective
    train: TrainConfig
    stage_dir: str
    tokenizer_dir: str
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]
    arch: ModelConfig | None = None
    init_from: str | None = None
    config_digest: str = ""
    storage_path: str | None = None

    @property
    def columns(self) -> tuple[str, ...]:
        return ("chosen_ids", "rejected_ids") if self.objective == "reward" else ("input_ids", "labels")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _forward(engine: Any, objective: Objective, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One micro batch → (loss to backpropagate, loss sum, count, tokens processed).

    ``lm``: the summed token loss and the number of target tokens. ``reward``: the summed pair
    loss and the number of correctly ordered pairs (the pair count is the batch size).
    """
    if objective == "lm":
        ids = batch["input_ids"]  # (B, T)
        labels = batch.get("labels", ids)  # pretraining: every token is a target
        logits = engine(input_ids=ids).logits  # (B, T, V)
        loss_sum, count = lm_loss_sum(logits, labels)
        return loss_sum / count.clamp(min=1), loss_sum.detach(), count.float(), ids.numel()
    both = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T)
    scores = engine(input_ids=both).logits.squeeze(-1)  # (2B,)
    chosen, rejected = scores.chunk(2)
    loss = bradley_terry_loss(chosen, rejected)
    return loss, loss.detach() * len(chosen), pairwise_correct(chosen, rejected).sum(), both.numel()


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _evaluate(engine: Any, job: TrainJob, stream: RowStream, rank: int, device: torch.device) -> dict[str, float]:
    """Held-out loss (and perplexity or pairwise accuracy) on the first rows of the validation files."""
    cfg = job.train
    per_batch = cfg.micro_batch_per_worker * cfg.num_workers
    batches = min(cfg.eval_batches, stream.total // per_batch)
    if batches == 0:
        return {}
    num = den = correct = 0.0
    engine.eval()
    with torch.no_grad():
        for b in range(batches):
            start = (b * cfg.num_workers + rank) * cfg.micro_batch_per_worker
            rows = stream.rows(0, np.arange(start, start + cfg.micro_batch_per_worker))
            batch = {k: torch.from_numpy(v).to(device) for k, v in rows.items()}
            _, n, d, _ = _forward(engine, job.objective, batch)
            if job.objective == "lm":
                num, den = num + n.item(), den + d.item()
            else:
                num, den, correct = num + n.item(), den + len(rows["chosen_ids"]), correct + d.item()
    engine.train()
    num, den, correct = _all_sum([num, den, correct])
    if job.objective == "lm":
        return {"val_loss": num / den, "val_perplexity": math.exp(min(num / den, 50.0))}
    return {"val_loss": num / den, "val_accuracy": correct / den}


def _save_checkpoint(engine: Any, job: TrainJob, step: int, rank: int, metrics: dict[str, Any], export: bool) -> None:
    """Write this rank's part of the checkpoint to a temp dir and hand it to Ray Train.

    Ray Train merges every rank's directory into one checkpoint folder in storage: the DeepSpeed
    files (rank 0's model states, each rank's optimizer partition), per-rank RNG states, rank 0's
    ``trainer_state.json``, and on the final step the consolidated HF export. Nothing in it is a
    pickle that a load must trust (``core.checkpoint``): RNG states are JSON.
    """
    with tempfile.TemporaryDirectory(prefix=f"kiln-ckpt-{rank}-") as tmp:
        root = Path(tmp)
        (root / "ds").mkdir()
        engine.save_checkpoint(str(root / "ds"), tag=CHECKPOINT_TAG, save_latest=False)
        (root / f"rng-rank{rank}.json").write_text(json.dumps(rng_state()))
        state = full_state_dict(engine, rank) if export else None
        if rank == 0:
            (root / "trainer_state.json").write_text(json.dumps({"step": step, "config_digest": job.config_digest}))
            if state is not None:
                save_hf_model(engine.module, state, job.tokenizer_dir, root / EXPORT_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{step:08d}")


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (``train_loop_per_worker``): build, restore, train, export."""
    import deepspeed  # here, not at the top: its import picks the accelerator (DS_ACCELERATOR)

    job: TrainJob = config["job"]
    cfg = job.train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    if cfg.use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if cfg.threads_per_worker is not None:
            # Two workers on two cores: torch's default (all cores each) oversubscribes them.
            torch.set_num_threads(cfg.threads_per_worker)
    metrics = MetricsSink(Path(job.stage_dir), enabled=rank == 0, gauges=StageGauges(job.stage).record)

    # 1. Model and engine. Same seed on every rank: ZeRO-3 partitions each rank's own copy.
    _seed_all(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_dir)
    model = build_model("lm" if job.objective == "lm" else "reward", tokenizer, arch=job.arch, path=job.init_from)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.weight_decay),
        config=deepspeed_config(cfg, cfg.micro_batch_per_worker, cfg.grad_accum_steps, cfg.num_workers),
        dist_init_required=False,  # Ray Train already set up torch.distributed (gloo / NCCL)
    )

    # 2. Resume: the step is the data position; the LR is a function of the step.
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            saved = json.loads((Path(ckpt_dir) / "trainer_state.json").read_text())
            if saved["config_digest"] != job.config_digest:
                raise RuntimeError(f"{job.stage}: latest checkpoint was written under another config; rerun with --force")
            load_deepspeed_checkpoint(engine, Path(ckpt_dir) / "ds", CHECKPOINT_TAG)
            set_rng_state(json.loads((Path(ckpt_dir) / f"rng-rank{rank}.json").read_text()))
            step = saved["step"]
    else:
        _seed_all(cfg.seed + rank)
    metrics.write({"event": "resume" if step else "start", "step": step, "time": time.time(), "pid": os.getpid()})

    train = RowStream(job.train_files, job.columns, cfg.seed, shuffle=True)
    valid = RowStream(job.validation_files, job.columns, cfg.seed, shuffle=False)
    epoch_rows = train.total // cfg.sequences_per_step * cfg.sequences_per_step

    # 3. The loop. One optimizer step = grad_accum_steps micro batches on every rank.
    window = {"num": 0.0, "den": 0.0, "extra": 0.0, "tokens": 0, "seconds": 0.0, "steps": 0}
    while step < cfg.max_steps:
        lr = cfg.learning_rate * lr_multiplier(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        num = den = 0.0
        tokens = 0
        for micro in range(cfg.grad_accum_steps):
            epoch, positions = step_positions(step, micro, rank, cfg, epoch_rows)
            batch = {k: torch.from_numpy(v).to(device) for k, v in train.rows(epoch, positions).items()}
            loss, n, d, t = _forward(engine, job.objective, batch)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            num, den, tokens = num + n.item(), den + d.item(), tokens + t
        grad_norm = engine.get_global_grad_norm()
        num, den = _all_sum([num, den])  # note: a sync point, once per optimizer step
        window["seconds"] += time.perf_counter() - t0
        step += 1
        denominator = den if job.objective == "lm" else cfg.sequences_per_step
        if not math.isfinite(num):
            metrics.write({"event": "non_finite_loss", "step": step, "loss": str(num / max(denominator, 1))})
            return  # every rank sees the same all-reduced value, so all stop here together
        window["num"] += num
        window["den"] += denominator
        window["extra"] += den
        window["tokens"] += tokens * cfg.num_workers
        window["steps"] += 1

        record: dict[str, Any] = {}
        if step % cfg.log_every_steps == 0 or step == cfg.max_steps:
            record = {
                "step": step,
                "loss": window["num"] / window["den"],
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": window["tokens"] / window["seconds"],
                "samples_seen": step * cfg.sequences_per_step,
                "epoch": step * cfg.sequences_per_step / max(epoch_rows, 1),
            }
            if job.objective == "reward":
                record["accuracy"] = window["extra"] / window["den"]
            window = dict.fromkeys(window, 0)
        if step % cfg.eval_every_steps == 0 or step == cfg.max_steps:
            record = {"step": step, **record, **_evaluate(engine, job, valid, rank, device)}
        if record:
            metrics.write(record)
        if step % cfg.checkpoint_every_steps == 0 or step == cfg.max_steps:
            # 4. The last checkpoint also carries the consolidated HF export.
            _save_checkpoint(engine, job, step, rank, record, export=step == cfg.max_steps)
        elif record:
            ray.train.report(record)
    metrics.write({"event": "finished", "step": step, "time": time.time()})
