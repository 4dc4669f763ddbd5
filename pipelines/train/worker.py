"""The Ray Train worker loop behind pretrain, SFT, reward model and DPO (DeepSpeed ZeRO).

Each worker (``train_worker``) reads top to bottom:

  1. build the model (new, or from a HF directory) and wrap it in a DeepSpeed engine;
  2. restore the latest Ray Train checkpoint, if any: weights, optimizer, step (= data position), RNG;
  3. loop: gradient-accumulated micro batches → step → metrics / eval / checkpoint;
  4. at the last step, gather the full weights (ZeRO-3 included) and export them in HF format
     inside the final checkpoint.

Objectives: ``lm`` (next-token loss on ``labels``, or on ``input_ids`` when the shards have no
labels: pretraining), ``reward`` (Bradley–Terry on ``chosen_ids``/``rejected_ids``) and ``dpo``
(a DPO loss on the policy's summed response log-probs against the reference's, which the rows
carry: the reference model itself is never loaded here).
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import tempfile
import time
from collections.abc import Callable
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
from pipelines.train.config import DpoConfig, LoraSettings, ModelConfig, RewardModelConfig, TrainConfig
from pipelines.train.engine import deepspeed_config, full_state_dict, import_deepspeed, param_groups
from pipelines.train.losses import (
    accumulation_weight,
    bradley_terry_loss,
    dpo_loss,
    first_predicting_position,
    lm_loss_sum,
    lm_target_count,
    lr_multiplier,
    pairwise_correct,
    sequence_logps,
)
from pipelines.train.modeling import apply_lora, build_model, exported, save_hf_model, with_lm_head
from pipelines.train.rows import RowStream, cut_to_longest, step_positions, trim_padding

Objective = Literal["lm", "reward", "dpo"]
Sums = dict[str, torch.Tensor | float]  # a micro batch's or a step's summed figures (``_forward``)
# The row columns each objective reads (a pretraining shard has no labels: RowStream skips them).
COLUMNS: dict[str, tuple[str, ...]] = {
    "lm": ("input_ids", "labels"),
    "reward": ("chosen_ids", "rejected_ids"),
    "dpo": ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels", "ref_chosen_logp", "ref_rejected_logp"),
}
CHECKPOINT_TAG = "state"  # DeepSpeed tag inside every checkpoint: ds/state/...
EXPORT_DIR = "hf"  # the final checkpoint's consolidated Hugging Face model


@dataclass(frozen=True)
class TrainJob:
    """Everything a training worker needs; built by a stage driver, pickled to the workers.

    Attributes:
        stage: the run-directory folder (``pretrain``, ``sft``, ``reward_model``, ``dpo``).
        objective: ``lm``, ``reward`` or ``dpo``.
        train: the stage's training section (a ``DpoConfig`` for ``dpo``: beta, loss).
        stage_dir: absolute ``runs/<name>/<stage>``; rank 0 appends ``metrics.jsonl`` there
            (on a multi-node cluster it must be on shared storage, like the checkpoints).
        tokenizer_dir: tokenizer saved with the exported model.
        train_files / validation_files: Parquet files of fixed-length int32 rows.
        arch: sizes of a new model (with ``init_from`` None).
        init_from: a HF model directory to start from.
        config_digest: the stage config's digest, to refuse resuming under another config.
        storage_path: Ray Train storage for the checkpoints (``RunConfig.stage_storage``: a
            shared path or object-store URI); None keeps them in ``<stage_dir>/ray``.
        lora: train a LoRA adapter only (``sft.lora`` / ``dpo.lora``); None trains every weight.
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
    lora: LoraSettings | None = None

    @property
    def lm_loss_weight(self) -> float:
        """The reward model's auxiliary next-token loss weight (0 for every other objective)."""
        return self.train.lm_loss_weight if isinstance(self.train, RewardModelConfig) else 0.0

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS[self.objective] + (("chosen_labels",) if self.lm_loss_weight > 0 else ())


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _pair_scores(
    engine: Any, chosen: torch.Tensor, rejected: torch.Tensor, pad_id: int | None, one_forward: bool = False
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Reward scores of both sides of B pairs: ((B,), (B,), tokens processed).

    One forward of the (2B, T) concatenation when the two sides are as wide; otherwise one forward
    per side, each cut to its own longest row. The quickstart's long "ramble"
    rejects made every batch 48 tokens wide while its chosen answers end by 36: per side, 13 %
    fewer tokens. The score is read at each row's last real token, so the cut changes no score
    beyond float rounding. ``one_forward`` (ZeRO-3, whose every forward gathers the parameters
    from all ranks together, so each rank must run as many as the others whatever its rows): the
    narrower side is padded to the wider and both go through one forward.
    """
    chosen, rejected = cut_to_longest(chosen, pad_id), cut_to_longest(rejected, pad_id)
    if one_forward and chosen.shape[1] != rejected.shape[1]:
        width = max(chosen.shape[1], rejected.shape[1])
        chosen, rejected = (torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=pad_id or 0)
                            for ids in (chosen, rejected))  # fmt: skip
    if chosen.shape[1] == rejected.shape[1]:
        both = torch.cat([chosen, rejected])  # (2B, T)
        return *engine(input_ids=both).logits.squeeze(-1).chunk(2), both.numel()
    scores = [engine(input_ids=ids).logits.squeeze(-1) for ids in (chosen, rejected)]  # (B,) each
    return scores[0], scores[1], chosen.numel() + rejected.numel()


def _pair_scores_with_lm(
    engine: Any, chosen: torch.Tensor, rejected: torch.Tensor, labels: torch.Tensor, pad_id: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``_pair_scores`` of a ``RewardWithLmHead``, and the next-token loss of the chosen responses:
    ((B,) chosen scores, (B,) rejected scores, summed loss, target tokens, tokens processed).

    One forward per side (every rank runs two, as ZeRO-3 needs); only the chosen side goes through
    the LM head, from its first predicting position (``first_predicting_position``) on.
    """
    chosen, rejected = cut_to_longest(chosen, pad_id), cut_to_longest(rejected, pad_id)
    labels = labels[:, : chosen.shape[1]]  # labels are IGNORE wherever chosen is padding
    first = first_predicting_position(labels)
    chosen_scores, logits = engine(input_ids=chosen, lm_from=first)
    rejected_scores, _ = engine(input_ids=rejected)
    loss_sum, count = lm_loss_sum(logits, labels[:, first:])
    return chosen_scores.squeeze(-1), rejected_scores.squeeze(-1), loss_sum, count, chosen.numel() + rejected.numel()


def start_engine(model: torch.nn.Module, cfg: TrainConfig) -> Any:
    """The DeepSpeed engine around ``model`` (torch.distributed already set up), in training mode:
    ``from_pretrained`` returns a model in eval mode, its dropout off and activation checkpointing
    skipped (transformers checkpoints only while training) until the first evaluation switched it."""
    deepspeed = import_deepspeed()
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.weight_decay),
        config=deepspeed_config(cfg, cfg.micro_batch_per_worker, cfg.grad_accum_steps, cfg.num_workers),
        dist_init_required=False,  # Ray Train already set up torch.distributed (gloo / NCCL)
    )
    if cfg.torch_compile is not None:
        engine.compile(backend=cfg.torch_compile)  # nn.Module.compile: parameter names unchanged
    engine.train()
    return engine


