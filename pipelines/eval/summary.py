"""From per-prompt measurements to ``eval/summary.json`` entries with their uncertainty.

Intervals are taken over *prompts*, the independent unit: k samples of one prompt are correlated,
so a sampled accuracy or a KL is first averaged per prompt and the t interval is taken over those
per-prompt means (a Wilson interval over all n·k samples would claim k times the data it has).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.eval.stats import mcnemar_exact, mean_interval, pass_at_k, proportion_mean_interval, wilson_interval


@dataclass
class ModelScores:
    """What was measured for one model on the same ``n`` held-out prompts.

    Attributes:
        name: the model's name (``base``, ``sft``, ... or a ``--models`` name).
        path: its directory.
        n: held-out prompts.
        correct: (n,) greedy response right or wrong; None without a metric function.
        sampled_correct: (n,) right answers among the k sampled responses; None without a metric.
        k: samples per prompt.
        rewards: (n,) reward function on the greedy responses; None without one.
        rm_scores: (n,) reward-model score of the greedy responses; None without a reward model.
        kl: (n,) per prompt, the mean over its k samples of sum_t log p_model - log p_ref; None when
            the reference is not evaluated (or uses another tokenizer).
        val_perplexity: on the validation sequences; None when skipped.
        engine: ``started`` (a new vLLM engine) or ``reloaded`` (weights loaded in place).
    """

    name: str
    path: str
    n: int
    correct: list[bool] | None
    sampled_correct: list[int] | None
    k: int
    rewards: list[float] | None
    rm_scores: list[float] | None
    kl: list[float] | None
    val_perplexity: float | None
    engine: str


def _interval(low_high: tuple[float, float]) -> list[float] | None:
    return None if any(math.isnan(x) for x in low_high) else [float(low_high[0]), float(low_high[1])]


def _mean(values: Sequence[float] | None, rates: bool = False) -> tuple[float | None, list[float] | None]:
    """The mean and its 95 % interval; ``rates``: values in [0, 1], an interval that stays there."""
    if not values:
        return None, None
    return float(np.mean(values)), _interval((proportion_mean_interval if rates else mean_interval)(values))


def model_entry(m: ModelScores) -> dict[str, Any]:
    """One ``models[]`` entry of the summary: point estimates, their 95 % intervals, counts."""
    n = m.n
    entry: dict[str, Any] = {"model": m.name, "path": m.path, "n": n, "k": m.k, "engine": m.engine}
    if m.correct is not None and m.sampled_correct is not None:
        right = sum(m.correct)
        entry["task_accuracy"] = right / n
        entry["task_accuracy_ci95"] = list(wilson_interval(right, n))
        per_prompt = [pass_at_k(m.k, c, m.k) for c in m.sampled_correct]
        entry["pass_at_k"], entry["pass_at_k_ci95"] = _mean(per_prompt, rates=True)
        entry["sampled_accuracy"], entry["sampled_accuracy_ci95"] = _mean([c / m.k for c in m.sampled_correct],
                                                                          rates=True)  # fmt: skip
    else:
        entry.update(dict.fromkeys(("task_accuracy", "task_accuracy_ci95", "pass_at_k", "pass_at_k_ci95",
                                    "sampled_accuracy", "sampled_accuracy_ci95")))  # fmt: skip
    entry["reward_mean"], entry["reward_mean_ci95"] = _mean(m.rewards)
    entry["rm_score_mean"], entry["rm_score_mean_ci95"] = _mean(m.rm_scores)
    entry["val_perplexity"] = m.val_perplexity
    entry["kl_to_ref"], entry["kl_to_ref_ci95"] = _mean(m.kl)
    return entry


def comparison_pairs(names: list[str], custom: bool) -> list[tuple[str, str]]:
    """Which models are compared: each consecutive pair for ``--models``; for a run's stage models,
    base → sft, then sft → each of ppo, grpo, rlhf, dpo that is present."""
    if custom:
        return list(zip(names, names[1:]))
    pairs = [("base", "sft")] + [("sft", later) for later in ("ppo", "grpo", "rlhf", "dpo")]
    return [(a, b) for a, b in pairs if a in names and b in names]


def comparison(a: ModelScores, b: ModelScores) -> dict[str, Any]:
    """McNemar's exact test of two models' greedy correctness on the same prompts."""
    assert a.correct is not None and b.correct is not None
    test = mcnemar_exact(a.correct, b.correct)
    return {"a": a.name, "b": b.name, "metric": "task_accuracy", "delta": test.delta, "p_value": test.p_value,
            "a_only": test.a_only, "b_only": test.b_only, "n": test.n}  # fmt: skip


def pairwise_entry(chosen: Sequence[float], rejected: Sequence[float], same_format: Sequence[bool]) -> dict[str, Any]:
    """The reward model's pairwise accuracy: chosen scored strictly above rejected (a tie is wrong),
    over all pairs and over the pairs with ``same_format``, with Wilson intervals."""
    wins = [c > r for c, r in zip(chosen, rejected)]
    same = [w for w, s in zip(wins, same_format) if s]
    entry: dict[str, Any] = {"pairs": len(wins), "pairs_same_format": len(same)}
    for key, group in (("pairwise_accuracy", wins), ("pairwise_accuracy_same_format", same)):
        entry[key] = sum(group) / len(group) if group else None
        entry[f"{key}_ci95"] = list(wilson_interval(sum(group), len(group))) if group else None
    return entry
