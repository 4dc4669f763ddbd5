"""The run report (``pipelines/report.py``) over a fake run directory.

The run directory here is hand-written: FAKE metrics, markers and evaluation files with round
numbers, so the expected table entries can be written down exactly. No stage is run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from core.metrics import read_metrics
from pipelines.report import REPORT_DIR, REPORT_FILE, ReportInputError, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALL_PNGS = ("pretrain_loss.png", "sft_loss.png", "reward_model.png", "dpo.png", "ppo_reward_kl.png",
            "ppo_before_after.png", "grpo_reward_kl.png", "rlhf_reward_kl.png", "eval_accuracy.png")

FAKE_DATA_REPORT = {
    "documents": {"in": 4700, "kept": 4100, "exact_duplicates": 200, "near_duplicates": 200, "filtered": 200,
                  "rejected": 0},
    "tokens": {"in": 1145509, "packed": 1145344, "leftover": 165},
    "sequences": {"train": 4360, "validation": 114},
    "seconds": {"total": 90.271},
}

# A resumed pretraining run: the first attempt reached step 30, the second restarted from the
# step-20 checkpoint and rewrote steps 30 (the record to keep has loss 6.0, not the stale 9.75).
FAKE_PRETRAIN_METRICS = [
    {"event": "start", "step": 0, "time": 1000.0, "pid": 1},
    {"step": 10, "loss": 8.0, "lr": 0.003, "grad_norm": 0.9, "tokens_per_s": 5000.0},
    {"step": 20, "loss": 7.0, "lr": 0.002, "grad_norm": 0.5, "tokens_per_s": 5500.0, "val_loss": 6.5,
     "val_perplexity": 665.1},
    {"step": 30, "loss": 9.75, "lr": 0.001, "grad_norm": 0.4, "tokens_per_s": 5600.0},
    {"event": "resume", "step": 20, "time": 1100.0, "pid": 2},
    {"step": 30, "loss": 6.0, "lr": 0.001, "grad_norm": 0.4, "tokens_per_s": 6000.4},
    {"step": 40, "loss": 3.5, "lr": 0.0005, "grad_norm": 0.3, "tokens_per_s": 6000.4, "val_loss": 3.75,
     "val_perplexity": 42.52},
    {"event": "finished", "step": 40, "time": 1200.0},
]
FAKE_SFT_METRICS = [
    {"step": 10, "loss": 5.5, "tokens_per_s": 6400.0},
    {"step": 20, "loss": 0.625, "tokens_per_s": 6400.0, "val_loss": 0.6875, "val_perplexity": 1.989},
]
FAKE_REWARD_MODEL_METRICS = [
    {"step": 10, "loss": 0.625, "accuracy": 0.575, "tokens_per_s": 12000.0},
    {"step": 20, "loss": 0.5, "accuracy": 0.66, "tokens_per_s": 12836.3, "val_loss": 0.53, "val_accuracy": 0.635},
]
FAKE_DPO_METRICS = [
    {"step": 10, "loss": 0.625, "accuracy": 0.5, "chosen_reward": 0.25, "rejected_reward": -0.5, "margin": 0.75,
     "tokens_per_s": 9000.0},
    {"step": 20, "loss": 0.375, "accuracy": 0.875, "chosen_reward": 0.0, "rejected_reward": -2.0, "margin": 2.0,
     "tokens_per_s": 9500.0, "val_loss": 0.4375, "val_accuracy": 0.8125, "val_chosen_reward": -0.25,
     "val_rejected_reward": -2.0, "val_margin": 1.75},
]
FAKE_PPO_METRICS = [
    {"step": s, "reward_mean": r, "kl": k, "policy_loss": -0.01, "value_loss": 0.2, "clip_fraction": 0.1,
     "entropy": 1.5, "response_length": 6.0, "logprob_mismatch": 0.001, "time_generate_s": 2.0,
     "time_score_s": 0.5, "time_learn_s": 3.0, "time_sync_s": 0.2, "time_step_s": 5.7, **extra}
    for s, r, k, extra in [
        (1, 0.1, 0.0, {"eval_reward": 0.2, "eval_accuracy": 0.1}),
        (2, 0.3, 0.02, {}),
        (3, 0.6, 0.05, {"eval_reward": 0.7, "eval_accuracy": 0.55}),
    ]
]
FAKE_PPO_EVAL = {"before": {"reward": 0.2, "accuracy": 0.1, "prompts": 64},
                 "after": {"reward": 0.7, "accuracy": 0.55, "prompts": 64}}
# kiln eval: three models on 200 prompts (base has no KL: it was measured against sft).
FAKE_EVAL_SUMMARY = {
    "models": [
        {"model": "base", "n": 200, "k": 8, "task_accuracy": 0.05, "task_accuracy_ci95": [0.0275, 0.09],
         "pass_at_k": 0.25, "reward_mean": 0.125, "rm_score_mean": -1.5, "val_perplexity": 42.52, "kl_to_ref": 3.25},
        {"model": "sft", "n": 200, "k": 8, "task_accuracy": 0.43, "task_accuracy_ci95": [0.3625, 0.5],
         "pass_at_k": 0.8125, "reward_mean": 0.5, "rm_score_mean": 0.75, "val_perplexity": 45.0, "kl_to_ref": 0.0},
        {"model": "ppo", "n": 200, "k": 8, "task_accuracy": 0.6, "task_accuracy_ci95": [0.53, 0.665],
         "pass_at_k": 0.875, "reward_mean": 0.7, "rm_score_mean": 1.25, "val_perplexity": None, "kl_to_ref": 0.375},
    ],
    "reward_model": {"pairwise_accuracy": 0.9, "pairwise_accuracy_same_format": 0.8, "pairs": 200,
                     "pairs_same_format": 100},
    "comparisons": [
        {"a": "base", "b": "sft", "metric": "task_accuracy", "delta": 0.38, "p_value": 1.5e-20, "a_only": 2,
         "b_only": 78, "n": 200},
        {"a": "sft", "b": "ppo", "metric": "task_accuracy", "delta": 0.17, "p_value": 0.00125, "a_only": 10,
         "b_only": 44, "n": 200},
    ],
    "reference": "sft", "k": 8, "temperature": 1.0, "prompts": {"n": 200},
}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _mark(stage_dir: Path, stage: str, summary: dict[str, Any]) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "stage.json").write_text(json.dumps({"stage": stage, "config_digest": "fake", "summary": summary}))


ALL_STAGES = ("data", "pretrain", "sft", "preferences", "reward_model", "dpo", "ppo", "grpo", "rlhf", "eval")


def make_fake_run(root: Path, stages: tuple[str, ...] = ALL_STAGES) -> Path:
    """A FAKE run directory with the hand-written inputs of ``stages``, each stage finished."""
    run = root / "fake-run"
    run.mkdir()
    if "data" in stages:
        _mark(run / "data", "data", FAKE_DATA_REPORT)
        (run / "data" / "data_report.json").write_text(json.dumps(FAKE_DATA_REPORT))
    fakes = {"pretrain": (FAKE_PRETRAIN_METRICS, 107.4), "sft": (FAKE_SFT_METRICS, 51.5),
             "reward_model": (FAKE_REWARD_MODEL_METRICS, 56.5), "dpo": (FAKE_DPO_METRICS, 80.0),
             "ppo": (FAKE_PPO_METRICS, 3725.0),
             "grpo": (FAKE_PPO_METRICS, 95.0), "rlhf": (FAKE_PPO_METRICS, 90.0)}
    for stage, (records, seconds) in fakes.items():
        if stage in stages:
            _write_jsonl(run / stage / "metrics.jsonl", records)
            _mark(run / stage, stage, {"seconds": seconds})
    for stage in ("ppo", "grpo", "rlhf"):
        if stage in stages:
            (run / stage / "eval.json").write_text(json.dumps(FAKE_PPO_EVAL))
    if "preferences" in stages:
        _mark(run / "preferences", "preferences", {"pairs": 2724, "prompts": 2120, "prompts_paired": 1781,
                                                   "distinct_responses": 5861, "accepted": 2155, "seconds": 61.0})
    if "eval" in stages:
        _mark(run / "eval", "eval", {"seconds": 125.0})
        (run / "eval" / "summary.json").write_text(json.dumps(FAKE_EVAL_SUMMARY))
    return run


def _row(markdown: str, stage: str, section: str = "Stages") -> str:
    """The one row of ``section``'s table (``## Stages`` or ``## Evaluation``) that starts with ``stage``."""
    lines = markdown.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = [line for line in lines if line.startswith(f"| {stage} |")]
    assert len(rows) == 1, markdown
    return rows[0]


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the signature
    assert width >= 300 and height >= 200 and len(data) > 5_000, (path, width, height, len(data))


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.md of a FAKE run with every stage (drawn once: plotting is the slow part)."""
    run = make_fake_run(tmp_path_factory.mktemp("report"))
    path = write_report(run)
    assert path == run / REPORT_FILE
    return path


def test_full_run_writes_markdown_and_every_plot(full_report: Path) -> None:
    run, path = full_report.parent, full_report
    markdown = path.read_text()
    assert markdown.startswith("# kiln run report: fake-run\n")
    assert sorted(p.name for p in (run / REPORT_DIR).iterdir()) == sorted(ALL_PNGS)
    for name in ALL_PNGS:
        _check_png(run / REPORT_DIR / name)
        assert f"]({REPORT_DIR}/{name})" in markdown
    assert markdown.count("*Figure ") == len(ALL_PNGS) and "Not plotted" not in markdown
    assert not [p for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_table_has_the_final_numbers(full_report: Path) -> None:
    markdown = full_report.read_text()
    assert _row(markdown, "data") == (
        "| data | finished | 1 min 30 s | 4,700 documents in, 4,100 kept (200 exact + 200 near duplicates, "
        "200 filtered, 0 rejected); 1,145,344 tokens packed into 4,360 train + 114 validation sequences |"
    )
    # The resumed step 30 keeps its last record; steps come from the records, not from the events.
    assert _row(markdown, "pretrain") == (
        "| pretrain | finished | 1 min 47 s | 40 steps, loss 8 → 3.5, val loss 3.75, val perplexity 42.52, "
        "6,000 tokens/s |"
    )
    assert _row(markdown, "sft") == (
        "| sft | finished | 51.5 s | 20 steps, loss 5.5 → 0.625, val loss 0.6875, val perplexity 1.989, "
        "6,400 tokens/s |"
    )
    assert _row(markdown, "preferences") == (
        "| preferences | finished | 1 min 1 s | 2,724 pairs from 1,781 of 2,120 prompts "
        "(2,155 of 5,861 distinct answers accepted) |"
    )
    assert _row(markdown, "reward_model") == (
        "| reward_model | finished | 56.5 s | 20 steps, loss 0.625 → 0.5, val loss 0.53, val accuracy 63.5%, "
        "12,836 tokens/s |"
    )
    assert _row(markdown, "dpo") == (
        "| dpo | finished | 1 min 20 s | 20 steps, loss 0.625 → 0.375, val loss 0.4375, val accuracy 81.2%, "
        "9,500 tokens/s |"
    )
    # No trend in the stage's summary: windows of half the run (here one step each).
    assert _row(markdown, "ppo") == (
        "| ppo | finished | 1 h 2 min | 3 steps, reward 0.1 → 0.6 (first → last step), KL 0.05 (last step), "
        "held-out reward 0.2 → 0.7, accuracy 10.0% → 55.0% (64 prompts) |"
    )


def test_rl_rows_give_the_stages_reward_trend_not_single_steps(tmp_path: Path) -> None:
    """One step's reward swings with its prompts: the row gives the trend windows' means and p."""
    run = make_fake_run(tmp_path, ("ppo",))
    records = [{**FAKE_PPO_METRICS[0], "step": s, "reward_mean": r, "kl": k}
               for s, r, k in zip(range(1, 7), [0.5, 0.1, 0.3, 0.6, 0.8, 0.4], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])]  # fmt: skip
    _write_jsonl(run / "ppo" / "metrics.jsonl", records)
    _mark(run / "ppo", "ppo", {"seconds": 60.0, "reward_first_steps": {"steps": 2, "mean": 0.3},
                               "reward_last_steps": {"steps": 2, "mean": 0.6}, "reward_gain_p": 0.0123})  # fmt: skip
    markdown = write_report(run).read_text()
    assert "| ppo | finished | 1 min 0 s | 6 steps, reward 0.3 → 0.6 (first → last 2 steps, p = 0.0123), " \
           "KL 0.45 (last 2 steps)," in markdown


def test_eval_table_has_every_model_and_comparison(full_report: Path) -> None:
    markdown = full_report.read_text()
    assert _row(markdown, "eval") == (
        "| eval | finished | 2 min 5 s | 3 models on 200 held-out prompts; best greedy accuracy ppo "
        "60.0% [53.0%, 66.5%] (table below) |"
    )
    assert "| model | accuracy [95% CI] | pass@8 | reward | RM score | ppl (pretraining val) | KL to sft |" in markdown
    assert _row(markdown, "base", "Evaluation") == "| base | 5.0% [2.8%, 9.0%] | 25.0% | 0.125 | -1.5 | 42.52 | 3.25 |"
    assert _row(markdown, "sft", "Evaluation") == "| sft | 43.0% [36.2%, 50.0%] | 81.2% | 0.5 | 0.75 | 45 | 0 |"
    assert _row(markdown, "ppo", "Evaluation") == "| ppo | 60.0% [53.0%, 66.5%] | 87.5% | 0.7 | 1.25 | — | 0.375 |"
    assert _row(markdown, "base → sft", "Evaluation") == "| base → sft | +38.0 pts | 1.5e-20 | 2 / 78 | 200 |"
    assert _row(markdown, "sft → ppo", "Evaluation") == "| sft → ppo | +17.0 pts | 0.0013 | 10 / 44 | 200 |"
    assert "pairwise accuracy 90.0% on 200 held-out pairs, 80.0% on the 100 pairs of the same format" in markdown
    assert "![Task accuracy by stage](report/eval_accuracy.png)" in markdown
    _check_png(full_report.parent / REPORT_DIR / "eval_accuracy.png")


def test_read_metrics_keeps_the_last_record_per_step(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "metrics.jsonl", FAKE_PRETRAIN_METRICS)
    records = read_metrics(tmp_path, by_step=True)
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert records[2]["loss"] == 6.0  # the resumed attempt's record, not the stale 9.75
    assert read_metrics(tmp_path / "absent", by_step=True) == []


def test_missing_and_unfinished_stages_are_noted(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path, stages=("data", "pretrain"))
    # SFT was interrupted: metrics, no stage.json.
    _write_jsonl(run / "sft" / "metrics.jsonl", FAKE_SFT_METRICS[:1])
    markdown = write_report(run).read_text()
    assert _row(markdown, "sft") == "| sft | not finished | — | 10 steps, loss 5.5 → 5.5, 6,400 tokens/s |"
    assert _row(markdown, "reward_model") == "| reward_model | not run | — | — |"
    assert _row(markdown, "ppo") == "| ppo | not run | — | — |"
    assert sorted(p.name for p in (run / REPORT_DIR).iterdir()) == ["pretrain_loss.png", "sft_loss.png"]
    assert "`reward_model.png` (reward_model: not run)" in markdown
    assert "`ppo_reward_kl.png` (ppo: not run)" in markdown and "`ppo_before_after.png` (ppo: not run)" in markdown
    assert _row(markdown, "eval") == "| eval | not run | — | — |" and "`eval_accuracy.png` (eval: not run)" in markdown

    # PPO being redone (--force, a changed input): the old held-out results are not this model's,
    # and a stage that began but measured nothing yet has still begun.
    _write_jsonl(run / "ppo" / "metrics.jsonl", [{"event": "start", "time": 1.0}])
    (run / "ppo" / "eval.json").write_text(json.dumps(FAKE_PPO_EVAL))
    (run / "reward_model").mkdir()
    (run / "reward_model" / "started.json").write_text('{"config_digest": "fake"}')
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps(FAKE_EVAL_SUMMARY))  # no marker: a previous eval's
    markdown = write_report(run).read_text()
    assert _row(markdown, "ppo") == "| ppo | not finished | — | — |"
    assert _row(markdown, "reward_model") == "| reward_model | not finished | — | — |"
    assert _row(markdown, "eval") == "| eval | not finished | — | — |"
    assert "`ppo_before_after.png` (ppo: no data for this plot)" in markdown
    assert "`eval_accuracy.png` (eval: no data for this plot)" in markdown

    # An empty run directory still gets a report that says so.
    empty = tmp_path / "empty-run"
    empty.mkdir()
    markdown = write_report(empty).read_text()
    assert all(_row(markdown, s).endswith("| not run | — | — |") for s in ("data", "pretrain", "ppo"))
    assert "No stage has metrics to plot yet." in markdown and list((empty / REPORT_DIR).iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        write_report(tmp_path / "no-such-run")


def test_finished_stage_without_metrics_uses_its_summary(tmp_path: Path) -> None:
    run = tmp_path / "fake-summary-only"
    _mark(run / "reward_model", "reward_model", {"seconds": 56.5, "steps": 80, "first_loss": 0.625,
                                                 "final_loss": 0.5, "val_loss": 0.53, "val_accuracy": 0.635})
    markdown = write_report(run).read_text()
    assert _row(markdown, "reward_model") == (
        "| reward_model | finished | 56.5 s | 80 steps, loss 0.625 → 0.5, val loss 0.53, val accuracy 63.5% |"
    )
    assert "`reward_model.png` (reward_model: no data for this plot)" in markdown


@pytest.mark.parametrize(
    ("stage", "bad_line", "message"),
    [
        ("sft", '{"step": 30, "loss": 0.5', r"sft/metrics\.jsonl:3: malformed JSON"),
        ("pretrain", '{"loss": 1.0}', r"pretrain/metrics\.jsonl:3: record has no integer 'step'"),
        ("ppo", "[1, 2]", r"ppo/metrics\.jsonl:3: expected a JSON object, got list"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, stage: str, bad_line: str, message: str) -> None:
    run = make_fake_run(tmp_path)
    metrics = run / stage / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines.insert(2, bad_line)
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportInputError, match=message):
        write_report(run)
    assert not (run / REPORT_FILE).exists() and not (run / REPORT_DIR).exists()


def test_malformed_json_files_are_named(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path)
    (run / "ppo" / "eval.json").write_text(json.dumps({"before": {"reward": "high"}, "after": {}}))
    with pytest.raises(ReportInputError, match=r"ppo/eval\.json: 'before' must be an object of numbers"):
        write_report(run)
    (run / "ppo" / "eval.json").write_text(json.dumps({"before": {"reward": None, "prompts": 4}, "after": {}}))
    assert "held-out reward — →" in write_report(run).read_text()  # null: no value (every sample skipped)
    (run / "ppo" / "eval.json").write_text(json.dumps(FAKE_PPO_EVAL))
    (run / "eval" / "summary.json").write_text(json.dumps({"models": [{"n": 200}]}))
    with pytest.raises(ReportInputError, match=r"eval/summary\.json: 'models' must be a list of objects"):
        write_report(run)
    (run / "data" / "data_report.json").write_text('{"documents":\n  {"in": 1,}\n}')
    with pytest.raises(ReportInputError, match=r"data/data_report\.json:2: malformed JSON"):
        write_report(run)
    (run / "data" / "data_report.json").write_bytes(b'{"documents": "\xff"}')  # was a bare codec error
    with pytest.raises(ReportInputError, match=r"data/data_report\.json: not UTF-8 text \(byte 15\)"):
        write_report(run)
    (run / "data" / "data_report.json").write_text("[" * 100_000)  # was a RecursionError traceback
    with pytest.raises(ReportInputError, match=r"data/data_report\.json: JSON nested too deeply"):
        write_report(run)


def test_failure_midway_keeps_the_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.report as report

    run = make_fake_run(tmp_path, stages=("pretrain", "ppo"))
    write_report(run)
    before = {p.name: p.read_bytes() for p in (run / REPORT_DIR).iterdir()}
    assert len(before) == 3
    markdown = (run / REPORT_FILE).read_bytes()

    # New inputs, then a plot that fails after the pretraining PNG is drawn.
    _write_jsonl(run / "pretrain" / "metrics.jsonl", FAKE_PRETRAIN_METRICS[:3])

    def fail(*args: Any) -> bool:
        raise RuntimeError("fake plotting failure")

    monkeypatch.setattr(report, "_plot_rl", fail)
    with pytest.raises(RuntimeError, match="fake plotting failure"):
        write_report(run)
    assert (run / REPORT_FILE).read_bytes() == markdown
    assert {p.name: p.read_bytes() for p in (run / REPORT_DIR).iterdir()} == before
    assert not [p for p in run.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
