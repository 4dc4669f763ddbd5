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


# Two ZeRO-3 ranks of a reward model loaded from disk, as kiln's workers build it. Rank 1's pairs
# have sides of different widths, rank 0's not.
_ZERO3_PAIRS = r"""
import datetime, json, os, sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, port, tokenizer_dir, model_dir, lm_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    from transformers import AutoTokenizer

    from pipelines.train.config import TrainConfig
    from pipelines.train.losses import bradley_terry_loss
    from pipelines.train.engine import full_state_dict
    from pipelines.train.modeling import build_model, exported, with_lm_head
    from pipelines.train.worker import _pair_scores, _pair_scores_with_lm, start_engine

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_model("reward", tok, path=model_dir)
    loaded_training = model.training
    cfg = TrainConfig(num_workers=2, zero_stage=3, micro_batch_per_worker=2, sequences_per_step=4, warmup_steps=0)
    engine = start_engine(model, cfg)
    torch.manual_seed(0)
    chosen, rejected = torch.randint(5, 100, (2, 16)), torch.randint(5, 100, (2, 16))
    if rank == 1:
        chosen[:, 10:] = tok.pad_token_id
    for _ in range(2):
        c, r, _ = _pair_scores(engine, chosen, rejected, tok.pad_token_id, one_forward=True)
        engine.backward(bradley_terry_loss(c, r))
        engine.step()
    # With the auxiliary LM loss (reward_model.lm_loss_weight): the LM head's forward on the
    # chosen side gathers its parameters as the trunk's do; the export drops it.
    lm_engine = start_engine(with_lm_head(build_model("reward", tok, path=lm_dir), lm_dir), cfg)
    labels = chosen.clone()
    labels[:, :4] = -100
    labels[chosen == tok.pad_token_id] = -100
    for _ in range(2):
        c, r, lm_sum, lm_count, _ = _pair_scores_with_lm(lm_engine, chosen, rejected, labels, tok.pad_token_id)
        lm_engine.backward(bradley_terry_loss(c, r) + lm_sum / lm_count)
        lm_engine.step()
    state = full_state_dict(lm_engine, rank)
    keys = None
    if rank == 0:
        module, state = exported(lm_engine.module, state)
        keys = sorted(k for k, v in state.items() if v.numel() > 0)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"loaded_training": loaded_training, "engine_training": engine.module.training,
                   "exported": keys}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(port, *sys.argv[1:]), nprocs=2)
"""


@pytest.mark.slow
def test_zero3_reward_model_ranks_whose_pairs_differ_in_width_train_together(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    """Every ZeRO-3 forward gathers the parameters from all ranks together: a rank whose chosen
    and rejected sides differed in width ran two forwards where the others ran one, and the ranks
    waited on each other until gloo's timeout (30 min under Ray Train). And a model loaded with
    ``from_pretrained`` trained in eval mode (activation checkpointing skipped) until its first
    evaluation. Real DeepSpeed, two gloo processes, a reward model wide enough (256) that ZeRO-3
    partitions and gathers its parameters. The same with the auxiliary LM loss
    (``reward_model.lm_loss_weight``): the LM head trains beside the score head, and the
    consolidated export is the reward model's state alone."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, num_labels=1)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(str(tmp_path / "rm"), safe_serialization=True)
    tok.save_pretrained(str(tmp_path / "rm"))
    lm = LlamaForCausalLM(config)  # the starting model of a reward model with the auxiliary LM loss
    lm.save_pretrained(str(tmp_path / "lm"), safe_serialization=True)
    tok.save_pretrained(str(tmp_path / "lm"))
    want_keys = sorted(LlamaForSequenceClassification(config).state_dict())
    script = tmp_path / "zero3_pairs.py"
    script.write_text(_ZERO3_PAIRS)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(script), str(tiny_tokenizer_dir), str(tmp_path / "rm"),
                           str(tmp_path / "lm"), str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        state = json.loads((tmp_path / f"out.{rank}").read_text())
        assert state == {"loaded_training": False, "engine_training": True,
                         "exported": want_keys if rank == 0 else None}, {**state, "exported": "..."}


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
