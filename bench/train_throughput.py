"""Training throughput: ``kiln pretrain``'s step (Ray Train + DeepSpeed) against a bare PyTorch loop.

In one run, on this machine:
  * matmul peak: float32 GEMM GFLOP/s with 1 and with 2 threads (the MFU denominator);
  * bare loop: one process, 2 threads (and 1), the same model, global batch, optimizer, clipping
    and accumulation as kiln, on the same token rows;
  * where kiln's gap goes: the bare loop as a Ray task holding both CPUs of kiln's embedded
    cluster (Ray's own processes beside a loop that has every core), and the loop through
    DeepSpeed's engine as kiln builds it, in one process without Ray;
  * kiln, 2 workers x 1 thread, 1 worker x 1 thread and 1 worker x 2 threads: the ``tokens_per_s`` kiln logs, which
    times the optimizer step only (forward, backward, gradient reduction, optimizer) — not
    evaluation, checkpoints or start-up; the first logging window (warm-up) is dropped.
Model FLOPs per token: 6·N (N = parameters excluding the input embedding) + 12·L·d·T (attention).

    .venv/bin/python bench/train_throughput.py            # quickstart-sized model, ~5 min on 2 CPUs
    .venv/bin/python bench/train_throughput.py --steps 20 # quicker, noisier
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.rundir import atomic_write_json  # noqa: E402
from pipelines.config import parse_config  # noqa: E402
from pipelines.data.config import TokenizerConfig
from pipelines.data.tokenizer import load_tokenizer, save_hf_tokenizer, train_bpe  # noqa: E402
from pipelines.quickstart.config import GenerateConfig
from pipelines.quickstart.generate import generate  # noqa: E402
from pipelines.train.config import ModelConfig, TrainConfig
from pipelines.train.datasets import write_rows  # noqa: E402
from pipelines.train.losses import lm_loss_sum, lr_multiplier  # noqa: E402
from pipelines.train.modeling import build_model  # noqa: E402

MODEL = ModelConfig(hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4, num_kv_heads=4,
                    max_position_embeddings=512)  # fmt: skip


def matmul_peak(threads: int, n: int = 1024, seconds: float = 2.0) -> float:
    """Measured float32 GEMM FLOP/s with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def make_data(work: Path, seq_len: int, rows: int) -> tuple[Path, Path]:
    """A BPE tokenizer trained on generated text, and ``rows`` token rows drawn from its vocabulary."""
    corpus = work / "corpus"
    generate(GenerateConfig(out_dir=str(corpus), num_documents=300, exact_duplicates=0, near_duplicates=0,
                            junk_documents=0))  # fmt: skip
    texts = [json.loads(line)["text"] for f in sorted((corpus / "pretrain").glob("*.jsonl")) for line in f.read_text().splitlines()]
    tok_dir = work / "tokenizer"
    save_hf_tokenizer(train_bpe(texts, TokenizerConfig(vocab_size=4096)), tok_dir)
    vocab = len(load_tokenizer(tok_dir))
    shards = work / "shards"
    shards.mkdir()
    ids = np.random.default_rng(0).integers(4, vocab, size=(rows, seq_len), dtype=np.int32)
    write_rows(shards / "train-00000.parquet", {"input_ids": ids})
    write_rows(shards / "validation-00000.parquet", {"input_ids": ids[:64]})
    return tok_dir, shards


