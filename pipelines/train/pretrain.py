"""``kiln pretrain CONFIG``: next-token pretraining on the data stage's shards → a base model.

Read top to bottom: find the shards and tokenizer (failing before any worker starts if they are
missing), describe the job, train it on the shared Ray Train + DeepSpeed machinery
(``pipelines.train.trainer``), mark the stage finished. A rerun resumes from the latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.progress import summary_text
from core.rundir import mark_finished, prepare_stage
from pipelines.config import KilnConfig
from pipelines.data.storage import shard_files, shards_location
from pipelines.train.trainer import fit, summary
from pipelines.train.worker import TrainJob

STAGE = "pretrain"


def run(cfg: KilnConfig, force: bool = False) -> dict[str, Any]:
    """Pretrain (or resume, or skip if finished); returns the stage summary."""
    pcfg, stage_dir, digest = cfg.stage_section(STAGE)
    # A folder or an object-store URI (the data stage's report names it when run.storage_path is set).
    shards = pcfg.shards or shards_location(cfg.run.dir)
    tokenizer_dir = Path(pcfg.tokenizer or pcfg.model.path or cfg.run.dir / "tokenizer").resolve()
    inputs = [shards, tokenizer_dir, *([pcfg.model.path] if pcfg.model.path else [])]
    storage = cfg.run.stage_storage(STAGE)  # Ray Train's checkpoints, when run.storage_path is set
    if (done := prepare_stage(stage_dir, STAGE, digest, force, inputs, storage)) is not None:
        return done

    train_files = shard_files(shards, "train")
    if not train_files:
        raise FileNotFoundError(f"no training shards (train-*.parquet) in {shards}; run `kiln data` first")
    job = TrainJob(
        stage=STAGE,
        objective="lm",
        train=pcfg,
        stage_dir=str(stage_dir),
        tokenizer_dir=str(tokenizer_dir),
        train_files=tuple(map(str, train_files)),
        validation_files=tuple(shard_files(shards, "validation")),
        arch=pcfg.model if pcfg.model.path is None else None,
        init_from=str(Path(pcfg.model.path).resolve()) if pcfg.model.path else None,
        config_digest=digest,
        storage_path=storage,
    )
    print(f"kiln pretrain: {len(train_files)} shard(s) from {shards}, {pcfg.num_workers} worker(s), "
          f"ZeRO-{pcfg.zero_stage}, {pcfg.max_steps} steps x {pcfg.sequences_per_step} sequences", flush=True)  # fmt: skip
    outcome = fit(job, cfg.ray)

    report = summary(outcome)
    mark_finished(stage_dir, STAGE, digest, report)
    print(f"kiln pretrain: done {summary_text(report)}", flush=True)
    return report
