"""The side-by-side table of ``eval/summary.json``: ``kiln eval`` prints it, the run report renders
it as Markdown. Only formatting, no statistics: the report (and so ``kiln --help``) imports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def _num(value: Any, digits: int = 3) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}g}"


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def _with_ci(value: Any, ci: Any, fmt: Callable[[Any], str]) -> str:
    if fmt(value) == "—":
        return "—"
    if isinstance(ci, list) and len(ci) == 2:
        return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"
    return fmt(value)


def model_header(summary: dict[str, Any]) -> list[str]:
    """Column names of the model table."""
    k = summary.get("k", "k")
    return ["model", "accuracy [95% CI]", f"pass@{k}", "reward", "RM score", "ppl (pretraining val)",
            f"KL to {summary.get('reference', 'ref')}"]  # fmt: skip


def model_cells(entry: dict[str, Any]) -> list[str]:
    """One model's row: accuracy with its interval, pass@k, reward, RM score, perplexity, KL."""
    return [
        str(entry.get("model", "?")),
        _with_ci(entry.get("task_accuracy"), entry.get("task_accuracy_ci95"), _pct),
        _pct(entry.get("pass_at_k")),
        _num(entry.get("reward_mean")),
        _num(entry.get("rm_score_mean")),
        _num(entry.get("val_perplexity"), 4),
        _num(entry.get("kl_to_ref")),
    ]


COMPARISON_HEADER = ["comparison", "Δ accuracy", "p (McNemar exact)", "only a / only b right", "n"]


def comparison_cells(c: dict[str, Any]) -> list[str]:
    """One comparison's row: b's accuracy minus a's in points, the p-value, discordant counts."""
    delta = c.get("delta")
    shown = f"{delta * 100:+.1f} pts" if isinstance(delta, (int, float)) else "—"
    return [f"{c.get('a')} → {c.get('b')}", shown, _num(c.get("p_value"), 2),
            f"{c.get('a_only', '—')} / {c.get('b_only', '—')}", str(c.get("n", "—"))]  # fmt: skip


def format_table(summary: dict[str, Any]) -> str:
    """The summary as plain text for a terminal: the models side by side, then the comparisons."""

    def block(header: list[str], rows: list[list[str]]) -> list[str]:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]

    n = summary["models"][0]["n"] if summary.get("models") else 0
    lines = [f"kiln eval: {n} held-out prompts, greedy accuracy with 95% Wilson interval, "
             f"{summary.get('k')} samples per prompt at temperature {summary.get('temperature')}"]  # fmt: skip
    lines += block(model_header(summary), [model_cells(e) for e in summary.get("models", [])])
    if summary.get("comparisons"):
        lines += ["", *block(COMPARISON_HEADER, [comparison_cells(c) for c in summary["comparisons"]])]
    rm = summary.get("reward_model") or {}
    if rm.get("pairs"):
        overall = _with_ci(rm.get("pairwise_accuracy"), rm.get("pairwise_accuracy_ci95"), _pct)
        same = _with_ci(rm.get("pairwise_accuracy_same_format"), rm.get("pairwise_accuracy_same_format_ci95"), _pct)
        lines += ["", f"reward model: pairwise accuracy {overall} on {rm['pairs']} pairs, "
                      f"{same} on the {rm.get('pairs_same_format', 0)} same-format pairs"]  # fmt: skip
    return "\n".join(lines)