def bare_loop(tok_dir: Path, shards: Path, train: TrainConfig, threads: int, steps: int,
              deepspeed: bool = False) -> float:  # fmt: skip
    """tokens/s of a single-process loop: the same model, batch, AdamW, clipping, accumulation;
    ``deepspeed``: through DeepSpeed's engine as kiln's worker builds it (ZeRO stage of ``train``,
    a one-process gloo group), still without Ray.

    The same statistic as kiln's: tokens/s of each window of ``log_every_steps`` optimizer steps
    (optimizer-step time only), the median of the windows after the first.
    """
    import pyarrow.parquet as pq

    torch.set_num_threads(threads)
    torch.manual_seed(train.seed)
    model = build_model("lm", load_tokenizer(tok_dir), arch=MODEL)
    model.config.use_cache = False
    micro = train.sequences_per_step // train.grad_accum_steps  # the workers' micro batches side by side
    if deepspeed:
        engine, opt = _deepspeed_engine(model, train, micro)
    else:
        engine = model
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps)  # fmt: skip
    col = pq.read_table(shards / "train-00000.parquet").column("input_ids").combine_chunks()
    data = torch.from_numpy(col.flatten().to_numpy().reshape(len(col), -1).astype(np.int64))
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = train.learning_rate * lr_multiplier(step, train.warmup_steps, train.max_steps, train.min_lr_ratio)
        for k in range(train.grad_accum_steps):
            start = (step * train.grad_accum_steps + k) * micro % (len(data) - micro)
            batch = data[start : start + micro]
            loss_sum, count = lm_loss_sum(engine(input_ids=batch).logits, batch)
            if deepspeed:
                engine.backward(loss_sum / count)  # DeepSpeed scales by the accumulation itself
                engine.step()  # steps the optimizer at the accumulation boundary, clipping included
            else:
                (loss_sum / count / train.grad_accum_steps).backward()
        if not deepspeed:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    if deepspeed:
        import torch.distributed as dist

        dist.destroy_process_group()
        for name in _LAUNCHER_ENV:  # not for the Ray cluster this process starts next
            os.environ.pop(name, None)
    per_window = train.log_every_steps
    tokens = train.sequences_per_step * data.shape[1] * per_window
    windows = [tokens / sum(times[i : i + per_window]) for i in range(0, steps - per_window + 1, per_window)]
    return statistics.median(windows[1:] or windows)


_LAUNCHER_ENV = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}


def _deepspeed_engine(model: torch.nn.Module, train: TrainConfig, micro: int) -> tuple[Any, Any]:
    """DeepSpeed's engine over ``model`` with kiln's config, in a one-process gloo group."""
    import deepspeed
    import torch.distributed as dist

    from pipelines.train.engine import deepspeed_config, param_groups

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(_LAUNCHER_ENV)  # DeepSpeed asserts a launcher set them
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, train.weight_decay),
                                   config=deepspeed_config(train, micro, train.grad_accum_steps, 1),
                                   dist_init_required=False)  # fmt: skip
    return engine, engine.optimizer


def bare_loop_in_ray_task(tok_dir: Path, shards: Path, train: TrainConfig, threads: int, steps: int) -> float:
    """``bare_loop`` as a Ray task holding ``threads`` CPUs of kiln's embedded cluster (already up):
    what Ray's own processes cost a loop that has every core."""
    import ray

    from bench import train_throughput  # by reference: run as a script, this module is __main__

    task = ray.remote(num_cpus=threads)(train_throughput.bare_loop)
    return ray.get(task.remote(tok_dir, shards, train, threads, steps))


