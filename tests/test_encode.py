"""The corpus encoder's fast path gives exactly the ids ``tokenizers`` gives, or is not taken."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.data import encode, pretokenize
from pipelines.data.config import TokenizerConfig
from pipelines.data.encode import CorpusEncoder, fast_path_applies
from pipelines.data.pretokenize import PIECE_PATTERN
from pipelines.data.tokenizer import save_hf_tokenizer, train_bpe

TRAINING = [
    "The quick brown fox's den, isn't it? They'll say 'we've 12 of 345' -- e.g. U.S.A. & co.",
    "Numbers 2024-05-06 and 3.14159; tabs\tand  double  spaces.\n\nNew paragraph!!! ...",
    "What is 7 + 35? 42. I'm sure you'd agree; we're done. <|endoftext|> <|im_start|>user",
] * 30
# Letters, digits, apostrophes and contractions, punctuation, every ASCII whitespace (and the
# \x1c-\x1f separators the fast path hands over), special-token text and non-ASCII letters.
PIECES = ["a", "Z", "the", " fox", "7", "42", "'", "'s", "'S", "'ll", "'re", " 'd", "!", "...", ",", "-", "+",
          " ", "  ", "\t", "\n", "\n\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1f", "<|endoftext|>", "<|im_end|>",
          "é", "ß", "²", "日本", "\u00a0", "\u2003"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tokenizer.json the data stage hands to its tasks (saved through transformers)."""
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_hf_tokenizer(train_bpe(iter(TRAINING), TokenizerConfig(vocab_size=400, min_frequency=1)), folder)
    return (folder / "tokenizer.json").read_text()


def _reference(tokenizer_json: str, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.encode_special_tokens = True
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def test_the_stage_tokenizer_takes_the_fast_path(tokenizer_json: str) -> None:
    assert fast_path_applies(json.loads(tokenizer_json))
    other = json.loads(tokenizer_json)
    other["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] = False
    assert not fast_path_applies(other)
    assert not fast_path_applies({**json.loads(tokenizer_json), "normalizer": {"type": "NFC"}})
    ignoring = json.loads(tokenizer_json)
    ignoring["model"]["ignore_merges"] = True  # a word in the vocabulary is one token: not the kernel's BPE
    assert not fast_path_applies(ignoring)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=40).map("".join), min_size=1, max_size=8))
def test_same_ids_as_encode_batch(tokenizer_json: str, texts: list[str]) -> None:
    encoder = CorpusEncoder(tokenizer_json)
    got = encoder.encode(texts)
    assert all(ids.dtype == np.int32 for ids in got)
    assert [ids.tolist() for ids in got] == _reference(tokenizer_json, texts)
    assert [ids.tolist() for ids in encoder.encode(texts)] == _reference(tokenizer_json, texts)  # from the cache
    _assert_ragged(CorpusEncoder(tokenizer_json), texts, _reference(tokenizer_json, texts))


def _assert_ragged(encoder: CorpusEncoder, texts: list[str], want: list[list[int]]) -> None:
    """``encode_ragged``: the same ids back to back, with each text's count."""
    ids, lens = encoder.encode_ragged(texts)
    assert ids.dtype == np.int32 and lens.dtype == np.int64
    assert ids.tolist() == [t for doc in want for t in doc]
    assert lens.tolist() == [len(doc) for doc in want]


def test_same_ids_on_the_quickstart_corpus(tokenizer_json: str, tmp_path: Path) -> None:
    from pipelines.quickstart.config import GenerateConfig
    from pipelines.quickstart.generate import generate

    generate(GenerateConfig(out_dir=str(tmp_path), num_documents=300, exact_duplicates=10, near_duplicates=10,
                            junk_documents=20, sft_examples=10, preference_pairs=10, ppo_prompts=10,
                            eval_prompts=10))  # fmt: skip
    texts = [json.loads(line)["text"] for f in sorted((tmp_path / "pretrain").glob("*.jsonl"))
             for line in f.read_text().splitlines()]  # fmt: skip
    assert len(texts) > 300
    assert [ids.tolist() for ids in CorpusEncoder(tokenizer_json).encode(texts)] == _reference(tokenizer_json, texts)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(max_codepoint=127), max_size=60), min_size=1, max_size=6))
def test_piece_state_machine_is_the_pattern(texts: list[str]) -> None:
    """The state machine's pieces, as the BPE trainer counts them, are the pattern's (their order
    is checked through the token ids above)."""
    assert _counted(texts) == Counter(piece.encode() for t in texts for piece in PIECE_PATTERN.findall(t))


def test_pieces_too_long_for_the_kernel_get_the_librarys_ids(tokenizer_json: str) -> None:
    """A piece over ``_KERNEL_PIECE_BYTES`` (a run of letters a file long) is encoded by the
    library's model, between pieces the kernel encodes, in one batch."""
    rng = np.random.default_rng(0)
    long_word = "".join(rng.choice(list("thequickbrownfox"), size=3 * encode._KERNEL_PIECE_BYTES))
    texts = ["What is 7 + 35?", "x" * 5000 + " done", long_word, f"the {long_word}s end", "the fox"]
    got = CorpusEncoder(tokenizer_json).encode(texts)
    assert [ids.tolist() for ids in got] == _reference(tokenizer_json, texts)


