"""Atomic outputs and finished-stage markers."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.rundir import StageConfigChanged, atomic_dir, finished_stage, mark_finished, unmark


def test_atomic_dir_replaces_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        (d / "f").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "f").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (final / "f").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


def test_finished_stage_skips_same_config_and_refuses_changed(tmp_path: Path) -> None:
    assert finished_stage(tmp_path, "abc") is None
    mark_finished(tmp_path, "data", "abc", {"kept": 3})
    assert finished_stage(tmp_path, "abc")["summary"] == {"kept": 3}
    with pytest.raises(StageConfigChanged, match="--force"):
        finished_stage(tmp_path, "other")
    unmark(tmp_path)
    assert finished_stage(tmp_path, "other") is None
