"""The run report: ``<run>/report.md`` and its PNG plots in ``<run>/report/``.

Reads what the stages left in the run directory, every input optional (a stage that did not run is
noted as not run):

- ``data/data_report.json`` (or the summary in ``data/stage.json``): document and token counts;
- ``<stage>/metrics.jsonl`` for ``pretrain``, ``sft``, ``reward_model``, ``dpo``, ``ppo``: one JSON object a
  line with ``step``; lifecycle lines (with an ``event`` key) are left out, and a resumed run's
  repeated steps keep their last record;
- ``<stage>/stage.json``: the stage finished, with its summary (``seconds`` gives the duration);
- ``ppo/eval.json``: ``{"before": {"reward", "accuracy", "prompts"}, "after": {...}}``, the SFT model
  and the PPO policy on held-out prompts;
- ``eval/summary.json`` (``kiln eval``): every model side by side with 95 % intervals, and McNemar
  tests between consecutive stages; the report renders its table and plots the task accuracy.

Every input is read and checked before anything is written, and the plots are drawn into a
temporary folder that replaces ``report/`` only when all of them are done, so a malformed input or
a failed plot leaves the previous report as it was.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.jsonl import BadRecord
from core.metrics import read_metrics
from core.rundir import STAGE_MARKER, atomic_dir, atomic_write_text
from pipelines.eval.table import COMPARISON_HEADER, comparison_cells, model_cells, model_header

STAGES = ("data", "pretrain", "sft", "preferences", "reward_model", "dpo", "ppo", "grpo", "rlhf", "eval")
TRAINED_STAGES = ("pretrain", "sft", "reward_model", "dpo", "ppo", "grpo", "rlhf")
RL_STAGES = ("ppo", "grpo", "rlhf")  # the same controller; grpo and rlhf are further RL runs from the SFT model
REPORT_FILE = "report.md"
REPORT_DIR = "report"


class ReportInputError(ValueError):
    """A report input is malformed; the message names the file, and the line where there is one."""


@dataclass
class StageData:
    """What one stage left behind.

    Attributes:
        name: the stage's run-directory folder.
        marker: its ``stage.json`` (None: not finished).
        records: per-step metric records, sorted by step, one per step.
        report: the data stage's ``data_report.json``; ``ppo/eval.json`` for PPO; ``eval/summary.json``
            for the evaluation (the RL stages' and the evaluation's only once they are finished).
        started: it has begun (its folder holds anything), measured or not.
    """

    name: str
    marker: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] | None = None
    started: bool = False

    @property
    def summary(self) -> dict[str, Any]:
        return (self.marker or {}).get("summary") or {}

    @property
    def status(self) -> str:
        if self.marker is not None:
            return "finished"
        return "not finished" if self.records or self.report or self.started else "not run"

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``key`` over the records that have it as a number."""
        pairs = [(r["step"], float(r[key])) for r in self.records if _is_number(r.get(key))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def first(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[0] if values else None

    def last(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it does not exist.

    Raises:
        ReportInputError: not valid JSON, or not an object (naming ``path:line``).
    """
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportInputError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise ReportInputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise ReportInputError(f"{path}: JSON nested too deeply to parse") from None
    if not isinstance(obj, dict):
        raise ReportInputError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _step_records(stage_dir: Path) -> list[dict[str, Any]]:
    """The stage's measurements, the last record of each step (``core.metrics.read_metrics``).

    Raises:
        ReportInputError: a line is not a JSON object, or has no integer ``step`` (``path:line``).
    """
    try:
        return read_metrics(stage_dir, by_step=True)
    except BadRecord as e:
        raise ReportInputError(str(e)) from None


def _read_eval(path: Path) -> dict[str, Any] | None:
    """``ppo/eval.json``, checked: ``before`` and ``after`` objects of numbers (or null: no value,
    e.g. the reward when the reward function skipped every held-out sample)."""
    obj = read_json(path)
    if obj is None:
        return None
    for side in ("before", "after"):
        values = obj.get(side)
        if not isinstance(values, dict) or not all(_is_number(v) or v is None for v in values.values()):
            raise ReportInputError(f"{path}: '{side}' must be an object of numbers, got {values!r}")
    return obj


def _read_eval_summary(path: Path) -> dict[str, Any] | None:
    """``eval/summary.json``, checked: a list of model objects, each with its name, and a list of
    comparison objects."""
    obj = read_json(path)
    if obj is None:
        return None
    models, comparisons = obj.get("models"), obj.get("comparisons", [])
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("model"), str) for m in models):
        raise ReportInputError(f"{path}: 'models' must be a list of objects with a 'model' name, got {models!r}")
    if not isinstance(comparisons, list) or not all(isinstance(c, dict) for c in comparisons):
        raise ReportInputError(f"{path}: 'comparisons' must be a list of objects, got {comparisons!r}")
    return obj


def load_run(run_dir: Path) -> dict[str, StageData]:
    """Every stage's inputs, read and checked (see the module docstring), keyed by stage name."""
    stages = {name: StageData(name, marker=read_json(run_dir / name / STAGE_MARKER),
                              started=(run_dir / name).is_dir() and any((run_dir / name).iterdir()))
              for name in STAGES}  # fmt: skip
    for name in TRAINED_STAGES:
        stages[name].records = _step_records(run_dir / name)
    data = stages["data"]
    data.report = read_json(run_dir / "data" / "data_report.json") or (data.summary or None)
    # Held-out results count once their stage is marked: those of a stage being redone (or that
    # failed before its marker) are the previous model's, not the one whose steps the row shows.
    for name in RL_STAGES:
        if stages[name].marker is not None:
            stages[name].report = _read_eval(run_dir / name / "eval.json")
    if stages["eval"].marker is not None:
        stages["eval"].report = _read_eval_summary(run_dir / "eval" / "summary.json")
    return stages


# ---- formatting -----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if not _is_number(value):
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value) or abs(value) < 1000:
        return f"{value:.4g}"
    return f"{value:,.0f}"


def _pct(value: Any) -> str:
    return f"{value:.1%}" if _is_number(value) else "—"


def _duration(seconds: Any) -> str:
    if not _is_number(seconds):
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


def _stage_seconds(stage: StageData) -> Any:
    seconds = stage.summary.get("seconds")
    if isinstance(seconds, dict):  # the data stage: seconds per phase and the total
        seconds = seconds.get("total")
    if seconds is None and stage.name == "data" and stage.report:
        seconds = (stage.report.get("seconds") or {}).get("total")
    return seconds


def _data_results(report: dict[str, Any]) -> str:
    docs, seqs = report.get("documents") or {}, report.get("sequences") or {}
    return (
        f"{_fmt(docs.get('in'))} documents in, {_fmt(docs.get('kept'))} kept "
        f"({_fmt(docs.get('exact_duplicates'))} exact + {_fmt(docs.get('near_duplicates'))} near duplicates, "
        f"{_fmt(docs.get('filtered'))} filtered, {_fmt(docs.get('rejected'))} rejected); "
        f"{_fmt((report.get('tokens') or {}).get('packed'))} tokens packed into "
        f"{_fmt(seqs.get('train'))} train + {_fmt(seqs.get('validation'))} validation sequences"
    )


def _training_results(stage: StageData) -> str:
    keys = ("val_loss", "val_perplexity", "val_accuracy", "tokens_per_s")
    # Metrics first (they exist for an unfinished stage too), else the finished stage's summary.
    if stage.records:
        steps, first, final = stage.records[-1]["step"], stage.first("loss"), stage.last("loss")
        latest = {key: stage.last(key) for key in keys}
    else:
        steps, first, final = (stage.summary.get(key) for key in ("steps", "first_loss", "final_loss"))
        latest = {key: stage.summary.get(key) for key in keys}
    parts = [f"{_fmt(steps)} steps", f"loss {_fmt(first)} → {_fmt(final)}"]
    templates = {"val_loss": "val loss {}", "val_perplexity": "val perplexity {}",
                 "val_accuracy": "val accuracy {}", "tokens_per_s": "{} tokens/s"}
    for key, template in templates.items():
        if latest[key] is not None:
            parts.append(template.format(_pct(latest[key]) if key == "val_accuracy" else _fmt(latest[key])))
    return ", ".join(parts)


def _ppo_results(stage: StageData) -> str:
    """Steps; the rollout reward's mean over the first and the last window of steps (the stage's own
    trend window, with its test's p; one step alone swings with the prompts it drew); the mean KL
    over the last window; the held-out before / after."""
    parts = []
    if stage.records:
        rewards, kls = stage.series("reward_mean")[1], stage.series("kl")[1]
        trend = stage.summary.get("reward_first_steps") or {}
        window = trend.get("steps") if _is_number(trend.get("steps")) else min(5, len(rewards) // 2)
        window = max(1, int(window))
        steps = "step" if window == 1 else f"{window} steps"
        parts.append(f"{_fmt(stage.records[-1]['step'])} steps")
        if rewards:
            gain_p = stage.summary.get("reward_gain_p")
            p_text = f", p = {_fmt(gain_p)}" if _is_number(gain_p) else ""
            first, last = statistics.fmean(rewards[:window]), statistics.fmean(rewards[-window:])
            parts.append(f"reward {_fmt(first)} → {_fmt(last)} (first → last {steps}{p_text})")
        if kls:
            parts.append(f"KL {_fmt(statistics.fmean(kls[-window:]))} (last {steps})")
    if stage.report:
        before, after = stage.report["before"], stage.report["after"]
        parts.append(
            f"held-out reward {_fmt(before.get('reward'))} → {_fmt(after.get('reward'))}, "
            f"accuracy {_pct(before.get('accuracy'))} → {_pct(after.get('accuracy'))} "
            f"({_fmt(after.get('prompts'))} prompts)"
        )
    return ", ".join(parts)


def _eval_results(summary: dict[str, Any]) -> str:
    models = summary["models"]
    graded = [m for m in models if _is_number(m.get("task_accuracy"))]
    text = f"{len(models)} models on {_fmt((summary.get('prompts') or {}).get('n'))} held-out prompts"
    if graded:
        best = max(graded, key=lambda m: m["task_accuracy"])
        text += f"; best greedy accuracy {best['model']} {model_cells(best)[1]} (table below)"
    return text


def _results(stage: StageData) -> str:
    if stage.marker is None and not stage.records and not stage.report:  # not run, or nothing measured yet
        return "—"
    if stage.name == "data":
        return _data_results(stage.report) if stage.report else "—"
    if stage.name in RL_STAGES:
        return _ppo_results(stage) or "—"
    if stage.name == "eval":
        return _eval_results(stage.report) if stage.report else "—"
    if stage.name == "preferences":
        s = stage.summary
        return (f"{_fmt(s.get('pairs'))} pairs from {_fmt(s.get('prompts_paired'))} of "
                f"{_fmt(s.get('prompts'))} prompts ({_fmt(s.get('accepted'))} of "
                f"{_fmt(s.get('distinct_responses'))} distinct answers accepted)")
    return _training_results(stage)


# ---- plots ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    """One PNG of the report: its file name in ``report/``, a short title (alt text), its caption."""

    file: str
    title: str
    caption: str


def _figure(ncols: int = 1) -> tuple[Any, list[Any]]:
    # Figure, not pyplot: no global state and no GUI backend; savefig draws with the Agg canvas.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * ncols, 4.0), layout="constrained")
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _curves(ax: Any, stage: StageData, keys: dict[str, str], ylabel: str) -> bool:
    """Plot each ``key: label`` of ``stage`` against the step; False when none has data."""
    drawn = False
    for key, label in keys.items():
        steps, values = stage.series(key)
        if steps:
            # Evaluations are sparse: mark their points.
            ax.plot(steps, values, "o-" if key.startswith(("val_", "eval_")) else "-", label=label)
            drawn = True
    if drawn:
        from matplotlib.ticker import MaxNLocator  # see _figure: matplotlib only when plotting

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 1.25
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    return drawn


def _plot_loss(stage: StageData, title: str, out: Path) -> bool:
    return _plot_panels(stage, out, [({"loss": "training", "val_loss": "held-out"}, "loss", title)])


# One panel of a figure: the curves (metric key: legend label), the y label, the title.
Panel = tuple[dict[str, str], str, str]


def _plot_panels(stage: StageData, out: Path, panels: list[Panel]) -> bool:
    """Side-by-side panels of ``stage``'s metrics against the step; False when none has data."""
    fig, axes = _figure(len(panels))
    drawn = False
    for ax, (keys, ylabel, title) in zip(axes, panels):
        if _curves(ax, stage, keys, ylabel):
            ax.set_title(title)
            drawn = True
    if drawn:
        fig.savefig(out, dpi=100)
    return drawn


def _plot_reward_model(stage: StageData, out: Path) -> bool:
    return _plot_panels(stage, out, [
        ({"loss": "training", "val_loss": "held-out"}, "Bradley–Terry loss", "Reward model loss"),
        ({"accuracy": "training", "val_accuracy": "held-out"}, "pairwise accuracy",
         "Reward model accuracy (chosen scored above rejected)"),
    ])  # fmt: skip


def _plot_dpo(stage: StageData, out: Path) -> bool:
    return _plot_panels(stage, out, [
        ({"loss": "training", "val_loss": "held-out", "accuracy": "accuracy (training)",
          "val_accuracy": "accuracy (held-out)"}, "loss / implicit-reward accuracy", "DPO loss and implicit-reward accuracy"),
        ({"chosen_reward": "chosen", "rejected_reward": "rejected", "val_margin": "margin (held-out)"},
         "implicit reward β log π/π_ref", "DPO implicit rewards (training) and held-out margin"),
    ])  # fmt: skip


def _plot_rl(stage: StageData, out: Path) -> bool:
    return _plot_panels(stage, out, [
        ({"reward_mean": "rollouts", "eval_reward": "held-out"}, "mean reward", f"{stage.name.upper()} reward"),
        ({"kl": "KL(policy ‖ reference)"}, "KL", f"{stage.name.upper()} KL to the SFT model"),
    ])  # fmt: skip


def _plot_before_after(evaluation: dict[str, Any] | None, out: Path) -> bool:
    if not evaluation:
        return False
    before, after = evaluation["before"], evaluation["after"]
    metrics = [m for m in ("reward", "accuracy") if _is_number(before.get(m)) and _is_number(after.get(m))]
    if not metrics:
        return False
    fig, axes = _figure(len(metrics))
    for ax, metric in zip(axes, metrics):
        values = [before[metric], after[metric]]
        bars = ax.bar(["SFT (before)", "PPO (after)"], values, color=["tab:gray", "tab:blue"])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values])
        ax.set_title(f"held-out {metric}")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(out, dpi=100)
    return True


def _plot_eval_accuracy(summary: dict[str, Any] | None, out: Path) -> bool:
    models = [m for m in (summary or {}).get("models", []) if _is_number(m.get("task_accuracy"))]
    if not models:
        return False
    fig, (ax,) = _figure()
    names, acc = [m["model"] for m in models], [m["task_accuracy"] for m in models]
    # Asymmetric error bars: the Wilson interval is not centred on the estimate.
    cis = [m.get("task_accuracy_ci95") or [a, a] for m, a in zip(models, acc)]
    yerr = [[a - lo for a, (lo, _) in zip(acc, cis)], [hi - a for a, (_, hi) in zip(acc, cis)]]
    ax.bar(names, acc, yerr=yerr, capsize=6, color="tab:blue", ecolor="black")
    for x, (a, (_, hi)) in enumerate(zip(acc, cis)):
        ax.text(x, hi + 0.02, f"{a:.1%}", ha="center")  # above the error bar, which it would hide
    ax.set_ylim(0.0, 1.08)
    ax.set_ylabel("task accuracy (greedy)")
    ax.set_title(f"Held-out task accuracy by stage (n = {models[0].get('n', '?')}, 95% Wilson CI)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(out, dpi=100)
    return True


def _draw_plots(stages: dict[str, StageData], out_dir: Path) -> tuple[list[Plot], list[str]]:
    """Draw every plot that has data into ``out_dir``; returns the plots and notes on the missing ones."""
    ppo = stages["ppo"]
    prompts = (ppo.report or {}).get("after", {}).get("prompts")
    on_prompts = f" on {_fmt(prompts)} held-out prompts" if prompts is not None else " on held-out prompts"
    # (stage, plot, draw): in pipeline order.
    wanted = [
        ("pretrain", Plot("pretrain_loss.png", "Pretraining loss",
                          "Pretraining: next-token loss per logging window, and on the validation shards."),
         lambda out: _plot_loss(stages["pretrain"], "Pretraining loss", out)),
        ("sft", Plot("sft_loss.png", "SFT loss", "SFT: loss on assistant tokens, training and held-out."),
         lambda out: _plot_loss(stages["sft"], "SFT loss", out)),
        ("reward_model", Plot("reward_model.png", "Reward model loss and accuracy",
                              "Reward model: Bradley–Terry loss (left) and pairwise accuracy (right), "
                              "training and held-out."),
         lambda out: _plot_reward_model(stages["reward_model"], out)),
        ("dpo", Plot("dpo.png", "DPO loss, accuracy and rewards",
                     "DPO: loss and implicit-reward accuracy (left), implicit rewards of the chosen and rejected "
                     "responses and the held-out margin (right)."),
         lambda out: _plot_dpo(stages["dpo"], out)),
        ("ppo", Plot("ppo_reward_kl.png", "PPO reward and KL",
                     "PPO: mean rollout reward and held-out reward (left), KL of the policy from the SFT "
                     "model (right)."),
         lambda out: _plot_rl(ppo, out)),
        ("ppo", Plot("ppo_before_after.png", "Task metric before and after PPO",
                     f"Task metric before (SFT model) and after PPO{on_prompts}."),
         lambda out: _plot_before_after(ppo.report, out)),
        ("grpo", Plot("grpo_reward_kl.png", "GRPO reward and KL",
                      "GRPO: mean rollout reward and held-out reward (left), KL of the policy from the SFT "
                      "model (right)."),
         lambda out: _plot_rl(stages["grpo"], out)),
        ("rlhf", Plot("rlhf_reward_kl.png", "RLHF (reward model only) reward and KL",
                      "RL from the reward model alone: mean rollout reward-model score and held-out score "
                      "(left), KL of the policy from the SFT model (right)."),
         lambda out: _plot_rl(stages["rlhf"], out)),
        ("eval", Plot("eval_accuracy.png", "Task accuracy by stage",
                      "Held-out task accuracy of every model (greedy decoding), with 95 % Wilson intervals."),
         lambda out: _plot_eval_accuracy(stages["eval"].report, out)),
    ]
    plots, missing = [], []
    for stage, plot, draw in wanted:
        if draw(out_dir / plot.file):
            plots.append(plot)
        else:
            why = "not run" if stages[stage].status == "not run" else "no data for this plot"
            missing.append(f"`{plot.file}` ({stage}: {why})")
    return plots, missing


# ---- the report -----------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _eval_section(summary: dict[str, Any]) -> list[str]:
    """Every model side by side, then the paired comparisons (``kiln eval``)."""
    prompts = (summary.get("prompts") or {}).get("n")
    lines = ["", "## Evaluation", "",
             f"{_fmt(prompts)} held-out prompts. Accuracy: greedy decoding, 95 % Wilson interval; "
             f"pass@{summary.get('k', 'k')}: {summary.get('k', 'k')} samples per prompt at temperature "
             f"{summary.get('temperature', '—')}; reward and RM score: means over the greedy responses; "
             f"ppl: perplexity on pretraining's validation shards (pretraining text, not the task); "
             f"KL: per-response k1 estimate against {summary.get('reference', 'the reference')}.", ""]  # fmt: skip
    lines += _table(model_header(summary), [model_cells(m) for m in summary["models"]])
    if summary.get("comparisons"):
        lines += ["", "Paired comparisons on the same prompts (McNemar's exact test on greedy correctness):", ""]
        lines += _table(COMPARISON_HEADER, [comparison_cells(c) for c in summary["comparisons"]])
    rm = summary.get("reward_model") or {}
    if _is_number(rm.get("pairwise_accuracy")):
        lines += ["", f"Reward model: pairwise accuracy {_pct(rm['pairwise_accuracy'])} on {_fmt(rm.get('pairs'))} "
                      f"held-out pairs, {_pct(rm.get('pairwise_accuracy_same_format'))} on the "
                      f"{_fmt(rm.get('pairs_same_format'))} pairs of the same format."]  # fmt: skip
    return lines


def _markdown(run_dir: Path, stages: dict[str, StageData], plots: list[Plot], missing: list[str]) -> str:
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    lines = [
        f"# kiln run report: {run_dir.name}",
        "",
        f"Run directory `{run_dir.resolve()}`, report generated {generated}.",
        "",
        "## Stages",
        "",
        "| stage | status | duration | results |",
        "|---|---|---|---|",
    ]
    for stage in stages.values():
        lines.append(f"| {stage.name} | {stage.status} | {_duration(_stage_seconds(stage))} | {_results(stage)} |")
    if stages["eval"].report:
        lines += _eval_section(stages["eval"].report)
    lines += ["", "## Plots", ""]
    for number, plot in enumerate(plots, start=1):
        lines += [f"![{plot.title}]({REPORT_DIR}/{plot.file})", "", f"*Figure {number}. {plot.caption}*", ""]
    if not plots:
        lines += ["No stage has metrics to plot yet.", ""]
    if missing:
        lines += ["Not plotted: " + "; ".join(missing) + ".", ""]
    return "\n".join(lines)


def write_report(run_dir: Path) -> Path:
    """Write ``<run_dir>/report.md`` and its plots in ``<run_dir>/report/``, replacing an older report.

    Args:
        run_dir: the run directory, ``runs/<name>``.

    Returns:
        The path of ``report.md``.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist.
        ReportInputError: an input file is malformed (naming the file and line); nothing is written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} not found")
    stages = load_run(run_dir)  # every input checked before anything is written
    with atomic_dir(run_dir / REPORT_DIR) as tmp:
        plots, missing = _draw_plots(stages, tmp)
        text = _markdown(run_dir, stages, plots, missing)
    # The plots are in place; report.md follows in one rename. Only a crash between the two
    # renames can pair new plots with the old text (same file names, so its links still work).
    path = run_dir / REPORT_FILE
    atomic_write_text(path, text)
    return path
