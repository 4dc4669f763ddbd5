"""Chaos: one PPO run in which every actor role dies once, against the same run undisturbed.

Both runs go through the controller's own loop (``ppo._train``): the chaotic one with a fault hook
that kills one actor before a chosen step. The controller must restart the dead actor's group (every
actor when there is no checkpoint yet), resume from the latest checkpoint (or from the start), reach
the last step, and produce the very same steps as the run that nothing disturbed: every step is a
function of (seed, step).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from test_ppo_e2e import _ppo_config

from actors.group import RankGroup
from core.metrics import read_metrics
from pipelines.rlhf.config import PpoConfig
from pipelines.rlhf.ppo import ActorFailure, Actors, _train, load_prompts, start_actors

pytestmark = pytest.mark.slow

MAX_STEPS = 7
# Before which step (0-based: steps done so far) each role dies. Checkpoints every 2 steps: the
# learner rank dies before any checkpoint (the run starts over), the critic and the reward scorer
# one step after one (that step is replayed), the reference right after one. The rollout actor is
# restarted in place by Ray (rollout.max_restarts) and resynced: no recovery.
KILLS = {1: "learner rank 1", 3: "critic rank 0", 4: "reference", 5: "reward scorer", 6: "rollout"}
COMPARED = ("reward_mean", "kl", "response_length", "policy_loss", "value_loss", "entropy")


def _config(files: dict[str, Any], **overrides: Any) -> PpoConfig:
    return _ppo_config(files, max_steps=MAX_STEPS, checkpoint_every_steps=2, keep_checkpoints=1, eval_every_steps=3,
                       **overrides)  # fmt: skip


def _run(files: dict[str, Any], p: PpoConfig, stage_dir: Path, fault: Any = None) -> dict[str, Any]:
    """The controller's loop (``_train``) on the task's policy and prompts; its summary part."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(files["policy"]))
    prompts, _ = load_prompts(Path(p.prompts), tok, p.max_prompt_tokens)
    eval_prompts, _ = load_prompts(Path(p.eval_prompts), tok, p.max_prompt_tokens)
    start = functools.partial(start_actors, p, files["policy"], None, files["policy"])
    return _train(start, p, stage_dir, prompts, eval_prompts, None, tok.pad_token_id, "ppo", fault=fault)


class Killer:
    """The fault hook: kills the role of ``KILLS`` due before this step, once."""

    def __init__(self) -> None:
        self.killed: list[tuple[int, str]] = []

    def __call__(self, actors: Actors, step: int) -> None:
        role = KILLS.get(step)
        if role is None or any(r == role for _, r in self.killed):
            return
        self.killed.append((step, role))
        # A crash, as Ray sees one: the process is gone. Ray restarts the rollout actor (max_restarts).
        ray.kill(actors.roles()[role], no_restart=role != "rollout")


