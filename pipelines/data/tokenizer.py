"""Byte-level BPE tokenizer, trained as ``tokenizers`` trains one and saved in Hugging Face format.

Digits are split one per token (as Llama and DeepSeek do) so arithmetic is learnable; the special
tokens and a ChatML chat template are included so SFT, PPO and serving all format conversations
the same way. ``AutoTokenizer.from_pretrained(dir)`` and vLLM load the saved directory unchanged.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders

from core.chat import CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS
from core.rundir import atomic_dir
from pipelines.data import bpe
from pipelines.data.config import TokenizerConfig
from pipelines.data.pretokenize import pre_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers (and with it torch) is imported inside the functions that need it: Ray Data
# workers unpickle UDFs from modules that import this one, and a torch import costs seconds each.


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE model on a stream of documents (never all in memory at once): each
    distinct word counted, then the merges learnt from the counts (``pipelines/data/bpe.py``, the
    library's trainer's algorithm: the same tokenizer, byte for byte, several times faster)."""
    tok = bpe.train(bpe.count_words(texts), cfg.vocab_size, cfg.min_frequency, SPECIAL_TOKENS)
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    return tok


def save_hf_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """Save as a Hugging Face tokenizer directory with the special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    hf.chat_template = CHAT_TEMPLATE
    with atomic_dir(out_dir) as tmp:
        hf.save_pretrained(str(tmp))


def check_hf_tokenizer(path: str | Path) -> "PreTrainedTokenizerBase":
    """``load_tokenizer`` for ``data.tokenizer.path``: it must also be a fast tokenizer (one that
    ``tokenizers`` runs), which the data stage encodes the corpus with.

    Raises:
        ValueError: no EOS token, or no fast tokenizer (naming the key and the directory).
    """
    tok = load_tokenizer(path)
    if not tok.is_fast:
        raise ValueError(f"data.tokenizer.path: {path} has no tokenizer.json and transformers has no fast "
                         "tokenizer to convert its files to; kiln encodes the corpus with the `tokenizers` library")  # fmt: skip
    return tok


def copy_hf_tokenizer(src: Path, out_dir: Path) -> None:
    """Use an existing Hugging Face tokenizer directory: checked to load, then copied. A directory
    without ``tokenizer.json`` (e.g. GPT-2's ``vocab.json`` + ``merges.txt`` alone) gets the one
    transformers converts its files to."""
    tok = check_hf_tokenizer(src)
    with atomic_dir(out_dir) as tmp:
        for item in src.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        if not (tmp / "tokenizer.json").is_file():
            (tmp / "tokenizer.json").write_text(tok.backend_tokenizer.to_str(), encoding="utf-8")  # type: ignore[attr-defined]


def load_tokenizer(path: str | Path) -> "PreTrainedTokenizerBase":
    """Load a tokenizer directory; it must have an EOS token (packing separates documents by it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: tokenizer has no eos_token")
    return tok
