"""Reward: a reward model from ``kiln reward-model`` and/or a Python function, weighted and summed.

The function is the user's code, run in this actor's process on the cluster. Each call has
``ppo.reward_timeout_s`` to return: one that hangs is an error like one that raises. Python cannot
stop a thread, so a call that timed out is abandoned, not stopped: it keeps its thread (a daemon)
until it returns or the actor ends, and the next call starts on a thread of its own.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from actors.experience import actor_device
from core.calls import CallTimeout, call_with_timeout
from core.chat import tokenize_chat
from pipelines.rlhf.config import PpoConfig


class RewardFunctionError(RuntimeError):
    """A reward function raised, returned a non-finite value or timed out; names the function and sample."""


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


# Reward-function calls in a row that may time out under ``on_reward_error: skip`` before the run stops.
MAX_TIMEOUTS_IN_A_ROW = 3
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # rewards are kept in float32


def function_rewards(
    fn: Callable[..., Any], spec: str, prompts: list[Any], responses: list[str], fields: list[dict[str, Any]],
    timeout_s: float, skip_errors: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A reward function's value on each of N samples, each call given ``timeout_s`` seconds.

    Args:
        fn: called as ``fn(prompt, response, **fields)``, returning a finite number.
        spec: its ``module:function`` name, for messages.
        prompts / responses / fields: the samples.
        timeout_s: ``ppo.reward_timeout_s``.
        skip_errors: ``on_reward_error: skip``: a failed sample is marked invalid, not raised.

    Returns:
        (N,) values (0 where invalid) and (N,) validity.

    Raises:
        RewardFunctionError: a call raised, returned a non-finite value or timed out, and errors
            are not skipped, or ``MAX_TIMEOUTS_IN_A_ROW`` calls in a row timed out (skipped or
            not); it names the function, the sample and what went wrong.
    """
    values = torch.zeros(len(responses))
    valid = torch.ones(len(responses), dtype=torch.bool)
    first_error = ""  # skipped samples: the first one's error is named, the rest counted
    hung = 0  # timeouts in a row
    for i, (prompt, response, extra) in enumerate(zip(prompts, responses, fields)):
        try:
            value = float(call_with_timeout(lambda: fn(prompt, response, **extra), timeout_s))  # noqa: B023 - called at once
            if not math.isfinite(value):
                raise ValueError(f"returned {value}")
            if abs(value) > _FLOAT32_MAX:  # finite in Python, but not in the float32 the rewards are kept in
                raise ValueError(f"returned {value}, beyond float32's range")
        except Exception as e:  # noqa: BLE001 - any failure of user code is reported the same way
            timed_out = isinstance(e, CallTimeout)
            hung = hung + 1 if timed_out else 0
            what = f"{'timed out' if timed_out else 'failed'} on sample {i}"
            cause = f"{e} (ppo.reward_timeout_s); the call was abandoned" if timed_out else f"{type(e).__name__}: {e}"
            if not skip_errors or hung == MAX_TIMEOUTS_IN_A_ROW:
                # Skipping a function that hangs on every call would cost timeout_s per sample and
                # leave a thread behind for each: after a few in a row it is the function, not a sample.
                again = f"; {hung} calls in a row timed out, so it is stopped (on_reward_error: skip)" if skip_errors else ""
                raise RewardFunctionError(
                    f"reward function {spec} {what} (prompt={prompt!r}, response={response!r}): {cause}{again}"
                ) from None
            if timed_out:  # a thread left running deserves a line in the log
                print(f"kiln: reward function {spec} {what}: {cause}; sample skipped", file=sys.stderr, flush=True)
            first_error = first_error or f"sample {i} (response={response!r:.200}): {cause}"
            valid[i] = False
            continue
        values[i] = value
        hung = 0
    if first_error:
        print(f"kiln: reward function {spec} failed on {int((~valid).sum())} of {len(responses)} samples, skipped "
              f"(on_reward_error: skip); the first: {first_error}", file=sys.stderr, flush=True)  # fmt: skip
    return values, valid


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
        ppo: the ``ppo:`` section (weights, the reward function, ``on_reward_error``,
            ``reward_timeout_s``, ``reward.threads``).
        model_dir: the reward model's directory (resolved by the controller), or None.
    """

    def __init__(self, ppo: PpoConfig, model_dir: str | None) -> None:
        torch.set_num_threads(ppo.reward.threads)
        self.model = self.tokenizer = None
        if model_dir is not None:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            # A GPU when Ray gave the actor one (ppo.reward.num_gpus; it sets CUDA_VISIBLE_DEVICES to it).
            self.device = actor_device()
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)
            self.model = model.to(self.device).eval()
        self.model_weight = ppo.reward_model_weight
        self.function_spec = ppo.reward_function
        self.function = load_function(ppo.reward_function) if ppo.reward_function else None
        self.function_weight = ppo.reward_function_weight
        self.skip_errors = ppo.on_reward_error == "skip"
        self.timeout_s = ppo.reward_timeout_s

    def score(self, prompts: list[Any], responses: list[str], fields: list[dict[str, Any]]) -> Scores:
        """Rewards of N samples.

        Args:
            prompts: the prompt of each sample (a string or chat messages), as in the prompts file.
            responses: the decoded responses.
            fields: each sample's other prompt-file fields, passed to the function as keywords.

        Raises:
            RewardFunctionError: the function failed (or timed out) on a sample and errors are not skipped.
        """
        n = len(responses)
        model = self._model_scores(prompts, responses) if self.model is not None else torch.zeros(n)
        function, valid = torch.zeros(n), torch.ones(n, dtype=torch.bool)
        if self.function is not None:
            function, valid = function_rewards(self.function, self.function_spec, prompts, responses, fields,
                                               self.timeout_s, self.skip_errors)  # fmt: skip
        total = (self.model_weight * model + self.function_weight * function) * valid
        return Scores(total=total, model=model, function=function, valid=valid)

    @torch.no_grad()
    def _model_scores(self, prompts: list[Any], responses: list[str], micro_batch: int = 64) -> torch.Tensor:
        # The tokens the reward model was trained on: the chat template over prompt + response, contents
        # as text (a response that spells out "<|im_end|>\n<|im_start|>..." is scored as that text).
        ids = []
        for prompt, response in zip(prompts, responses):
            head = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            messages = head + [{"role": "assistant", "content": response}]
            ids.append(tokenize_chat(self.tokenizer, messages).ids)
        self.tokenizer.padding_side = "right"  # the score is read at the last non-pad token
        out = []
        for start in range(0, len(ids), micro_batch):
            enc = self.tokenizer.pad({"input_ids": ids[start : start + micro_batch]}, return_tensors="pt")
            out.append(self.model(**enc.to(self.device)).logits.squeeze(-1).float().cpu())
        return torch.cat(out)