@pytest.fixture(scope="module")
def runs(ray_local: None, task: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    p = _config(task, max_failures=len(KILLS) - 1)  # the rollout actor's restart is not a failure
    calm_dir, chaos_dir = tmp_path_factory.mktemp("calm"), tmp_path_factory.mktemp("chaos")
    calm = _run(task, p, calm_dir)
    killer = Killer()
    chaos = _run(task, p, chaos_dir, fault=killer)
    return {"calm": calm, "chaos": chaos, "killed": killer.killed, "calm_dir": calm_dir, "chaos_dir": chaos_dir}


def test_every_role_dies_once_and_the_run_reaches_its_last_step(runs: dict[str, Any]) -> None:
    assert [role for _, role in runs["killed"]] == list(KILLS.values())
    events = [r for r in read_metrics(runs["chaos_dir"]) if r.get("event") == "recovery"]
    # The rollout actor's crash is absorbed by Ray's restart; each other role costs one recovery.
    assert [e["role"] for e in events] == ["learner rank 1", "critic rank 0", "reference", "reward scorer"]
    assert [(e["failed_step"], e["resumed_step"]) for e in events] == [(2, 0), (4, 2), (5, 4), (6, 4)]
    # Before the first checkpoint every actor starts again; after it, only the dead one's group.
    ids = [e["ids"] for e in read_metrics(runs["chaos_dir"]) if e.get("event") == "actors"]
    replaced = [sorted(role for role in new if new[role] != old[role]) for old, new in zip(ids, ids[1:])]
    assert replaced == [sorted(ids[0]), ["critic rank 0"], ["reference"], ["reward scorer"]], replaced
    assert runs["chaos"]["recoveries"] == 4 and runs["calm"]["recoveries"] == 0
    steps = [r["step"] for r in read_metrics(runs["chaos_dir"], by_step=True)]
    assert steps == list(range(MAX_STEPS + 1))  # step 0: the evaluation before training
    assert (runs["chaos_dir"] / "model" / "config.json").is_file()
    assert sorted(x.name for x in (runs["chaos_dir"] / "checkpoints").iterdir()) == [f"step-{MAX_STEPS:08d}"]


def test_replayed_steps_are_counted_once(runs: dict[str, Any]) -> None:
    written = [r["step"] for r in read_metrics(runs["chaos_dir"]) if "event" not in r]
    # Steps 1 (no checkpoint yet), 3 and 5 (one step past a checkpoint) were written twice ...
    assert sorted(s for s in set(written) if written.count(s) > 1) == [1, 3, 5]
    # ... and the reader keeps the last of each.
    by_step = read_metrics(runs["chaos_dir"], by_step=True)
    assert [r["recoveries"] for r in by_step[1:]] == [1, 1, 2, 2, 4, 4, 4]


def test_steps_after_each_resume_equal_the_undisturbed_run(runs: dict[str, Any]) -> None:
    calm, chaos = (read_metrics(runs[k], by_step=True) for k in ("calm_dir", "chaos_dir"))
    assert len(calm) == len(chaos) == MAX_STEPS + 1
    for a, b in zip(calm[1:], chaos[1:]):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], abs=1e-4), (a["step"], key)
        assert b["logprob_mismatch"] < 1e-4, b["step"]
    for when in ("before", "after"):
        assert runs["chaos"][when] == pytest.approx(runs["calm"][when], abs=1e-6), when
    evals = [[r.get("eval_reward") for r in run] for run in (calm, chaos)]
    assert evals[0] == pytest.approx(evals[1], abs=1e-6) and sum(e is not None for e in evals[0]) == 4


def test_one_failure_too_many_ends_the_run_naming_role_and_step(ray_local: None, task: dict[str, Any],
                                                                tmp_path: Path) -> None:  # fmt: skip
    def kill_reference(actors: Actors, step: int) -> None:
        ray.kill(actors.reference)

    with pytest.raises(ActorFailure, match=r"the reference died during step 1, failure 1 of at most 0"):
        _run(task, _config(task, max_failures=0), tmp_path, fault=kill_reference)


def _settled() -> float:
    """The cluster's free CPUs once Ray has returned those of killed actors (a moment after ray.kill)."""
    total, deadline = ray.cluster_resources()["CPU"], time.monotonic() + 30
    while (free := ray.available_resources().get("CPU", 0.0)) < total and time.monotonic() < deadline:
        time.sleep(0.2)
    return free


def test_a_failed_constructor_leaves_no_actor_of_the_start_running(ray_local: None, task: dict[str, Any], tmp_path: Path) -> None:
    """The reward model is missing: the scorer's constructor fails while the rollout engine, the
    reference and the learner's and critic's ranks start (Ray reports it at the scorer's first
    call). start_actors raises and kills every actor it made at once (before, it returned them,
    and they lived until their last handle went)."""
    assert _settled() == ray.cluster_resources()["CPU"]  # the earlier tests' actors are gone
    with pytest.raises(ray.exceptions.RayActorError) as failure:
        start_actors(_config(task), task["policy"], tmp_path / "no-such-model", task["policy"])
    assert failure.traceback  # held, as a caller that reports or retries holds it
    assert _settled() == ray.cluster_resources()["CPU"]


@ray.remote(num_cpus=0.25)
class FailingRank:
    """A fake rank, named so: rank 1's set-up fails, as a DeepSpeed rank's does on a missing model."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank

    def rendezvous(self) -> tuple[str, int]:
        return "127.0.0.1", 1

    def setup(self, addr: str, port: int) -> None:
        if self.rank == 1:
            raise RuntimeError("rank 1 cannot join")


def test_a_rank_group_whose_rank_fails_to_set_up_kills_its_ranks(ray_local: None) -> None:
    """Before, the group's ranks stayed alive as long as the error's traceback held the group."""
    assert _settled() == ray.cluster_resources()["CPU"]
    with pytest.raises(ray.exceptions.RayTaskError, match="rank 1 cannot join") as failure:
        RankGroup(FailingRank, 2, {"num_cpus": 0.25})
    assert failure.traceback
    assert _settled() == ray.cluster_resources()["CPU"]
