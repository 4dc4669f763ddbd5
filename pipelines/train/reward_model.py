"""``kiln reward-model CONFIG``: a scalar reward model trained on preference pairs (Bradley–Terry).

Read top to bottom: check the starting model (the SFT model by default) and the pairs before any
worker starts, render prompt + chosen / prompt + rejected with the chat template, write them as
Parquet under ``<run>/reward_model/dataset/``, train a ``LlamaForSequenceClassification``
(``num_labels=1``, score at the last token) on the shared machinery, report held-out pairwise
accuracy, mark the stage finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.jsonl import read_jsonl
from core.rundir import atomic_dir, mark_finished, prepare_stage
from pipelines.config import KilnConfig
from pipelines.data.tokenizer import load_tokenizer
from pipelines.train.datasets import preference_rows, split_validation, write_rows
from pipelines.train.modeling import check_model_dir
from pipelines.train.trainer import fit, summary
from pipelines.train.worker import TrainJob

STAGE = "reward_model"


def run(cfg: KilnConfig, force: bool = False) -> dict[str, Any]:
    """Train the reward model (or resume, or skip if finished); returns the stage summary."""
    if cfg.reward_model is None:
        raise ValueError("config has no 'reward_model' section")
    rcfg = cfg.reward_model
    stage_dir = (cfg.run.dir / STAGE).resolve()
    digest = cfg.digest(STAGE)
    init_from = check_model_dir(Path(rcfg.init_from or cfg.run.dir / "sft" / "model").resolve())
    data = Path(rcfg.data)
    if not data.is_file():
        raise FileNotFoundError(f"preference data {data} not found")
    if (done := prepare_stage(stage_dir, STAGE, digest, force)) is not None:
        return done

    tokenizer = load_tokenizer(init_from)
    records = [(f"{data}:{lineno}", record) for lineno, record in read_jsonl(data)]
    train_records, val_records = split_validation(records, rcfg.validation_fraction)
    train_rows, stats = preference_rows(tokenizer, train_records, rcfg.seq_len, rcfg.overlong)
    val_rows, _ = preference_rows(tokenizer, val_records, rcfg.seq_len, rcfg.overlong)
    with atomic_dir(stage_dir / "dataset") as tmp:
        write_rows(tmp / "train.parquet", train_rows)
        if val_records:
            write_rows(tmp / "validation.parquet", val_rows)
    dataset = stage_dir / "dataset"
    print(f"kiln reward-model: {stats.records} pairs ({stats.truncated} sequences truncated), "
          f"{len(val_records)} held out", flush=True)  # fmt: skip

    job = TrainJob(
        stage=STAGE,
        objective="reward",
        train=rcfg,
        stage_dir=str(stage_dir),
        tokenizer_dir=str(init_from),
        train_files=(str(dataset / "train.parquet"),),
        validation_files=tuple(str(p) for p in [dataset / "validation.parquet"] if p.exists()),
        init_from=str(init_from),
        config_digest=digest,
        storage_path=cfg.run.stage_storage(STAGE),
    )
    outcome = fit(job, cfg.ray)

    report = {**summary(outcome), "pairs": stats.records, "truncated": stats.truncated}
    mark_finished(stage_dir, STAGE, digest, report)
    print(f"kiln reward-model: done {report}", flush=True)
    return report
