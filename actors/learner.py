"""Learner: the policy on DeepSpeed; PPO's clipped objective; publishes its weights.

With ``ppo.learner.lora`` the policy is a LoRA model: only the adapter trains, the reference
log-probs are this model's with the adapter switched off, and ``publish_weights`` sends the
adapter alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoTokenizer

from actors.experience import Batch, response_logits
from actors.trainable import DeepSpeedRank
from pipelines.rlhf.config import PpoConfig
from pipelines.rlhf.ppo_math import entropy_from_logits, kl_loss, masked_mean, policy_loss, token_logprobs
from pipelines.train.engine import full_state_dict, trainable_state_dict
from pipelines.train.modeling import adapter_state_dict, apply_lora, build_model, save_hf_model


@ray.remote
class PolicyLearner(DeepSpeedRank):
    """One data-parallel rank of the policy.

    Verbs: ``logprobs``, ``reference_logprobs`` (LoRA only), ``update``, ``publish_weights``,
    ``export``, plus ``save`` / ``load``.

    Args:
        rank / world: this rank and the number of ranks.
        ppo: the ``ppo:`` section (``ppo.learner`` sizes the rank; temperature and clip_eps).
        model_dir: the starting policy (Hugging Face directory).
    """

    def __init__(self, rank: int, world: int, ppo: PpoConfig, model_dir: str) -> None:
        super().__init__(rank, world, ppo.learner, ppo)
        self.model_dir = model_dir
        self.temperature = ppo.temperature
        self.clip_eps = ppo.clip_eps
        self.lora = ppo.learner.lora

    def _build_module(self) -> torch.nn.Module:
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = build_model("lm", self.tokenizer, path=self.model_dir)
        model.config.use_cache = False
        return apply_lora(model, self.lora) if self.lora is not None else model

    def _logits(self, batch: Batch) -> torch.Tensor:
        # Same temperature as the sampler: the ratio compares the distributions tokens came from.
        return response_logits(self.engine, batch) / self.temperature  # (b, A, V)

    @torch.no_grad()
    def logprobs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the batch: (b, A) log pi_theta(a_t) and (b,) each sample's mean
        entropy per response token."""
        self.engine.eval()
        mine = self._my_rows(batch)
        out, entropy = [], []
        for micro in self._micro_batches(mine):
            logits = self._logits(micro)
            tokens = micro.input_ids[:, micro.prompt_len :]
            out.append((token_logprobs(logits, tokens) * micro.response_mask).cpu())
            entropy.append(masked_mean(entropy_from_logits(logits), micro.response_mask, dim=1).float().cpu())
        self.engine.train()
        return torch.cat(out), torch.cat(entropy)

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        """LoRA only: this rank's share of (b, A) log pi_ref(a_t), the reference being this very
        model with the adapter switched off (the frozen base: no second copy of the weights)."""
        with self.engine.module.disable_adapter():
            return self.logprobs(batch)[0]

    def update(self, batch: Batch, step: int, epochs: int, kl_coef: float = 0.0) -> dict[str, float]:
        """PPO epochs over the batch (needs ``old_logprobs`` and ``advantages``); mean metrics.

        Args:
            kl_coef: weight of the KL-to-reference loss term (``kl_penalty: loss``; needs
                ``ref_logprobs``); 0 when the penalty is in the reward instead.
        """

        def loss_fn(micro: Batch, divisor: float) -> tuple[torch.Tensor, dict[str, Any]]:
            logits = self._logits(micro)
            logp = token_logprobs(logits, micro.input_ids[:, micro.prompt_len :])
            loss, clip_fraction, approx_kl = policy_loss(
                logp, micro.old_logprobs, micro.advantages, micro.response_mask, self.clip_eps, divisor
            )
            parts = {"policy_loss": loss.item(), "clip_fraction": clip_fraction.item(), "approx_kl": approx_kl.item()}
            if kl_coef:
                kl = kl_loss(logp, micro.ref_logprobs, micro.response_mask, divisor)
                loss = loss + kl_coef * kl
                parts["kl_loss"] = kl.item()
            return loss, parts

        return self._train_epochs(batch, step, epochs, loss_fn)

    def publish_weights(self) -> list[ray.ObjectRef] | None:
        """Gather the full weights, or with LoRA the adapter's only (a collective call), and put
        them in the object store.

        Returns:
            On rank 0, ``[ref]`` to a ``{name: tensor}`` dict in Hugging Face naming, or PEFT's
            adapter naming with LoRA (wrapped in a list so the caller receives the reference, not
            the tensors); None on other ranks.
        """
        if self.lora is None:
            state = full_state_dict(self.engine, self.rank)
        else:
            adapter = trainable_state_dict(self.engine, self.rank)
            state = adapter_state_dict(self.engine.module, adapter) if adapter is not None else None
        return [ray.put(state)] if state is not None else None

    def export(self, out_dir: str) -> None:
        """Write the policy in Hugging Face format (rank 0 writes; a collective call); with LoRA the
        merged model, and the adapter in PEFT format in ``out_dir/adapter``."""
        state = full_state_dict(self.engine, self.rank)
        if state is not None:
            save_hf_model(self.engine.module, state, self.model_dir, Path(out_dir))
