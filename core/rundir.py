"""The run directory and its rules: atomic outputs, and finished stages that stay finished.

Layout (DESIGN.md): ``<root>/<name>/`` holds ``config.yaml`` and one folder per stage
(``data/``, ``tokenizer/``, ``pretrain/``, ...). A stage is finished when its folder holds
``stage.json``, written last and atomically; rerunning a finished stage is a no-op unless forced.

An atomic output is built under a temporary name beside its final one: ``.<name>.tmp-<tag>``
while it is written, ``.<name>.new-<tag>`` once it is whole, ``.<name>.old-<tag>`` for the output
it replaces until the new one is in place. Whatever a crash leaves, :func:`recover_interrupted`
finds a whole output again: nothing is lost between the renames.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from core.environment import environment
from core.jsonl import json_safe, parse_json
from core.locations import remove

STAGE_MARKER = "stage.json"


class StageConfigChanged(RuntimeError):
    """A finished stage's recorded config differs from the current one."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new name inside ``path`` durable (POSIX; a no-op where directories
    cannot be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is as durable as they allow
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk, so that a power cut after the rename
    that commits it cannot leave a whole-looking output with empty or missing files."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


# A temporary of an atomic output: ".<final name>.<tmp|new|old>-<8 hex digits>".
_TEMPORARY = re.compile(r"^\.(?P<final>.+)\.(?P<kind>tmp|new|old)-[0-9a-f]{8}$")


def _temporary(final: Path, kind: str, tag: str) -> Path:
    return final.with_name(f".{final.name}.{kind}-{tag}")


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory under a temporary name; put it in place as ``final`` only on success.

    An existing ``final`` is replaced. On an exception the partial directory is removed and
    ``final`` is left as it was. A crash (a kill, a power cut) at any point leaves ``final`` whole
    or lets :func:`recover_interrupted` make it whole again: the finished directory is first
    renamed ``.new-`` (the mark that it is complete), the old one is moved aside and removed only
    once the new one is in place. An earlier attempt's leftovers are recovered first.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    tag = uuid.uuid4().hex[:8]
    tmp = _temporary(final, "tmp", tag)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_tree(tmp)
    new = _temporary(final, "new", tag)
    os.replace(tmp, new)  # the commit point: from here on a crash rolls forward to the new output
    _fsync_dir(final.parent)
    _install(new, final, tag)
    _fsync_dir(final.parent)


def _install(new: Path, final: Path, tag: str) -> None:
    """Put the whole directory ``new`` in place as ``final``; the old ``final`` goes last."""
    old = _temporary(final, "old", tag)
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _recover(final: Path, temporaries: list[Path] | None = None) -> None:
    """Finish or undo an atomic output of ``final`` that a crash interrupted.

    A whole new output (``.new-``) is put in place: the crash came after it was complete.
    Otherwise a missing ``final`` gets the output that was moved aside (``.old-``) back. Partial
    outputs (``.tmp-``, also :func:`atomic_write_bytes`'s files) and the rest are removed.
    """
    if temporaries is None:
        temporaries = [c for c in final.parent.iterdir() if (m := _TEMPORARY.match(c.name)) and m["final"] == final.name]
    kinds = {path: _TEMPORARY.match(path.name)["kind"] for path in temporaries}
    new = [path for path, kind in kinds.items() if kind == "new"]
    old = [path for path, kind in kinds.items() if kind == "old"]
    kept = None
    if new:
        kept = max(new, key=lambda path: path.stat().st_mtime)
        _install(kept, final, uuid.uuid4().hex[:8])
    elif old and not final.exists():
        kept = max(old, key=lambda path: path.stat().st_mtime)
        os.replace(kept, final)
    for path in temporaries:
        if path != kept:
            _remove(path)


def recover_interrupted(folder: Path) -> None:
    """Recover every atomic output in ``folder`` that a crashed earlier attempt left half-replaced
    (see :func:`atomic_dir`); call it where a stage starts, before it looks at its outputs."""
    if not folder.is_dir():
        return
    leftovers: dict[str, list[Path]] = {}
    for child in folder.iterdir():
        if m := _TEMPORARY.match(child.name):
            leftovers.setdefault(m["final"], []).append(child)
    for name, temporaries in leftovers.items():
        _recover(folder / name, temporaries)


