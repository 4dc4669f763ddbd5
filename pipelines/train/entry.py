"""The function Ray Train runs on every worker, in a module that imports nothing heavy.

Ray pickles the loop function by reference and its config by value, and the Train controller
actor unpickles both: a loop function from ``pipelines.train.worker``, or a ``TrainJob`` config
object, made the controller import torch, transformers, PEFT and DeepSpeed's helpers (~6 s of
CPU) before it started any worker, on the cores those workers then import the same on. Here the
job travels as pickled bytes and the heavy module is imported in the workers only.
"""

from __future__ import annotations

import pickle
from typing import Any


def pack_job(job: Any) -> dict[str, bytes]:
    """The ``train_loop_config`` for ``job`` (a ``pipelines.train.worker.TrainJob``)."""
    return {"job": pickle.dumps(job)}


def train_loop(config: dict[str, bytes]) -> None:
    """Ray Train's ``train_loop_per_worker``: unpack the job and run the worker loop."""
    from pipelines.train.worker import train_worker  # torch, transformers, DeepSpeed: workers only

    train_worker({"job": pickle.loads(config["job"])})
