"""One progress bar per stage on the terminal: steps, the stage's headline number, and an ETA.

The training stages' steps happen in Ray Train workers, so the bar follows the stage's own
``metrics.jsonl`` (a background thread reads the lines appended since its last look); the PPO
controller advances its bar itself. The bar writes to stderr and only on a terminal (or when
forced), so logs and CI output keep one line per stage.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from tqdm import tqdm

from core.metrics import METRICS_FILE


class StageProgress:
    """A tqdm bar over a stage's steps, fed by ``update`` or by following ``<stage_dir>/metrics.jsonl``.

    Args:
        stage: shown as the bar's label.
        total: steps the stage runs.
        keys: metric keys shown after the bar (the first present of each record), e.g. ``("loss",)``.
        stage_dir: follow this stage's metrics file (None: the caller calls ``update``).
        enabled: None: only when stderr is a terminal.
    """

    def __init__(
        self, stage: str, total: int, keys: tuple[str, ...], stage_dir: Path | None = None, enabled: bool | None = None
    ) -> None:
        self.keys = keys
        on = sys.stderr.isatty() if enabled is None else enabled
        self.bar = tqdm(total=total, desc=f"kiln {stage}", unit="step", disable=not on, dynamic_ncols=True, leave=True)
        self.path = stage_dir / METRICS_FILE if stage_dir is not None else None
        self._offset = self.path.stat().st_size if self.path is not None and self.path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True) if self.path is not None and on else None

    def __enter__(self) -> StageProgress:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._read_new()
        self.bar.close()

    def update(self, record: dict[str, Any]) -> None:
        """Move the bar to ``record["step"]`` and show its headline numbers."""
        step = record.get("step")
        if isinstance(step, int) and step > self.bar.n:
            self.bar.update(min(step, self.bar.total or step) - self.bar.n)
        shown = {k: f"{v:.4g}" for k, v in record.items() if k in self.keys and isinstance(v, (int, float))}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def write(self, line: str) -> None:
        """Print a line above the bar (or plainly, without a terminal)."""
        self.bar.write(line)

    def _read_new(self) -> None:
        if self.path is None or not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next look
        self._offset += len(complete)
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the reader of record (core.metrics) reports malformed lines; a bar does not
            if isinstance(record, dict) and "event" not in record:
                self.update(record)

    def _follow(self) -> None:
        while not self._stop.wait(1.0):
            self._read_new()


def summary_text(summary: dict[str, Any], cwd: Path | None = None) -> str:
    """A stage's summary as the one line its ``done`` message shows: ``key=value`` pairs, floats to
    four significant digits (whole from 10,000 up), paths under the working directory made
    relative, and Ray node ids (``nodes``: a list, or a list per actor role) as how many nodes ran
    the stage. The summary itself, every digit and node id, is what ``stage.json`` keeps.

    >>> summary_text({"model": "/w/runs/a/model", "loss": 0.12345678, "nodes": ["n1", "n1"]}, Path("/w"))
    'model=runs/a/model, loss=0.1235, nodes=1'
    """
    base = Path.cwd() if cwd is None else cwd

    def node_count(nodes: Any) -> int:
        ids = nodes if isinstance(nodes, list) else [n for group in nodes.values() for n in group]
        return len(set(ids))

    def text(value: Any) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float):
            return f"{value:,.0f}" if 1e4 <= abs(value) < 1e15 else f"{value:.4g}"  # 15,350 tokens/s, not 1.535e+04
        if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(base):
            return str(Path(value).relative_to(base))
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}={text(v)}" for k, v in value.items()) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(text(v) for v in value) + "]"
        return str(value)

    return ", ".join(
        f"{key}={node_count(value) if key == 'nodes' and isinstance(value, (list, dict)) else text(value)}"
        for key, value in summary.items()
    )
