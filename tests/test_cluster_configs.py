"""cluster/: the launcher YAML, the KubeRay manifests and the Dockerfile agree with kiln itself.

Nothing here starts a cloud machine or a Kubernetes cluster; what can be checked offline is: the
files parse; the launcher YAML passes Ray's own schema; the KubeRay objects use only fields
KubeRay defines; and every name one file takes from another (image, Ray version, working
directory, volume, Secret, config, CLI subcommand, Serve import path and its arguments, GPU
resources) is the one the other file, the CLI or the config tree actually has.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from importlib.metadata import distribution, metadata, requires
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from pipelines.cli import build_parser
from pipelines.config import KilnConfig, load_config
from serving.config import ServeConfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
# The project's metadata as pyproject.toml declares it (read from the installed distribution).
METADATA = metadata("kiln")
VERSION = METADATA["Version"]
EXTRAS = set(METADATA.get_all("Provides-Extra") or [])
RAY_VERSION = next(r.split("==")[1] for r in requires("kiln") or [] if r.startswith("ray[") and "==" in r)
# The project's Python packages ([tool.setuptools] packages: what the image must contain).
PACKAGES = (distribution("kiln").read_text("top_level.txt") or "").split()
GPU = "nvidia.com/gpu"

# EC2 instance types the launcher YAML may use: (vCPUs, NVIDIA GPUs), from AWS's instance pages.
EC2 = {"m5.xlarge": (4, 0), "m5.2xlarge": (8, 0), "m5.4xlarge": (16, 0), "g5.xlarge": (4, 1),
       "g5.2xlarge": (8, 1), "g5.12xlarge": (48, 4), "g6.2xlarge": (8, 1), "p4d.24xlarge": (96, 8)}  # fmt: skip

# Fields KubeRay's v1 API defines (ray-operator/apis/ray/v1/*_types.go); a typo such as
# `rayStartParam` is otherwise silently dropped by the API server.
CLUSTER_SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
                "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy",
                "tlsOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs"}  # fmt: skip
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType", "resources", "labels", "suspend"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "rayStartParams", "template",
                "scaleStrategy", "numOfHosts", "suspend", "resources", "labels"}  # fmt: skip
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
JOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
            "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
            "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
            "ttlSecondsAfterFinished", "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend"}  # fmt: skip
SERVICE_SPEC = {"rayClusterDeletionDelaySeconds", "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
                "serveService", "upgradeStrategy", "managedBy", "serveConfigV2", "rayClusterConfig",
                "excludeHeadPodFromServeSvc", "suspend"}  # fmt: skip
RESOURCES = {"requests", "limits", "claims"}


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a YAML mapping"
    return data


def _manifests() -> dict[str, dict[str, Any]]:
    """kind -> object, for every file in cluster/kuberay/ (one object per file)."""
    docs = [_load(p) for p in sorted(KUBERAY.glob("*.yaml"))]
    kinds = [d["kind"] for d in docs]
    assert len(set(kinds)) == len(kinds), f"one object of each kind expected, got {kinds}"
    return {d["kind"]: d for d in docs}


def _cluster_specs(m: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {"RayCluster": m["RayCluster"]["spec"], "RayService": m["RayService"]["spec"]["rayClusterConfig"]}


def _groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


def _containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for g in _groups(spec) for c in g["template"]["spec"]["containers"]]


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def _dockerfile() -> tuple[str, str, list[str]]:
    """(FROM image, WORKDIR, RUN commands) of cluster/Dockerfile."""
    lines = [line.strip() for line in (CLUSTER / "Dockerfile").read_text().splitlines() if line.strip() and not line.startswith("#")]
    first = {line.split()[0]: line.split(None, 1)[1] for line in reversed(lines)}
    return first["FROM"], first["WORKDIR"], [line.split(None, 1)[1] for line in lines if line.startswith("RUN ")]


def _extra_installed(command: str) -> str:
    """The extra of an editable install of the project in a shell command (``pip install -e ".[gpu]"``)."""
    match = re.search(r"pip install[^&;]*-e\s+[\"']?\.\[(\w+)\][\"']?", command)
    assert match, f"no `pip install -e .[extra]` in {command!r}"
    return match.group(1)


# --- the AWS cluster-launcher YAML ---------------------------------------------------------------


def test_launcher_yaml_passes_rays_own_schema() -> None:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_load(CLUSTER / "aws.yaml"), schema)


def test_launcher_node_types_are_a_cpu_head_and_gpu_workers_matching_their_instances() -> None:
    cfg = _load(CLUSTER / "aws.yaml")
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    for name, node in types.items():
        instance = node["node_config"]["InstanceType"]
        assert instance in EC2, f"{name}: unknown instance type {instance}"
        cpus, gpus = EC2[instance]
        assert node["resources"].get("CPU", cpus) == cpus and node["resources"].get("GPU", gpus) == gpus, (
            f"{name}: resources {node['resources']} disagree with {instance} ({cpus} vCPUs, {gpus} GPUs)"
        )
    assert EC2[types[cfg["head_node_type"]]["node_config"]["InstanceType"]][1] == 0, "the head is a CPU node"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    assert workers and all(EC2[t["node_config"]["InstanceType"]][1] >= 1 for t in workers.values()), "GPU workers"
    assert sum(t["max_workers"] for t in workers.values()) >= cfg["max_workers"] >= sum(t.get("min_workers", 0) for t in workers.values())


def test_launcher_runs_the_projects_ray_and_python_and_installs_kiln() -> None:
    cfg = _load(CLUSTER / "aws.yaml")
    docker = cfg["docker"]
    images = {"head": docker["head_image"], "workers": docker["image"]}
    images |= {n: t["docker"]["worker_image"] for n, t in cfg["available_node_types"].items() if "worker_image" in t.get("docker", {})}
    for role, image in images.items():
        assert re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3(\d+)(-gpu)?", image), f"{role}: {image}"
        assert image.endswith("-gpu") == (role != "head"), f"{role}: {image} (GPU image on GPU nodes only)"
    # The source tree is synced from the repository root to where setup_commands install it from.
    (remote, local), *_ = [(r, lo) for r, lo in cfg["file_mounts"].items() if (ROOT / lo).resolve() == ROOT]
    install = next(c for c in cfg["setup_commands"] if "pip install" in c)
    assert install.startswith(f"cd {remote} &&"), install
    assert _extra_installed(install) in EXTRAS
    for local_only in (".venv", "runs", ".git"):
        assert local_only in cfg["rsync_exclude"], f"{local_only} would be copied to every node"
    from cluster.submit import SECRET_EXCLUDES

    # What kiln submit never uploads, the launcher never copies (but the token's own file mount).
    missing = [p for p in SECRET_EXCLUDES if p not in cfg["rsync_exclude"] and p != "*auth_token*"]
    assert missing == [], f"{missing} would be copied to every node"


def test_launcher_starts_ray_with_token_auth_on_every_node() -> None:
    cfg = _load(CLUSTER / "aws.yaml")
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "the token must reach every node"
    head = next(c for c in cfg["head_start_ray_commands"] if "ray start" in c)
    worker = next(c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    assert "RAY_AUTH_MODE=token ray start --head" in head and "RAY_AUTH_MODE=token ray start --address" in worker
    port = re.search(r"--port=(\d+)", head).group(1)  # type: ignore[union-attr]
    assert f"--address=$RAY_HEAD_IP:{port}" in worker
    # The accelerator follows the config, not the node: a per-node value would reach GPU workers.
    commands = [*cfg["setup_commands"], *cfg["head_start_ray_commands"], *cfg["worker_start_ray_commands"]]
    assert not any("DS_ACCELERATOR" in c for c in commands)


# --- the Dockerfile -------------------------------------------------------------------------------


def test_dockerfile_builds_the_projects_ray_python_and_packages() -> None:
    base, workdir, runs = _dockerfile()
    match = re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py3(\d+)-gpu", base)
    assert match, f"FROM {base}: expected Ray {RAY_VERSION}'s GPU image"
    python = f"3.{match.group(1)}"
    assert SpecifierSet(METADATA["Requires-Python"]).contains(python), f"{base}: Python {python} outside requires-python"
    assert _extra_installed(" ".join(runs)) == "gpu"
    text = (CLUSTER / "Dockerfile").read_text()
    assert PACKAGES, "no top-level packages in kiln's metadata"
    for package in [*PACKAGES, "configs"]:
        assert re.search(rf"^COPY .*\b{package}/", text, re.M), f"the image lacks {package}/"
    assert workdir.startswith("/"), workdir


# --- the KubeRay manifests ------------------------------------------------------------------------


def test_manifests_use_only_fields_kuberay_defines() -> None:
    m = _manifests()
    assert set(m) == {"PersistentVolumeClaim", "RayCluster", "RayJob", "RayService"}
    for kind in ("RayCluster", "RayJob", "RayService"):
        assert m[kind]["apiVersion"] == "ray.io/v1", kind
    assert set(m["RayJob"]["spec"]) <= JOB_SPEC, set(m["RayJob"]["spec"]) - JOB_SPEC
    assert set(m["RayService"]["spec"]) <= SERVICE_SPEC, set(m["RayService"]["spec"]) - SERVICE_SPEC
    for kind, spec in _cluster_specs(m).items():
        assert set(spec) <= CLUSTER_SPEC, (kind, set(spec) - CLUSTER_SPEC)
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP, (kind, set(spec["headGroupSpec"]) - HEAD_GROUP)
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP, (kind, set(group) - WORKER_GROUP)
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], (kind, group["groupName"])
        assert set(spec["authOptions"]) <= AUTH_OPTIONS, kind
        for group in _groups(spec):
            # KubeRay passes rayStartParams to `ray start` as strings and rejects other types.
            assert all(isinstance(v, str) for v in group["rayStartParams"].values()), (kind, group["rayStartParams"])
        for c in _containers(spec):
            assert set(c.get("resources", {})) <= RESOURCES, (kind, c["name"], c.get("resources"))


def test_manifests_run_one_image_built_from_the_dockerfile() -> None:
    m = _manifests()
    _, workdir, _ = _dockerfile()
    for kind, spec in _cluster_specs(m).items():
        assert spec["rayVersion"] == RAY_VERSION, kind
        for c in _containers(spec):
            # The tag is the project version, so a manifest names the code it runs.
            assert c["image"] == f"kiln:{VERSION}", (kind, c["name"], c["image"])
            assert c["workingDir"] == workdir, (kind, c["name"])


def test_manifests_share_token_auth_volume_and_api_key() -> None:
    m = _manifests()
    pvc = m["PersistentVolumeClaim"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "every node mounts the run directory"
    _, workdir, _ = _dockerfile()
    specs = _cluster_specs(m)
    assert len({json.dumps(s["authOptions"], sort_keys=True) for s in specs.values()}) == 1, "one token for both"
    for kind, spec in specs.items():
        assert spec["authOptions"]["mode"] == "token", kind
        for group in _groups(spec):
            pod = group["template"]["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            for c in pod["containers"]:
                mounts = {v["mountPath"]: claims.get(v["name"]) for v in c["volumeMounts"]}
                assert mounts.get(f"{workdir}/runs") == pvc["metadata"]["name"], (kind, c["name"], mounts)
                env = {e["name"]: e for e in c.get("env", [])}
                assert env["KILN_API_KEY"]["valueFrom"]["secretKeyRef"]["key"], (kind, c["name"])


def test_manifests_put_gpus_on_workers_only() -> None:
    for kind, spec in _cluster_specs(_manifests()).items():
        head = spec["headGroupSpec"]
        assert all(_gpus(c) == 0 for c in head["template"]["spec"]["containers"]), f"{kind}: GPU on the head"
        for group in spec["workerGroupSpecs"]:
            for c in group["template"]["spec"]["containers"]:
                gpus = _gpus(c)
                assert gpus >= 1, f"{kind}/{group['groupName']}: no {GPU} limit"
                # Kubernetes requires requests == limits for extended resources such as GPUs.
                assert int(c["resources"]["requests"].get(GPU, gpus)) == gpus, (kind, group["groupName"])
                assert int(group["rayStartParams"].get("num-gpus", gpus)) == gpus, (kind, group["groupName"])


def test_rayjob_runs_kiln_run_on_the_raycluster_with_a_real_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from cluster.submit import job_env_vars

    m = _manifests()
    job = m["RayJob"]["spec"]
    assert job["clusterSelector"]["ray.io/cluster"] == m["RayCluster"]["metadata"]["name"]
    _, workdir, _ = _dockerfile()
    cd, command = (part.strip() for part in job["entrypoint"].split("&&"))
    assert cd == f"cd {workdir}"
    argv = shlex.split(command)
    assert argv[0] == "kiln" and argv[1] == "run", argv
    assert build_parser().parse_args(argv[1:]).command == "run"
    cfg = load_config(ROOT / argv[2])  # the image's configs/ is the repository's
    # The job's DeepSpeed accelerator is the one `kiln submit` would give this config.
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    env_vars = yaml.safe_load(job["runtimeEnvYAML"])["env_vars"]
    assert env_vars["DS_ACCELERATOR"] == job_env_vars(cfg)["DS_ACCELERATOR"]


def _rayjob_config() -> KilnConfig:
    command = _manifests()["RayJob"]["spec"]["entrypoint"].split("&&")[-1]
    return load_config(ROOT / shlex.split(command)[2])


def test_rayservice_serves_kilns_app_on_the_rayjobs_model() -> None:
    from ray.serve.schema import ServeDeploySchema

    m = _manifests()
    serve_cfg = yaml.safe_load(m["RayService"]["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # Ray Serve's own check of a `serve deploy` config
    (app,) = serve_cfg["applications"]
    reference = _load(ROOT / "serving" / "serve_config.yaml")["applications"][0]["import_path"]
    assert app["import_path"] == reference
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = ServeConfig.model_validate(app["args"])
    # Served from the shared volume, where the RayJob's run writes its final (PPO) model.
    _, workdir, _ = _dockerfile()
    run = _rayjob_config().run
    assert args.model == f"{workdir}/{run.root}/{run.name}/ppo/model"
    # The endpoint listens on every interface, so it needs an API key (present in every pod).
    assert serve_cfg["http_options"]["host"] == "0.0.0.0" and args.api_key_env == "KILN_API_KEY"
    # A replica fits on one GPU worker.
    worker = m["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert 1 <= args.num_gpus <= _gpus(worker) and args.engine.tensor_parallel_size <= _gpus(worker)
    assert args.num_cpus <= float(worker["resources"]["limits"]["cpu"])


def test_rayservice_builder_checks_the_exposed_host_and_passes_on_the_secrets_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.app import build_app

    spec = _manifests()["RayService"]["spec"]
    serve_cfg = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve_cfg["applications"]
    # The builder sees only its args: they must name the interface the proxy binds, or its
    # "no API key on an exposed host" check runs against the default loopback host and passes.
    assert app["args"].get("host") == serve_cfg["http_options"]["host"] == "0.0.0.0"
    args = ServeConfig.model_validate(app["args"])
    assert not args.allow_unauthenticated and args.api_key is None  # the key comes from the environment only
    (tmp_path / "config.json").write_text("{}")  # stands in for the model on the shared volume
    built = {**app["args"], "model": str(tmp_path)}
    monkeypatch.delenv(args.api_key_env, raising=False)
    with pytest.raises(ValueError, match="no API key"):
        build_app(built)  # a pod without the key: refused, not served openly
    monkeypatch.setenv(args.api_key_env, "a-key-from-the-secret")
    build_app(built)
    # Every pod (the builder runs as a Ray task on any of them) has the variable, from the Secret.
    for c in _containers(spec["rayClusterConfig"]):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env[args.api_key_env]["valueFrom"]["secretKeyRef"]["name"] == "kiln-api-key", c["name"]


def test_submit_subcommand_matches_the_docs_in_the_manifests() -> None:
    # raycluster.yaml tells users to run `kiln submit CONFIG --address http://127.0.0.1:8265`.
    text = (KUBERAY / "raycluster.yaml").read_text()
    line = next(line for line in text.splitlines() if "kiln submit" in line)
    argv = shlex.split(line.split("kiln", 1)[1])
    args = build_parser().parse_args(argv)
    assert args.command == "submit" and args.address == "http://127.0.0.1:8265"
