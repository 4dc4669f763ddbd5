"""``kiln sft CONFIG``: supervised fine-tuning on chat data, loss on response tokens only.

Read top to bottom: check the starting model and the JSONL (before any worker starts), apply
the model's chat template and mask the prompt tokens (``pipelines.train.datasets``), write the rows as
Parquet under ``<run>/sft/dataset/``, train them on the shared machinery, mark the stage finished.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from core.progress import summary_text
from core.rundir import mark_finished, prepare_stage
from pipelines.config import KilnConfig
from pipelines.data.tokenizer import load_tokenizer
from pipelines.train.datasets import sft_rows, write_dataset
from pipelines.train.modeling import check_lora_targets, check_model_dir
from pipelines.train.trainer import finetune_job, fit, summary

STAGE = "sft"


def run(cfg: KilnConfig, force: bool = False) -> dict[str, Any]:
    """Fine-tune (or resume, or skip if finished); returns the stage summary."""
    scfg, stage_dir, digest = cfg.stage_section(STAGE)
    init_from = check_model_dir(Path(scfg.init_from or cfg.run.dir / "pretrain" / "model").resolve())
    if scfg.lora is not None:
        check_lora_targets(scfg.lora, init_from, f"{STAGE}.lora.target_modules")
    data = Path(scfg.data)
    if not data.is_file():
        raise FileNotFoundError(f"SFT data {data} not found")
    storage = cfg.run.stage_storage(STAGE)  # Ray Train's checkpoints, when run.storage_path is set
    if (done := prepare_stage(stage_dir, STAGE, digest, force, [init_from, data], storage)) is not None:
        return done

    # Chat template + prompt masking, on the driver: the data is small next to pretraining's.
    tokenizer = load_tokenizer(init_from)
    dataset, stats, held_out = write_dataset(
        stage_dir, data, lambda records: sft_rows(tokenizer, records, scfg.seq_len, scfg.overlong, scfg.packing),
        scfg.validation_fraction,
    )
    print(f"kiln sft: {stats.records} examples -> {stats.rows} rows of {scfg.seq_len} tokens "
          f"({stats.truncated} truncated, {stats.trained_tokens}/{stats.tokens} tokens trained), "
          f"{held_out} held out", flush=True)  # fmt: skip
    if no_target := stats.extra.get("no_target"):
        print(f"kiln sft: {no_target} example(s) left out: the prompt fills seq_len {scfg.seq_len}, no response "
              "token is left to learn (raise sft.seq_len)", flush=True)  # fmt: skip

    job = finetune_job(STAGE, "lm", scfg, stage_dir, init_from, dataset, digest, storage)
    job = replace(job, lora=scfg.lora)  # an adapter only, or every weight (null)
    outcome = fit(job, cfg.ray)

    report = {**summary(outcome), "examples": stats.records, "truncated": stats.truncated, **stats.extra}
    mark_finished(stage_dir, STAGE, digest, report)
    print(f"kiln sft: done {summary_text(report)}", flush=True)
    return report
