"""The math of training, as pure functions on tensors: losses, pairwise accuracy, LR schedule."""

from __future__ import annotations

import math

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
