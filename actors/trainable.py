"""What the learner and the critic share: one DeepSpeed data-parallel rank living in a Ray actor.

The ranks of one model form their own ``torch.distributed`` group (gloo on CPU, NCCL on GPU):
rank 0 names an address and a free port (``rendezvous``), then every rank joins it in ``setup``.
Each PPO update trains on mini-batches of the rollout batch: every rank takes its contiguous
share of each mini-batch and DeepSpeed accumulates and all-reduces the gradients.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

import ray
import torch

from actors.experience import Batch
from core.checkpoint import load_deepspeed_checkpoint
from core.shards import split
from pipelines.rlhf.config import OptimizedModelConfig, PpoConfig
from pipelines.train.engine import deepspeed_config, import_deepspeed, param_groups

CHECKPOINT_TAG = "state"


def mean_records(records: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of metric dicts (mini-batches of one rank, or ranks that train equal shares)."""
    return {k: sum(r[k] for r in records) / len(records) for k in records[0]}


def rendezvous() -> tuple[str, int]:
    """This node's IP and a free TCP port, for the process group's rank 0."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class DeepSpeedRank:
    """One rank of a DeepSpeed-wrapped model; subclasses build the module and define the loss.

    Public verbs: ``rendezvous`` and ``setup`` (called by ``RankGroup`` only), ``save`` and
    ``load``; subclasses add their own few. Everything else is private.

    Args:
        rank / world: this rank and the number of ranks.
        cfg: the model's section (``ppo.learner`` or ``ppo.critic``).
        ppo: the ``ppo:`` section (mini-batch size and seed).
    """

    def __init__(self, rank: int, world: int, cfg: OptimizedModelConfig, ppo: PpoConfig) -> None:
        self.rank, self.world, self.cfg = rank, world, cfg
        self.minibatch_size = ppo.samples_per_step // ppo.minibatches_per_epoch
        self.seed = ppo.seed
        self.optimizer_steps = 0
        self.engine: Any = None
        if cfg.use_gpu:
            self.device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        else:
            self.device = torch.device("cpu")
            if cfg.threads_per_worker is not None:
                torch.set_num_threads(cfg.threads_per_worker)

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address for the process group."""
        return rendezvous()

    def _build_module(self) -> torch.nn.Module:
        """The model to train (subclasses); called once in :meth:`setup`, after the seed is set."""
        raise NotImplementedError

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group and wrap the model in a DeepSpeed engine (a collective call)."""
        deepspeed = import_deepspeed()

        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world), LOCAL_RANK="0",
        )
        deepspeed.init_distributed(dist_backend="nccl" if self.cfg.use_gpu else "gloo")
        torch.manual_seed(self.seed)  # identical initial weights on every rank
        module = self._build_module()
        micro = self.cfg.micro_batch_per_worker
        accum = self.minibatch_size // (micro * self.world)
        self.engine, *_ = deepspeed.initialize(
            model=module,
            model_parameters=param_groups(module, self.cfg.weight_decay),
            config=deepspeed_config(self.cfg, micro, accum, self.world),
            dist_init_required=False,
        )

    def _my_rows(self, batch: Batch) -> Batch:
        return batch.rows(split(batch.size, self.world)[self.rank]).to(self.device)

    def _minibatches(self, batch: Batch, step: int, epoch: int) -> list[tuple[Batch, float]]:
        """This rank's share of each mini-batch of one epoch, with the mini-batch's response-token
        count over every rank; the order is a function of (seed, step, epoch)."""
        gen = torch.Generator().manual_seed(hash((self.seed, step, epoch)) & 0x7FFFFFFF)
        order = torch.randperm(batch.size, generator=gen)
        out = []
        for start in range(0, batch.size, self.minibatch_size):
            rows = order[start : start + self.minibatch_size]
            mine = rows[split(len(rows), self.world)[self.rank]]
            out.append((batch.rows(mine).to(self.device), float(batch.response_mask[rows].sum())))
        return out

    def _micro_batches(self, part: Batch) -> list[Batch]:
        m = self.cfg.micro_batch_per_worker
        return [part.rows(slice(s, s + m)) for s in range(0, part.size, m)]

    def _set_lr(self) -> float:
        cfg = self.cfg
        warm = min(1.0, (self.optimizer_steps + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        lr = cfg.learning_rate * warm
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _train_minibatch(self, part: Batch, tokens: float, loss_fn: Any) -> dict[str, float]:
        """One optimizer step over this rank's share of a mini-batch of ``tokens`` response tokens
        (every rank's); returns this rank's loss parts, whose mean over the ranks (``mean_records``)
        is each part's token mean over the mini-batch.

        ``loss_fn(micro, divisor)`` divides its token sums by ``divisor`` (``ppo_math.token_mean``):
        the mini-batch's tokens over what DeepSpeed divides the gradient by (accumulation steps x
        ranks), so the update is the gradient of the mini-batch's token mean whatever the micro-batch
        size, and a micro-batch of skipped samples (mask 0) does not shrink it.
        """
        self._set_lr()
        totals: dict[str, float] = {}
        micro_batches = self._micro_batches(part)
        divisor = tokens / (self.engine.gradient_accumulation_steps() * self.world)
        for micro in micro_batches:
            loss, parts = loss_fn(micro, divisor)
            self.engine.backward(loss)
            self.engine.step()  # steps the optimizer at the accumulation boundary only
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
        self.optimizer_steps += 1
        grad_norm = self.engine.get_global_grad_norm()
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        return totals

    def _train_epochs(self, batch: Batch, step: int, epochs: int, loss_fn: Any) -> dict[str, float]:
        """``epochs`` passes of mini-batches over the batch; the mean of each loss part.

        Raises:
            FloatingPointError: a loss part became NaN or infinite (the run stops; the last
                checkpoint is intact).
        """
        out = mean_records([self._train_minibatch(part, tokens, loss_fn)
                            for epoch in range(epochs) for part, tokens in self._minibatches(batch, step, epoch)])
        bad = {k: v for k, v in out.items() if k != "grad_norm" and not math.isfinite(v)}
        if bad:
            raise FloatingPointError(f"{type(self).__name__}: {bad} at PPO step {step}")
        return out

    def save(self, directory: str) -> None:
        """Write this rank's part of a DeepSpeed checkpoint (weights, optimizer) into ``directory``."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False,
                                    client_state={"optimizer_steps": self.optimizer_steps})

    def load(self, directory: str) -> None:
        """Restore what :meth:`save` wrote (read with ``torch.load(weights_only=True)``: a
        checkpoint cannot run code here)."""
        client = load_deepspeed_checkpoint(self.engine, directory, CHECKPOINT_TAG)
        self.optimizer_steps = int(client.get("optimizer_steps", 0))