def kiln_run(work: Path, name: str, tok_dir: Path, shards: Path, section: dict[str, Any]) -> float:
    """tokens/s of ``kiln pretrain`` (median of the logging windows after the first)."""
    from core.metrics import read_metrics
    from pipelines.train import pretrain

    cfg = parse_config({"run": {"name": name, "root": str(work / "runs")}, "ray": {"num_cpus": 2},
                        "pretrain": {**section, "shards": str(shards), "tokenizer": str(tok_dir)}})  # fmt: skip
    pretrain.run(cfg, force=True)
    windows = [m["tokens_per_s"] for m in read_metrics(cfg.run.dir / "pretrain") if "tokens_per_s" in m]
    return statistics.median(windows[1:] or windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per measurement")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences-per-step", type=int, default=16)
    parser.add_argument("--micro-batch-per-worker", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=1, choices=(1, 2, 3), help="as the quickstart (1)")
    args = parser.parse_args()

    section: dict[str, Any] = {
        "model": MODEL.model_dump(), "zero_stage": args.zero_stage, "sequences_per_step": args.sequences_per_step,
        "micro_batch_per_worker": args.micro_batch_per_worker, "max_steps": args.steps, "warmup_steps": 2,
        "learning_rate": 1.0e-3, "threads_per_worker": 1, "cpus_per_worker": 1.0,
        "log_every_steps": max(1, args.steps // 4), "eval_every_steps": args.steps, "eval_batches": 1,
        "checkpoint_every_steps": args.steps, "max_failures": 0,
    }  # fmt: skip
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        work = Path(tmp)
        tok_dir, shards = make_data(work, args.seq_len, rows=args.sequences_per_step * (args.steps + 1))
        model = build_model("lm", load_tokenizer(tok_dir), arch=MODEL)
        fpt = flops_per_token(model, args.seq_len)
        params = sum(p.numel() for p in model.parameters())
        peak1, peak2 = matmul_peak(1), matmul_peak(2)

        two = TrainConfig(**{k: v for k, v in section.items() if k != "model"}, num_workers=2)
        bare = bare_loop(tok_dir, shards, two, threads=2, steps=args.steps)
        bare1 = bare_loop(tok_dir, shards, two, threads=1, steps=args.steps)
        # DeepSpeed's engine, one process: the micro batch of one worker doing both workers' share.
        one = TrainConfig(**{**{k: v for k, v in section.items() if k != "model"}, "num_workers": 1,
                             "micro_batch_per_worker": args.micro_batch_per_worker * 2})  # fmt: skip
        ds = bare_loop(tok_dir, shards, one, threads=2, steps=args.steps, deepspeed=True)
        kiln2 = kiln_run(work, "w2", tok_dir, shards, {**section, "num_workers": 2})
        kiln1 = kiln_run(work, "w1", tok_dir, shards, {**section, "num_workers": 1,
                         "micro_batch_per_worker": args.micro_batch_per_worker * 2})  # fmt: skip
        # The same two cores as one worker's two threads: no gradient exchange between processes.
        kiln12 = kiln_run(work, "w1t2", tok_dir, shards, {**section, "num_workers": 1, "threads_per_worker": 2,
                          "cpus_per_worker": 2.0, "micro_batch_per_worker": args.micro_batch_per_worker * 2})  # fmt: skip
        bare_ray = bare_loop_in_ray_task(tok_dir, shards, two, threads=2, steps=args.steps)  # the cluster kiln started

    rows = [
        ("bare PyTorch loop, 1 process x 2 threads", bare, peak2),
        ("bare PyTorch loop, 1 process x 1 thread", bare1, peak1),
        ("bare loop as a Ray task (2 CPUs), 2 threads", bare_ray, peak2),
        (f"DeepSpeed engine (ZeRO-{args.zero_stage}), no Ray, 2 threads", ds, peak2),
        ("kiln pretrain, 2 workers x 1 thread", kiln2, peak2),
        ("kiln pretrain, 1 worker x 1 thread", kiln1, peak1),
        ("kiln pretrain, 1 worker x 2 threads", kiln12, peak2),
    ]
    print(f"\nmodel: {params / 1e6:.2f}M parameters, {fpt / 1e6:.1f} MFLOP/token; seq_len {args.seq_len}, "
          f"{args.sequences_per_step} sequences/step, ZeRO-{args.zero_stage}, {args.steps} steps")  # fmt: skip
    print(f"matmul peak (float32 GEMM): 1 thread {peak1 / 1e9:.1f} GFLOP/s, 2 threads {peak2 / 1e9:.1f} GFLOP/s\n")
    print(f"| {'setup':<48} | {'tokens/s':>9} | {'vs bare':>7} | {'MFU':>6} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 9}|{'-' * 8}|")
    for label, tps, peak in rows:
        print(f"| {label:<48} | {tps:>9.0f} | {tps / bare:>6.2f}x | {tps * fpt / peak:>6.1%} |")
    print(f"\n2 workers / 1 worker: {kiln2 / kiln1:.2f}x   goal kiln 2x1 >= 0.9x bare: "
          f"{'met' if kiln2 >= 0.9 * bare else 'NOT met'}")  # fmt: skip
    out = Path("runs/bench/train_throughput.json")
    atomic_write_json(out, {
        "statistic": "median tokens/s of the logging windows after the first (optimizer-step time only), for every peer",
        "model_parameters": params, "flops_per_token": fpt, "seq_len": args.seq_len, "steps": args.steps,
        "sequences_per_step": args.sequences_per_step, "zero_stage": args.zero_stage,
        "matmul_peak_flops": {"1_thread": peak1, "2_threads": peak2}, "load_before": load_before,
        "load_after": list(os.getloadavg()),
        "rows": [{"setup": label, "tokens_per_s": tps, "vs_bare": tps / bare, "mfu": tps * fpt / peak} for label, tps, peak in rows],
    })  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
