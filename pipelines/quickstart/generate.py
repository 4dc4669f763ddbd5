"""Deterministic quickstart data: a corpus with known flaws, and the addition task's data.

The corpus is synthetic English-like text over a vocabulary of a few thousand invented words, so
two unrelated documents share essentially no word 5-grams and every duplicate is one we planted.
``ground_truth.json`` records each planted exact copy, near copy (with its exact Jaccard
similarity, as ``pipelines.data.text.jaccard`` computes it) and junk document, so the data stage's
filters and dedup can be scored, not just run. About a third of the documents also state true
sums in the task's own prompt format, so pretraining sees the task.

The task files (SFT, preferences, PPO prompts, eval prompts) draw operand pairs from one split:
eval pairs, and their commuted twins, appear nowhere else, pretraining text included.

Same config, byte-identical files: every random choice comes from a ``random.Random`` seeded from
``(seed, purpose)``, so e.g. changing ``sft_examples`` leaves the corpus unchanged.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.rundir import atomic_write_json, atomic_write_text
from pipelines.data.text import jaccard
from pipelines.quickstart.config import GenerateConfig
from pipelines.quickstart.task import format_answer, format_prompt, has_carry

# An addition task's operands (a, b).
Pair = tuple[int, int]

NGRAM = 5
PRETRAIN_PARTS = 4
JUNK_KINDS = ("too_short", "symbol_soup", "repeated_lines", "non_alpha", "bullet_list")
# Target Jaccard bands for near copies, one third each: two above the dedup threshold 0.8, one
# below. None touches (0.78, 0.82), so which copies count as duplicates at 0.8 is unambiguous.
NEAR_DUPLICATE_BANDS = ((0.90, 0.97), (0.82, 0.88), (0.50, 0.70))

# Common English words (the grammar's among them). Invented stems skip them, so a real word
# never doubles as an invented noun or verb ("some" and "became" are valid syllable strings).
_FUNCTION_WORDS = (
    "the a of and to in is was that for on with as by at from this it every some each many "
    "no near under over after before because when while but or then also very not they we "
    "what plus equals seemed became stayed"
).split()
_ONSETS = "b c d f g h j k l m n p r s t v w z br cr dr fr gr pl pr st tr sh ch th".split()
_VOWELS = "a e i o u ai ea ou".split()
_CODAS = ["", "", "n", "r", "l", "s", "m", "nd", "st"]
_ADJECTIVE_SUFFIXES = ("ic", "ous", "al", "ish")
_SINGULAR_DETERMINERS = ("the", "the", "a", "every", "this", "each", "no")
_PLURAL_DETERMINERS = ("some", "many", "the")
_PREPOSITIONS = ("with", "under", "near", "from", "over", "after", "before", "for")
# A token the near-copy editor may touch: a plain word, perhaps with its punctuation. Numbers
# are never edited, so every arithmetic sentence in a copy stays true.
_EDITABLE = re.compile(r"[A-Za-z]+[.,?]?")

# Hedges: responses that answer nothing, the "different format" rejects of the preference data.
_RAMBLES = (
    "Let me think about this carefully before I answer.",
    "Addition means putting two amounts together into one.",
    "That is a good question about numbers.",
    "I would need to count it out slowly to be sure.",
    "Numbers can be added in any order you like.",
    "It depends on how you look at the problem.",
)


@dataclass(frozen=True)
class Vocabulary:
    """Invented content words by part of speech (surface forms, ready to use)."""

    nouns: list[str]
    verbs: list[str]
    adjectives: list[str]
    adverbs: list[str]

    def content(self) -> list[str]:
        return self.nouns + self.verbs + self.adjectives + self.adverbs


def _rng(seed: int, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across runs and platforms.
    return random.Random(f"kiln-quickstart/{seed}/{purpose}")


def build_vocabulary(rng: random.Random) -> Vocabulary:
    """About 5,000 distinct invented words: 2-3 syllable stems with part-of-speech suffixes."""
    seen = set(_FUNCTION_WORDS)
    stems: list[str] = []
    while len(stems) < 3100:
        syllables = rng.choice((2, 2, 2, 2, 3))
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        stem += rng.choice(_CODAS)
        if stem not in seen:
            seen.add(stem)
            stems.append(stem)
    verbs = stems[1600:2300]
    return Vocabulary(
        nouns=stems[:1600],
        verbs=[v + "s" for v in verbs] + [v + "ed" for v in verbs],
        adjectives=[a + rng.choice(_ADJECTIVE_SUFFIXES) for a in stems[2300:2800]],
        adverbs=[a + "ly" for a in stems[2800:]],
    )


def _noun_phrase(rng: random.Random, vocab: Vocabulary, topic: list[str]) -> str:
    # About a third of the nouns come from the document's topic, as in real text.
    noun = rng.choice(topic) if rng.random() < 0.35 else rng.choice(vocab.nouns)
    adjective = rng.choice(vocab.adjectives) + " " if rng.random() < 0.4 else ""
    if rng.random() < 0.25:
        return f"{rng.choice(_PLURAL_DETERMINERS)} {adjective}{noun}s"
    return f"{rng.choice(_SINGULAR_DETERMINERS)} {adjective}{noun}"


def _verb_phrase(rng: random.Random, vocab: Vocabulary, topic: list[str]) -> str:
    kind = rng.random()
    if kind < 0.15:
        # Copulas that agree with singular and plural subjects alike.
        return f"{rng.choice(('seemed', 'became', 'stayed'))} {rng.choice(vocab.adjectives)}"
    if kind < 0.3:
        return f"{rng.choice(vocab.verbs)} {rng.choice(vocab.adverbs)}"
    phrase = f"{rng.choice(vocab.verbs)} {_noun_phrase(rng, vocab, topic)}"
    if rng.random() < 0.4:
        phrase += f" {rng.choice(_PREPOSITIONS)} {_noun_phrase(rng, vocab, topic)}"
    return phrase


def _sentence(rng: random.Random, vocab: Vocabulary, topic: list[str]) -> str:
    def clause() -> str:
        return f"{_noun_phrase(rng, vocab, topic)} {_verb_phrase(rng, vocab, topic)}"

    shape = rng.random()
    if shape < 0.45:
        text = clause()
    elif shape < 0.6:
        text = f"{clause()}, and {clause()}"
    elif shape < 0.72:
        text = f"when {clause()}, {clause()}"
    elif shape < 0.84:
        text = f"{clause()} because {clause()}"
    else:
        text = f"{rng.choice(vocab.adverbs)}, {clause()}"
    return text[0].upper() + text[1:] + "."


def _arithmetic_sentence(rng: random.Random, pairs: list[Pair]) -> str:
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        return f"{format_prompt(a, b)} {format_answer(a, b, a + b)}"
    return f"{a} plus {b} equals {a + b}."


def make_document(rng: random.Random, vocab: Vocabulary, pairs: list[Pair]) -> str:
    """One clean document of about 110-220 words (~1.2 KB), a paragraph per line.

    Args:
        rng: The corpus's random stream.
        vocab: Words to draw from.
        pairs: Operand pairs an arithmetic sentence may use (eval pairs excluded).

    Returns:
        The text; about a third of documents also contain 1-3 true arithmetic sentences.
    """
    topic = rng.sample(vocab.nouns, 6)
    # The last sentence and any arithmetic overshoot the target by up to ~30 words.
    target_words = rng.randint(110, 190)
    paragraphs: list[list[str]] = []
    count = 0
    while count < target_words:
        paragraph: list[str] = []
        for _ in range(rng.randint(2, 5)):
            sentence = _sentence(rng, vocab, topic)
            paragraph.append(sentence)
            count += len(sentence.split())
            if count >= target_words:
                break
        paragraphs.append(paragraph)
    if rng.random() < 1 / 3:
        for _ in range(rng.randint(1, 3)):
            paragraph = rng.choice(paragraphs)
            paragraph.insert(rng.randint(0, len(paragraph)), _arithmetic_sentence(rng, pairs))
    # Single newlines: blank separator lines would count as repeated lines in quality filters.
    return "\n".join(" ".join(paragraph) for paragraph in paragraphs)


def _edit_once(rng: random.Random, lines: list[list[str]], content: list[str]) -> None:
    """Substitute, insert or delete one word (in place), leaving numbers alone."""
    spots = [
        (i, j)
        for i, line in enumerate(lines)
        for j, token in enumerate(line)
        if _EDITABLE.fullmatch(token)
    ]
    i, j = rng.choice(spots)
    operation = rng.randrange(3)
    if operation == 0:
        token = lines[i][j]
        core = token.rstrip(".,?")
        word = rng.choice(content)
        lines[i][j] = (word.capitalize() if core[0].isupper() else word) + token[len(core) :]
    elif operation == 1:
        lines[i].insert(j + 1, rng.choice(content))
    elif len(lines[i]) > 1:
        del lines[i][j]


def near_duplicate(
    rng: random.Random, text: str, content: list[str], low: float, high: float
) -> tuple[str, float]:
    """A copy of ``text`` edited word by word until its exact Jaccard falls in [low, high].

    Args:
        rng: The corpus's random stream.
        text: The original document.
        content: Words that substitutions and insertions draw from.
        low: Lowest acceptable similarity.
        high: Highest acceptable similarity.

    Returns:
        The copy and its measured ``jaccard(text, copy, NGRAM)``.
    """
    # Each edit lowers the similarity by a few hundredths on a ~150-word document, so a stop at
    # a random target inside the band lands in it on most tries; an overshoot below ``low``
    # starts over from the original with fresh edits.
    while True:
        target = rng.uniform(low, high)
        lines = [line.split(" ") for line in text.split("\n")]
        similarity = 1.0
        while similarity > target:
            _edit_once(rng, lines, content)
            copy = "\n".join(" ".join(line) for line in lines)
            similarity = jaccard(text, copy, NGRAM)
        if similarity >= low:
            return copy, similarity


def make_junk(rng: random.Random, vocab: Vocabulary, kind: str) -> str:
    """A low-quality document of one kind (see ``JUNK_KINDS``) that a quality filter should drop.

    Every kind but ``too_short`` has at least 20 words, so it is caught by its own rule.
    """
    content = vocab.content()
    if kind == "too_short":
        text = " ".join(rng.choices(content, k=rng.randint(3, 15)))
        return text.capitalize() + "."
    if kind == "symbol_soup":
        # About 0.7 '#' or '...' per word; Gopher drops documents above 0.1.
        lines = []
        for _ in range(rng.randint(2, 4)):
            tokens = []
            for word in rng.choices(content, k=rng.randint(10, 16)):
                roll = rng.random()
                tokens.append(f"#{word}" if roll < 0.35 else f"{word}..." if roll < 0.7 else word)
            lines.append(" ".join(tokens))
        return "\n".join(lines)
    if kind == "repeated_lines":
        topic = rng.sample(vocab.nouns, 6)
        repeated = _sentence(rng, vocab, topic)
        lines = [_sentence(rng, vocab, topic)] + [repeated] * rng.randint(8, 15)
        return "\n".join(lines)
    if kind == "non_alpha":
        rows = []
        for _ in range(rng.randint(8, 14)):
            cells = [
                rng.choice((str(rng.randint(0, 9999)), f"{rng.uniform(0, 100):.2f}", "--", "%"))
                for _ in range(rng.randint(4, 7))
            ]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)
    if kind == "bullet_list":
        # Both bullet characters Gopher-style filters recognise, one per document.
        marker = rng.choice(("•", "-"))
        lines = [
            f"{marker} " + " ".join(rng.choices(content, k=rng.randint(2, 4)))
            for _ in range(rng.randint(12, 18))
        ]
        return "\n".join(lines)
    raise ValueError(f"unknown junk kind {kind!r}; expected one of {JUNK_KINDS}")


def split_pairs(
    rng: random.Random, max_operand: int, eval_count: int
) -> tuple[list[Pair], list[Pair]]:
    """Operand pairs for training data and for eval, never sharing a pair.

    Args:
        rng: The task's random stream.
        max_operand: Operands are drawn from [0, max_operand].
        eval_count: Distinct pairs held out for eval.

    Returns:
        ``(train_pairs, eval_pairs)``; the commuted twin ``(b, a)`` of an eval pair is held out
        too, since it asks for the same answer.

    Raises:
        ValueError: eval would take more than a quarter of all pairs.
    """
    pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if eval_count > len(pairs) // 4:
        raise ValueError(
            f"generate.eval_prompts ({eval_count}) must be at most a quarter of the "
            f"{len(pairs)} operand pairs that max_operand={max_operand} allows"
        )
    held_out = rng.sample(pairs, eval_count)
    blocked = set(held_out) | {(b, a) for a, b in held_out}
    return [p for p in pairs if p not in blocked], held_out


def teacher_answer(rng: random.Random, a: int, b: int, carry_error: float) -> str:
    """The SFT demonstrator's answer: right, except that it drops the carry on a share of the
    sums that need one (writing 17 + 25 = 32) — a systematic flaw, as real demonstrations have,
    which imitation learns and reinforcement against a verifier or a reward model can undo."""
    value = a + b
    if has_carry(a, b) and rng.random() < carry_error:
        value -= 10
    return format_answer(a, b, value)


# The held-out pairs' shares of tens-digit misses and of hedges, fixed so that kiln eval measures
# one thing whatever the training pairs' mix.
HELD_OUT_TENS_SHARE = 0.5
HELD_OUT_HEDGE_SHARE = 0.25


def _wrong_value(rng: random.Random, a: int, b: int, tens_share: float) -> int:
    # ``tens_share`` of the wrong sums miss the tens digit by one, the rest the units digit by 1..9.
    # A tens miss is as often too high as too low, with or without a carry (a dropped carry, an
    # extra one): with only dropped carries, "the larger tens digit wins" is a shortcut a reward
    # model learns instead of the carry (90 % right on dropped carries, 42 % on an extra ten), and
    # RL on it learnt to add ten where it should not (README, The quickstart task).
    if rng.random() < tens_share:
        return a + b + (rng.choice((-10, 10)) if a + b >= 10 else 10)
    offset = rng.randint(1, 9) * rng.choice((-1, 1))
    return a + b + (offset if a + b + offset >= 0 else -offset)


def sft_example(rng: random.Random, a: int, b: int, carry_error: float) -> dict[str, Any]:
    """One teacher demonstration, in chat (``messages``) or plain (``prompt``/``response``) form."""
    prompt, response = format_prompt(a, b), teacher_answer(rng, a, b, carry_error)
    if rng.random() < 0.5:
        return {
            "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
        }
    return {"prompt": prompt, "response": response}


def preference_pair(rng: random.Random, a: int, b: int, tens_share: float, hedge_share: float) -> dict[str, Any]:
    """A right (chosen) and a worse (rejected) response to the same prompt.

    ``hedge_share`` of the rejects hedge without answering; the others state a wrong sum in the
    same format as the chosen one (``same_format: true``), ``tens_share`` of them with the tens
    digit wrong: the reward model must check the sum, not the shape.
    """
    same_format = rng.random() < 1.0 - hedge_share
    if same_format:
        rejected = format_answer(a, b, _wrong_value(rng, a, b, tens_share))
    else:
        rejected = " ".join(rng.sample(_RAMBLES, rng.randint(1, 2)))
    return {
        "prompt": format_prompt(a, b),
        "chosen": format_answer(a, b, a + b),
        "rejected": rejected,
        "same_format": same_format,
    }


def _prompt_row(a: int, b: int) -> dict[str, Any]:
    return {"prompt": format_prompt(a, b), "answer": a + b}


def _doc_id(index: int) -> str:
    return f"doc-{index:06d}"


def build_corpus(cfg: GenerateConfig, pairs: list[Pair]) -> tuple[list[str], dict[str, Any]]:
    """All pretraining documents, indexed by id number, and the ground truth about them.

    Ids follow creation order (originals, exact copies, near copies, junk), so every original
    has a smaller id than its copies and a keep-the-first dedup keeps the original.

    Args:
        cfg: Sizes and seed.
        pairs: Operand pairs arithmetic sentences may use.

    Returns:
        ``(texts, ground_truth)``; document ``i`` has id ``doc-{i:06d}``.

    Raises:
        ValueError: more copies asked for than there are originals to copy.
    """
    # Copies are planted from distinct originals, so there must be enough originals.
    for name in ("exact_duplicates", "near_duplicates"):
        if getattr(cfg, name) > cfg.num_documents:
            raise ValueError(
                f"generate.{name} ({getattr(cfg, name)}) exceeds "
                f"generate.num_documents ({cfg.num_documents})"
            )
    rng = _rng(cfg.seed, "corpus")
    vocab = build_vocabulary(rng)
    content = vocab.content()
    texts = [make_document(rng, vocab, pairs) for _ in range(cfg.num_documents)]
    unique = list(range(cfg.num_documents))
    exact = []
    for original in rng.sample(unique, cfg.exact_duplicates):
        exact.append([_doc_id(len(texts)), _doc_id(original)])
        texts.append(texts[original])
    near = []
    for k, original in enumerate(rng.sample(unique, cfg.near_duplicates)):
        low, high = NEAR_DUPLICATE_BANDS[k % len(NEAR_DUPLICATE_BANDS)]
        copy, similarity = near_duplicate(rng, texts[original], content, low, high)
        near.append(
            {"id": _doc_id(len(texts)), "original": _doc_id(original), "jaccard": similarity}
        )
        texts.append(copy)
    junk = []
    for k in range(cfg.junk_documents):
        kind = JUNK_KINDS[k % len(JUNK_KINDS)]
        junk.append({"id": _doc_id(len(texts)), "kind": kind})
        texts.append(make_junk(rng, vocab, kind))
    ground_truth = {
        "ngram": NGRAM,
        "documents": len(texts),
        "unique": [_doc_id(i) for i in unique],
        "exact_duplicates": exact,
        "near_duplicates": near,
        "junk": junk,
    }
    return texts, ground_truth


def build_task_data(
    cfg: GenerateConfig, train_pairs: list[Pair], eval_pairs: list[Pair]
) -> dict[str, list[dict[str, Any]]]:
    """The task files' rows by file name; each file draws from its own stream.

    ``eval_preferences.jsonl`` pairs are built on the held-out pairs, for ``kiln eval`` only,
    with ``HELD_OUT_TENS_SHARE`` and ``HELD_OUT_HEDGE_SHARE`` whatever the training pairs' shares
    are: the held-out measure stays the same when the training pairs' mix changes.
    """
    sft, preferences, ppo, held = (_rng(cfg.seed, name) for name in ("sft", "preferences", "ppo", "eval_preferences"))
    return {
        "sft.jsonl": [
            sft_example(sft, *sft.choice(train_pairs), cfg.teacher_carry_error) for _ in range(cfg.sft_examples)
        ],
        "preferences.jsonl": [
            preference_pair(
                preferences, *preferences.choice(train_pairs), cfg.preference_tens_share, cfg.preference_hedge_share
            )
            for _ in range(cfg.preference_pairs)
        ],
        "ppo_prompts.jsonl": [
            _prompt_row(*ppo.choice(train_pairs)) for _ in range(cfg.ppo_prompts)
        ],
        # Every training pair once: the prompts kiln preferences samples the SFT model on.
        "preference_prompts.jsonl": [_prompt_row(a, b) for a, b in train_pairs],
        "eval_prompts.jsonl": [_prompt_row(a, b) for a, b in eval_pairs],
        "eval_preferences.jsonl": [preference_pair(held, a, b, HELD_OUT_TENS_SHARE, HELD_OUT_HEDGE_SHARE)
                                   for a, b in eval_pairs],
    }


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def generate(cfg: GenerateConfig) -> dict[str, int]:
    """Write the quickstart corpus, its ground truth and the task data under ``cfg.out_dir``.

    Files: ``pretrain/part-000{0..3}.jsonl`` (``{"id", "text"}`` per line), ``ground_truth.json``,
    ``sft.jsonl``, ``preferences.jsonl``, ``ppo_prompts.jsonl``, ``preference_prompts.jsonl``,
    ``eval_prompts.jsonl``, ``eval_preferences.jsonl``; each written atomically.

    Args:
        cfg: Sizes, seed and output folder.

    Returns:
        Lines written per JSONL file, keyed by path relative to ``out_dir``.

    Raises:
        ValueError: the counts cannot be satisfied (see ``build_corpus`` and ``split_pairs``).
    """
    out = Path(cfg.out_dir)
    pairs_rng = _rng(cfg.seed, "pairs")
    train_pairs, eval_pairs = split_pairs(pairs_rng, cfg.max_operand, cfg.eval_prompts)
    texts, ground_truth = build_corpus(cfg, train_pairs)
    files = build_task_data(cfg, train_pairs, eval_pairs)

    # Shuffled, then dealt round-robin, so every part mixes originals, copies and junk.
    order = list(range(len(texts)))
    _rng(cfg.seed, "parts").shuffle(order)
    for part in range(PRETRAIN_PARTS):
        files[f"pretrain/part-{part:04d}.jsonl"] = [
            {"id": _doc_id(i), "text": texts[i]} for i in order[part::PRETRAIN_PARTS]
        ]

    for name, rows in files.items():
        atomic_write_text(out / name, _jsonl(rows))
    atomic_write_json(out / "ground_truth.json", ground_truth)
    return {name: len(rows) for name, rows in sorted(files.items())}
