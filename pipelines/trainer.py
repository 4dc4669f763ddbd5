"""The one training machinery behind pretrain, SFT and reward model: Ray Train + DeepSpeed ZeRO.

The driver side (``fit``) checks inputs, starts a ``TorchTrainer`` and copies the exported model
into the run directory. Each worker (``_train_worker``) reads top to bottom:

  1. build the model (new, or from a HF directory) and wrap it in a DeepSpeed engine;
  2. restore the latest Ray Train checkpoint, if any: weights, optimizer, step (= data position), RNG;
  3. loop: gradient-accumulated micro batches → step → metrics / eval / checkpoint;
  4. at the last step, gather the full weights (ZeRO-3 included) and export them in HF format
     inside the final checkpoint.

Data order is a pure function of (seed, epoch, position): every optimizer step reads a fixed
slice of a seeded permutation of the Parquet rows, each rank its own stride of it. The
checkpoint stores the step, so a resumed run reads exactly the rows an uninterrupted run would
have read next: none skipped, none repeated. (Ray Data's ``streaming_split`` hands blocks to
whichever worker asks first, so it cannot promise that; see ``RowStream``.)

Objectives: ``lm`` (next-token loss on ``labels``, or on ``input_ids`` when the shards have no
labels: pretraining) and ``reward`` (Bradley–Terry on ``chosen_ids``/``rejected_ids``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow.parquet as pq
import torch

from pipelines.config import DeepSpeedSettings, ModelConfig, RayConfig, TrainConfig
from pipelines.train_math import bradley_terry_loss, lm_loss_sum, lr_multiplier, pairwise_correct

Objective = Literal["lm", "reward"]
CHECKPOINT_TAG = "state"  # DeepSpeed tag inside every checkpoint: ds/state/...
EXPORT_DIR = "hf"  # the final checkpoint's consolidated Hugging Face model


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint is kept."""


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


# --- data: a deterministic, resumable row stream ------------------------------------------------


