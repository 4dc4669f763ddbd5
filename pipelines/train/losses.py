"""The math of training, as pure functions on tensors: losses, pairwise accuracy, DPO, LR schedule."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = -100  # label that carries no loss (same value as pipelines.train.datasets.IGNORE)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of tokens it covers.

    Position t predicts ``labels[:, t + 1]``; positions whose target is ``IGNORE`` (prompt,
    padding) contribute nothing.

    Args:
        logits: (B, T, V) float.
        labels: (B, T) int, token ids or IGNORE.

    Returns:
        (loss summed over target tokens, scalar float; number of target tokens, scalar int64)
    """
    pred = logits[:, :-1, :].float()  # (B, T-1, V)
    target = labels[:, 1:].long()  # (B, T-1)
    loss = F.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, (target != IGNORE).sum()


def lm_target_count(labels: np.ndarray) -> int:
    """The number of target tokens ``lm_loss_sum`` counts for (B, T) ``labels`` (token ids or
    IGNORE; a pretraining batch passes its ids: every token after the first is a target)."""
    return int((labels[:, 1:] != IGNORE).sum())


def accumulation_weight(units: int, step_units: float, micro_batches: int, world: int) -> float:
    """The factor on a micro batch's mean loss that makes a step's update the mean over all of its units.

    DeepSpeed divides each micro batch's loss by ``micro_batches`` and averages the gradients over
    the ``world`` ranks: a mean of the micro batches' means, in which a target token of a micro
    batch with few of them weighs more than one of a full one (SFT rows differ in response
    length). Weighted by ``units * micro_batches * world / step_units``, the update is the mean over
    the step's ``step_units`` (summed over its micro batches and ranks): the loss the metric lines
    report (Hugging Face's ``num_items_in_batch`` fix). Equal micro batches (packed pretraining
    rows, preference pairs) get exactly 1.

    Args:
        units: Target tokens (or pairs) of this micro batch.
        step_units: The same summed over the step's micro batches on every rank.
        micro_batches: Micro batches per optimizer step on each rank (gradient accumulation).
        world: Data-parallel ranks.
    """
    return units * micro_batches * world / max(step_units, 1.0)


def first_predicting_position(labels: torch.Tensor) -> int:
    """The earliest position whose logits any loss term reads: position t predicts ``labels[:, t + 1]``.

    SFT labels only the responses, so the logits of the prompt tokens before it (a third of the
    quickstart's positions, each a 4,096-way output layer) need not be computed: the model's
    ``logits_to_keep`` keeps the positions from here on, and ``lm_loss_sum`` gets ``labels[:, here:]``.
    Pretraining (every token a target) gives 0. Args: labels (B, T) ids or IGNORE.
    """
    targets = (labels[:, 1:] != IGNORE).any(dim=0).nonzero()  # (n, 1) positions predicting a target
    return int(targets[0]) if len(targets) else 0


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean -log σ(r_chosen - r_rejected): the negative log-likelihood of the observed preference.

    Args:
        chosen: (B,) scalar rewards of the preferred responses.
        rejected: (B,) scalar rewards of the other responses.
    """
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def pairwise_correct(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """(B,) 1.0 where the preferred response scores strictly higher, else 0.0 (ties are wrong)."""
    return (chosen > rejected).float()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each sequence's summed log-probability of its labelled tokens (the response).

    Position t predicts ``labels[:, t + 1]`` (as in ``lm_loss_sum``); ``IGNORE`` targets (prompt,
    padding) add nothing.

    Args:
        logits: (B, T, V) float.
        labels: (B, T) int, token ids or IGNORE.

    Returns:
        (B,) float32: sum over t of log p(labels[t + 1] | tokens ..t).
    """
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)  # (B, T-1, V)
    target = labels[:, 1:].long()  # (B, T-1)
    mask = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * mask).sum(-1)


DpoLoss = Literal["sigmoid", "ipo", "cdpo"]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss: DpoLoss = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair direct preference optimisation losses and implicit rewards.

    With h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)) (summed response
    log-probs, chosen w, rejected l):

    - ``sigmoid`` (DPO, Rafailov et al. 2023): −log σ(β h);
    - ``cdpo`` (conservative DPO: the label is wrong with probability ε = ``label_smoothing``):
      −(1 − ε) log σ(β h) − ε log σ(−β h);
    - ``ipo`` (Azar et al. 2023, on summed log-probs as in the paper): (h − 1 / (2β))².

    The implicit rewards are β (log π − log π_ref) of each response, for every variant.

    Args:
        policy_chosen, policy_rejected: (B,) summed log-probs under the policy being trained.
        ref_chosen, ref_rejected: (B,) the same under the frozen reference.
        beta: β > 0, the strength of the pull towards the reference.
        loss: ``sigmoid``, ``ipo`` or ``cdpo``.
        label_smoothing: ε for ``cdpo``; ignored by the others.

    Returns:
        (loss (B,), chosen reward (B,), rejected reward (B,)), float32.
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()  # (B,) log π/π_ref of y_w
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss == "cdpo":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r} (sigmoid, ipo or cdpo)")
    return losses, beta * chosen_ratio, beta * rejected_ratio


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): linear warm-up, cosine decay.

    Rises linearly from 1/warmup to 1 over ``warmup_steps`` steps, then follows a half cosine
    from 1 down to ``min_ratio`` at ``max_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
