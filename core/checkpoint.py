"""Checkpoints that cannot run code when they are loaded.

Whoever can write a checkpoint directory (``run.storage_path``, ``<run>/ppo/checkpoints``) must
not be able to run code on the workers that resume from it. ``torch.load(weights_only=False)``,
which DeepSpeed uses, unpickles anything, so :func:`load_deepspeed_checkpoint` reads DeepSpeed's
files with ``weights_only=True`` (tensors, containers, numbers, strings) and an allowlist of the
few plain DeepSpeed classes its optimizer states hold; what else a checkpoint carries (random
states, step counters) is JSON (:func:`rng_state`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def load_deepspeed_checkpoint(engine: Any, directory: str | Path, tag: str) -> dict[str, Any]:
    """``engine.load_checkpoint(directory, tag=tag)`` with every file read by ``torch.load(weights_only=True)``.

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` with DeepSpeed's default (torch) checkpoint engine.
        directory: the folder ``engine.save_checkpoint`` wrote into.
        tag: the checkpoint's tag (its subfolder).

    Returns:
        The client state saved with it ({} if none).

    Raises:
        pickle.UnpicklingError: a file holds something other than tensors, plain containers and
            the allowlisted DeepSpeed classes; nothing in it ran.
    """
    # Imported here, not at the top: importing deepspeed picks the accelerator (DS_ACCELERATOR).
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # What DeepSpeed 0.19's ZeRO 1-3 optimizer states pickle besides tensors: a loss scaler
    # (numbers), the ZeRO stage (an int enum) and fragment addresses (two ints).
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    # DeepSpeed's TorchCheckpointEngine.load passes weights_only=False; every checkpoint read of
    # load_checkpoint (model states, optimizer partitions, client state) goes through it.
    engine.checkpoint_engine.load = load
    _, client = engine.load_checkpoint(str(directory), tag=tag)
    return dict(client or {})


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch random states as JSON values: the CPU generator's,
    and the current CUDA device's when this process has initialised CUDA (a GPU worker: its dropout,
    a LoRA adapter's included, draws from the device's generator, not the CPU's)."""
    version, python_keys, gauss = random.getstate()
    name, numpy_keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(python_keys), gauss],
        "numpy": [name, numpy_keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (after a JSON round trip). A CUDA state goes to the
    current device; on a machine without one (a GPU run resumed on CPUs) it has nothing to drive."""
    version, python_keys, gauss = state["python"]
    random.setstate((version, tuple(python_keys), gauss))
    name, numpy_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(numpy_keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
