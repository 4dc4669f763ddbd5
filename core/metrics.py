"""A stage's metrics: one writer (``metrics.jsonl`` + TensorBoard + an optional live hook) and one reader.

Every stage that logs per-step numbers (the training stages, PPO) appends one JSON object a line
to ``<stage>/metrics.jsonl``. Records with an ``event`` key (``start``, ``resume``, ``finished``,
``non_finite_loss``) mark the lifecycle; the others are measurements with an integer ``step``.
A resumed run appends the steps since its last checkpoint again: readers keep the last record
of each step.

A crash can cut the last record short (disk full, a kill mid-write). Readers skip such a torn
last line with a warning, and a sink opened on the file drops it before appending, so the next
record starts a line of its own: otherwise the two would be glued into a broken line in the
middle, which no reader accepts.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter

from core.jsonl import BadRecord, json_safe, read_jsonl

METRICS_FILE = "metrics.jsonl"


class MetricsSink:
    """Rank 0's metric sinks: ``metrics.jsonl`` (appended), TensorBoard and an optional hook.

    Args:
        stage_dir: the stage's folder in the run directory.
        enabled: False on ranks other than 0 (every method is then a no-op).
        gauges: called with every record, e.g. ``cluster.dashboard.StageGauges(stage).record``.
    """

    def __init__(self, stage_dir: Path, enabled: bool, gauges: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.enabled = enabled
        self.path = stage_dir / METRICS_FILE
        self.gauges = gauges
        self.tb = SummaryWriter(str(stage_dir / "tensorboard")) if enabled else None
        if enabled:
            end_torn_line(self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record to every sink; the line is on disk when this returns."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")  # NaN / inf as null
            f.flush()
            os.fsync(f.fileno())
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()
        if self.gauges is not None:
            self.gauges(record)


def end_torn_line(path: Path) -> None:
    """Make ``path`` end with a whole line before anything is appended to it: a last record that a
    crash cut short is dropped (with a warning); one that lacks only its newline gets it."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        whole = isinstance(json.loads(data[cut:]), dict)
    except ValueError:
        whole = False
    with open(path, "r+b") as f:
        if whole:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        else:
            lineno = data.count(b"\n") + 1
            warnings.warn(f"{path}:{lineno}: dropped a record cut short by a crash", stacklevel=2)
            f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())


def read_metrics(stage_dir: Path, by_step: bool = False) -> list[dict[str, Any]]:
    """The records of ``<stage_dir>/metrics.jsonl`` (empty if there is none).

    Args:
        stage_dir: the stage's folder.
        by_step: False: every record of every attempt, in file order (events included). True: the
            measurements only, the last record of each step (a resumed run's replayed steps
            count once), sorted by step.

    Raises:
        BadRecord: a line is not a JSON object, or (``by_step``) a measurement has no integer
            ``step`` (naming ``path:line``). A torn last line is skipped with a warning.
    """
    path = stage_dir / METRICS_FILE
    if not path.is_file():
        return []
    if not by_step:
        return [record for _, record in read_jsonl(path, torn_tail_ok=True)]
    by: dict[int, dict[str, Any]] = {}
    for lineno, record in read_jsonl(path, torn_tail_ok=True):
        if "event" in record:
            continue
        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise BadRecord(f"{path}:{lineno}: record has no integer 'step' (got {step!r})")
        by[step] = record
    return [by[step] for step in sorted(by)]