def _forward(
    engine: Any, job: TrainJob, batch: dict[str, torch.Tensor], pad_id: int | None
) -> tuple[torch.Tensor, Sums, int]:
    """One micro batch → (loss to backpropagate, sums to accumulate, tokens processed).

    The sums (added over micro batches and ranks, then turned into metrics by ``_metrics``):
    ``loss`` summed over ``count`` units (target tokens for ``lm``, pairs otherwise), ``correct``
    pairs (``reward``, ``dpo``: the chosen response scores strictly higher), and for ``dpo`` the
    summed implicit rewards ``chosen_reward`` and ``rejected_reward``. They stay 0-d tensors on the
    device until the step's one all-reduce: reading one here would wait for the device at every
    micro batch, so a GPU's queue would run dry while the host prepares the next.
    """
    if job.objective == "lm":
        ids = batch["input_ids"]  # (B, T)
        labels = batch.get("labels")  # pretraining: none, every token is a target
        first = 0 if labels is None else first_predicting_position(labels)  # SFT: no output layer over the prompts
        targets = (ids if labels is None else labels)[:, first:]
        logits = engine(input_ids=ids, logits_to_keep=ids.shape[1] - first).logits  # (B, T - first, V)
        loss_sum, count = _lm_loss(job.train.torch_compile)(logits, targets)
        return loss_sum / count.clamp(min=1), {"loss": loss_sum.detach(), "count": count}, ids.numel()
    pairs = len(batch["chosen_ids"])
    if job.objective == "reward":
        lm: Sums = {}  # the auxiliary next-token loss's sums (reward_model.lm_loss_weight), if any
        aux: torch.Tensor | float = 0.0
        if job.lm_loss_weight > 0:
            chosen, rejected, lm_sum, lm_count, tokens = _pair_scores_with_lm(
                engine, batch["chosen_ids"], batch["rejected_ids"], batch["chosen_labels"], pad_id)  # fmt: skip
            lm = {"lm_loss": lm_sum.detach(), "lm_tokens": lm_count}
            aux = job.lm_loss_weight * lm_sum / lm_count.clamp(min=1)
        else:
            chosen, rejected, tokens = _pair_scores(engine, batch["chosen_ids"], batch["rejected_ids"], pad_id,
                                                    one_forward=job.train.zero_stage == 3)  # fmt: skip
        bt = bradley_terry_loss(chosen, rejected)
        return bt + aux, {"loss": bt.detach() * pairs, "count": pairs, "correct": pairwise_correct(chosen, rejected).sum(),
                          **lm}, tokens  # fmt: skip
    both = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])  # (2B, T): one forward for both sides
    cfg = job.train
    assert isinstance(cfg, DpoConfig)
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])  # (2B, T): response tokens only
    policy_chosen, policy_rejected = sequence_logps(engine(input_ids=both).logits, labels).chunk(2)  # (B,) each
    losses, chosen_reward, rejected_reward = dpo_loss(
        policy_chosen, policy_rejected, batch["ref_chosen_logp"], batch["ref_rejected_logp"],
        cfg.beta, cfg.loss, cfg.label_smoothing,
    )  # fmt: skip
    sums: Sums = {
        "loss": losses.detach().sum(),
        "count": pairs,
        "correct": pairwise_correct(chosen_reward, rejected_reward).sum(),
        "chosen_reward": chosen_reward.detach().sum(),
        "rejected_reward": rejected_reward.detach().sum(),
    }
    return losses.mean(), sums, both.numel()