class RowStream:
    """Rows of Parquet files in an order fixed by (seed, epoch): files permuted, rows permuted.

    Position ``p`` of epoch ``e`` maps to one (file, row); a reader asks for positions, and keeps
    only the file(s) it is reading in memory, so the stream never loads the whole corpus.
    Every rank reads the same files and keeps its own stride of rows.
    """

    def __init__(self, files: tuple[str, ...], columns: tuple[str, ...], seed: int, shuffle: bool) -> None:
        self.files = files
        self.seed, self.shuffle = seed, shuffle
        schema = pq.read_schema(files[0]) if files else None
        self.columns = tuple(c for c in columns if schema is not None and c in schema.names)
        self.counts = np.array([pq.ParquetFile(f).metadata.num_rows for f in files], dtype=np.int64)
        self.total = int(self.counts.sum())
        self._cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def _file_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.files))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.files))

    def _file_rows(self, epoch: int, file_index: int) -> dict[str, np.ndarray]:
        key = (epoch, file_index)
        if key not in self._cache:
            if len(self._cache) >= 2:  # a step touches at most two files
                self._cache.pop(next(iter(self._cache)))
            table = pq.read_table(self.files[file_index], columns=list(self.columns))
            rows = {c: _fixed_rows(table.column(c)) for c in self.columns}
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch, file_index]).permutation(int(self.counts[file_index]))
                rows = {c: a[order] for c, a in rows.items()}
            self._cache[key] = rows
        return self._cache[key]

    def rows(self, epoch: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at ``positions`` (within ``epoch``) as {column: (len(positions), L) int64}."""
        order = self._file_order(epoch)
        ends = np.cumsum(self.counts[order])
        slot = np.searchsorted(ends, positions, side="right")
        out: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        for s, p in zip(slot, positions):
            file_rows = self._file_rows(epoch, int(order[s]))
            row = int(p - (ends[s] - self.counts[order[s]]))
            for c in self.columns:
                out[c].append(file_rows[c][row])
        return {c: np.stack(v).astype(np.int64) for c, v in out.items()}


def _fixed_rows(column: Any) -> np.ndarray:
    """A fixed_size_list<int32>[L] column as an (N, L) array."""
    col = column.combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), -1)


def step_positions(step: int, micro: int, rank: int, cfg: TrainConfig, epoch_rows: int) -> tuple[int, np.ndarray]:
    """(epoch, row positions) of one worker's micro batch: a pure function of the step.

    Optimizer step ``s`` consumes positions [s·G, (s+1)·G) of the epoch-concatenated stream,
    G = ``sequences_per_step``; each epoch uses its first ``epoch_rows`` (a multiple of G) rows.
    Within a step, micro batch k of rank r is the slice starting at (k·W + r)·M.
    """
    per_step = cfg.sequences_per_step
    steps_per_epoch = epoch_rows // per_step
    epoch, in_epoch = divmod(step, steps_per_epoch)
    start = in_epoch * per_step + (micro * cfg.num_workers + rank) * cfg.micro_batch_per_worker
    return epoch, np.arange(start, start + cfg.micro_batch_per_worker)


# --- the worker ----------------------------------------------------------------------------------


def deepspeed_config(cfg: DeepSpeedSettings, micro_batch: int, accum_steps: int, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a training stage or of a PPO-trained model (same field names)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": micro_batch * accum_steps * world,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.learning_rate,
                "betas": [cfg.adam_beta1, cfg.adam_beta2],
                "eps": cfg.adam_eps,
                "weight_decay": cfg.weight_decay,
                # Fused CUDA Adam does not exist on CPU.
                "torch_adam": not cfg.use_gpu,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.use_gpu},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No weight decay on norms and biases (1-D tensors), as in GPT-2/Llama recipes.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class MetricsSink:
    """Rank 0's metric sinks: ``metrics.jsonl`` (appended, one JSON object a line) and TensorBoard."""

    def __init__(self, stage_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = stage_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(stage_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        # Ray dashboard gauges kiln_train_<key>{stage=...}; the stage folder's name is the stage.
        from pipelines.dashboard import StageGauges

        StageGauges(self.path.parent.name).record(record)


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
    import torch.distributed as dist

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


def full_state_dict(engine: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """The module's complete weights on rank 0 (None elsewhere); a collective call.

    Under ZeRO-3 each rank holds a slice of every parameter: ``GatheredParameters`` assembles
    the full tensors for the duration of the block. Below stage 3 it is a no-op.
    """
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank == 0:
            return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}
    return None


def _save_checkpoint(engine: Any, job: TrainJob, step: int, rank: int, metrics: dict[str, Any], export: bool) -> None:
    """Write this rank's part of the checkpoint to a temp dir and hand it to Ray Train.

    Ray Train merges every rank's directory into one checkpoint folder in storage: the DeepSpeed
    files (rank 0's model states, each rank's optimizer partition), per-rank RNG states, rank 0's
    ``trainer_state.json``, and on the final step the consolidated HF export.
    """
    import ray.train

    from pipelines.modeling import save_hf_model

    with tempfile.TemporaryDirectory(prefix=f"kiln-ckpt-{rank}-") as tmp:
        root = Path(tmp)
        (root / "ds").mkdir()
        engine.save_checkpoint(str(root / "ds"), tag=CHECKPOINT_TAG, save_latest=False)
        torch.save(_rng_state(), root / f"rng-rank{rank}.pt")
        state = full_state_dict(engine, rank) if export else None
        if rank == 0:
            (root / "trainer_state.json").write_text(json.dumps({"step": step, "config_digest": job.config_digest}))
            if state is not None:
                save_hf_model(engine.module, state, job.tokenizer_dir, root / EXPORT_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{step:08d}")


def _train_worker(config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from transformers import AutoTokenizer

    from pipelines.modeling import build_model

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
    metrics = MetricsSink(Path(job.stage_dir), enabled=rank == 0)

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
            engine.load_checkpoint(str(Path(ckpt_dir) / "ds"), tag=CHECKPOINT_TAG)
            _set_rng_state(torch.load(Path(ckpt_dir) / f"rng-rank{rank}.pt", weights_only=False))
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


# --- the driver ----------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    """What ``fit`` returns: the exported model directory and the run's metric lines."""

    model_dir: Path
    metrics: list[dict[str, Any]]
    seconds: float


def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    """The stage's ``metrics.jsonl`` lines (all attempts, in order)."""
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_inputs(job: TrainJob) -> None:
    """Fail before any worker starts if data or model inputs are missing or unusable.

    Raises:
        FileNotFoundError: naming the missing path.
        ValueError: too little data for one optimizer step.
    """
    from pipelines.modeling import check_model_dir

    if job.init_from is not None:
        check_model_dir(job.init_from)
    if not (Path(job.tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer directory {job.tokenizer_dir} not found (no tokenizer.json)")
    for f in job.train_files + job.validation_files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"training data {f} not found")
    stream = RowStream(job.train_files, job.columns, 0, shuffle=False)
    if stream.total < job.train.sequences_per_step:
        raise ValueError(
            f"{job.stage}: {stream.total} training rows, fewer than sequences_per_step ({job.train.sequences_per_step})"
        )
    seq_len = pq.read_schema(job.train_files[0]).field(stream.columns[0]).type.list_size
    if job.arch is not None:
        max_positions = job.arch.max_position_embeddings
    else:
        max_positions = json.loads((Path(job.init_from) / "config.json").read_text()).get("max_position_embeddings", seq_len)
    if seq_len > max_positions:
        raise ValueError(f"{job.stage}: sequences of {seq_len} tokens exceed the model's max_position_embeddings ({max_positions})")


def prepare_stage(stage_dir: Path, stage: str, digest: str, force: bool) -> dict[str, Any] | None:
    """The start of every training stage: the finished marker's summary (skip), or None (train).

    ``force`` forgets the stage's marker, checkpoints and metrics. An unfinished stage keeps its
    checkpoints (the run resumes from them) as long as its config is the one it started with.

    Raises:
        StageConfigChanged: finished, or checkpointed, under another config (use --force).
    """
    from pipelines.rundir import StageConfigChanged, atomic_write_json, finished_stage, unmark

    if force:
        unmark(stage_dir)
        for name in ("ray", "tensorboard", "model", "dataset"):
            shutil.rmtree(stage_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "started.json"):
            (stage_dir / name).unlink(missing_ok=True)
    elif (done := finished_stage(stage_dir, digest)) is not None:
        print(f"kiln {stage}: {stage_dir} is finished; skipping (use --force to redo)")
        return done["summary"]
    started = stage_dir / "started.json"
    if started.exists() and json.loads(started.read_text())["config_digest"] != digest:
        raise StageConfigChanged(f"{stage_dir} has checkpoints from another config; rerun with --force to start over")
    atomic_write_json(started, {"config_digest": digest})
    return None


def fit(job: TrainJob, ray_cfg: RayConfig) -> TrainOutcome:
    """Train (or resume) with Ray Train and copy the exported HF model to ``<stage_dir>/model``.

    Raises:
        TrainingDiverged: the loss became non-finite (the last good checkpoint is kept).
        ray.train.TrainingFailedError: workers failed more than ``max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from cluster.runtime import init_ray
    from pipelines.rundir import atomic_dir

    check_inputs(job)
    init_ray(ray_cfg)
    stage_dir = Path(job.stage_dir)
    cfg = job.train
    t0 = time.perf_counter()
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=job.storage_path or str(stage_dir / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
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
    return out

