"""``kiln reward-model CONFIG``: a scalar reward model trained on preference pairs (Bradley–Terry).

Read top to bottom: check the starting model (the SFT model by default) and the pairs before any
worker starts, render prompt + chosen / prompt + rejected with the chat template, write them as
Parquet under ``<run>/reward_model/dataset/``, train a ``LlamaForSequenceClassification``
(``num_labels=1``, score at the last token) on the shared machinery, report held-out pairwise
accuracy, mark the stage finished.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from core.progress import summary_text
from core.rundir import mark_finished, prepare_stage
from pipelines.config import KilnConfig
from pipelines.data.tokenizer import load_tokenizer
from pipelines.train.datasets import dpo_rows, preference_rows, write_dataset
from pipelines.train.modeling import check_causal_lm, check_lora_targets, check_model_dir
from pipelines.train.trainer import finetune_job, fit, summary

STAGE = "reward_model"


def run(cfg: KilnConfig, force: bool = False) -> dict[str, Any]:
    """Train the reward model (or resume, or skip if finished); returns the stage summary."""
    rcfg, stage_dir, digest = cfg.stage_section(STAGE)
    init_from = check_model_dir(Path(rcfg.init_from or cfg.run.dir / "sft" / "model").resolve())
    if rcfg.lm_loss_weight > 0:
        check_causal_lm(init_from, f"{STAGE}.lm_loss_weight")
    if rcfg.lora is not None:
        check_lora_targets(rcfg.lora, init_from, f"{STAGE}.lora.target_modules", head="reward")
    data = [Path(f) for f in ([rcfg.data] if isinstance(rcfg.data, str) else rcfg.data)]
    for f in data:
        if not f.is_file():
            raise FileNotFoundError(f"preference data {f} not found")
    storage = cfg.run.stage_storage(STAGE)  # Ray Train's checkpoints, when run.storage_path is set
    if (done := prepare_stage(stage_dir, STAGE, digest, force, [init_from, *data], storage)) is not None:
        return done

    tokenizer = load_tokenizer(init_from)
    # The auxiliary next-token loss needs the chosen responses' label masks: DPO's rows carry them
    # (the same ids as preference_rows, and each side's response-only labels).
    encode = dpo_rows if rcfg.lm_loss_weight > 0 else preference_rows
    dataset, stats, held_out = write_dataset(
        stage_dir, data, lambda records: encode(tokenizer, records, rcfg.seq_len, rcfg.overlong),
        rcfg.validation_fraction,
    )
    print(f"kiln reward-model: {stats.records} pairs ({stats.truncated} sequences truncated), "
          f"{held_out} held out", flush=True)  # fmt: skip

    job = finetune_job(STAGE, "reward", rcfg, stage_dir, init_from, dataset, digest, storage)
    job = replace(job, lora=rcfg.lora)  # adapters and the new score head, or every weight (null)
    outcome = fit(job, cfg.ray)

    report = {**summary(outcome), "pairs": stats.records, "truncated": stats.truncated}
    mark_finished(stage_dir, STAGE, digest, report)
    print(f"kiln reward-model: done {summary_text(report)}", flush=True)
    return report
