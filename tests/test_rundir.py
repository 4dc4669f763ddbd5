"""Atomic outputs and finished-stage markers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from core.rundir import (
    StageConfigChanged,
    atomic_dir,
    finished_stage,
    input_stamps,
    inputs_changed,
    mark_finished,
    prepare_stage,
    stamp,
    unmark,
)


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


def test_atomic_dir_flushes_every_file_before_the_rename_that_commits_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut after the commit rename must not find a whole-looking output with empty files:
    every file and folder of the new output is fsynced before it is renamed, its parent after."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        (d / "sub").mkdir()
        (d / "sub" / "shard.parquet").write_bytes(b"x" * 10)
        (d / "stage.json").write_text("{}")
        tmp = str(d)
    commit = next(i for i, (kind, path) in enumerate(events) if kind == "replace" and ".out.new-" in path)
    flushed = {path for kind, path in events[:commit] if kind == "fsync"}
    assert {f"{tmp}/sub/shard.parquet", f"{tmp}/stage.json", f"{tmp}/sub", tmp} <= flushed
    assert ("fsync", str(tmp_path)) in events[commit:]  # the renames themselves made durable


def test_finished_stage_skips_same_config_and_refuses_changed(tmp_path: Path) -> None:
    assert finished_stage(tmp_path, "abc") is None
    mark_finished(tmp_path, "data", "abc", {"kept": 3})
    assert finished_stage(tmp_path, "abc")["summary"] == {"kept": 3}
    with pytest.raises(StageConfigChanged, match="--force"):
        finished_stage(tmp_path, "other")
    unmark(tmp_path)
    assert finished_stage(tmp_path, "other") is None


def _bump(path: Path) -> None:
    """Change ``path``'s content (a retrained model's weights, an edited data file)."""
    path.write_text(path.read_text() + " ")


def test_a_stage_is_redone_when_an_input_was_written_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``kiln sft --force`` rewrites sft/model: the reward model trained from the old one must not be
    skipped as finished. Its checkpoints and outputs go; an unchanged input keeps it finished."""
    model, data = tmp_path / "sft" / "model", tmp_path / "pairs.jsonl"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_text("weights")
    data.write_text("{}\n")
    stage_dir = tmp_path / "reward_model"
    assert prepare_stage(stage_dir, "reward_model", "d1", False, [model, data]) is None
    (stage_dir / "ray").mkdir()
    mark_finished(stage_dir, "reward_model", "d1", {"val_accuracy": 0.9})
    assert prepare_stage(stage_dir, "reward_model", "d1", False, [model, data]) == {"val_accuracy": 0.9}

    _bump(model / "model.safetensors")  # the SFT stage redone
    assert prepare_stage(stage_dir, "reward_model", "d1", False, [model, data]) is None
    assert f"{model} changed since this stage read it" in capsys.readouterr().out
    assert not (stage_dir / "ray").exists() and finished_stage(stage_dir, "d1") is None
    mark_finished(stage_dir, "reward_model", "d1", {"val_accuracy": 0.8})
    assert prepare_stage(stage_dir, "reward_model", "d1", False, [model, data]) == {"val_accuracy": 0.8}

    _bump(data)  # a data file changed: redone too
    assert prepare_stage(stage_dir, "reward_model", "d1", False, [model, data]) is None


