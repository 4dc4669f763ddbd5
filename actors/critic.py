"""Critic: a per-token value model on DeepSpeed, trained with the clipped value loss."""

from __future__ import annotations

from typing import Any

import ray
import torch
from transformers import AutoTokenizer

from actors.experience import Batch
from actors.trainable import DeepSpeedRank
from pipelines.rlhf.config import PpoConfig
from pipelines.rlhf.ppo_math import value_loss
from pipelines.train.modeling import build_model


class ValueModel(torch.nn.Module):
    """A sequence-classification model's trunk and scalar head, read at every position.

    A reward model scores a sequence with its head at the last token; applied at every token the
    same head gives V(s_t), which is why a reward model is the usual critic initialisation.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        hidden = self.model.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).last_hidden_state  # (B, P + A, H)
        a = batch.response_mask.shape[1]
        # V(s_t) for response token t is read where the policy predicts it: column P + t - 1.
        return self.model.score(hidden[:, batch.prompt_len - 1 : batch.prompt_len - 1 + a]).squeeze(-1).float()


@ray.remote
class Critic(DeepSpeedRank):
    """One data-parallel rank of the value model.

    Verbs: ``values``, ``update``, plus ``save`` / ``load``.

    Args:
        rank / world: this rank and the number of ranks.
        ppo: the ``ppo:`` section (``ppo.critic`` sizes the rank; value_clip).
        model_dir: the starting model: a reward model's head becomes the value head.
    """

    def __init__(self, rank: int, world: int, ppo: PpoConfig, model_dir: str) -> None:
        super().__init__(rank, world, ppo.critic, ppo)
        self.model_dir = model_dir
        self.value_clip = ppo.value_clip

    def _build_module(self) -> torch.nn.Module:
        model = build_model("reward", AutoTokenizer.from_pretrained(self.model_dir), path=self.model_dir)
        model.config.use_cache = False
        return ValueModel(model)

    @torch.no_grad()
    def values(self, batch: Batch) -> torch.Tensor:
        """This rank's share of the batch: (b, A) values, 0 on padding."""
        self.engine.eval()
        mine = self._my_rows(batch)
        out = [(self.engine(micro) * micro.response_mask).cpu() for micro in self._micro_batches(mine)]
        self.engine.train()
        return torch.cat(out)

    def update(self, batch: Batch, step: int, epochs: int) -> dict[str, float]:
        """Value-loss epochs over the batch (needs ``values`` and ``returns``); mean metrics."""

        def loss_fn(micro: Batch, divisor: float) -> tuple[torch.Tensor, dict[str, Any]]:
            values = self.engine(micro)
            loss, clip_fraction = value_loss(values, micro.values, micro.returns, micro.response_mask, self.value_clip, divisor)
            return loss, {"value_loss": loss.item(), "value_clip_fraction": clip_fraction.item()}

        return self._train_epochs(batch, step, epochs, loss_fn)