INPUTS = "inputs.json"  # what a stage read, input key (run_key) -> stamp, written as it starts


# An input of up to this many bytes in all is stamped by its content (a deterministic step that
# rewrites the same bytes, like `kiln generate` on every `kiln run`, changes nothing); a larger one
# (a real model, a corpus's shards) by each file's size and mtime, so no stage start reads gigabytes.
_CONTENT_STAMP_BYTES = 64 << 20


def _file_stamp(f: Path, by_content: bool) -> str:
    if not by_content:
        st = f.stat()
        return f"{st.st_size}-{st.st_mtime_ns}"
    digest = hashlib.sha256()
    with f.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def stamp(path: Path) -> str:
    """What a stage read at ``path``: its content, or for an input above 64 MiB in all the size
    and modification time of each file (the file ``path``, or every file under the folder
    ``path``); "" when nothing is there. A retrained model or a changed data file changes it; the
    same bytes of a small input written again do not."""
    if path.is_file():
        return _file_stamp(path, path.stat().st_size <= _CONTENT_STAMP_BYTES)
    if not path.is_dir():
        return ""
    return _named_stamp([(f.relative_to(path).as_posix(), f) for f in path.rglob("*") if f.is_file()])


def files_stamp(run_dir: Path, files: Iterable[Path]) -> str:
    """``stamp`` of a set of files (a corpus as listed): by content up to 64 MiB in all, else each
    file's size and modification time; each file named by ``run_key`` (so a moved run keeps it)."""
    return _named_stamp([(run_key(run_dir, str(f)), f) for f in files])


def _named_stamp(named: list[tuple[str, Path]]) -> str:
    """One stamp of files under their names (sorted): each by content when all of them together
    are at most 64 MiB, else by size and mtime; "" for none."""
    if not named:
        return ""
    named = sorted(named, key=lambda item: item[0])
    by_content = sum(f.stat().st_size for _, f in named) <= _CONTENT_STAMP_BYTES
    listing = [(name, _file_stamp(f, by_content)) for name, f in named]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def input_stamps(inputs: Iterable[Path | str]) -> dict[str, str]:
    """Each input's ``stamp``, by its path as given: computed once per stage start, then compared
    (``inputs_changed``) and recorded (``record_inputs``)."""
    return {str(p): stamp(Path(p)) for p in inputs}


def run_key(run_dir: Path, path: str) -> str:
    """A path as a stage records it: inside the run directory by its place there (``<run>/sft/model``),
    so that a run directory moved or copied elsewhere still knows its own upstream stages (stages
    name them by absolute path; a copy must keep mtimes, which ``stamp`` reads above 64 MiB); any
    other path, object-store URIs included, as given."""
    if "://" in path:
        return path
    try:
        inside = Path(path).resolve().relative_to(run_dir.resolve())
    except ValueError:
        return path
    return f"<run>/{inside.as_posix()}"


def inputs_changed(stage_dir: Path, stage: str, stamps: dict[str, str]) -> bool:
    """Whether an input the stage read when it last started (an upstream stage's model folder, a data
    file) changed since, e.g. by ``kiln sft --force``; says which. ``stamps``: ``input_stamps`` now.
    An input that is gone now (deleted to save space) or an object-store URI is no evidence either way."""
    recorded = json.loads((stage_dir / INPUTS).read_text()) if (stage_dir / INPUTS).exists() else {}
    for path, now in stamps.items():
        # A record written before inputs were keyed by their place in the run holds the path as given.
        then = recorded.get(run_key(stage_dir.parent, path), recorded.get(path))
        if then is not None and now and now != then:
            print(f"kiln {stage}: {path} changed since this stage read it (an upstream stage redone, or a data "
                  "file edited); redoing the stage", flush=True)  # fmt: skip
            return True
    return False


def record_inputs(stage_dir: Path, stamps: dict[str, str]) -> None:
    """Remember the ``input_stamps`` of what the stage is about to read (``inputs_changed`` compares them)."""
    atomic_write_json(stage_dir / INPUTS, {run_key(stage_dir.parent, path): s for path, s in stamps.items()})


