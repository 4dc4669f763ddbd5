"""``kiln sft CONFIG``: supervised fine-tuning on chat data, loss on response tokens only.

Read top to bottom: check the starting model and the JSONL (before any worker starts), apply
the model's chat template and mask the prompt tokens (``pipelines.train.datasets``), write the rows as
Parquet under ``<run>/sft/dataset/``, train them on the shared machinery, mark the stage finished.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.jsonl import read_jsonl
from core.rundir import atomic_dir, mark_finished, prepare_stage
from pipelines.config import KilnConfig
from pipelines.data.tokenizer import load_tokenizer
from pipelines.train.datasets import sft_rows, split_validation, write_rows
from pipelines.train.modeling import check_model_dir
from pipelines.train.trainer import fit, summary
from pipelines.train.worker import TrainJob

STAGE = "sft"


def run(cfg: KilnConfig, force: bool = False) -> dict[str, Any]:
    """Fine-tune (or resume, or skip if finished); returns the stage summary."""
    if cfg.sft is None:
        raise ValueError("config has no 'sft' section")
    scfg = cfg.sft
    stage_dir = (cfg.run.dir / STAGE).resolve()
    digest = cfg.digest(STAGE)
    init_from = check_model_dir(Path(scfg.init_from or cfg.run.dir / "pretrain" / "model").resolve())
    data = Path(scfg.data)
    if not data.is_file():
        raise FileNotFoundError(f"SFT data {data} not found")
    if (done := prepare_stage(stage_dir, STAGE, digest, force)) is not None:
        return done

    # Chat template + prompt masking, on the driver: the data is small next to pretraining's.
    tokenizer = load_tokenizer(init_from)
    records = [(f"{data}:{lineno}", record) for lineno, record in read_jsonl(data)]
    train_records, val_records = split_validation(records, scfg.validation_fraction)
    train_rows, stats = sft_rows(tokenizer, train_records, scfg.seq_len, scfg.overlong, scfg.packing)
    val_rows, _ = sft_rows(tokenizer, val_records, scfg.seq_len, scfg.overlong, scfg.packing)
    with atomic_dir(stage_dir / "dataset") as tmp:
        write_rows(tmp / "train.parquet", train_rows)
        if len(val_rows["input_ids"]):
            write_rows(tmp / "validation.parquet", val_rows)
    dataset = stage_dir / "dataset"
    print(f"kiln sft: {stats.records} examples -> {stats.rows} rows of {scfg.seq_len} tokens "
          f"({stats.truncated} truncated, {stats.trained_tokens}/{stats.tokens} tokens trained), "
          f"{len(val_records)} held out", flush=True)  # fmt: skip

    job = TrainJob(
        stage=STAGE,
        objective="lm",
        train=scfg,
        stage_dir=str(stage_dir),
        tokenizer_dir=str(init_from),
        train_files=(str(dataset / "train.parquet"),),
        validation_files=tuple(str(p) for p in [dataset / "validation.parquet"] if p.exists()),
        init_from=str(init_from),
        config_digest=digest,
        storage_path=cfg.run.stage_storage(STAGE),
    )
    outcome = fit(job, cfg.ray)

    report = {**summary(outcome), "examples": stats.records, "truncated": stats.truncated}
    mark_finished(stage_dir, STAGE, digest, report)
    print(f"kiln sft: done {report}", flush=True)
    return report
