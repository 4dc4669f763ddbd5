"""The train worker's per-step sums and its compiled LM loss (no Ray, no DeepSpeed: the helpers alone)."""

from __future__ import annotations

import torch

from pipelines.train.losses import lm_loss_sum
from pipelines.train.worker import _add, _all_sum, _lm_loss, _metrics, _to_device


def test_sums_stay_tensors_until_the_all_sum_and_add_up_in_float64() -> None:
    micro = [{"loss": torch.tensor(1e8, dtype=torch.float32), "count": torch.tensor(3)},
             {"loss": torch.tensor(1.0, dtype=torch.float32), "count": torch.tensor(4)}]  # fmt: skip
    total: dict = {}
    for sums in micro:
        total = _add(total, sums)
    assert all(
        isinstance(v, torch.Tensor) and v.dtype == torch.float64 for v in total.values()
    )
    reduced = _all_sum(total)  # no process group: this rank's sums, read once
    assert reduced == {
        "loss": 100000001.0,
        "count": 7.0,
    }  # float32 addition would have lost the 1.0
    assert _metrics(reduced, "lm", held_out=True)["val_loss"] == 100000001.0 / 7


def test_the_compiled_lm_loss_equals_the_eager_one() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 9, 13), torch.randint(0, 13, (2, 9))
    labels[0, :4] = -100  # a prompt: no loss there
    assert _lm_loss(None) is lm_loss_sum
    compiled = _lm_loss("aot_eager")
    assert _lm_loss("aot_eager") is compiled  # compiled once per backend
    (want, want_n), (got, got_n) = lm_loss_sum(logits, labels), compiled(logits, labels)
    assert got_n == want_n == 13
    torch.testing.assert_close(got, want)


def test_cpu_batches_share_the_rows_memory() -> None:
    import numpy as np

    rows = {"input_ids": np.arange(6, dtype=np.int64).reshape(2, 3)}
    batch = _to_device(rows, torch.device("cpu"))
    rows["input_ids"][0, 0] = 42
    assert batch["input_ids"][0, 0] == 42  # no copy on CPU
