"""Compile the data stage's numba kernels for this machine ahead of the first ``kiln data``.

numba compiles a kernel at its first call and keeps the machine code in its disk cache (the
``__pycache__`` beside each module), so only the first data stage of an installation pays: on the
quickstart corpus 19.8-20.8 s instead of 3.9-4.0 s on 2 CPUs, most of it on the stage's critical path, and
every kernel a pass needs compiled by each worker that runs it. ``scripts/setup.sh`` runs this
module once after installing, as uv compiles the packages' bytecode: the kernels in two groups side
by side, each through the same functions the stage calls, so each kernel is compiled for the
argument types the stage gives it.

    python -m pipelines.data.kernels          # both groups, one process each
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np

# A few documents with repeated words (so that BPE has pairs to merge), digits and punctuation.
_TEXTS = [
    "The quick brown fox jumps over the lazy dog 12 times, and the dog sleeps on.",
    "A quick brown dog jumps over the lazy fox; the fox runs off into the woods 345.",
    "Numbers such as 2024 and 7 are split one digit per token before the merges apply!",
] * 4


def _tokenizer_group() -> None:
    """Tokenizer training (``pipelines/data/bpe.py`` and its pre-tokenizer kernel)."""
    from pipelines.data.config import TokenizerConfig
    from pipelines.data.tokenizer import train_bpe

    train_bpe(iter(_TEXTS), TokenizerConfig(vocab_size=300, min_frequency=1))


def _library_bpe_json() -> str:
    """A small tokenizer of the kind ``kiln data`` trains, from the ``tokenizers`` library's own
    trainer (the one ``bpe.py`` reproduces), so this group compiles none of the other's kernels."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from core.chat import SPECIAL_TOKENS
    from pipelines.data.pretokenize import pre_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(_TEXTS, trainer)
    return tok.to_str()


def _corpus_group() -> None:
    """MinHash signatures and shingle sets (pass 1 and 2), candidate verification, and tokenising
    and splitting into streams (pass 3), through the functions the stage's tasks call."""
    from pipelines.data.dedup import pair_jaccard
    from pipelines.data.encode import CorpusEncoder, fast_path_applies
    from pipelines.data.minhash import MinHasher, shingle_sets
    from pipelines.data.packing import eos_streams
    from pipelines.data.parts import in_validation

    MinHasher(num_perm=16, ngram=5).signatures(_TEXTS)
    ids = np.arange(len(_TEXTS), dtype=np.int64)
    hashes, offsets = shingle_sets(_TEXTS, 5)
    pair_jaccard(np.array([[0, 1], [1, 2]], dtype=np.int64), [{"ids": ids, "offsets": offsets, "hashes": hashes}])
    tokenizer_json = _library_bpe_json()
    if not fast_path_applies(json.loads(tokenizer_json)):  # a tokenizers release that writes its JSON otherwise
        # Set-up goes on (the stage only compiles these itself); tests/test_kernels.py fails on it.
        print("kiln: warning: the corpus encoder's kernels were not compiled ahead (its stand-in tokenizer "
              "does not take the fast path)", file=sys.stderr)  # fmt: skip
    token_ids, lens = CorpusEncoder(tokenizer_json).encode_ragged(_TEXTS)
    eos_streams(token_ids, lens, in_validation(ids, 0.5), 0)


GROUPS: dict[str, Callable[[], None]] = {"tokenizer": _tokenizer_group, "corpus": _corpus_group}


def _run(name: str) -> tuple[str, float]:
    t = time.perf_counter()
    GROUPS[name]()
    return name, time.perf_counter() - t


def main() -> int:
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=len(GROUPS)) as pool:
        done = list(pool.map(_run, GROUPS))
    each = ", ".join(f"{name} {s:.1f} s" for name, s in done)
    print(f"kiln: data-stage kernels compiled for this CPU in {time.perf_counter() - t:.1f} s ({each})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
