"""``kiln dpo CONFIG``: direct preference optimisation of the SFT policy on preference pairs.

Read top to bottom: check the starting model (the SFT model by default) and the pairs before any
worker starts; render prompt + chosen / prompt + rejected with the chat template and mask all but
the response's tokens (as SFT does); score every pair once with the frozen reference (Ray tasks on
the training workers' resources) and store its summed response log-probs beside the rows, as
Parquet under ``<run>/dpo/dataset/``; train the policy with the configured DPO loss on the shared
machinery (the workers read the reference's numbers from the rows and never load it); report the
held-out loss, implicit-reward accuracy and margin; mark the stage finished.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from cluster.config import RayConfig
from cluster.runtime import init_ray
from core.progress import summary_text
from core.rundir import mark_finished, prepare_stage
from pipelines.config import KilnConfig
from pipelines.data.tokenizer import load_tokenizer
from pipelines.train.config import DpoConfig
from pipelines.train.datasets import dpo_rows, write_dataset
from pipelines.train.losses import sequence_logps
from pipelines.train.modeling import build_model, check_lora_targets, check_model_dir
from pipelines.train.trainer import finetune_job, fit, summary

STAGE = "dpo"
REFERENCE_BATCH = 32  # pairs per reference forward pass (two sequences each)


@ray.remote
def _reference_shard(model_dir: str, rows: dict[str, np.ndarray], threads: int | None, use_gpu: bool) -> dict[str, np.ndarray]:
    """The frozen reference's summed response log-probs of a shard of DPO rows.

    The same model class, dtype (float32 on CPU, bfloat16 on GPU, as the trainer's DeepSpeed
    engine) and ``sequence_logps`` as the policy in training, so that before the first update the
    policy's log-probs equal these and every implicit reward is 0.

    Returns:
        {"ref_chosen_logp": (N,) float64, "ref_rejected_logp": (N,) float64}
    """
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu else "cpu")
    model = build_model("lm", load_tokenizer(model_dir), path=model_dir)
    model = model.to(device, torch.bfloat16 if use_gpu else torch.float32).eval()
    out = {}
    for side in ("chosen", "rejected"):
        ids, labels = (torch.from_numpy(rows[f"{side}_{kind}"]).long() for kind in ("ids", "labels"))  # (N, T) each
        with torch.no_grad():
            parts = [
                sequence_logps(model(input_ids=ids[i : i + REFERENCE_BATCH].to(device)).logits,
                               labels[i : i + REFERENCE_BATCH].to(device)).double().cpu()
                for i in range(0, len(ids), REFERENCE_BATCH)
            ]  # fmt: skip
        out[f"ref_{side}_logp"] = torch.cat(parts).numpy()
    return out


def reference_logps(model_dir: Path, rows: dict[str, np.ndarray], ray_cfg: RayConfig, dcfg: DpoConfig) -> dict[str, np.ndarray]:
    """Score ``rows`` with the reference in ``num_workers`` Ray tasks, each with one training
    worker's resources; returns the two (N,) float64 columns in row order."""
    n = len(rows["chosen_ids"])
    if n == 0:
        return {"ref_chosen_logp": np.zeros(0), "ref_rejected_logp": np.zeros(0)}
    init_ray(ray_cfg)
    task = _reference_shard.options(num_cpus=dcfg.cpus_per_worker, num_gpus=1 if dcfg.use_gpu else 0)
    shards = [idx for idx in np.array_split(np.arange(n), dcfg.num_workers) if len(idx)]
    parts = ray.get([
        task.remote(str(model_dir), {k: v[idx] for k, v in rows.items()}, dcfg.threads_per_worker, dcfg.use_gpu)
        for idx in shards
    ])  # fmt: skip
    return {k: np.concatenate([p[k] for p in parts]) for k in ("ref_chosen_logp", "ref_rejected_logp")}


def run(cfg: KilnConfig, force: bool = False) -> dict[str, Any]:
    """Train the DPO policy (or resume, or skip if finished); returns the stage summary."""
    dcfg, stage_dir, digest = cfg.stage_section(STAGE)
    init_from = check_model_dir(Path(dcfg.init_from or cfg.run.dir / "sft" / "model").resolve())
    if dcfg.lora is not None:
        check_lora_targets(dcfg.lora, init_from, f"{STAGE}.lora.target_modules")
    data = Path(dcfg.data)
    if not data.is_file():
        raise FileNotFoundError(f"preference data {data} not found")
    storage = cfg.run.stage_storage(STAGE)  # Ray Train's checkpoints, when run.storage_path is set
    if (done := prepare_stage(stage_dir, STAGE, digest, force, [init_from, data], storage)) is not None:
        return done

    # Rows: the chat template, response-only masks; a bad pair fails here naming file:line. Then
    # the reference's log-probs, once, as columns of the dataset: no training step recomputes them.
    tokenizer = load_tokenizer(init_from)
    dataset, stats, held_out = write_dataset(
        stage_dir, data, lambda records: dpo_rows(tokenizer, records, dcfg.seq_len, dcfg.overlong),
        dcfg.validation_fraction, add_columns=lambda rows: reference_logps(init_from, rows, cfg.ray, dcfg),
        max_records=dcfg.max_pairs,
    )
    print(f"kiln dpo: {stats.records} pairs ({stats.truncated} sequences truncated, "
          f"{stats.trained_tokens}/{stats.tokens} tokens are responses), {held_out} held out; "
          f"reference log-probs stored in {dataset}", flush=True)  # fmt: skip

    job = finetune_job(STAGE, "dpo", dcfg, stage_dir, init_from, dataset, digest, storage)
    job = replace(job, lora=dcfg.lora)  # an adapter only, or every weight (null)
    outcome = fit(job, cfg.ray)

    report = {**summary(outcome), "pairs": stats.records, "truncated": stats.truncated, "held_out_pairs": held_out,
              "loss_type": dcfg.loss, "beta": dcfg.beta}  # fmt: skip
    mark_finished(stage_dir, STAGE, digest, report)
    print(f"kiln dpo: done {summary_text(report)}", flush=True)
    return report
