"""Faults a run must survive without losing anything (issue 11).

A torn last line in ``metrics.jsonl``; a kill between the two renames of an atomic output; a
reward function that never returns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from core.jsonl import BadRecord, read_jsonl
from core.metrics import METRICS_FILE, MetricsSink, read_metrics
from core.rundir import atomic_dir, recover_interrupted

ROOT = Path(__file__).resolve().parent.parent

# --- a torn last line in metrics.jsonl ------------------------------------------------------------

# A PPO run: steps 1-3, a crash after the checkpoint at step 2 while step 4's record was being
# written (disk full, a kill): its line is cut short.
_BEFORE_CRASH = [
    {"event": "start", "step": 0},
    {"step": 1, "reward_mean": 0.1, "kl": 0.01, "time_step_s": 1.0, "time_sync_s": 0.1},
    {"step": 2, "reward_mean": 0.2, "kl": 0.02, "time_step_s": 1.0, "time_sync_s": 0.1},
    {"step": 3, "reward_mean": 0.3, "kl": 0.03, "time_step_s": 1.0, "time_sync_s": 0.1},
]
_TORN = '{"step": 4, "reward_mean": 0.4, "kl": 0.0'


def _torn_run(stage_dir: Path) -> Path:
    stage_dir.mkdir(parents=True)
    path = stage_dir / METRICS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in _BEFORE_CRASH) + _TORN)
    return path


def test_a_torn_last_metrics_line_is_skipped_with_a_warning(tmp_path: Path) -> None:
    path = _torn_run(tmp_path / "ppo")
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:5: skipped a record cut short by a crash"):
        steps = read_metrics(tmp_path / "ppo", by_step=True)
    assert [r["step"] for r in steps] == [1, 2, 3]
    with pytest.warns(UserWarning, match="cut short"):
        assert len(read_metrics(tmp_path / "ppo")) == 4
    # A record written whole but without its newline (the crash came just before it) is kept.
    path.write_text("".join(json.dumps(r) + "\n" for r in _BEFORE_CRASH) + '{"step": 4, "reward_mean": 0.4}')
    assert [r["step"] for r in read_metrics(tmp_path / "ppo", by_step=True)] == [1, 2, 3, 4]


def test_a_broken_line_that_is_not_the_torn_tail_is_still_an_error(tmp_path: Path) -> None:
    path = _torn_run(tmp_path / "ppo")
    lines = path.read_text().splitlines(keepends=True)
    # In the middle: another writer's mistake, not a crash.
    path.write_text("".join(lines[:2] + ['{"step": 9, "reward_mean": \n'] + lines[2:4]))
    with pytest.raises(BadRecord, match=r"metrics\.jsonl:3: malformed JSON"):
        read_metrics(tmp_path / "ppo", by_step=True)
    # Last, but ended with its newline: written whole, so it is wrong, not torn.
    path.write_text("".join(lines[:4]) + '{"step": 4, "reward_mean": \n')
    with pytest.raises(BadRecord, match=r"metrics\.jsonl:5: malformed JSON"):
        read_metrics(tmp_path / "ppo")
    # An input file's broken last line is an error too: its last record may matter.
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b')
    with pytest.raises(BadRecord, match=r"prompts\.jsonl:2: malformed JSON"):
        list(read_jsonl(tmp_path / "prompts.jsonl"))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"prompt": "caf\xe9"}', r"not valid UTF-8 \(byte 0xe9 at offset 15\)"),  # Latin-1, not UTF-8
        (b'{"prompt": "b", "id": ' + b"9" * 5000 + b"}", r"malformed JSON: Exceeds the limit \(4300 digits\)"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply to parse"),
        (b'{"prompt": "b"}\r{"prompt": "c"}', "malformed JSON: Extra data"),  # "\r" ends no JSONL line
    ],
)
def test_every_unparsable_input_line_is_a_bad_record_naming_file_and_line(tmp_path: Path, line: bytes,
                                                                          reason: str) -> None:  # fmt: skip
    (tmp_path / "prompts.jsonl").write_bytes(b'{"prompt": "a"}\n' + line + b"\n")
    with pytest.raises(BadRecord, match=rf"prompts\.jsonl:2: {reason}"):
        list(read_jsonl(tmp_path / "prompts.jsonl"))


def test_a_resumed_run_appends_after_a_torn_line_and_counts_each_step_once(tmp_path: Path) -> None:
    stage_dir = tmp_path / "ppo"
    path = _torn_run(stage_dir)
    # The rerun resumes from the step-2 checkpoint: step 3 again, then 4 and 5.
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:5: dropped a record cut short by a crash"):
        sink = MetricsSink(stage_dir, enabled=True)
    sink.write({"event": "resume", "step": 2})
    for step in (3, 4, 5):
        sink.write({"step": step, "reward_mean": step / 10 + 0.05, "kl": 0.01, "time_step_s": 2.0, "time_sync_s": 0.2})
    # Every line is whole again: even the strict reader reads the file.
    assert [n for n, _ in read_jsonl(path)] == list(range(1, 9))
    steps = read_metrics(stage_dir, by_step=True)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert steps[2]["reward_mean"] == pytest.approx(0.35)  # the resumed step's record, not the first one
    # The PPO summary's step-time mean (pipelines/rlhf/ppo.py) is over five steps, not six.
    assert sum(r["time_step_s"] for r in steps) / len(steps) == pytest.approx((1 + 1 + 2 + 2 + 2) / 5)


def test_the_report_renders_a_run_whose_metrics_end_in_a_torn_line(tmp_path: Path) -> None:
    from pipelines.report import REPORT_FILE, write_report

    run = tmp_path / "run"
    _torn_run(run / "ppo")
    with pytest.warns(UserWarning, match="cut short"):
        write_report(run)
    row = next(line for line in (run / REPORT_FILE).read_text().splitlines() if line.startswith("| ppo |"))
    assert "3 steps" in row and "not finished" in row, row


# --- a kill between the renames of an atomic output -------------------------------------------------

# A process that replaces <final> (100 files of "v1") with a new version and is killed with SIGKILL
# (no cleanup, no finally) at one point: inside the body, or just before the nth rename, or just
# before the replaced output is deleted.
_KILLED_WRITER = r"""
import os, signal, sys
from pathlib import Path
from types import SimpleNamespace

