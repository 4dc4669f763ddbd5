"""Ray's workers import from the driver's working directory first: kiln refuses to start Ray where
that directory has a package named like one of kiln's, instead of running another project's code
in every task."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cluster.runtime import ShadowedPackages, check_worker_imports, shadowing_packages

ROOT = Path(__file__).resolve().parents[1]
KILN = Path(sys.executable).with_name("kiln")


def test_packages_and_modules_shadow_namespace_folders_and_kilns_own_root_do_not(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "serving.py").write_text("")
    (tmp_path / "pipelines").mkdir()  # no __init__.py: a namespace portion, which kiln's package wins over
    (tmp_path / "utils").mkdir()
    (tmp_path / "utils" / "__init__.py").write_text("")
    assert shadowing_packages(tmp_path) == ["core", "serving"]
    assert shadowing_packages(ROOT) == []
    assert shadowing_packages(tmp_path / "utils") == []


def test_the_check_names_the_directory_and_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ShadowedPackages, match=re.escape(f"{tmp_path} has core/ of its own") + ".*Run kiln from another directory"):
        check_worker_imports()
    # A submitted job's driver runs in its shipped working directory, to which Ray adds nothing.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "x"}}))
    check_worker_imports()


_RAY_SCRIPT = textwrap.dedent(
    """
    import json, ray
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")

    @ray.remote
    def where() -> str:
        import core
        return core.__file__

    print("RESULT " + json.dumps(ray.get(where.remote())))
    """
)


def test_rays_workers_do_import_the_drivers_working_directory_first(tmp_path: Path) -> None:
    """Real Ray: the behaviour the check guards against (if Ray stops doing this, the check can go)."""
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    script = tmp_path / "where.py"
    script.write_text(_RAY_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    assert json.loads(lines[0][len("RESULT ") :]) == str(tmp_path / "core" / "__init__.py")


def test_kiln_refuses_before_starting_ray_and_writes_no_output(tmp_path: Path) -> None:
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text(json.dumps({"text": "a document of a few words"}) + "\n")
    config = tmp_path / "kiln.yaml"
    config.write_text(json.dumps({"run": {"name": "t", "root": str(tmp_path / "runs")}, "ray": {"num_cpus": 1},
                                  "data": {"input": {"paths": [str(tmp_path / "corpus")]}}}))  # fmt: skip
    proc = subprocess.run([str(KILN), "data", str(config)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"kiln data: error: {tmp_path} has core/ of its own" in proc.stderr
    assert not (tmp_path / "runs" / "t" / "data").exists()
