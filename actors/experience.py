"""The one data contract between the PPO controller and its actors.

``Samples`` is what the rollout generator returns (ragged token lists, straight from vLLM).
``Batch`` is the same samples as padded tensors, the form every model actor consumes: prompts
are *left*-padded to a common length ``P`` and responses *right*-padded to ``A``, so response
token ``j`` of every row sits at column ``P + j`` and is predicted by the logits at column
``P + j - 1``. Left-padded prompts need explicit position ids (``position_ids``) so that each
sequence's positions start at 0 exactly as in vLLM, which never sees the padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ray
import torch


@dataclass
class Samples:
    """Sampled responses, ``N = prompts x samples_per_prompt`` of them, grouped by prompt.

    Attributes:
        prompt_ids: N prompt token lists (chat template applied).
        response_ids: N response token lists, the stop token included when one was sampled.
        logprobs: N lists, vLLM's log-probability of each response token.
        texts: N decoded responses (stop token excluded).
        policy_version: the weight version that generated them.
        truncated: N flags, True where the response was cut at ``max_response_tokens`` before a
            stop token (vLLM's finish reason "length").
    """

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]
    texts: list[str]
    policy_version: int
    truncated: list[bool]


def actor_device() -> torch.device:
    """``cuda:0`` when Ray gave this actor a GPU (Ray sets ``CUDA_VISIBLE_DEVICES`` to it), else the CPU."""
    return torch.device("cuda", 0) if ray.is_initialized() and ray.get_gpu_ids() else torch.device("cpu")


@dataclass(frozen=True)
class Batch:
    """Padded tensors of ``B`` samples; ``A`` response positions, ``P`` prompt positions.

    Immutable: each PPO phase returns a new batch (``dataclasses.replace``) with its fields filled.

    Attributes:
        input_ids: (B, P + A) int64 prompt (left-padded) then response (right-padded).
        attention_mask: (B, P + A) int64, 1 on real tokens.
        response_mask: (B, A) float32, 1 on real response tokens.
        prompt_len: P.
        rollout_logprobs: (B, A) log pi_rollout(a_t) from vLLM.
        old_logprobs: (B, A) log pi_theta_old(a_t), the learner's before this step's updates.
        ref_logprobs: (B, A) log pi_ref(a_t).
        values: (B, A) the critic's V(s_t) before the update (zeros for GRPO).
        advantages: (B, A).
        returns: (B, A) the critic's targets (zeros for GRPO).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    rollout_logprobs: torch.Tensor
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor:
        """(B, P + A) positions counted from each sequence's first real token."""
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def with_fields(self, **fields: torch.Tensor) -> "Batch":
        """A copy with ``fields`` set (e.g. ``old_logprobs``, ``advantages``); this batch is unchanged."""
        return replace(self, **fields)

    def rows(self, index: torch.Tensor | slice) -> "Batch":
        """The samples at ``index`` (every per-sample tensor sliced alike)."""
        fields = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            fields[name] = value[index] if isinstance(value, torch.Tensor) else value
        return Batch(**fields)

    def to(self, device: torch.device) -> "Batch":
        """The same batch with every tensor on ``device``."""
        fields = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            fields[name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Batch(**fields)


def collate(samples: Samples, pad_id: int) -> Batch:
    """Pad ragged samples into a :class:`Batch` (prompts left, responses right)."""
    n = len(samples.prompt_ids)
    p = max(len(ids) for ids in samples.prompt_ids)
    a = max(max(len(ids) for ids in samples.response_ids), 1)
    input_ids = torch.full((n, p + a), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p + a), dtype=torch.long)
    mask = torch.zeros((n, a), dtype=torch.float32)
    logprobs = torch.zeros((n, a), dtype=torch.float32)
    for i, (prompt, response, lp) in enumerate(zip(samples.prompt_ids, samples.response_ids, samples.logprobs)):
        input_ids[i, p - len(prompt) : p] = torch.tensor(prompt)
        input_ids[i, p : p + len(response)] = torch.tensor(response, dtype=torch.long)
        attention[i, p - len(prompt) : p + len(response)] = 1
        mask[i, : len(response)] = 1.0
        logprobs[i, : len(lp)] = torch.tensor(lp)
    return Batch(input_ids, attention, mask, p, logprobs)


def response_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """A causal LM's logits for each response token: (B, A, V).

    Token ``P + t`` is predicted at position ``P - 1 + t``, so only the last ``A + 1`` positions go
    through the output layer (``logits_to_keep``, as TRL does) and the last of them is dropped: the
    prompt's logits are never read, and on the quickstart's policy skipping them makes a training
    micro-batch's forward and backward ~15 % faster, with the same values bit for bit."""
    a = batch.response_mask.shape[1]
    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=a + 1,
    ).logits  # (B, A + 1, V): positions P - 1 .. P + A - 1
    return logits[:, :a]