import core.rundir as rundir

final, point = Path(sys.argv[1]), sys.argv[2]
renames = 0
real_replace, real_rmtree = os.replace, rundir.shutil.rmtree


def replace(src, dst):
    global renames
    renames += 1
    if point == f"rename{renames}":
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)


def rmtree(path, *args, **kwargs):
    if point == "delete-old" and ".old-" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *args, **kwargs)


rundir.os.replace, rundir.shutil.rmtree = replace, rmtree
with rundir.atomic_dir(final) as tmp:
    for i in range(100):
        (tmp / f"part-{i:03d}").write_text(f"v2 {i}")
        if point == "body" and i == 50:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def _write_version(final: Path, version: str) -> None:
    with atomic_dir(final) as tmp:
        for i in range(100):
            (tmp / f"part-{i:03d}").write_text(f"{version} {i}")


def _version(final: Path) -> str:
    """The one version every file of ``final`` holds ("mixed" if not whole)."""
    texts = [p.read_text() for p in sorted(final.iterdir())]
    versions = {t.split()[0] for t in texts}
    whole = len(texts) == 100 and len(versions) == 1
    return versions.pop() if whole else f"mixed {sorted(versions)} in {len(texts)} files"


# The renames: 1 the finished new output to ".new-" (its mark of completeness), 2 the old output
# aside, 3 the new output in place. A kill after 1 rolls forward, before it the old output stays.
@pytest.mark.parametrize(
    ("point", "expected"),
    [("body", "v1"), ("rename1", "v1"), ("rename2", "v2"), ("rename3", "v2"), ("delete-old", "v2")],
)
def test_a_kill_at_any_point_of_an_atomic_replace_loses_nothing(tmp_path: Path, point: str, expected: str) -> None:
    final = tmp_path / "model"
    _write_version(final, "v1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(final), point], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    if point == "rename3":
        assert not final.exists()  # the window: the old output moved aside, the new one not yet in place
    # The next start: the stage recovers its folder first (the data stage, PPO's checkpoints), or
    # writes the same output again (atomic_dir recovers it before it starts), and fails.
    if point in ("rename2", "rename3"):
        with pytest.raises(RuntimeError, match="next attempt fails"), atomic_dir(final):
            raise RuntimeError("next attempt fails")
    else:
        recover_interrupted(tmp_path)
    assert _version(final) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporaries left behind


def test_an_output_moved_aside_with_nothing_in_its_place_is_put_back(tmp_path: Path) -> None:
    # What a crash between the renames of an earlier kiln left: the old output moved aside and a
    # partial new one, with no mark that it is whole.
    _write_version(tmp_path / "model", "v1")
    os.replace(tmp_path / "model", tmp_path / ".model.old-0123abcd")
    (tmp_path / ".model.tmp-89abcdef").mkdir()
    (tmp_path / ".model.tmp-89abcdef" / "part-000").write_text("v2 0")
    (tmp_path / ".config.yaml.tmp-00ff00ff").write_text("half a fi")  # an atomic file write's partial
    recover_interrupted(tmp_path)
    assert _version(tmp_path / "model") == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --- a reward function that never returns --------------------------------------------------------

_RELEASE = threading.Event()  # set at the end of each test: the abandoned calls then return


@pytest.fixture
def hanging_reward() -> Iterator[Callable[..., float]]:
    def reward(prompt: str, response: str, **fields: Any) -> float:
        if response == "hang":
            _RELEASE.wait()  # a network call that never answers, a deadlock, an endless loop
        if response == "own timeout":
            raise TimeoutError("the grading service timed out")  # the function's own error, not a hang
        return float(len(response))

    _RELEASE.clear()
    yield reward
    _RELEASE.set()


def test_a_hung_reward_call_stops_the_run_naming_function_sample_and_timeout(hanging_reward: Callable[..., float]) -> None:
    from actors.reward import RewardFunctionError, function_rewards

    t0 = time.monotonic()
    with pytest.raises(RewardFunctionError) as e:
        function_rewards(hanging_reward, "tasks:grade", ["p0", "p1"], ["ok", "hang"], [{}, {"answer": 2}], 0.3, False)
    assert time.monotonic() - t0 < 5
    assert str(e.value) == (
        "reward function tasks:grade timed out on sample 1 (prompt='p1', response='hang'): no result after 0.3 s "
        "(ppo.reward_timeout_s); the call was abandoned"
    )
    # A TimeoutError of the function's own is a failure like any other, not a hang.
    with pytest.raises(RewardFunctionError, match=r"failed on sample 0 .*: TimeoutError: the grading service timed out"):
        function_rewards(hanging_reward, "tasks:grade", ["p0"], ["own timeout"], [{}], 0.3, False)


def test_a_hung_reward_call_is_skipped_and_counted_and_later_calls_go_on(
    hanging_reward: Callable[..., float], capfd: pytest.CaptureFixture[str]
) -> None:
    from actors.reward import function_rewards

    t0 = time.monotonic()
    values, valid = function_rewards(hanging_reward, "tasks:grade", ["p"] * 4, ["ok", "hang", "three", "hang"],
                                     [{}] * 4, 0.3, True)  # fmt: skip
    assert time.monotonic() - t0 < 5  # two timeouts of 0.3 s, not forever
    assert valid.tolist() == [True, False, True, False]  # masked out of the update
    assert values.tolist() == [2.0, 0.0, 5.0, 0.0]
    assert int((~valid).sum()) == 2  # what PPO logs as skipped_samples
    assert capfd.readouterr().err.count("timed out on sample") == 2  # each abandoned call leaves a line in the log


def test_a_reward_function_that_hangs_on_every_call_stops_even_when_errors_are_skipped(
    hanging_reward: Callable[..., float],
) -> None:
    from actors.reward import MAX_TIMEOUTS_IN_A_ROW, RewardFunctionError, function_rewards

    # Timeouts apart are skipped (above); this many in a row stop the run instead of costing
    # timeout_s and an abandoned thread for every one of the step's samples.
    responses = ["hang", "ok", *["hang"] * MAX_TIMEOUTS_IN_A_ROW, "never called"]
    t0 = time.monotonic()
    with pytest.raises(RewardFunctionError, match=rf"timed out on sample {1 + MAX_TIMEOUTS_IN_A_ROW} .*"
                                                  rf"{MAX_TIMEOUTS_IN_A_ROW} calls in a row timed out, so it is stopped"):
        function_rewards(hanging_reward, "tasks:grade", ["p"] * len(responses), responses, [{}] * len(responses), 0.2, True)
    assert time.monotonic() - t0 < 0.2 * (MAX_TIMEOUTS_IN_A_ROW + 1) + 2


def test_reward_timeout_reaches_the_reward_actor(ray_local: None, tmp_path: Path) -> None:
    import ray

    from actors.reward import RewardFunctionError, RewardScorer
    from pipelines.rlhf.config import PpoConfig

    # An importable module:function, as a user's reward is; the actor's workers find it on PYTHONPATH.
    (tmp_path / "hanging_task.py").write_text(
        "import threading\n\n\ndef reward(prompt, response, **fields):\n"
        "    if response == 'hang':\n        threading.Event().wait()\n    return 1.0\n"
    )
    env = {"runtime_env": {"env_vars": {"PYTHONPATH": str(tmp_path)}}}
    p = PpoConfig(prompts="unused.jsonl", reward_function="hanging_task:reward", reward_timeout_s=0.5)
    assert PpoConfig(prompts="unused.jsonl", reward_function="m:f").reward_timeout_s == 60.0
    stopping = RewardScorer.options(**env).remote(p, None)
    skipping = RewardScorer.options(**env).remote(p.model_copy(update={"on_reward_error": "skip"}), None)
    try:
        with pytest.raises(RewardFunctionError, match=r"hanging_task:reward timed out on sample 1 .*after 0\.5 s"):
            try:
                ray.get(stopping.score.remote(["q", "q"], ["a", "hang"], [{}, {}]), timeout=60)
            except ray.exceptions.RayTaskError as e:
                raise e.cause from None
        scores = ray.get(skipping.score.remote(["q", "q"], ["a", "hang"], [{}, {}]), timeout=60)
        assert scores.valid.tolist() == [True, False] and scores.total.tolist() == [1.0, 0.0]
        # The abandoned call does not hold the actor: the next batch is scored at once.
        t0 = time.monotonic()
        assert ray.get(skipping.score.remote(["q"], ["b"], [{}]), timeout=60).total.tolist() == [1.0]
        assert time.monotonic() - t0 < 5
    finally:
        ray.kill(stopping)
        ray.kill(skipping)



def test_a_timeout_too_long_to_wait_for_is_no_limit() -> None:
    """``reward_timeout_s: .inf`` passed the config and made every call fail with OverflowError
    (threading cannot wait that long), blamed on the user's function."""
    from core.calls import call_with_timeout

    assert call_with_timeout(lambda: 7, float("inf")) == 7
    assert call_with_timeout(lambda: 8, 1e10) == 8


def test_metric_lines_and_json_outputs_are_strict_json(tmp_path: Path) -> None:
    """Python wrote a NaN held-out loss and an inf gradient norm as NaN / Infinity: not JSON to jq or
    JavaScript's JSON.parse. They are null now, and every reader here takes null as no value."""
    from core.metrics import MetricsSink, read_metrics
    from core.rundir import atomic_write_json

    MetricsSink(tmp_path, enabled=True).write({"step": 1, "loss": 2.0, "grad_norm": float("inf"),
                                               "val_loss": float("nan"), "prompt_rewards": [[3, float("-inf")]]})  # fmt: skip
    line = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "step": 1, "loss": 2.0, "grad_norm": None, "val_loss": None, "prompt_rewards": [[3, None]]}
    assert read_metrics(tmp_path) == [json.loads(line)]
    atomic_write_json(tmp_path / "s.json", {"p": float("nan"), "ci": (0.1, float("inf"))})
    assert json.loads((tmp_path / "s.json").read_text()) == {"p": None, "ci": [0.1, None]}


