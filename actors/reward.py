"""Reward: a reward model from ``kiln reward-model`` and/or a Python function, weighted and summed."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pipelines.rlhf.config import PpoConfig


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned a non-finite value; names the function and sample."""


def load_function(spec: str) -> Callable[..., Any]:
    """Import ``module:function``.

    Raises:
        ValueError: the module or the attribute does not exist, or is not callable.
    """
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


@dataclass
class Scores:
    """Per-sample rewards and their parts.

    Attributes:
        total: (N,) the weighted sum the policy is trained on.
        model: (N,) reward-model scores (zeros without a reward model).
        function: (N,) reward-function values (zeros without one).
        valid: (N,) False where the function failed and the sample is skipped.
    """

    total: torch.Tensor
    model: torch.Tensor
    function: torch.Tensor
    valid: torch.Tensor


@ray.remote
class RewardScorer:
    """Scores (prompt, response) pairs: ``score`` is its one verb.

    Args:
        ppo: the ``ppo:`` section (weights, the reward function, ``on_reward_error``, ``reward.threads``).
        model_dir: the reward model's directory (resolved by the controller), or None.
    """

    def __init__(self, ppo: PpoConfig, model_dir: str | None) -> None:
        torch.set_num_threads(ppo.reward.threads)
        self.model = self.tokenizer = None
        if model_dir is not None:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model_weight = ppo.reward_model_weight
        self.function_spec = ppo.reward_function
        self.function = load_function(ppo.reward_function) if ppo.reward_function else None
        self.function_weight = ppo.reward_function_weight
        self.skip_errors = ppo.on_reward_error == "skip"

    def score(self, prompts: list[Any], responses: list[str], fields: list[dict[str, Any]]) -> Scores:
        """Rewards of N samples.

        Args:
            prompts: the prompt of each sample (a string or chat messages), as in the prompts file.
            responses: the decoded responses.
            fields: each sample's other prompt-file fields, passed to the function as keywords.

        Raises:
            RewardFunctionError: the function failed on a sample and errors are not skipped.
        """
        n = len(responses)
        model = self._model_scores(prompts, responses) if self.model is not None else torch.zeros(n)
        function = torch.zeros(n)
        valid = torch.ones(n, dtype=torch.bool)
        if self.function is not None:
            for i, (prompt, response, extra) in enumerate(zip(prompts, responses, fields)):
                try:
                    value = float(self.function(prompt, response, **extra))
                    if not math.isfinite(value):
                        raise ValueError(f"returned {value}")
                except Exception as e:  # noqa: BLE001 - any failure of user code is reported the same way
                    if not self.skip_errors:
                        raise RewardFunctionError(
                            f"reward function {self.function_spec} failed on sample {i} "
                            f"(prompt={prompt!r}, response={response!r}): {type(e).__name__}: {e}"
                        ) from None
                    valid[i] = False
                    continue
                function[i] = value
        total = (self.model_weight * model + self.function_weight * function) * valid
        return Scores(total=total, model=model, function=function, valid=valid)

    @torch.no_grad()
    def _model_scores(self, prompts: list[Any], responses: list[str], micro_batch: int = 64) -> torch.Tensor:
        # The text the reward model was trained on: the chat template over prompt + response.
        texts = []
        for prompt, response in zip(prompts, responses):
            head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            messages = head + [{"role": "assistant", "content": response}]
            texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
        self.tokenizer.padding_side = "right"  # the score is read at the last non-pad token
        out = []
        for start in range(0, len(texts), micro_batch):
            enc = self.tokenizer(texts[start : start + micro_batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out.append(self.model(**enc).logits.squeeze(-1).float())
        return torch.cat(out)
