"""Reference policy: the frozen starting policy, for the per-token KL penalty.

Not started when the learner trains a LoRA adapter (``ppo.learner.lora``): the reference is then
the learner's own base model with the adapter switched off (``PolicyLearner.reference_logprobs``).
"""

from __future__ import annotations

import ray
import torch
from transformers import AutoModelForCausalLM

from actors.experience import Batch, actor_device, response_logits
from pipelines.rlhf.config import PpoConfig
from pipelines.rlhf.ppo_math import token_logprobs


def reference_dtype(ppo: PpoConfig) -> torch.dtype:
    """The learner's compute dtype (DeepSpeed trains in bf16 on GPUs, float32 on CPUs): a float32
    reference beside a bf16 learner would make the KL measure the rounding, not the drift (non-zero
    at step 1, where the policy is the reference)."""
    return torch.bfloat16 if ppo.learner.use_gpu else torch.float32


@ray.remote
class ReferencePolicy:
    """A frozen causal LM; answers log pi_ref(a_t) for every response token.

    Args:
        model_dir: the starting policy (Hugging Face directory).
        ppo: the ``ppo:`` section (``ppo.reference.threads``, the sampling temperature).
    """

    def __init__(self, model_dir: str, ppo: PpoConfig) -> None:
        torch.set_num_threads(ppo.reference.threads)
        # A GPU when Ray gave the actor one (ppo.reference.num_gpus; it sets CUDA_VISIBLE_DEVICES to it).
        self.device = actor_device()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=reference_dtype(ppo)).to(self.device).eval()
        self.temperature = ppo.temperature

    @torch.no_grad()
    def logprobs(self, batch: Batch, micro_batch: int = 64) -> torch.Tensor:
        """(B, A) log-probs of the response tokens under the reference, at the sampling temperature."""
        out = []
        for start in range(0, batch.size, micro_batch):
            part = batch.rows(slice(start, start + micro_batch)).to(self.device)
            logits = response_logits(self.model, part) / self.temperature
            out.append((token_logprobs(logits, part.input_ids[:, part.prompt_len :]) * part.response_mask).cpu())
        return torch.cat(out)
