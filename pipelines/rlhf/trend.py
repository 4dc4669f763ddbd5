"""The rollout-reward trend of a PPO or GRPO run: did training raise the reward it optimises?

``prompt_rewards`` condenses one step's scores to each prompt's mean reward (a step's metric
record keeps them); ``reward_trend`` compares the first and the last steps of a run, paired by
prompt when both drew the same prompts. Pure functions of tensors and metric records.
"""

from __future__ import annotations

from typing import Any

import torch

from pipelines.eval.stats import mean_interval, paired_mean_test, welch_test


def prompt_rewards(indices: list[int], total: torch.Tensor, valid: torch.Tensor, k: int) -> list[list[float]]:
    """``[prompt index, mean reward]`` for each prompt of a step whose ``k`` samples are not all skipped."""
    out = []
    for i, index in enumerate(indices):
        ok = valid[i * k : (i + 1) * k]
        if ok.any():
            out.append([index, total[i * k : (i + 1) * k][ok].mean().item()])
    return out


def reward_trend(steps: list[dict[str, Any]], window: int = 5) -> dict[str, Any]:
    """Did training raise the rollout reward? The first ``window`` steps against the last ``window``.

    Each window's mean is a mean of step means, with a 95 % t interval. How much of a step's mean
    is the policy and how much its prompts (a batch of harder prompts scores lower) depends on
    which prompts it drew. When both windows drew the same prompts (``ppo.revisit_steps``, or a
    prompt set the run cycles through once per window), the gain is a paired t-test over those prompts, each prompt's
    mean reward in the first window against the last: the prompts' own difficulty cancels.
    Otherwise it is Welch's test on the step means. A run of fewer than ``2 x window`` steps gets
    windows of half its steps: a step in both windows would be counted as evidence on both sides.
    """
    window = min(window, len(steps) // 2)
    first, last = steps[:window], steps[len(steps) - window :]
    out: dict[str, Any] = {}
    for name, part in (("reward_first_steps", first), ("reward_last_steps", last)):
        means = [m["reward_mean"] for m in part]
        out[name] = {"steps": len(means), "mean": sum(means) / len(means) if means else None,
                     "ci95": list(mean_interval(means)) if means else None}  # fmt: skip
    before, after = (_per_prompt(part) for part in (first, last))
    shared = sorted(before.keys() & after.keys())
    if len(shared) >= 2 and 2 * len(shared) >= max(len(before), len(after)):
        delta, p_value = paired_mean_test([before[i] for i in shared], [after[i] for i in shared])
        out.update(reward_gain=delta, reward_gain_p=p_value, reward_gain_test=f"paired t over {len(shared)} prompts")
    else:
        delta, p_value = welch_test([m["reward_mean"] for m in first], [m["reward_mean"] for m in last])
        out.update(reward_gain=delta, reward_gain_p=p_value, reward_gain_test="Welch over step means")
    return out


def _per_prompt(steps: list[dict[str, Any]]) -> dict[int, float]:
    """Each prompt's mean reward over ``steps`` (from their ``prompt_rewards``)."""
    seen: dict[int, list[float]] = {}
    for m in steps:
        for index, reward in m.get("prompt_rewards", ()):
            seen.setdefault(int(index), []).append(reward)
    return {i: sum(r) / len(r) for i, r in seen.items()}
