"""``bench/gpu_check.py`` and the GPU-only code paths it runs.

On a machine without CUDA (CI): the check says so in one line, exits 0 at once and writes nothing;
its configs (pretraining with ``use_gpu``, PPO's GPU actors, the GPU serving replica) pass kiln's
strict config; a failing step becomes a "failed: <reason>" row. Marked ``gpu`` (skipped without a
GPU by ``conftest.py``), each within about two minutes once DeepSpeed's fused Adam op is built:
``kiln pretrain`` with ``use_gpu`` (bf16, NCCL) to a finite loss, a PPO step with every actor on
the GPU, vLLM's GPU rollout actor loading a learner's weights (then its log-probs are the
learner's), and a GPU serving replica answering a request. The first three run in a fresh Python
process each: their own Ray cluster, with DeepSpeed's CUDA accelerator in every worker (the test
session's Ray, if any, is the CPU one of ``conftest.ray_local``).

    .venv/bin/python -m pytest -q tests/test_gpu_check.py            # CPU: the GPU tests skip
    .venv/bin/python -m pytest -q -m gpu tests/test_gpu_check.py     # on a CUDA machine
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bench(name: str) -> ModuleType:
    """``bench.<name>``, without keeping the environment defaults a bench sets when imported
    (``bench.ppo_step``: ``VLLM_*``, ``HF_HUB_OFFLINE``, ...): other tests share this process."""
    before = dict(os.environ)
    module = importlib.import_module(f"bench.{name}")
    os.environ.clear()
    os.environ.update(before)
    return module


def _run(args: list[str], timeout_s: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, **env})  # fmt: skip


# --- on any machine --------------------------------------------------------------------------------


@pytest.mark.skipif(_has_cuda(), reason="this machine has a CUDA GPU: the check would run")
def test_without_a_gpu_it_says_so_at_once_and_measures_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    # Exactly `python -m bench.gpu_check`, and then which heavy engines the process imported.
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['gpu_check', '--out', {str(out)!r}]\n"
        "try:\n    runpy.run_module('bench.gpu_check', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('imported:', sorted(m for m in ('vllm', 'deepspeed', 'ray') if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    t0 = time.monotonic()
    proc = _run(["-c", code], timeout_s=60)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "nothing was measured" in lines[0], proc.stdout
    assert "imported: []" in proc.stderr, proc.stderr
    assert seconds < 15, f"took {seconds:.1f} s"
    assert list(tmp_path.iterdir()) == [], "wrote something without a GPU"


def test_datasheet_peaks_only_for_gpus_known_for_sure() -> None:
    gc = _bench("gpu_check")
    known = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H200": 989, "NVIDIA H100 PCIe": 756, "NVIDIA A100-SXM4-80GB": 312,
             "NVIDIA A100 80GB PCIe": 312, "NVIDIA L4": 121, "NVIDIA A10": 125}  # fmt: skip
    for name, tflops in known.items():
        assert gc.datasheet_peak(name) == tflops * 1e12, name
    for name in ("NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA A10G", "NVIDIA L40S", "Tesla T4"):
        assert gc.datasheet_peak(name) is None, name


def test_a_failure_is_one_line_naming_the_cause() -> None:
    gc = _bench("gpu_check")
    ray_text = (
        "ray.exceptions.RayTaskError(RuntimeError): ray::_RayTrainWorker__execute() (pid=1, ip=10.0.0.1)\n"
        '  File "pipelines/train/worker.py", line 169, in _all_sum\n    dist.all_reduce(t)\n'
        "RuntimeError: No backend type associated with device type cpu\n"
    )
    assert gc.reason(ray_text) == "RuntimeError: No backend type associated with device type cpu"
    assert gc.reason(ValueError("bad\nsecond line")) == "ValueError: bad"
    assert len(gc.reason("x" * 500)) == 160


def test_the_gpu_configs_pass_kilns_strict_config(tmp_path: Path) -> None:
    """Every config a GPU step builds validates here first: a typo would otherwise cost GPU time."""
    import yaml

    from pipelines.config import parse_config
    from pipelines.rlhf.config import PpoConfig

    gc, ppo_step, serve = _bench("gpu_check"), _bench("ppo_step"), _bench("serve")
    for s, gpus, compile in ((gc.FULL, 1, False), (gc.SMOKE, 8, True)):
        cfg = parse_config(gc.pretrain_config(tmp_path, tmp_path / "tok", tmp_path / "shards", s, gpus, compile)).pretrain
        assert cfg.use_gpu and cfg.zero_stage == 2 and cfg.num_workers == gpus and cfg.grad_accum_steps >= 1
        assert cfg.torch_compile == ("inductor" if compile else None)
        assert cfg.model.hidden_size // cfg.model.num_heads == 64 and cfg.model.max_position_embeddings == s.seq_len
        for advantage in ("gae", "grpo"):
            p = PpoConfig.model_validate(ppo_step.ppo_section(tmp_path, tmp_path / "p.jsonl", gc.ppo_args(s), advantage,
                                                               gpu=True))  # fmt: skip
            assert p.learner.use_gpu and p.critic.use_gpu and p.rollout.num_gpus == 1
            assert p.rollout.engine.dtype == "bfloat16"
    # The CPU defaults are what they were; --gpu adds a GPU per replica and bfloat16.
    args = argparse.Namespace(response_tokens=24, prompts=16, samples=4)
    assert ppo_step.ppo_section(tmp_path, tmp_path, args, "gae")["rollout"]["engine"]["dtype"] == "float32"
    cpu, gpu = (yaml.safe_load(serve.kiln_config(tmp_path, 8000, tmp_path, 128, g))["serve"] for g in (False, True))
    assert (cpu.get("num_gpus", 0), cpu["engine"]["dtype"]) == (0, "float32")
    assert (gpu["num_gpus"], gpu["engine"]["dtype"]) == (1.0, "bfloat16")
    parse_config(yaml.safe_load(serve.kiln_config(tmp_path, 8000, tmp_path, 128, gpu=True)))


@pytest.mark.skipif(_has_cuda(), reason="on a GPU the setup step succeeds")
def test_a_failing_step_is_a_failed_row_and_the_table_shows_it(tmp_path: Path) -> None:
    """The setup step in its own process, on a machine where it must fail: the parent gets a row."""
    gc = _bench("gpu_check")
    args = argparse.Namespace(smoke=True, compile=False, pretrain_steps=None, micro_batch=None, serve_model=None,
                              total_s=60.0)
    r = gc.run_step("setup", 60.0, args, tmp_path / "logs" / "setup.log")
    assert r["status"].startswith("failed: ") and r["rows"][-1]["status"] == r["status"], r
    assert (tmp_path / "logs" / "setup.log").is_file() and r["seconds"] < 60
    assert gc.run_step("serve", 5.0, args, tmp_path / "serve.log")["status"] == "failed: no time left"
    env = {"gpus": ["NVIDIA H200"], "cuda": "12.8", "torch": "2.14.0", "vllm": "0.33.0", "deepspeed": "0.19.8",
           "ray": "2.60.0", "nvidia_smi": None}  # fmt: skip
    text = gc.table({"environment": env, "parts": {"setup": r}})
    assert f"| {r['status']} |" in text and "| setup (" in text


def test_end_group_stops_the_whole_process_group() -> None:
    gc = _bench("gpu_check")
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    time.sleep(0.3)
    gc.end_group(proc)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


# --- on a CUDA GPU ---------------------------------------------------------------------------------


def _gpu_step(step: str, tmp_path: Path) -> dict[str, Any]:
    """One ``bench.gpu_check`` step at smoke size, in its own process; its report."""
    result = tmp_path / "result.json"
    proc = _run(["-m", "bench.gpu_check", "--part", step, "--smoke", "--result", str(result)], timeout_s=300)
    report = json.loads(result.read_text()) if result.is_file() else {"status": "no report", "rows": []}
    assert proc.returncode == 0 and report["status"] == "ok", f"{report}\n{proc.stdout[-6000:]}"
    return report


@pytest.mark.gpu
def test_kiln_pretrain_on_gpu_reaches_a_finite_loss(tmp_path: Path) -> None:
    """``kiln pretrain`` with ``use_gpu`` (one Ray Train worker per GPU, ZeRO-2, bf16, NCCL), 6 steps."""
    kiln = _gpu_step("pretrain", tmp_path)["details"]["kiln"]
    assert math.isfinite(kiln["first_loss"]) and math.isfinite(kiln["last_loss"]) and kiln["tokens_per_s"] > 0


@pytest.mark.gpu
def test_a_ppo_step_with_every_actor_on_gpu(tmp_path: Path) -> None:
    """vLLM rollout, learner and critic on the GPU: GAE and GRPO steps, each followed by a weight sync."""
    details = _gpu_step("ppo", tmp_path)["details"]
    for key in ("gae", "grpo"):
        assert 0 < details[key]["sync_share"] < 1 and details[key]["logprob_mismatch_max"] < 0.2, details[key]


def _rollout_logprobs_against_learner(work: Path) -> dict[str, float]:
    """A vLLM rollout actor on the GPU starts from policy A; a learner rank (DeepSpeed bf16, NCCL)
    holds B (A with its output layer x 10, so the two disagree by whole nats). The largest gap
    between vLLM's log-probs of its samples and the learner's, before and after B's weights are loaded."""
    import ray
    from conftest import TINY_TEXTS, save_tiny_llama
    from transformers import LlamaForCausalLM

    from actors.experience import collate
    from actors.group import RankGroup
    from actors.learner import PolicyLearner
    from actors.rollout import RolloutGenerator
    from bench.ppo_step import init_gpu_ray, ppo_section
    from pipelines.data.config import TokenizerConfig
    from pipelines.data.tokenizer import load_tokenizer, save_hf_tokenizer, train_bpe
    from pipelines.rlhf.config import PpoConfig

    save_hf_tokenizer(train_bpe(TINY_TEXTS, TokenizerConfig(vocab_size=512)), work / "tokenizer")
    a, b = (save_tiny_llama(work / "tokenizer", work / name, max_position_embeddings=64) for name in ("a", "b"))
    model = LlamaForCausalLM.from_pretrained(str(b))
    model.lm_head.weight.data.mul_(10.0)
    model.save_pretrained(str(b), safe_serialization=True)
    args = argparse.Namespace(response_tokens=16, prompts=4, samples=8)
    p = PpoConfig.model_validate(ppo_section(a, work / "prompts.jsonl", args, "grpo", gpu=True))
    init_gpu_ray(p)
    env = p.rollout.engine.vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")  # as pipelines.rlhf.ppo.start_actors
    rollout = RolloutGenerator.options(num_cpus=1, num_gpus=p.rollout.num_gpus, runtime_env={"env_vars": env}).remote(
        str(a), p
    )
    learner = RankGroup(PolicyLearner, 1, {"num_cpus": 1, "num_gpus": 1}, p, str(b))
    tok = load_tokenizer(a)
    prompt_ids = [tok.encode(f"What is {i} + {i + 1}?") for i in range(4)]

    def gap() -> float:
        batch = collate(ray.get(rollout.generate.remote(prompt_ids, 8, 0)), tok.pad_token_id)
        [(logprobs, _)] = learner.get(lambda r: r.logprobs.remote(batch))  # (B, A)
        return ((logprobs - batch.rollout_logprobs).abs() * batch.response_mask).max().item()

    before = gap()
    [[weights]] = learner.get(lambda r: r.publish_weights.remote())
    ray.get(rollout.load_weights.remote(weights, 1))
    return {"before": before, "after": gap()}