def finished_stage(stage_dir: Path, digest: str) -> dict[str, Any] | None:
    """The stage's marker if it finished with this config digest, else None.

    Raises:
        StageConfigChanged: it finished with a different config (rerun with --force).
    """
    marker = stage_dir / STAGE_MARKER
    if not marker.exists():
        return None
    info = _read_record(marker)
    if info.get("config_digest") != digest:
        raise StageConfigChanged(
            f"{stage_dir} finished with a different config (digest {info.get('config_digest')}, "
            f"now {digest}); rerun with --force to redo it"
        )
    return info


def _read_record(path: Path) -> dict[str, Any]:
    """A stage's own JSON record (``stage.json``, ``started.json``), or a ValueError naming it."""
    info, why = parse_json(path.read_bytes())
    if why:
        raise ValueError(f"{path}: unreadable stage record ({why}); rerun with --force to redo the stage")
    if not isinstance(info, dict):
        raise ValueError(f"{path}: unreadable stage record (a JSON {type(info).__name__}, not an object); "
                         "rerun with --force to redo the stage")  # fmt: skip
    return info


def mark_finished(stage_dir: Path, stage: str, digest: str, summary: dict[str, Any]) -> None:
    """Record that ``stage`` finished: written last, atomically, with the machine and library
    versions it ran on (``core.environment``)."""
    atomic_write_json(
        stage_dir / STAGE_MARKER,
        {"stage": stage, "config_digest": digest, "finished_at": time.time(), "summary": summary,
         "environment": environment()},
    )


def unmark(stage_dir: Path) -> None:
    """Forget that a stage finished (``--force``), before any of its outputs are rewritten."""
    (stage_dir / STAGE_MARKER).unlink(missing_ok=True)


def finished_summary(stage_dir: Path, stage: str, digest: str, force: bool) -> dict[str, Any] | None:
    """The summary of a stage already finished with this config (skip it), or None (run it).

    ``force`` forgets the finished marker first.

    Raises:
        StageConfigChanged: finished under another config (use --force).
    """
    if force:
        unmark(stage_dir)
        return None
    if (done := finished_stage(stage_dir, digest)) is not None:
        print(f"kiln {stage}: {stage_dir} is finished; skipping (use --force to redo)")
        return done["summary"]
    return None


# started.json's digest while --force clears a stage (see prepare_stage).
_RESETTING = "reset in progress"


def prepare_stage(stage_dir: Path, stage: str, digest: str, force: bool,
                  inputs: Iterable[Path | str] = (), storage: str | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The start of every stage that checkpoints (training, PPO): the finished marker's summary (skip), or None (train).

    ``force`` forgets the stage's marker, checkpoints and metrics, also those in ``storage`` (the
    stage's folder under ``run.storage_path``, a path or URI, where Ray Train keeps its checkpoints
    then: left there, the redone stage would resume from them). An unfinished stage keeps its
    checkpoints (the run resumes from them) as long as its config is the one it started with.

    A stage whose ``inputs`` changed since it read them (``inputs_changed``) is redone as if
    forced: what it holds was derived from inputs that are gone.

    Raises:
        StageConfigChanged: finished, or checkpointed, under another config (use --force).
    """
    stamps = input_stamps(inputs)
    force = force or inputs_changed(stage_dir, stage, stamps)
    if (done := finished_summary(stage_dir, stage, digest, force)) is not None:
        return done
    started = stage_dir / "started.json"
    if force:
        # Marked first, cleared last: a reset that fails part-way (an object store's error) leaves
        # the mark, so the next run cannot resume from the checkpoints it did not get to delete.
        if stage_dir.exists():
            atomic_write_json(started, {"config_digest": _RESETTING})
        for name in ("ray", "checkpoints", "tensorboard", "model", "dataset"):  # "checkpoints": PPO's
            shutil.rmtree(stage_dir / name, ignore_errors=True)
        if storage is not None:
            remove(storage)
        for name in ("metrics.jsonl", "eval.json", INPUTS, "started.json"):  # "eval.json": the RL stages'
            (stage_dir / name).unlink(missing_ok=True)
    if started.exists() and (was := _read_record(started).get("config_digest")) != digest:
        if was == _RESETTING:
            raise StageConfigChanged(f"{stage_dir}: a reset (--force) of it did not finish; rerun with --force")
        raise StageConfigChanged(f"{stage_dir} has checkpoints from another config; rerun with --force to start over")
    atomic_write_json(started, {"config_digest": digest})
    record_inputs(stage_dir, stamps)
    return None