@functools.cache
def _lm_loss(backend: str | None) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``lm_loss_sum``, compiled with the model's backend when the model is: inductor then fuses the
    float32 log-softmax over the vocabulary into the loss instead of writing (B, T, V) float32
    logits and their gradient to memory."""
    return lm_loss_sum if backend is None else torch.compile(lm_loss_sum, backend=backend)


def _step_weights(micro_rows: list[dict[str, np.ndarray]], cfg: TrainConfig) -> list[float]:
    """Each micro batch's loss weight, so that the step's update is the mean over all of its target
    tokens (``accumulation_weight``). Only rows with ``labels`` (SFT) differ in their targets:
    packed pretraining rows and preference pairs (every micro batch the same size) get exactly 1
    without the all-reduce. Counted from the host rows, so no device sync."""
    if "labels" not in micro_rows[0]:
        return [1.0] * len(micro_rows)
    units = [lm_target_count(rows["labels"]) for rows in micro_rows]
    step_units = _all_sum({"units": float(sum(units))})["units"]
    return [accumulation_weight(u, step_units, cfg.grad_accum_steps, cfg.num_workers) for u in units]


def _metrics(sums: dict[str, float], objective: Objective, held_out: bool) -> dict[str, float]:
    """Summed values → the metric line's figures (``val_``-prefixed for the held-out split)."""
    count = max(sums["count"], 1.0)
    out = {"loss": sums["loss"] / count}
    if objective == "lm" and held_out:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    if "correct" in sums:
        out["accuracy"] = sums["correct"] / count  # reward model: pairwise; DPO: implicit reward
    if "lm_loss" in sums:  # the reward model's auxiliary next-token loss, per chosen-response token
        out["lm_loss"] = sums["lm_loss"] / max(sums["lm_tokens"], 1.0)
    if "chosen_reward" in sums:
        out["chosen_reward"] = sums["chosen_reward"] / count
        out["rejected_reward"] = sums["rejected_reward"] / count
        out["margin"] = out["chosen_reward"] - out["rejected_reward"]
    return {f"val_{k}" if held_out else k: v for k, v in out.items()}