def test_hash_collisions_fall_back_to_encode_batch(tokenizer_json: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every piece hashing alike: the cache keeps one per hash and the rest take the slow path."""
    monkeypatch.setattr(encode, "_HASH_MASK", np.uint64(0))  # every piece's hash is 1
    texts = ["What is 7 + 35?", "the the the", "x", "", "I'm sure you'd agree"]
    encoder = CorpusEncoder(tokenizer_json)
    assert [ids.tolist() for ids in encoder.encode(texts)] == _reference(tokenizer_json, texts)
    assert encoder._cache.size == 1
    ids, lens = encoder.encode_ragged(texts)
    assert ids.tolist() == [t for doc in _reference(tokenizer_json, texts) for t in doc]
    assert lens.tolist() == [len(doc) for doc in _reference(tokenizer_json, texts)]


def test_pieces_alike_in_their_first_eight_bytes_are_told_apart(tokenizer_json: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot holds a piece's first 8 bytes: two longer pieces of one length and hash that differ
    only after them must still get their own ids (the first is cached, the second misses)."""
    monkeypatch.setattr(encode, "_HASH_MASK", np.uint64(0))  # every piece's hash is 1
    texts = [" abcdefghij", " abcdefghik", " abcdefghij"]
    encoder = CorpusEncoder(tokenizer_json)
    assert [ids.tolist() for ids in encoder.encode(texts)] == _reference(tokenizer_json, texts)
    assert encoder._cache.size == 1


def test_cache_is_emptied_when_full(tokenizer_json: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encode, "_MAX_CACHED_WORDS", 3)
    encoder = CorpusEncoder(tokenizer_json)
    texts = TRAINING[:3]
    for _ in range(3):
        assert [ids.tolist() for ids in encoder.encode(texts)] == _reference(tokenizer_json, texts)
    assert encoder._cache.size <= 3 + len(PIECE_PATTERN.findall(" ".join(texts)))


def test_counted_pieces_are_the_pre_tokenizer_pieces() -> None:
    """The BPE trainer's word counts (``encode.PieceCounter``) are the library's pre-tokenizer's
    pieces, byte-level mapped back to bytes, each counted."""
    library = pretokenize.pre_tokenizer()
    inverse = {ch: b for b, ch in enumerate(pretokenize.byte_chars())}
    texts = [t for t in TRAINING[:3] if t.isascii()] + ["\x00\x7f\t \n  x", ""]
    want = Counter(bytes(inverse[c] for c in piece) for t in texts for piece, _ in library.pre_tokenize_str(t))
    assert _counted(texts) == want


def _counted(texts: list[str]) -> Counter[bytes]:
    counter = encode.PieceCounter()
    counter.add(texts[: len(texts) // 2])
    counter.add(texts[len(texts) // 2 :])  # counts add up across calls
    data, off, counts = counter.pieces()
    assert not counter.unindexed
    return Counter({data[a:b].tobytes(): int(c) for a, b, c in zip(off[:-1], off[1:], counts)})


def test_large_batches_are_encoded_in_bounded_chunks(tokenizer_json: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert encode._chunks([1, 2, 3, 4], [5, 5, 20, 1], 10) == [[1, 2], [3], [4]]
    assert encode._chunks([], [], 10) == []
    monkeypatch.setattr(encode, "_CHUNK_BYTES", 64)  # several documents per call, and one alone
    texts = [*TRAINING[:5], "x" * 200, "é", *TRAINING[5:9]]
    assert [ids.tolist() for ids in CorpusEncoder(tokenizer_json).encode(texts)] == _reference(tokenizer_json, texts)
    _assert_ragged(CorpusEncoder(tokenizer_json), texts, _reference(tokenizer_json, texts))  # "é": the slow path
    ascii_only = [*TRAINING[:5], "x" * 200, *TRAINING[5:9]]  # the fast path, in several calls
    _assert_ragged(CorpusEncoder(tokenizer_json), ascii_only, _reference(tokenizer_json, ascii_only))
    _assert_ragged(CorpusEncoder(tokenizer_json), [], [])


def test_a_tokenizer_folder_without_tokenizer_json_gets_the_converted_one(tokenizer_json: str, tmp_path: Path) -> None:
    """``data.tokenizer.path`` naming GPT-2-style files alone (vocab.json + merges.txt): the copy the
    data stage encodes with has a tokenizer.json that encodes as transformers does."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from pipelines.data.tokenizer import copy_hf_tokenizer

    src = tmp_path / "gpt2-style"
    src.mkdir()
    Tokenizer.from_str(tokenizer_json).model.save(str(src))  # vocab.json, merges.txt
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                           "eos_token": "<|endoftext|>"}))  # fmt: skip
    copy_hf_tokenizer(src, tmp_path / "copy")
    assert not (src / "tokenizer.json").exists() and (tmp_path / "copy" / "tokenizer.json").is_file()
    copied = Tokenizer.from_file(str(tmp_path / "copy" / "tokenizer.json"))
    text = TRAINING[0] + TRAINING[2]
    assert copied.encode(text, add_special_tokens=False).ids == AutoTokenizer.from_pretrained(src).encode(
        text, add_special_tokens=False
    )


def test_a_copied_tokenizers_truncation_and_padding_are_not_applied_to_documents(tokenizer_json: str) -> None:
    """A tokenizer.json from data.tokenizer.path (a BERT-style one) may truncate and pad: the slow
    path (non-ASCII documents) cut them to max_length and padded the rest into the shards."""
    from tokenizers import Tokenizer

    configured = Tokenizer.from_str(tokenizer_json)
    configured.enable_truncation(max_length=5)
    configured.enable_padding(pad_id=0, pad_token="<|endoftext|>")
    texts = ["café au lait, the quick brown fox", "é", "x y"]
    ids, lens = CorpusEncoder(configured.to_str()).encode_ragged(texts)
    want = _reference(tokenizer_json, texts)
    assert lens.tolist() == [len(w) for w in want] and ids.tolist() == [t for w in want for t in w]