def test_a_reward_beyond_float32_is_a_reward_error_named_or_skipped() -> None:
    """Found in review: 1e39 is finite as a Python float, and storing it in the float32 rewards raised
    torch's bare 'value cannot be converted to type float without overflow', which ended the run
    under on_reward_error: skip too and named neither the function nor the sample."""
    from actors.reward import RewardFunctionError, function_rewards

    def huge(prompt: str, response: str) -> float:
        return 1e39 if response == "big" else 1.0

    values, valid = function_rewards(huge, "m:f", ["q", "q"], ["ok", "big"], [{}, {}], 5.0, True)
    assert valid.tolist() == [True, False] and values.tolist() == [1.0, 0.0]
    with pytest.raises(RewardFunctionError, match=r"reward function m:f failed on sample 1 .*beyond float32"):
        function_rewards(huge, "m:f", ["q", "q"], ["ok", "big"], [{}, {}], 5.0, False)


def test_dead_roles_finds_every_actor_that_died_together(ray_local: None) -> None:
    """Found in review: the first dead actor found was the only one replaced, so two actors lost
    together (a node) ended the run with a raw Ray error on the second. Real Ray, trivial actors."""
    import ray

    import pipelines.rlhf.ppo as ppo

    @ray.remote(num_cpus=0)
    class Alive:
        def ping(self) -> int:
            return 1

    handles = {role: Alive.remote() for role in ("rollout", "reference", "learner rank 0", "learner rank 1")}
    ray.get([h.ping.remote() for h in handles.values()])
    fake_actors = SimpleNamespace(roles=lambda: handles)  # the real Actors' roles(): role -> handle
    try:
        assert ppo.dead_roles(fake_actors, ray.exceptions.RayActorError()) == {"an actor"}  # none answers dead
        assert ppo.dead_roles(fake_actors, ValueError("code's own")) == set()
        for role in ("reference", "learner rank 1"):
            ray.kill(handles[role])
            with pytest.raises(ray.exceptions.RayActorError):  # dead by now (kill is asynchronous)
                for _ in range(100):
                    ray.get(handles[role].ping.remote())
                    time.sleep(0.05)
        t0 = time.monotonic()
        assert ppo.dead_roles(fake_actors, ray.exceptions.RayTaskError("f", "tb", ValueError())) == {
            "reference", "learner rank 1"}  # fmt: skip
        assert time.monotonic() - t0 < 10
    finally:
        for h in handles.values():
            ray.kill(h)


