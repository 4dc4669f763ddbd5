"""What the terminal shows: kiln's own lines and bars; libraries' progress bars only with --verbose."""

from __future__ import annotations

import pytest
from transformers.utils import logging as hf_logging

from cluster.runtime import configure_output


@pytest.fixture
def restore_output(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    was = hf_logging.is_progress_bar_enabled()
    yield
    configure_output(False)  # kiln's default, as the other tests run
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_hugging_face_bars_are_off_unless_verbose(restore_output: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    hf_logging.enable_progress_bar()
    configure_output(True)
    assert hf_logging.is_progress_bar_enabled() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
    configure_output(False)  # the default: "Loading weights" bars would interleave with kiln's own
    assert not hf_logging.is_progress_bar_enabled() and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"

    # A user's explicit choice wins.
    hf_logging.enable_progress_bar()
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    configure_output(False)
    assert hf_logging.is_progress_bar_enabled()
