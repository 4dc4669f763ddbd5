"""Scores of responses: the task metric and reward functions, and ``transformers`` log-probabilities
(sequence log-probs for the KL estimate, validation perplexity), float32 on the CPU.

Log-probs are taken with ``transformers`` rather than from vLLM so that a model and its reference
are scored by the same code on the same padded batch: the reference's own KL estimate is then 0
exactly, not vLLM-vs-transformers noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from core.calls import CallTimeout, call_with_timeout
from pipelines.rlhf.prompts import PromptRecord


def _call(kind: str, fn: Callable[..., Any], spec: str, prompt: PromptRecord, response: str, timeout_s: float) -> Any:
    """``fn(prompt, response, **fields)`` within ``timeout_s`` (a hung call is abandoned, see core.calls).

    Raises:
        ValueError: it raised or timed out, naming the function, the prompt's line and the response.
    """
    try:
        return call_with_timeout(lambda: fn(prompt.prompt, response, **prompt.fields), timeout_s)
    except CallTimeout:
        raise ValueError(f"{kind} function {spec} gave no result within {timeout_s:g} s on {prompt.where} "
                         f"(response {response!r})") from None  # fmt: skip
    except Exception as e:  # any failure of user code is reported the same way
        raise ValueError(f"{kind} function {spec} failed on {prompt.where} (response {response!r}): "
                         f"{type(e).__name__}: {e}") from e  # fmt: skip


def grade(metric: Callable[..., Any], spec: str, prompt: PromptRecord, response: str, timeout_s: float = 60.0) -> bool:
    """The metric function's verdict on one response: right (True) or wrong.

    Raises:
        ValueError: the function raised, timed out, or returned something other than a bool or 0/1
            (accuracy, pass@k and McNemar's test count right answers); names the function and the prompt's line.
    """
    value = _call("metric", metric, spec, prompt, response, timeout_s)
    # numpy's 0/1 (a metric computed as (pred == gold).sum()) counts like Python's.
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"metric function {spec} returned {value!r} on {prompt.where}; it must return a bool (or 0/1)")


def metric_score(metric: Callable[..., Any], spec: str, prompt: PromptRecord, response: str,
                 timeout_s: float = 60.0) -> float:  # fmt: skip
    """The metric function's value for one response, averaged into an accuracy: a bool or a
    number in [0, 1] (PPO's held-out ``accuracy``).

    Raises:
        ValueError: the function raised, timed out, or returned anything else; names the function
            and the prompt's line.
    """
    value = _call("metric", metric, spec, prompt, response, timeout_s)
    if isinstance(value, bool | np.bool_ | int | float | np.number) and 0 <= float(value) <= 1:
        return float(value)
    raise ValueError(f"metric function {spec} returned {value!r} on {prompt.where}; it must return a bool or a "
                     "number in [0, 1]")  # fmt: skip


def reward(fn: Callable[..., Any], spec: str, prompt: PromptRecord, response: str, timeout_s: float = 60.0) -> float:
    """The reward function's value for one response.

    Raises:
        ValueError: the function raised, timed out, or returned a non-number or a non-finite value
            (naming it and the prompt's line).
    """
    raw = _call("reward", fn, spec, prompt, response, timeout_s)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"reward function {spec} returned {raw!r} on {prompt.where}; it must return a number") from None
    if not math.isfinite(value):
        raise ValueError(f"reward function {spec} returned {value} on {prompt.where}")
    return value


def load_causal_lm(model_dir: Path) -> PreTrainedModel:
    """A Hugging Face causal LM in float32, in eval mode."""
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.no_grad()
def response_logprobs(
    model: PreTrainedModel,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    temperature: float = 1.0,
    micro_batch: int = 16,
) -> torch.Tensor:
    """(N,) sum over each response's tokens of log p(y_t | prompt, y_<t), logits divided by
    ``temperature`` (the distribution the responses were sampled from). An empty response scores 0.

    Sequences are right-padded, so positions start at 0 for every row as they do in vLLM, and the
    causal mask keeps the padding out of every real token's context.
    """
    out = []
    for start in range(0, len(prompt_ids), micro_batch):
        prompts, responses = prompt_ids[start : start + micro_batch], response_ids[start : start + micro_batch]
        length = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids = torch.zeros((len(prompts), length), dtype=torch.long)  # (B, T)
        attention = torch.zeros_like(ids)
        targets = torch.zeros_like(ids, dtype=torch.bool)  # (B, T) True where a response token sits
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            attention[i, : len(p) + len(r)] = 1
            targets[i, len(p) : len(p) + len(r)] = True
        # The output layer only from the first position that predicts a response token (F = the
        # shortest prompt's last position): the prompts' logits are never read.
        first = max(min(len(p) for p in prompts) - 1, 0)
        logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=length - first).logits  # (B, T-F, V)
        logits = logits[:, :-1].float() / temperature  # positions F .. T-2
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, first + 1 :].unsqueeze(-1)).squeeze(-1)  # (B, T-F-1)
        out.append((logp * targets[:, first + 1 :]).sum(1))  # token t is predicted at position t - 1
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def perplexity(model: PreTrainedModel, sequences: np.ndarray, micro_batch: int = 8) -> float:
    """exp(mean next-token negative log-likelihood) over every position of (N, L) packed sequences
    (the data stage's validation rows: full blocks, no padding)."""
    positions = getattr(model.config, "max_position_embeddings", sequences.shape[1])
    ids_all = torch.from_numpy(sequences[:, :positions])  # (N, L) longer blocks are cut to the context
    nll, count = 0.0, 0
    for start in range(0, len(ids_all), micro_batch):
        ids = ids_all[start : start + micro_batch]
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, L-1, V)
        targets = ids[:, 1:].reshape(-1)  # (B * (L-1),)
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum"))
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
