"""DeepSpeed start-up in kiln's training processes (pipelines/train/engine.py), on real DeepSpeed."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.train.engine import deepspeed_arch_list, use_deepspeed_arch_list

ROOT = Path(__file__).resolve().parent.parent

# A process of its own, as a training worker is: the import picks the accelerator once.
_SCRIPT = r"""
import json, os, socket, sys

import torch

from core.config import DeepSpeedSettings
from pipelines.train.engine import deepspeed_config, import_deepspeed, param_groups

deepspeed = import_deepspeed()
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
module = torch.nn.Linear(4, 1)
cfg = DeepSpeedSettings(num_workers=1, zero_stage=2, micro_batch_per_worker=2)
engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, 0.0),
                                  config=deepspeed_config(cfg, 2, 1, 1), dist_init_required=False)
loss = engine(torch.ones(2, 4)).sum()
engine.backward(loss)
engine.step()
from deepspeed.comm import comm
print(json.dumps({"shm_op": comm.cdb.shm_comm_op is not None, "accelerator": deepspeed.get_accelerator().device_name()}))
"""


def test_zero_training_starts_without_building_deepspeeds_shm_op(tmp_path: Path) -> None:
    """A ZeRO-2 step on CPU with no JIT op built: the shared-memory collective op (~70 s of
    compiling on a fresh machine) serves DeepSpeed inference only, so kiln skips it."""
    extensions = tmp_path / "torch_extensions"  # where torch would build any JIT op
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"shm_op": False, "accelerator": "cpu"}
    assert not extensions.exists() or not any(extensions.rglob("*.so")), sorted(extensions.rglob("*"))


def test_arch_suffixes_are_dropped_for_deepspeed() -> None:
    assert deepspeed_arch_list("9.0a") == "9.0"
    assert deepspeed_arch_list("8.0;9.0a+PTX 10.0f") == "8.0;9.0+PTX 10.0"
    assert deepspeed_arch_list("7.5;8.6+PTX") == "7.5;8.6+PTX"  # nothing to drop


def test_deepspeeds_cuda_op_builder_reads_the_rewritten_arch_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real DeepSpeed's CUDA fused-Adam builder (no GPU needed to plan its nvcc flags): ``9.0a`` from a
    Hopper image breaks its JIT build; after ``use_deepspeed_arch_list`` it plans sm_80 and sm_90."""
    builder = importlib.import_module("deepspeed.ops.op_builder.fused_adam").FusedAdamBuilder()
    builder.jit_mode = True
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a 8.0")
    with pytest.raises(ValueError, match="0a"):
        builder.compute_capability_args()
    use_deepspeed_arch_list()
    builder.compute_capability_args()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
