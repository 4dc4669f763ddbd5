"""kiln's BPE trainer (``pipelines/data/bpe.py``) gives the tokenizer ``tokenizers``' own trainer gives."""

from __future__ import annotations

import heapq
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders

from core.chat import SPECIAL_TOKENS
from pipelines.data import bpe, pretokenize
from pipelines.data.config import TokenizerConfig
from pipelines.data.tokenizer import train_bpe
from tests.test_encode import PIECES, TRAINING


def _library(texts: list[str], cfg: TokenizerConfig, special_tokens: list[str] = SPECIAL_TOKENS) -> str:
    """The reference: the library's trainer, kiln's pre-tokenizer, the documents as they are."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pretokenize.pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, show_progress=False,
                                  special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=60).map("".join), min_size=1, max_size=12),
       st.sampled_from([1, 2]))  # fmt: skip
def test_the_library_tokenizer_on_every_kind_of_piece(texts: list[str], min_frequency: int) -> None:
    """Vocabulary, merges and every setting: letters, digits, contractions, punctuation, each
    ASCII whitespace, special-token text and non-ASCII documents (split by the library)."""
    cfg = TokenizerConfig(vocab_size=320, min_frequency=min_frequency)
    assert train_bpe(texts, cfg).to_str() == _library(texts, cfg)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["ab", "abc", "aab", "ab ", "abc ", "aaab   ", "ab1 .", "xyz<|> "]),
       st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=12), st.sampled_from([300, 320, 400, 1000]),
       st.sampled_from([1, 2, 3]))  # fmt: skip
def test_the_library_tokenizer_when_merges_recreate_tokens(alphabet: str, seeds: list[int], vocab_size: int,
                                                           min_frequency: int) -> None:  # fmt: skip
    """Long words over two or three letters: merges make tokens that other merges made already
    ("ab" + "ab" and "aba" + "b"), pairs overlap ("aaa"), and the queue holds stale counts."""
    texts = ["".join(np.random.default_rng(s).choice(list(alphabet), size=s % 300)) for s in seeds]
    cfg = TokenizerConfig(vocab_size=vocab_size, min_frequency=min_frequency)
    assert train_bpe(texts, cfg).to_str() == _library(texts, cfg)


def test_the_library_tokenizer_on_the_quickstart_corpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pipelines.quickstart.config import GenerateConfig
    from pipelines.quickstart.generate import generate

    generate(GenerateConfig(out_dir=str(tmp_path), num_documents=1500, exact_duplicates=10, near_duplicates=10,
                            junk_documents=20, sft_examples=10, preference_pairs=10, ppo_prompts=10,
                            eval_prompts=10))  # fmt: skip
    texts = [json.loads(line)["text"] for f in sorted((tmp_path / "pretrain").glob("*.jsonl"))
             for line in f.read_text().splitlines()]  # fmt: skip
    monkeypatch.setattr(bpe, "_CHUNK_BYTES", 4096)  # many counting calls
    for cfg in (TokenizerConfig(vocab_size=1024), TokenizerConfig(vocab_size=4096, min_frequency=5)):
        assert train_bpe([*TRAINING, *texts], cfg).to_str() == _library([*TRAINING, *texts], cfg)


def test_special_tokens_that_are_byte_characters_or_merges() -> None:
    """A special token that is one byte character takes that character's place; one a merge would
    make ("ab") keeps its id, as the library's vocabulary does."""
    texts = ["ab ab abab! ab", "abba a!b"] * 5
    specials = ["!", "ab", "<|endoftext|>", "é"]
    cfg = TokenizerConfig(vocab_size=300, min_frequency=1)
    tok = bpe.train(bpe.count_words(texts), cfg.vocab_size, cfg.min_frequency, specials)
    tok.pre_tokenizer = pretokenize.pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    assert tok.to_str() == _library(texts, cfg, specials)


def test_stops_at_vocab_size_and_at_min_frequency() -> None:
    texts = TRAINING[:3] * 2
    small = json.loads(train_bpe(texts, TokenizerConfig(vocab_size=300, min_frequency=1)).to_str())
    assert len(small["model"]["vocab"]) == 300
    rare = json.loads(train_bpe(texts, TokenizerConfig(vocab_size=4096, min_frequency=1000)).to_str())
    assert rare["model"]["merges"] == [] and len(rare["model"]["vocab"]) == len(SPECIAL_TOKENS) + 256


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=60))
def test_heap_gives_the_highest_count_then_the_smallest_pair(rows: list[tuple[int, int, int]]) -> None:
    """The queue's order is the library's ``Merge`` order; entries equal in both come out in either
    order (here told apart by their word lists)."""
    heap, n = np.empty(4, np.int64), 0
    for i, (count, a, b) in enumerate(rows):
        heap = bpe._push(heap, n, count, a, b, i)
        n += 1
    got = []
    while n:
        count, a, b, words = bpe._pop(heap, n)
        n -= 1
        got.append((count, a, b))
    want = [(-c, a, b) for c, a, b in rows]
    heapq.heapify(want)
    assert got == [(-c, a, b) for c, a, b in (heapq.heappop(want) for _ in rows)]
