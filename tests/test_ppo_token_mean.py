"""The learner's update is the gradient of the mini-batch's token mean, however it is cut up.

Real DeepSpeed learner ranks in Ray actors (the tiny Llama, no rollout): one rank taking the
mini-batch in one micro-batch, and two ranks taking it in micro-batches of two (gradient
accumulation and a gloo all-reduce), see the same loss and the same gradient on a batch whose
responses differ in length and two of whose samples the reward skipped (mask 0). Averaging each
micro-batch's own token mean, as before, gave the two set-ups different gradients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from actors.experience import Batch
from actors.group import RankGroup
from actors.learner import PolicyLearner
from actors.trainable import mean_records
from pipelines.rlhf.config import PpoConfig

# With Adam's eps at 1 and a gradient far below it, the first step is ~lr x gradient (not Adam's
# usual ~lr x sign(gradient)), so equal weights after it mean equal gradients.

pytestmark = pytest.mark.slow


def _config(workers: int, micro: int) -> PpoConfig:
    return PpoConfig.model_validate({
        "prompts": "unused.jsonl", "reward_function": "pipelines.quickstart.task:reward",
        "prompts_per_step": 2, "samples_per_prompt": 4, "minibatches_per_epoch": 1,
        "max_prompt_tokens": 8, "max_response_tokens": 8, "advantage": "grpo", "clip_eps": 0.2,
        "learner": {"num_workers": workers, "cpus_per_worker": 0.25, "zero_stage": 1, "threads_per_worker": 1,
                    "micro_batch_per_worker": micro, "learning_rate": 1.0, "adam_eps": 1.0, "warmup_steps": 0},
    })  # fmt: skip


def _batch(vocab: int) -> Batch:
    gen = torch.Generator().manual_seed(0)
    n, p, a = 8, 4, 6
    input_ids = torch.randint(3, vocab, (n, p + a), generator=gen)
    lengths = torch.tensor([6, 1, 0, 2, 6, 0, 3, 1])  # two skipped samples: no response token counts
    mask = (torch.arange(a) < lengths.unsqueeze(1)).float()
    attention = torch.ones(n, p + a, dtype=torch.long)
    advantages = torch.randn(n, 1, generator=gen) * mask
    old = -3.0 + 0.1 * torch.randn(n, a, generator=gen)
    return Batch(input_ids, attention, mask, p, old * mask, old_logprobs=old * mask, advantages=advantages)


def _update(model_dir: Path, workers: int, micro: int, batch: Batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    group = RankGroup(PolicyLearner, workers, {"num_cpus": 0.25}, _config(workers, micro), str(model_dir))
    try:
        metrics = group.get(lambda r: r.update.remote(batch, 0, 1))
        weights = ray.get(group.get(lambda r: r.publish_weights.remote())[0][0])
    finally:
        for rank in group.ranks:
            ray.kill(rank)
    return mean_records(metrics), weights  # the ranks' mean, as the PPO step reports it


def test_one_rank_whole_and_two_ranks_in_micro_batches_take_the_same_step(ray_local: None, tiny_llama_dir: Path) -> None:
    from transformers import AutoConfig

    batch = _batch(AutoConfig.from_pretrained(tiny_llama_dir).vocab_size)
    whole, w_whole = _update(tiny_llama_dir, 1, 8, batch)
    split_up, w_split = _update(tiny_llama_dir, 2, 2, batch)
    assert whole["grad_norm"] > 0
    assert split_up["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)
    for key in ("policy_loss", "clip_fraction", "approx_kl"):
        assert split_up[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-7), key
    for name, weight in w_whole.items():
        torch.testing.assert_close(w_split[name], weight, rtol=0, atol=1e-6, msg=name)
