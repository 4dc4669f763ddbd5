"""``python -m pipelines.data.kernels`` (run by scripts/setup.sh) compiles every numba kernel a data
stage calls, for the argument types the stage gives it: a real ``kiln data`` afterwards, on real
Ray, compiles none (numba's own cache log, in the workers' output, says so)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cluster_helpers import ROOT, client_env, kiln_cli, tiny_config


@pytest.mark.slow  # ~26 s: 10 s of compiling, then a Ray cluster and a data stage
def test_setup_compiles_every_kernel_the_data_stage_calls(tmp_path: Path) -> None:
    # An empty cache of its own (numba keys it on the source path): what a fresh clone has.
    env = client_env(NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    warm = subprocess.run([sys.executable, "-m", "pipelines.data.kernels"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert warm.returncode == 0 and "kernels compiled for this CPU" in warm.stdout, warm.stdout + warm.stderr

    config = tiny_config(tmp_path, "kernels")
    config["data"]["dedup"]["verify_candidates"] = True  # the exact-Jaccard kernel too
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env["NUMBA_DEBUG_CACHE"] = "1"  # every cache load and save, printed by the process doing it
    done = kiln_cli(["run", str(path)], env, timeout=600)  # generate, then data
    assert done.returncode == 0 and "kiln data: summary" in done.stdout, done.stdout + done.stderr

    logs = tmp_path / "runs" / "kernels" / "logs" / "ray"
    output = "".join(f.read_text(errors="replace") for f in sorted(logs.glob("worker-*.out")))
    assert "[cache] data loaded from" in output, "no numba cache log in the workers' output"
    saved = [line for line in output.splitlines() if "[cache] data saved to" in line]
    assert not saved, "kernels the data stage compiled although the set-up step ran:\n" + "\n".join(saved)
