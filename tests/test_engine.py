"""DeepSpeed start-up in kiln's training processes (pipelines/train/engine.py), on real DeepSpeed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
