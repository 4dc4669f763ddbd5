"""Training and PPO metrics on the Ray dashboard, through ``ray.util.metrics`` gauges.

One gauge per numeric key of a stage's metric record, named by a fixed rule so that a newcomer can
guess the Prometheus name from a ``metrics.jsonl`` line:

    ``kiln_<family>_<key>``, tag ``stage=<stage>``

where ``family`` is ``train`` for the three training stages (``pretrain``, ``sft``,
``reward_model``: one Grafana panel shows all three losses, split by the ``stage`` tag) and the
stage's own name otherwise (``ppo``). Examples::

    StageGauges("pretrain").record({"step": 10, "loss": 7.8, "tokens_per_s": 6298.0})
    # kiln_train_step{stage="pretrain"} 10, kiln_train_loss{...} 7.8, kiln_train_tokens_per_s{...} 6298
    StageGauges("ppo").record({"step": 3, "reward_mean": 0.41, "kl": 0.02, "time_step_s": 9.1})
    # kiln_ppo_step{stage="ppo"} 3, kiln_ppo_reward_mean{...} 0.41, kiln_ppo_kl{...} 0.02, ...

Ray's metrics agent exports them with its own ``ray_`` prefix (``ray_kiln_train_loss``) on each
node's metrics export port, next to the serving metrics (``ray_kiln_serve_*``, ``serving/app.py``).

Only finite ints and floats are recorded (bools, strings, NaN and inf are skipped); records with an
``event`` key (``start``, ``resume``, ``finished``, ``non_finite_loss`` in the trainer) are
lifecycle markers, not measurements, and are skipped whole. Outside a Ray worker or driver the
gauges are still created and set, but nothing exports them, so the helper is safe to call anywhere.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Mapping
from typing import Any

from ray.util.metrics import Gauge

TRAIN_STAGES = frozenset({"pretrain", "sft", "reward_model"})

# Descriptions shown on the metrics page; other keys get a generic one.
_DESCRIPTIONS = {
    "step": "Last optimizer / PPO step reported.",
    "loss": "Training loss over the last logging window.",
    "val_loss": "Held-out loss at the last evaluation.",
    "val_perplexity": "Held-out perplexity at the last evaluation.",
    "val_accuracy": "Held-out pairwise accuracy of the reward model at the last evaluation.",
    "tokens_per_s": "Training throughput, tokens per second (all workers).",
    "lr": "Learning rate.",
    "grad_norm": "Global gradient norm (PPO: the policy's).",
    "value_grad_norm": "Global gradient norm of the PPO critic.",
    "reward_mean": "Mean reward of the step's rollouts.",
    "kl": "KL divergence of the policy from the reference (SFT) model.",
    "eval_reward": "Mean reward on held-out prompts at the last evaluation.",
    "eval_accuracy": "Task accuracy on held-out prompts at the last evaluation.",
}

_INVALID = re.compile(r"[^a-zA-Z0-9_]")

# Ray registers a metric per name and process; creating the same name twice in a process would
# register it twice, so gauges are created lazily, once, and shared by every StageGauges here.
_gauges: dict[str, Gauge] = {}
_lock = threading.Lock()


def metric_name(stage: str, key: str) -> str:
    """The gauge name for ``key`` of ``stage``'s records (before Ray's ``ray_`` export prefix).

    Args:
        stage: run-directory stage name, e.g. ``pretrain`` or ``ppo``.
        key: a metric record key, e.g. ``loss``; characters Prometheus rejects become ``_``.
    """
    family = "train" if stage in TRAIN_STAGES else _INVALID.sub("_", stage)
    return f"kiln_{family}_{_INVALID.sub('_', key)}"


def _gauge(name: str, key: str) -> Gauge:
    with _lock:
        gauge = _gauges.get(name)
        if gauge is None:
            description = _DESCRIPTIONS.get(key, f"kiln metric record key '{key}' (last value).")
            gauge = _gauges[name] = Gauge(name, description, tag_keys=("stage",))
        return gauge


class StageGauges:
    """Sets one Ray gauge per numeric key of a stage's metric records.

    Args:
        stage: the stage name, used as the ``stage`` tag and to pick the metric family.

    Raises:
        ValueError: ``stage`` is empty.
    """

    def __init__(self, stage: str) -> None:
        if not stage:
            raise ValueError("StageGauges: stage name is empty")
        self.stage = stage
        self._tags = {"stage": stage}

    def record(self, record: Mapping[str, Any]) -> list[str]:
        """Set a gauge for every finite numeric value of ``record``.

        Args:
            record: one metric record, e.g. a ``metrics.jsonl`` line as a dict.

        Returns:
            The gauge names set (empty for a lifecycle ``event`` record).
        """
        if "event" in record:
            return []
        names = []
        for key, value in record.items():
            # bool is an int subclass, but True is not a measurement.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = metric_name(self.stage, key)
            _gauge(name, key).set(float(value), tags=self._tags)
            names.append(name)
        return names