@pytest.mark.parametrize("uri", [False, True])
def test_a_redone_stage_forgets_its_checkpoints_under_run_storage_path(tmp_path: Path, uri: bool) -> None:
    """With ``run.storage_path`` set, Ray Train keeps a stage's checkpoints there, and a run of the
    same name resumes from them: ``--force`` (or a changed input) must delete them too, or the redone
    stage would resume (or, finished, export the old model again). A plain resume keeps them."""
    data = tmp_path / "sft.jsonl"
    data.write_text("{}\n")
    remote = tmp_path / "storage" / "run" / "sft"
    storage = f"file://{remote}" if uri else str(remote)
    stage_dir = tmp_path / "sft"

    def checkpoint() -> Path:
        (remote / "train" / "step-00000004").mkdir(parents=True, exist_ok=True)
        return remote / "train" / "step-00000004"

    assert prepare_stage(stage_dir, "sft", "d1", False, [data], storage) is None
    checkpoint()
    assert prepare_stage(stage_dir, "sft", "d1", False, [data], storage) is None  # a resume: kept
    assert checkpoint().is_dir()
    (stage_dir / "eval.json").write_text("{}")  # an RL stage's held-out results, of the model being redone
    assert prepare_stage(stage_dir, "sft", "d1", True, [data], storage) is None  # --force: gone
    assert not remote.exists() and not (stage_dir / "eval.json").exists()
    checkpoint()
    _bump(data)  # an input changed: redone as if forced
    assert prepare_stage(stage_dir, "sft", "d1", False, [data], storage) is None
    assert not remote.exists()



def test_a_reset_that_fails_part_way_cannot_be_resumed_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--force`` removed started.json before the stage's storage: an object store's error between
    the two left config A's checkpoints with no check, and the next run under config B resumed them."""
    import core.rundir as rundir

    remote = tmp_path / "storage" / "sft"
    stage_dir = tmp_path / "sft"
    assert prepare_stage(stage_dir, "sft", "A", False, storage=str(remote)) is None
    (remote / "checkpoint_000009").mkdir(parents=True)

    def failing(uri: str) -> None:
        raise OSError("the object store said no")

    monkeypatch.setattr(rundir, "remove", failing)
    with pytest.raises(OSError):
        prepare_stage(stage_dir, "sft", "B", True, storage=str(remote))
    assert (remote / "checkpoint_000009").is_dir()  # still there, so no run may start on it
    with pytest.raises(StageConfigChanged, match=r"a reset \(--force\) of it did not finish; rerun with --force"):
        prepare_stage(stage_dir, "sft", "B", False, storage=str(remote))
    monkeypatch.undo()
    assert prepare_stage(stage_dir, "sft", "B", True, storage=str(remote)) is None
    assert not remote.exists()
    assert prepare_stage(stage_dir, "sft", "B", False, storage=str(remote)) is None  # and it resumes as B

def test_the_same_bytes_written_again_leave_a_finished_stage_finished(tmp_path: Path) -> None:
    """``kiln run`` regenerates the quickstart corpus every time (same seed, same bytes, new mtime):
    the SFT stage that read it stays finished. Only a content change counts."""
    data = tmp_path / "corpus" / "sft.jsonl"
    data.parent.mkdir()
    data.write_text('{"prompt": "1 + 1", "response": "2"}\n')
    stage_dir = tmp_path / "sft"
    prepare_stage(stage_dir, "sft", "d1", False, [data, data.parent])
    mark_finished(stage_dir, "sft", "d1", {"steps": 3})
    text = data.read_text()
    data.unlink()
    data.write_text(text)
    os.utime(data, ns=(1, 10**18))  # a much later mtime
    assert prepare_stage(stage_dir, "sft", "d1", False, [data, data.parent]) == {"steps": 3}


def test_a_large_input_is_stamped_by_size_and_mtime_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder of many files, each under the content limit but over it together (a corpus's
    shards), is not read at every stage start: its files' sizes and mtimes stand for it."""
    from core import rundir

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"train-{i}.parquet").write_bytes(bytes(40))
    monkeypatch.setattr(rundir, "_CONTENT_STAMP_BYTES", 100)  # 120 bytes in all: over it
    before = stamp(shards)
    monkeypatch.setattr(Path, "open", lambda *a, **k: pytest.fail("a large input's content was read"))
    assert stamp(shards) == before
    os.utime(shards / "train-1.parquet", ns=(1, 10**18))  # the same bytes, written again
    assert stamp(shards) != before


