"""The PPO / GRPO math as pure functions on tensors: no Ray, no model, no config.

Shapes: ``B`` samples (prompt + response each), ``A`` response ("action") positions. Every
per-token tensor is ``(B, A)`` and comes with ``mask`` ``(B, A)``: 1.0 on real response tokens,
0.0 on the right padding. Response tokens are contiguous from position 0 (right-padded), which
the backward recursions below rely on.

References: Schulman et al. 2017 (clipped objective), Schulman et al. 2016 (GAE), Ziegler et
al. 2019 (per-token KL penalty, adaptive coefficient), Schulman 2020 "Approximating KL
divergence" (k1/k3), Shao et al. 2024 (GRPO group-normalised advantages).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k3"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def token_mean(x: torch.Tensor, mask: torch.Tensor, divisor: float | None = None) -> torch.Tensor:
    """A loss's mean over response tokens: ``masked_mean(x, mask)``, or with ``divisor`` the masked
    sum divided by it.

    ``divisor`` is how a loss over several micro-batches becomes one token mean (veRL's global
    "token-mean", TRL's ``loss_type="dapo"``): each micro-batch divides its sum by the token count
    of the whole mini-batch (every micro-batch, every rank) rather than by its own, so a
    micro-batch of few tokens, or of samples the reward skipped (mask 0), weighs what its tokens
    weigh and the micro-batch size does not change the update. The caller folds in what its engine
    divides by (DeepSpeed: gradient-accumulation steps x data-parallel ranks).
    """
    if divisor is None:
        return masked_mean(x, mask)
    return (x * mask).sum() / max(divisor, 1e-8)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` with mean and (unbiased) std taken over masked positions only.

    Padding stays 0 so that it never leaks into a later masked sum.
    """
    mean = masked_mean(x, mask)
    count = mask.sum()
    var = (((x - mean) ** 2) * mask).sum() / (count - 1.0).clamp(min=1.0)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[tokens]``: (B, T, V), (B, T) -> (B, T), in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (B, T, V) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of tokens sampled from pi.

    ``k1 = log pi - log ref`` is unbiased but can be negative per token; ``k3 = r - 1 - log r``
    with ``r = ref / pi`` is unbiased too, never negative, and has lower variance when the two
    policies are close.
    """
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    return torch.expm1(-log_ratio) + log_ratio


def kl_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, divisor: float | None = None) -> torch.Tensor:
    """The KL penalty as a loss term: the mean over response tokens of the k3 estimate of
    KL(pi_theta || ref), ``exp(ref - logp) - (ref - logp) - 1`` (GRPO, Shao et al. 2024).

    Differentiable in ``logp`` (the current policy's log-probs of the sampled tokens); never
    negative; 0 where the policy equals the reference.

    Args:
        logp: (B, A) log pi_theta(a_t), with gradients.
        ref_logp: (B, A) log pi_ref(a_t).
        mask: (B, A) response mask.
        divisor: of the token mean (``token_mean``; None: this batch's own tokens).

    Padding is masked before the exponential: the learner's ``logp`` is not masked (the
    reference's is 0 there), and a pad token the policy puts below e^-88.7 would make float32's
    ``expm1`` infinite and ``inf * 0`` a NaN loss.
    """
    delta = (ref_logp - logp) * mask
    return token_mean(torch.expm1(delta) - delta, mask, divisor)


def sequence_scores(
    total: torch.Tensor, truncated: torch.Tensor, reward_clip: float | None, missing_eos_penalty: float | None
) -> torch.Tensor:
    """The score each sample's advantage starts from: its reward, less ``missing_eos_penalty`` where
    the response was cut before its stop token (TRL's), then clipped to +-``reward_clip``.

    Args:
        total: (B,) rewards.
        truncated: (B,) bool, the responses cut at the token limit.
        reward_clip: bound of the result's magnitude (None: unclipped).
        missing_eos_penalty: subtracted from a cut response's reward (None: nothing).
    """
    scores = total - missing_eos_penalty * truncated.to(total.dtype) if missing_eos_penalty else total
    return scores.clamp(-reward_clip, reward_clip) if reward_clip else scores


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl`` everywhere, plus the sequence score on the last token.

    Args:
        scores: (B,) one scalar reward per sample.
        kl: (B, A) per-token KL estimate to the reference.
        mask: (B, A) response mask; each row has at least one token.
        kl_coef: weight of the KL penalty.

    Returns:
        (B, A) rewards, 0 on padding.
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,) index of each response's final token
    return rewards.index_put((torch.arange(len(scores)), last), scores, accumulate=True)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` = 0 past the last token, and
    ``A_t = delta_t + gamma * lam * A_{t+1}``.

    Args:
        rewards: (B, A) per-token rewards.
        values: (B, A) critic values of the states before each response token.
        mask: (B, A) response mask (right-padded).
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, each (B, A) and 0 on padding; ``returns = advantages + values``
        are the critic's regression targets.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def grpo_advantages(
    scores: torch.Tensor, group_size: int, valid: torch.Tensor | None = None, eps: float = 1e-6, scale: bool = True
) -> torch.Tensor:
    """GRPO: each sample's score normalised within the group of samples of its prompt.

    Args:
        scores: (B,) sequence rewards, ordered so that consecutive runs of ``group_size`` share
            a prompt.
        group_size: samples per prompt.
        valid: (B,) bool, False for samples left out (a reward function that failed under
            ``on_reward_error: skip``): they take no part in their group's mean and standard
            deviation and get advantage 0. None: all valid.
        eps: added to the std, so that a group of equal scores gets advantage 0, not NaN.
        scale: divide by the group's std (GRPO). False: only subtract the group mean (Dr. GRPO),
            so that tiny score differences within a group (a length penalty, a KL term) stay tiny.

    Returns:
        (B,) advantages ``(score - group mean) / (group std + eps)`` over the valid samples of
        each group; 0 for invalid samples and for groups with fewer than two valid samples.
    """
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    keep = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.bool()
    groups = scores.view(-1, group_size)  # (G, k)
    w = keep.view(-1, group_size).to(scores.dtype)  # (G, k)
    count = w.sum(1, keepdim=True)  # (G, 1) valid samples per group
    mean = (groups * w).sum(1, keepdim=True) / count.clamp(min=1)
    # Unbiased (n - 1) std over the valid samples, as torch.std.
    var = (((groups - mean) ** 2) * w).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    adv = ((groups - mean) / (var.sqrt() + eps) if scale else groups - mean) * w
    return torch.where(count > 1, adv, torch.zeros_like(adv)).view(-1)


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float,
    divisor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, averaged over response tokens (``token_mean`` with ``divisor``: then
    each of the three is this batch's part of the whole mini-batch's mean).

    Returns:
        ``(loss, clip_fraction, approx_kl)``: the loss to minimise; the share of tokens whose
        ratio was clipped; ``mean(0.5 * (log ratio)^2)``, the drift from the rollout policy.
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = token_mean(torch.maximum(unclipped, clipped), mask, divisor)
    clip_fraction = token_mean((clipped > unclipped).float(), mask, divisor)
    approx_kl = token_mean(0.5 * log_ratio.pow(2), mask, divisor)
    return loss, clip_fraction.detach(), approx_kl.detach()


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None,
    divisor: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The critic's (optionally clipped) squared error, ``0.5 * mean(max(err^2, err_clipped^2))``
    (the mean: ``token_mean`` with ``divisor``).

    With ``clip``, a value may move at most ``clip`` away from its rollout-time estimate before
    its error stops improving (the PPO2 value clipping).

    Returns:
        ``(loss, clip_fraction)``.
    """
    err = (values - returns) ** 2
    if clip is None:
        return 0.5 * token_mean(err, mask, divisor), torch.zeros(())
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(err, err_clipped), mask, divisor)
    return loss, token_mean((err_clipped > err).float(), mask, divisor).detach()


def adaptive_kl_coef(coef: float, observed_kl: float, target_kl: float, samples: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: move ``coef`` so that the KL tracks ``target_kl``.

    ``error = clip(observed / target - 1, -0.2, 0.2)``; ``coef *= 1 + error * samples / horizon``.
    """
    error = min(max(observed_kl / target_kl - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * samples / horizon)
