"""``bench/gpu_check.py``'s results: a step's rows (saved as it goes), a failure in one line, the one table.

The standard library only: the parent process imports it before any engine.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.rundir import atomic_write_json

NONE = "—"  # a row without a goal or a verdict

_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt|Exit)\b.*")


def reason(error: BaseException | str, limit: int = 160) -> str:
    """A failure in one line: the last ``SomeError: message`` line of its text (Ray wraps the
    cause's traceback in its own), else the first line."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    found = [line for line in lines if _ERROR_LINE.match(line)]
    line = found[-1] if found else (lines[0] if lines else "unknown error")
    return line if len(line) <= limit else line[: limit - 1] + "…"


class Report:
    """A step's rows and details, saved atomically to ``path`` after every change: what a part
    measured before it failed or ran out of time still reaches the table."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.status = "ok"
        self.rows: list[dict[str, str]] = []
        self.details: dict[str, Any] = {}

    def add(self, measure: str, value: str, goal: str = NONE, status: str = NONE) -> None:
        self.rows.append({"measure": measure, "value": value, "goal": goal, "status": status})
        self.save()

    def fail(self, measure: str, error: BaseException, goal: str = NONE) -> None:
        status = f"failed: {reason(error)}"
        self.status = status if self.status == "ok" else self.status
        self.details.setdefault("errors", {})[measure] = str(error)[-4000:]
        self.add(measure, "", goal, status)

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"status": self.status, "rows": self.rows, "details": self.details})


def guarded(report: Report, measure: str, goal: str, fn: Callable[[], Any]) -> Any:
    """``fn()``; on an exception None, and a failed row for ``measure`` (the traceback goes to the log)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure of one measurement is reported, the rest still runs
        traceback.print_exc()
        report.fail(measure, e, goal)
        return None


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def table(results: dict[str, Any]) -> str:
    """The one table: part (and its seconds), measure, value, goal, status."""
    env = results["environment"]
    lines = [
        f"{env['gpus'][0]} x {len(env['gpus'])}; torch {env['torch']} (CUDA {env['cuda']}), vLLM {env['vllm']}, "
        f"DeepSpeed {env['deepspeed']}, Ray {env['ray']}",
        f"nvidia-smi: {env['nvidia_smi'] or 'not available'}",
        "",
        "| part | measure | value | goal | status |",
        "|---|---|---|---|---|",
    ]
    for part, r in results["parts"].items():
        for i, row in enumerate(r["rows"]):
            name = f"{part} ({r['seconds']:.0f} s)" if i == 0 else ""
            lines.append(f"| {name} | {row['measure']} | {row['value']} | {row['goal']} | {row['status']} |")
    return "\n".join(lines)