@pytest.mark.gpu
def test_gpu_rollout_loads_the_learners_weights(tmp_path: Path) -> None:
    proc = _run([__file__, "rollout", str(tmp_path)], timeout_s=300, DS_ACCELERATOR="cuda")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    gaps = json.loads(proc.stdout.strip().splitlines()[-1])
    assert gaps["before"] > 1.0, gaps  # vLLM held A, the learner B
    assert gaps["after"] < 0.2, gaps  # now vLLM holds B too (bf16 on both sides)


@pytest.mark.gpu
def test_a_gpu_serving_replica_answers(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``kiln serve`` with one GPU per replica and a bfloat16 engine (``bench.serve``'s ``--gpu`` config)."""
    import httpx

    serve = _bench("serve")
    port, log = serve._free_port(), tmp_path / "kiln.log"
    proc = serve.start_kiln(tiny_llama_dir, port, tmp_path, 8, log, gpu=True)
    try:
        url = f"http://127.0.0.1:{port}"
        serve.wait_ready(url, "/healthz", proc, log, timeout_s=180)
        body = {"model": serve.NAME, "prompt": "What is 2 + 3?", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
    finally:
        serve.stop(proc)


if __name__ == "__main__":  # a GPU test's body in a fresh process: `python tests/test_gpu_check.py rollout DIR`
    sys.path.insert(0, str(ROOT))
    assert sys.argv[1] == "rollout", sys.argv
    print(json.dumps(_rollout_logprobs_against_learner(Path(sys.argv[2]))))