def test_two_groups_dead_at_once_or_a_death_during_recovery_restart_every_actor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The recovery loop, driven by fakes named so (no Ray): two groups dead together restart every
    actor from the checkpoint; an actor dying while the recovery starts actors is one more failure
    (it escaped the handler as a raw Ray error), then every actor restarts; the run reaches its end."""
    import ray

    import pipelines.rlhf.ppo as ppo
    from pipelines.rlhf.config import PpoConfig

    p = PpoConfig(prompts="p.jsonl", reward_function="m:f", max_steps=4, checkpoint_every_steps=2, max_failures=3)
    deaths = {3: {"reference", "critic rank 0"}}  # step -> roles that die in it (once)
    starts: list[str | None] = []
    fail_next_start = [False]

    def fake_start(keep: object = None, replace: str | None = None) -> SimpleNamespace:
        starts.append(replace)
        if fail_next_start[0]:
            fail_next_start[0] = False
            raise ray.exceptions.RayActorError()
        return SimpleNamespace(roles=lambda: dict.fromkeys(["rollout", "reference", "critic rank 0"], object()),
                               all=lambda: [], nodes=lambda: {}, ids=lambda: {},
                               learner=SimpleNamespace(get=lambda f: None))  # fmt: skip

    def fake_step(actors: object, prompts: object, p: object, state: ppo.State, pad_id: int) -> dict:
        if (roles := deaths.pop(state.step + 1, None)) is not None:
            monkeypatch.setattr(ppo, "dead_roles", lambda *a: roles)
            raise ray.exceptions.RayActorError()
        state.step += 1
        return {"step": state.step}

    def fake_save(actors: object, state: ppo.State, root: Path, keep: int) -> Path:
        (root / f"step-{state.step:08d}").mkdir(parents=True, exist_ok=True)
        return root

    monkeypatch.setattr(ppo, "ppo_step", fake_step)
    monkeypatch.setattr(ppo, "save_checkpoint", fake_save)
    monkeypatch.setattr(ppo, "restore", lambda actors, ckpt: ppo.State(step=int(ckpt.name.split("-")[1])))
    monkeypatch.setattr(ppo.ray, "kill", lambda actor: None)
    out = ppo._train(fake_start, p, tmp_path, [], [], None, 0, "ppo")
    assert out["recoveries"] == 1 and starts == [None, None]  # every actor, not one group
    events = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    recovery = next(e for e in events if e.get("event") == "recovery")
    assert recovery["role"] == "critic rank 0, reference" and recovery["resumed_step"] == 2

    # One group dead, and the start of its replacement fails: a second failure, every actor restarts.
    (tmp_path / "checkpoints").exists() and shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / METRICS_FILE).unlink()
    deaths[3], starts[:] = {"reference"}, []

    def failing_once(*args: object, **kw: object) -> SimpleNamespace:
        fail_next_start[0] = bool(kw.get("replace"))
        return fake_start(*args, **kw)

    out = ppo._train(failing_once, p, tmp_path, [], [], None, 0, "ppo")
    assert out["recoveries"] == 2 and starts == [None, "reference", None]

    # The code's own error during the recovery (a corrupt checkpoint: no actor is dead) surfaces at
    # once, not retried as deaths up to max_failures.
    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / METRICS_FILE).unlink()
    deaths[3] = {"reference"}

    def corrupt(actors: object, ckpt: Path) -> ppo.State:
        monkeypatch.setattr(ppo, "dead_roles", lambda *a: set())
        raise ray.exceptions.RayTaskError("load", "Traceback ...", ValueError("corrupt checkpoint"))

    monkeypatch.setattr(ppo, "restore", corrupt)
    with pytest.raises(ray.exceptions.RayTaskError):
        ppo._train(fake_start, p, tmp_path, [], [], None, 0, "ppo")
