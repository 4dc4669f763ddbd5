"""LoRA against full fine-tuning of the same policy, in one run: training memory and weight sync.

Run from the repository root:

    .venv/bin/python -m bench.lora --quick     # a 2 x 64 model, 3 syncs each (2.5 minutes on 2 loaded CPUs)
    .venv/bin/python -m bench.lora             # the quickstart's 4 x 128 model, 5 syncs each
    .venv/bin/python -m bench.lora --layers 8 --hidden 512 --rank 16

The model is a randomly initialised Llama built here (tokenizer trained on generated text), saved
in Hugging Face format; the LoRA adapter is ``--rank`` (8) with alpha 2 x rank on every linear
module of the decoder layers (q, k, v, o, gate, up, down), the default ``target_modules``.

1. **Optimizer state and gradient memory.** One training step (forward, backward, AdamW step)
   of each model in this process, with the optimizer DeepSpeed runs on CPU (``torch_adam``:
   ``torch.optim.AdamW``, two fp32 moments per trainable parameter). Bytes are counted from the
   tensors themselves (``optimizer.state`` and every ``.grad``), not from process memory, so other
   jobs on the machine do not change them. The frozen base weights are the same in both and not
   counted. On GPU under bf16 DeepSpeed adds an fp32 master copy per trainable parameter (not
   measured here; the ratio is the same, as everything scales with the trainable count).
2. **Weight sync.** kiln's own actors on an embedded Ray cluster: one ``PolicyLearner`` rank
   (ZeRO-2) and one ``RolloutGenerator`` (vLLM, float32) per setup, full and LoRA, and the exact
   path ``kiln ppo`` takes each step (``pipelines.rlhf.ppo.sync_weights``): ``publish_weights``
   (full: every weight gathered; LoRA: the adapter's tensors only) → object store → the rollout
   actor's ``load_weights`` (full: vLLM ``reload_weights`` in place; LoRA: the adapter written to
   ``/dev/shm`` and added as a new vLLM LoRA adapter). Bytes = the published tensors' sizes;
   seconds = wall time of the whole sync, the median of ``--syncs`` after one warm-up.

Writes ``runs/bench/lora.json`` and prints a table of LoRA / full ratios. Timings on a shared
machine move with its load: compare ratios from one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from core.rundir import atomic_write_json
from pipelines.data.config import TokenizerConfig
from pipelines.data.tokenizer import load_tokenizer, save_hf_tokenizer, train_bpe
from pipelines.quickstart.config import GenerateConfig
from pipelines.quickstart.generate import generate
from pipelines.quickstart.task import format_prompt
from pipelines.rlhf.config import PpoConfig
from pipelines.train.config import LoraSettings, ModelConfig
from pipelines.train.modeling import apply_lora, build_model, save_hf_model


def make_model(work: Path, arch: ModelConfig) -> Path:
    """A BPE tokenizer trained on the quickstart corpus and a new Llama of ``arch``, in HF format."""
    corpus = work / "corpus"
    generate(GenerateConfig(out_dir=str(corpus), num_documents=300, exact_duplicates=0, near_duplicates=0, junk_documents=0))
    texts = [json.loads(line)["text"] for f in sorted((corpus / "pretrain").glob("*.jsonl")) for line in f.read_text().splitlines()]
    save_hf_tokenizer(train_bpe(texts, TokenizerConfig(vocab_size=4096)), work / "tokenizer")
    torch.manual_seed(0)
    model = build_model("lm", load_tokenizer(work / "tokenizer"), arch=arch)
    save_hf_model(model, model.state_dict(), work / "tokenizer", work / "policy")
    return work / "policy"


def training_memory(model_dir: Path, lora: LoraSettings | None, seq_len: int = 64, batch: int = 4) -> dict[str, int]:
    """Trainable parameters, and bytes of AdamW state and of gradients after one training step."""
    torch.manual_seed(0)
    model = build_model("lm", load_tokenizer(model_dir), path=model_dir)
    if lora is not None:
        model = apply_lora(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in state),
        "gradient_bytes": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None),
    }


def weight_sync(model_dir: Path, lora: LoraSettings | None, syncs: int) -> dict[str, Any]:
    """Bytes and seconds of kiln's sync (learner → object store → vLLM rollout actor), with or without LoRA."""
    import ray

    from actors.group import RankGroup
    from actors.learner import PolicyLearner
    from actors.rollout import RolloutGenerator

    prompts = model_dir.parent / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": format_prompt(1, 2), "answer": 3}) + "\n")
    p = PpoConfig.model_validate({
        "prompts": str(prompts), "reward_function": "pipelines.quickstart.task:reward", "advantage": "grpo",
        "max_prompt_tokens": 32, "max_response_tokens": 16, "prompts_per_step": 1, "samples_per_prompt": 4,
        "minibatches_per_epoch": 1,
        "learner": {"num_workers": 1, "cpus_per_worker": 0.5, "micro_batch_per_worker": 4,
                    "lora": lora.model_dump() if lora else None},
        "rollout": {"num_cpus": 0.5, "engine": {"dtype": "float32"}},
    })  # fmt: skip
    env = {"VLLM_LOGGING_LEVEL": "WARNING", **p.rollout.engine.vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")}
    rollout = RolloutGenerator.options(num_cpus=0.5, runtime_env={"env_vars": env}).remote(str(model_dir), p)
    learner = RankGroup(PolicyLearner, 1, {"num_cpus": 0.5}, p, str(model_dir))
    try:
        ray.get(rollout.policy_version.remote())  # the engine has started
        seconds, sent = [], 0
        for version in range(1, syncs + 2):  # the first is a warm-up
            t0 = time.perf_counter()
            ref = learner.get(lambda r: r.publish_weights.remote())[0][0]
            ray.get(rollout.load_weights.remote(ref, version))
            seconds.append(time.perf_counter() - t0)
            sent = sum(t.numel() * t.element_size() for t in ray.get(ref).values())
        return {"bytes": sent, "seconds": statistics.median(seconds[1:]), "all_seconds": seconds}
    finally:
        for actor in [rollout, *learner.ranks]:
            ray.kill(actor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2 x 64 model and 3 syncs per setup")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--syncs", type=int, default=5)
    args = parser.parse_args()
    layers, hidden, syncs = (2, 64, 3) if args.quick else (args.layers, args.hidden, args.syncs)
    arch = ModelConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_layers=layers, num_heads=hidden // 32,
                       num_kv_heads=hidden // 32, max_position_embeddings=256)  # fmt: skip
    lora = LoraSettings(rank=args.rank, alpha=2.0 * args.rank)

    import ray

    from cluster.runtime import worker_env

    with tempfile.TemporaryDirectory(prefix="kiln-bench-lora-") as tmp:
        model_dir = make_model(Path(tmp), arch)
        memory = {"full": training_memory(model_dir, None), "lora": training_memory(model_dir, lora)}
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env()})
        try:
            sync = {"full": weight_sync(model_dir, None, syncs), "lora": weight_sync(model_dir, lora, syncs)}
        finally:
            ray.shutdown()

    rows = [
        ("trainable parameters", memory["full"]["trainable_parameters"], memory["lora"]["trainable_parameters"], ""),
        ("AdamW state (bytes)", memory["full"]["optimizer_state_bytes"], memory["lora"]["optimizer_state_bytes"], ""),
        ("gradients (bytes)", memory["full"]["gradient_bytes"], memory["lora"]["gradient_bytes"], ""),
        ("weight sync (bytes)", sync["full"]["bytes"], sync["lora"]["bytes"], ""),
        ("weight sync (s, median)", sync["full"]["seconds"], sync["lora"]["seconds"], ".4f"),
    ]
    print(f"\nmodel: {layers} layers x {hidden}, {memory['full']['parameters'] / 1e6:.2f}M parameters; "
          f"LoRA rank {lora.rank}, alpha {lora.alpha}, on {', '.join(lora.target_modules)}\n")  # fmt: skip
    print(f"| {'measure':<26} | {'full':>14} | {'LoRA':>14} | {'LoRA / full':>11} |")
    print(f"|{'-' * 28}|{'-' * 16}|{'-' * 16}|{'-' * 13}|")
    for label, full, adapted, fmt in rows:
        print(f"| {label:<26} | {full:>14{fmt or ',d'}} | {adapted:>14{fmt or ',d'}} | {adapted / full:>11.4f} |")
    out = Path("runs/bench/lora.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {
        "model": {"layers": layers, "hidden": hidden, "parameters": memory["full"]["parameters"]},
        "lora": lora.model_dump(), "syncs": syncs, "memory": memory, "sync": sync,
        "ratios": {label: adapted / full for label, full, adapted, _ in rows},
        "note": "sync seconds: median over syncs after one warm-up, on whatever else the machine was running",
    })  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
