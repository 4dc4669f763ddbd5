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
