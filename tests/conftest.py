"""Shared fixtures: a local Ray cluster, and a tiny *real* tokenizer and Llama model on disk.

Nothing here is a fake: the tokenizer is trained by ``pipelines.data.tokenizer`` and the model is a
randomly initialised ``transformers`` Llama saved in Hugging Face format, small enough that vLLM,
DeepSpeed and Ray Serve run it on 2 CPUs in seconds.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _torch_has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One embedded 2-CPU Ray cluster shared by the tests that need one."""
    import ray

    from cluster.runtime import export_worker_env

    if not ray.is_initialized():
        export_worker_env()  # as init_ray does for an embedded cluster: no runtime env
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


TINY_TEXTS = [
    f"What is {a} + {b}? {a + b}. The quick brown fox jumps over the lazy dog number {a}."
    for a in range(30)
    for b in range(0, 30, 3)
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 512) with the chat template, in HF format."""
    from pipelines.data.config import TokenizerConfig
    from pipelines.data.tokenizer import save_hf_tokenizer, train_bpe

    out = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    save_hf_tokenizer(train_bpe(TINY_TEXTS, TokenizerConfig(vocab_size=512)), out)
    return out


def save_tiny_llama(tokenizer_dir: Path, out: Path, max_position_embeddings: int = 256) -> Path:
    """Save a randomly initialised 2-layer, 64-wide Llama (2 heads of 32) with ``tokenizer_dir``'s
    tokenizer to ``out``, in HF format."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # Head size 32: vLLM's CPU attention has no kernel for head size 16 (it fails at the
        # first request, not at load).
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (context 256) with the tiny tokenizer, in HF format."""
    return save_tiny_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("model") / "tiny-llama")


# PPO's task (tests/test_ppo_e2e.py, test_ppo_chaos.py, test_lora.py): addition with operands 0..MAX_OPERAND.
MAX_OPERAND = 9
# Like much real SFT data, the fixture's demonstrations are not all helpful: some responses
# ramble without answering. A verifiable reward should teach the policy to answer instead, and
# that behaviour carries over to prompts PPO never trained on.
ANSWER_SHARE = 0.6
RAMBLES = ("Let me think about it.", "That is a good question.", "I am not sure about that.")


def _sft(model_dir: Path, pairs: list[tuple[int, int]], steps: int) -> None:
    """Fine-tune ``model_dir`` in place on "What is a + b?" chats, answered (a + b) or rambled (cosine LR)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.quickstart.task import format_prompt
    from pipelines.train.datasets import sft_rows

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(1)
    records = [
        (f"pair:{a},{b}", {"prompt": format_prompt(a, b), "response": str(a + b) if rng.random() < ANSWER_SHARE else rng.choice(RAMBLES)})
        for a, b in pairs for _ in range(2)
    ]  # fmt: skip
    rows, _ = sft_rows(tok, records, 64, "reject", packing=False)
    ids, labels = torch.from_numpy(rows["input_ids"]).long(), torch.from_numpy(rows["labels"]).long()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=3e-4)
    for _ in range(steps):
        idx = torch.randint(0, len(ids), (32,))
        logits = model(input_ids=ids[idx]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[idx][:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.save_pretrained(str(model_dir), safe_serialization=True)


@pytest.fixture(scope="session")
def task(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> dict[str, Any]:
    """A fine-tuned tiny policy, PPO prompts and disjoint held-out prompts (JSONL, with answers).

    One per session: PPO, its chaos test and LoRA only read it."""
    from pipelines.quickstart.task import format_prompt

    root = tmp_path_factory.mktemp("ppo")
    pairs = [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    random.Random(0).shuffle(pairs)
    held_out, train = pairs[:30], pairs[30:]
    for name, subset in (("prompts.jsonl", train), ("eval.jsonl", held_out)):
        (root / name).write_text("".join(json.dumps({"prompt": format_prompt(a, b), "answer": a + b}) + "\n" for a, b in subset))
    policy = save_tiny_llama(tiny_tokenizer_dir, root / "policy", max_position_embeddings=64)
    # The tiny model cannot learn to generalise addition in a minute of CPU, so SFT sees every
    # pair (imperfectly); PPO's held-out prompts are held out from PPO.
    _sft(policy, pairs, steps=300)
    return {"root": root, "policy": policy, "prompts": root / "prompts.jsonl", "eval": root / "eval.jsonl"}
