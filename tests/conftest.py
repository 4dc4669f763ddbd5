"""Shared fixtures: a local Ray cluster, and a tiny *real* tokenizer and Llama model on disk.

Nothing here is a fake: the tokenizer is trained by ``pipelines.data.tokenizer`` and the model is a
randomly initialised ``transformers`` Llama saved in Hugging Face format, small enough that vLLM,
DeepSpeed and Ray Serve run it on 2 CPUs in seconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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

    from cluster.runtime import worker_env

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": worker_env()})
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