def test_a_deleted_input_leaves_a_finished_stage_finished(tmp_path: Path) -> None:
    """Deleting a finished stage's inputs (big data shards, say) proves nothing about them: skip."""
    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    (shards / "train-00000.parquet").write_text("rows")
    stage_dir = tmp_path / "pretrain"
    prepare_stage(stage_dir, "pretrain", "d1", False, [shards, "s3://bucket/shards"])
    mark_finished(stage_dir, "pretrain", "d1", {"steps": 10})
    shutil.rmtree(tmp_path / "data")
    assert not inputs_changed(stage_dir, "pretrain", input_stamps([shards, "s3://bucket/shards"]))
    assert prepare_stage(stage_dir, "pretrain", "d1", False, [shards]) == {"steps": 10}
    assert stamp(shards) == ""


def test_a_moved_run_directory_still_knows_its_upstream_stages(tmp_path: Path) -> None:
    """Stages name their upstream models by absolute path; a run directory moved or copied
    elsewhere (another clone, a renamed folder) must still redo a stage whose input was retrained."""
    run = tmp_path / "here" / "runs" / "q"
    model = run / "reward_model" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    prepare_stage(run / "rlhf", "rlhf", "d1", False, [model.resolve()])
    mark_finished(run / "rlhf", "rlhf", "d1", {"steps": 30})
    moved = tmp_path / "there" / "runs" / "q"
    shutil.copytree(run, moved)
    stamps = input_stamps([(moved / "reward_model" / "model").resolve()])
    assert not inputs_changed(moved / "rlhf", "rlhf", stamps)
    _bump(moved / "reward_model" / "model" / "config.json")
    assert inputs_changed(moved / "rlhf", "rlhf", input_stamps([(moved / "reward_model" / "model").resolve()]))


def test_a_record_keyed_by_the_path_as_given_is_still_read(tmp_path: Path) -> None:
    model = tmp_path / "sft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    stage_dir = tmp_path / "ppo"
    stage_dir.mkdir()
    (stage_dir / "inputs.json").write_text(json.dumps(input_stamps([model])))  # the old record
    assert not inputs_changed(stage_dir, "ppo", input_stamps([model]))
    _bump(model / "config.json")
    assert inputs_changed(stage_dir, "ppo", input_stamps([model]))


def test_an_interrupted_stage_resumes_only_from_the_same_inputs(tmp_path: Path) -> None:
    """Checkpoints taken from the old SFT model are not resumed under a new one."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    stage_dir = tmp_path / "ppo"
    prepare_stage(stage_dir, "ppo", "d1", False, [model])
    (stage_dir / "checkpoints" / "step-3").mkdir(parents=True)
    assert prepare_stage(stage_dir, "ppo", "d1", False, [model]) is None  # resumes: checkpoints kept
    assert (stage_dir / "checkpoints" / "step-3").is_dir()
    _bump(model / "config.json")
    assert prepare_stage(stage_dir, "ppo", "d1", False, [model]) is None
    assert not (stage_dir / "checkpoints").exists()


def test_sft_redoes_itself_when_the_pretrained_model_was_retrained(tiny_llama_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The real ``sft.run`` up to training: finished from this model, it is skipped; once the model
    is written again (``kiln pretrain --force``), it gets as far as training. ``fit`` is replaced
    by a fake that only records the call (training itself is tested in test_train_e2e.py)."""
    from pipelines.config import parse_config
    from pipelines.train import sft

    model = tmp_path / "pretrain-model"
    shutil.copytree(tiny_llama_dir, model)
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "What is 1 + 2?", "response": "3"}\n' * 8)
    cfg = parse_config({"run": {"name": "r", "root": str(tmp_path / "runs")},
                        "sft": {"data": str(data), "init_from": str(model), "seq_len": 32, "validation_fraction": 0.25}})  # fmt: skip
    stage_dir = cfg.run.dir / "sft"
    _, _, digest = cfg.stage_section("sft")
    prepare_stage(stage_dir, "sft", digest, False, [model.resolve(), data])  # as sft.run records them
    mark_finished(stage_dir, "sft", digest, {"final_loss": 1.0})

    class Trained(Exception):
        pass

    def fake_fit(job: object, ray_cfg: object) -> None:
        raise Trained(job)

    monkeypatch.setattr(sft, "fit", fake_fit)
    assert sft.run(cfg) == {"final_loss": 1.0}
    _bump(model / "config.json")
    with pytest.raises(Trained):
        sft.run(cfg)