def _to_device(rows: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """A micro batch's columns as tensors on ``device``. To a GPU through pinned memory without
    waiting: a copy from pageable memory first waits for every kernel already queued, which would
    drain the GPU's queue at every micro batch."""
    if device.type != "cuda":
        return {k: torch.from_numpy(v) for k, v in rows.items()}
    return {k: torch.from_numpy(v).pin_memory().to(device, non_blocking=True) for k, v in rows.items()}


def _add(total: Sums, sums: Sums) -> Sums:
    """Key-wise sums, in float64 (as Python floats were) however the micro batch computed them."""
    return {k: total.get(k, 0.0) + (v.double() if isinstance(v, torch.Tensor) else v) for k, v in sums.items()}


def _all_sum(sums: Sums) -> dict[str, float]:
    """Every rank's sums added up (every rank has the same keys): the one read of the device."""
    keys = sorted(sums)
    # NCCL reduces CUDA tensors only; gloo (CPU) takes this one where it is.
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    t = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=device) for k in keys])
    if dist.is_initialized():
        dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def _evaluate(
    engine: Any, job: TrainJob, stream: RowStream, rank: int, device: torch.device, pad_id: int | None
) -> dict[str, float]:
    """Held-out figures (``val_loss``, and perplexity, pairwise accuracy or DPO's rewards) on the
    first rows of the validation files."""
    cfg = job.train
    per_batch = cfg.micro_batch_per_worker * cfg.num_workers
    batches = min(cfg.eval_batches, stream.total // per_batch)
    if batches == 0:
        return {}
    sums: Sums = {}
    engine.eval()
    with torch.no_grad():
        for b in range(batches):
            start = (b * cfg.num_workers + rank) * cfg.micro_batch_per_worker
            rows = trim_padding(stream.rows(0, np.arange(start, start + cfg.micro_batch_per_worker)), pad_id)
            batch = _to_device(rows, device)
            sums = _add(sums, _forward(engine, job, batch, pad_id)[1])
    engine.train()
    return _metrics(_all_sum(sums), job.objective, held_out=True)


def _save_checkpoint(engine: Any, job: TrainJob, step: int, rank: int, metrics: dict[str, Any], export: bool,
                     window: dict[str, Any]) -> None:  # fmt: skip
    """Write this rank's part of the checkpoint to a temp dir and hand it to Ray Train.

    Ray Train merges every rank's directory into one checkpoint folder in storage: the DeepSpeed
    files (rank 0's model states, each rank's optimizer partition), per-rank RNG states, rank 0's
    ``trainer_state.json`` (with ``window``: the metric sums since the last metric line, so a
    resumed run's next line averages the same steps as an uninterrupted run's), and on the final
    step the consolidated HF export. Nothing in it is a
    pickle that a load must trust (``core.checkpoint``): RNG states are JSON.
    """
    with tempfile.TemporaryDirectory(prefix=f"kiln-ckpt-{rank}-") as tmp:
        root = Path(tmp)
        (root / "ds").mkdir()
        engine.save_checkpoint(str(root / "ds"), tag=CHECKPOINT_TAG, save_latest=False)
        (root / f"rng-rank{rank}.json").write_text(json.dumps(rng_state()))
        state = full_state_dict(engine, rank) if export else None
        if rank == 0:
            (root / "trainer_state.json").write_text(json.dumps({"step": step, "config_digest": job.config_digest,
                                                                  "window": window}))  # fmt: skip
            if state is not None:
                save_hf_model(*exported(engine.module, state), job.tokenizer_dir, root / EXPORT_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step-{step:08d}")


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker loop (``train_loop_per_worker``): build, restore, train, export."""
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
    pad_id = tokenizer.pad_token_id  # micro batches are cut to their longest row (trim_padding)
    model = build_model("reward" if job.objective == "reward" else "lm", tokenizer, arch=job.arch, path=job.init_from)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if job.lm_loss_weight > 0:
        assert job.init_from is not None, "the reward model starts from a model directory"
        model = with_lm_head(model, job.init_from)  # exported without its LM head
    if job.lora is not None:
        # Base weights frozen: only the adapters reach the optimizer (param_groups keeps trainable
        # parameters). The HF export is the merged model, with the adapter beside it.
        model = apply_lora(model, job.lora)
    engine = start_engine(model, cfg)

    # 2. Resume: the step is the data position; the LR is a function of the step.
    step = 0
    checkpoint = ray.train.get_checkpoint()
    resumed_window: dict[str, Any] = {}
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            saved = json.loads((Path(ckpt_dir) / "trainer_state.json").read_text())
            if saved["config_digest"] != job.config_digest:
                raise RuntimeError(f"{job.stage}: latest checkpoint was written under another config; rerun with --force")
            load_deepspeed_checkpoint(engine, Path(ckpt_dir) / "ds", CHECKPOINT_TAG)
            set_rng_state(json.loads((Path(ckpt_dir) / f"rng-rank{rank}.json").read_text()))
            step = saved["step"]
            resumed_window = saved.get("window") or {}
    else:
        _seed_all(cfg.seed + rank)
    # Where every rank runs (Ray node ids, rank order): the stage summary reports the nodes used.
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    metrics.write({"event": "resume" if step else "start", "step": step, "time": time.time(), "pid": os.getpid(),
                   "nodes": nodes, "compiled": engine.is_compiled})  # fmt: skip

    train = RowStream(job.train_files, job.columns, cfg.seed, shuffle=True)
    valid = RowStream(job.validation_files, job.columns, cfg.seed, shuffle=False)
    epoch_rows = train.total // cfg.sequences_per_step * cfg.sequences_per_step

    # 3. The loop. One optimizer step = grad_accum_steps micro batches on every rank.
    # Sums since the last metric line (a checkpoint between two lines carries them over a resume).
    window: dict[str, float] = dict(resumed_window.get("sums", {}))
    timing = {"tokens": 0, "seconds": 0.0, **resumed_window.get("timing", {})}
    while step < cfg.max_steps:
        lr = cfg.learning_rate * lr_multiplier(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        sums: Sums = {}
        tokens = 0
        # The step's micro batches first: the update is the mean over all of the step's target
        # tokens, so each micro batch's loss is weighted by its share of them.
        micro_rows = [trim_padding(train.rows(*step_positions(step, micro, rank, cfg, epoch_rows)), pad_id)
                      for micro in range(cfg.grad_accum_steps)]  # fmt: skip
        for rows, weight in zip(micro_rows, _step_weights(micro_rows, cfg)):
            batch = _to_device(rows, device)
            loss, micro_sums, t = _forward(engine, job, batch, pad_id)
            engine.backward(loss * weight)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            sums, tokens = _add(sums, micro_sums), tokens + t
        grad_norm = engine.get_global_grad_norm()
        # A sync point, once per optimizer step. The ranks' tokens too: trimmed to their own
        # longest rows, they differ between ranks (SFT, reward model, DPO).
        sums = _all_sum({**sums, "tokens": float(tokens)})
        step_tokens = sums.pop("tokens")
        timing["seconds"] += time.perf_counter() - t0
        step += 1
        if not math.isfinite(sums["loss"]):
            metrics.write({"event": "non_finite_loss", "step": step, "loss": str(sums["loss"] / max(sums["count"], 1))})
            return  # every rank sees the same all-reduced value, so all stop here together
        window = _add(window, sums)
        timing["tokens"] += step_tokens

        record: dict[str, Any] = {}
        if step % cfg.log_every_steps == 0 or step == cfg.max_steps:
            record = {
                "step": step,
                **_metrics(window, job.objective, held_out=False),
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": timing["tokens"] / timing["seconds"],
                "samples_seen": step * cfg.sequences_per_step,
                "epoch": step * cfg.sequences_per_step / max(epoch_rows, 1),
            }
            window, timing = {}, {"tokens": 0, "seconds": 0.0}
        if step % cfg.eval_every_steps == 0 or step == cfg.max_steps:
            record = {"step": step, **record, **_evaluate(engine, job, valid, rank, device, pad_id)}
        if record:
            metrics.write(record)
        if step % cfg.checkpoint_every_steps == 0 or step == cfg.max_steps:
            # 4. The last checkpoint also carries the consolidated HF export.
            _save_checkpoint(engine, job, step, rank, record, export=step == cfg.max_steps,
                             window={"sums": window, "timing": timing})  # fmt: skip
        elif record:
            ray.train.report(record)
    metrics.write({"event": "finished", "step": step, "time": time.time()})