def test_a_refused_stage_leaves_the_runs_saved_config_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``kiln data b.yaml`` on a run whose data stage finished under a.yaml refuses (use --force);
    it had already replaced the run's config.yaml with b.yaml's, so the record no longer matched
    what its finished stages were made with."""
    import yaml

    from pipelines.cli import main

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "x"}\n')
    config = {"run": {"name": "r", "root": str(tmp_path / "runs")}, "data": {"input": {"paths": [str(corpus)]}}}
    run_dir = tmp_path / "runs" / "r"
    mark_finished(run_dir / "data", "data", "a-digest", {"kept": 1})
    (run_dir / "config.yaml").write_text("the config the data stage finished with\n")
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["data", str(path)]) == 1
    err = capsys.readouterr().err
    assert "kiln data: error:" in err and "--force" in err, err  # refused, naming the way out
    assert (run_dir / "config.yaml").read_text() == "the config the data stage finished with\n"

@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe{}", b"[" * 100_000])
def test_an_unreadable_stage_record_names_itself_and_the_way_out(tmp_path: Path, content: bytes) -> None:
    """A hand-edited or foreign stage.json / started.json gave a bare JSON error (no path) or an
    AttributeError traceback."""
    stage_dir = tmp_path / "sft"
    stage_dir.mkdir()
    for name in ("stage.json", "started.json"):
        (stage_dir / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{stage_dir / name}: unreadable stage record .*rerun with --force"):
            prepare_stage(stage_dir, "sft", "d1", False)
        (stage_dir / name).unlink()
    (stage_dir / "stage.json").write_bytes(content)
    (stage_dir / "started.json").write_bytes(content)
    assert prepare_stage(stage_dir, "sft", "d1", True) is None  # --force starts over
    assert prepare_stage(stage_dir, "sft", "d1", False) is None


def test_a_real_logs_folder_is_kept_and_hides_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """``<run>/logs/ray`` as a real folder (a run copied with its logs): unlinking it raised
    IsADirectoryError inside the failed stage's error handler, hiding the stage's own error."""
    import pipelines.cli as cli
    from pipelines.config import parse_config

    session = tmp_path / "session" / "logs"
    session.mkdir(parents=True)
    monkeypatch.setattr(cli, "ray_log_dir", lambda: str(session))
    cfg = parse_config({"run": {"name": "r", "root": str(tmp_path / "runs")}})
    (tmp_path / "runs" / "r" / "logs" / "ray").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "logs" / "ray" / "worker.out").write_text("kept")
    cli._link_ray_logs(cfg)
    assert (tmp_path / "runs" / "r" / "logs" / "ray" / "worker.out").read_text() == "kept"
    assert f"in {session} (" in capsys.readouterr().err
    (tmp_path / "runs" / "r" / "logs" / "ray" / "worker.out").unlink()
    (tmp_path / "runs" / "r" / "logs" / "ray").rmdir()
    cli._link_ray_logs(cfg)  # and the usual case: a link to the session's logs
    assert (tmp_path / "runs" / "r" / "logs" / "ray").resolve() == session.resolve()


def test_stage_record_names_the_machine_and_library_versions(tmp_path: Path) -> None:
    """Found on 2026-12-07: the same code gave another SFT model on another CPU draw (AVX2 only), and
    nothing recorded what the earlier runs had run on. stage.json now does."""
    from importlib import metadata

    from core.environment import cpu_info

    mark_finished(tmp_path, "sft", "d", {})
    env = json.loads((tmp_path / "stage.json").read_text())["environment"]
    assert env["packages"]["torch"] == metadata.version("torch") and env["packages"]["ray"] == metadata.version("ray")
    assert env["cpu"]["count"] == os.cpu_count()
    sample = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
              "flags\t\t: fpu sse2 avx avx2 fma avx512f\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: sse2\n")  # fmt: skip
    assert cpu_info(sample) == {"model": "AMD EPYC", "family": "25", "model_number": "1", "isa": ["avx2", "fma", "avx512f"]}
