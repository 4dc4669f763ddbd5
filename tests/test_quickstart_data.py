"""The quickstart generator: deterministic files, ground truth that is true, a checkable task."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from pipelines.data.text import jaccard, words
from pipelines.quickstart.config import GenerateConfig
from pipelines.quickstart.generate import JUNK_KINDS, generate
from pipelines.quickstart.task import (
    format_answer,
    format_prompt,
    has_carry,
    is_correct,
    operands,
    parse_answer,
    reward,
)

_PROMPT = re.compile(r"What is (\d+) \+ (\d+)\?")
_ARITHMETIC = re.compile(r"What is (\d+) \+ (\d+)\? \d+ \+ \d+ = (\d+)\.|(\d+) plus (\d+) equals (\d+)\.")


def _small(out_dir: Path) -> GenerateConfig:
    return GenerateConfig(
        out_dir=str(out_dir),
        seed=7,
        num_documents=300,
        exact_duplicates=20,
        near_duplicates=30,
        junk_documents=25,
        sft_examples=200,
        preference_pairs=200,
        ppo_prompts=50,
        eval_prompts=50,
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in paths}


def _pair(prompt: str) -> tuple[int, int]:
    match = _PROMPT.fullmatch(prompt)
    assert match, prompt
    return int(match[1]), int(match[2])


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("quickstart")
    generate(_small(root))
    return root


@pytest.fixture(scope="module")
def docs(out: Path) -> dict[str, str]:
    rows = [row for part in sorted(out.glob("pretrain/*.jsonl")) for row in _read_jsonl(part)]
    texts = {row["id"]: row["text"] for row in rows}
    assert len(texts) == len(rows), "ids must be unique"
    return texts


@pytest.fixture(scope="module")
def truth(out: Path) -> dict[str, Any]:
    return json.loads((out / "ground_truth.json").read_text())


# --- files ------------------------------------------------------------------------------------


def test_same_config_gives_byte_identical_files(tmp_path: Path) -> None:
    first = generate(_small(tmp_path / "a"))
    second = generate(_small(tmp_path / "b"))
    assert first == second
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a == files_b
    expected = {f"pretrain/part-{i:04d}.jsonl" for i in range(4)} | {
        "ground_truth.json",
        "sft.jsonl",
        "preferences.jsonl",
        "ppo_prompts.jsonl",
        "preference_prompts.jsonl",
        "eval_prompts.jsonl",
        "eval_preferences.jsonl",
    }
    assert set(files_a) == expected, "writes these files and nothing else"
    for name, lines in first.items():
        assert files_a[name].count(b"\n") == lines


def test_another_seed_gives_another_corpus(tmp_path: Path) -> None:
    generate(_small(tmp_path / "a"))
    generate(_small(tmp_path / "b").model_copy(update={"seed": 8}))
    part = "pretrain/part-0000.jsonl"
    assert (tmp_path / "a" / part).read_bytes() != (tmp_path / "b" / part).read_bytes()


def test_impossible_counts_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval_prompts"):
        generate(_small(tmp_path).model_copy(update={"max_operand": 9, "eval_prompts": 26}))
    with pytest.raises(ValueError, match="near_duplicates"):
        generate(_small(tmp_path).model_copy(update={"near_duplicates": 301}))


# --- ground truth -----------------------------------------------------------------------------


def test_ground_truth_accounts_for_every_document(
    docs: dict[str, str], truth: dict[str, Any]
) -> None:
    assert truth["ngram"] == 5
    groups = [
        truth["unique"],
        [copy for copy, _ in truth["exact_duplicates"]],
        [near["id"] for near in truth["near_duplicates"]],
        [junk["id"] for junk in truth["junk"]],
    ]
    assert [len(g) for g in groups] == [300, 20, 30, 25]
    every = [doc_id for group in groups for doc_id in group]
    assert len(set(every)) == len(every) == truth["documents"] == len(docs)
    assert set(every) == set(docs)
    assert all(re.fullmatch(r"doc-\d{6}", doc_id) for doc_id in every)
    assert len({docs[i] for i in truth["unique"]}) == 300, "originals are all distinct"


def test_exact_duplicates_copy_their_originals(docs: dict[str, str], truth: dict[str, Any]) -> None:
    unique = set(truth["unique"])
    for copy, original in truth["exact_duplicates"]:
        assert original in unique
        assert docs[copy] == docs[original]


def test_near_duplicate_jaccards_are_exact_and_straddle_the_threshold(
    docs: dict[str, str], truth: dict[str, Any]
) -> None:
    unique = set(truth["unique"])
    similarities = []
    for near in truth["near_duplicates"]:
        assert near["original"] in unique, "copies are made of originals, never of copies"
        assert near["jaccard"] == jaccard(docs[near["original"]], docs[near["id"]], 5)
        similarities.append(near["jaccard"])
    assert not [s for s in similarities if 0.78 < s < 0.82]
    above = sum(s >= 0.82 for s in similarities)
    assert 0 < above < len(similarities)
    assert any(s >= 0.9 for s in similarities), "some are very close copies"
    assert max(similarities) < 1.0


def test_unrelated_documents_share_almost_no_shingles(
    docs: dict[str, str], truth: dict[str, Any]
) -> None:
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.sample(truth["unique"], 2)
        assert jaccard(docs[a], docs[b], 5) < 0.2


def test_originals_pass_quality_signals(docs: dict[str, str], truth: dict[str, Any]) -> None:
    with_arithmetic = 0
    for doc_id in truth["unique"]:
        text = docs[doc_id]
        tokens = text.split()
        lines = text.split("\n")
        assert 100 <= len(tokens) <= 260
        assert 3 <= sum(len(t.strip(".,?")) for t in tokens) / len(tokens) <= 10
        assert "#" not in text and "..." not in text
        assert len(set(lines)) == len(lines) >= 2
        assert sum(any(c.isalpha() for c in t) for t in tokens) / len(tokens) >= 0.8
        sums = _ARITHMETIC.findall(text)
        with_arithmetic += bool(sums)
        for match in sums:
            a, b, total = (int(x) for x in match if x)
            assert a + b == total, "planted arithmetic is true"
    assert 0.2 <= with_arithmetic / len(truth["unique"]) <= 0.5
    vocabulary = {w for doc_id in truth["unique"] for w in words(docs[doc_id])}
    assert len(vocabulary) >= 3000


def test_junk_is_what_its_kind_says(docs: dict[str, str], truth: dict[str, Any]) -> None:
    assert {junk["kind"] for junk in truth["junk"]} == set(JUNK_KINDS)
    for junk in truth["junk"]:
        text, kind = docs[junk["id"]], junk["kind"]
        tokens, lines = text.split(), text.split("\n")
        if kind == "too_short":
            assert len(tokens) < 20 and len(words(text)) < 20
            continue
        assert len(tokens) >= 20, "caught by its own rule, not by length"
        if kind == "symbol_soup":
            assert (text.count("#") + text.count("...")) / len(tokens) > 0.3
        elif kind == "repeated_lines":
            assert 1 - len(set(lines)) / len(lines) > 0.5
        elif kind == "non_alpha":
            assert sum(any(c.isalpha() for c in t) for t in tokens) / len(tokens) < 0.2
        elif kind == "bullet_list":
            assert all(line.startswith(("• ", "- ")) for line in lines)
        else:
            pytest.fail(f"unexpected junk kind {kind}")


# --- the task ---------------------------------------------------------------------------------


def test_task_functions_on_hand_made_cases() -> None:
    assert format_prompt(12, 7) == "What is 12 + 7?" and operands("What is 12 + 7?") == (12, 7)
    assert format_answer(12, 7, 19) == "12 + 7 = 19."
    assert parse_answer("12 + 7 = 19.", 12, 7) == 19, "the answer follows the '='"
    assert parse_answer("7 + 12 = 19", 12, 7) == 19, "the operands in either order"
    assert parse_answer(" 19. ", 12, 7) == 19, "the bare sum"
    assert parse_answer("12 + 7 =", 12, 7) is None
    assert parse_answer("I am not sure.", 12, 7) is None
    assert is_correct("What is 12 + 7?", "12 + 7 = 19.", 19)
    assert not is_correct("What is 12 + 7?", "12 + 7 = 18.", 19)
    assert not is_correct("What is 12 + 7?", "12 + 7 equals nineteen", 19)
    assert has_carry(17, 25) and not has_carry(12, 7) and has_carry(5, 5)
    assert operands([{"role": "system", "content": "Add."}, {"role": "user", "content": "What is 2 + 3?"}]) == (2, 3)
    with pytest.raises(ValueError, match="not a quickstart prompt"):
        operands("What is 2 plus 3?")
    with pytest.raises(ValueError, match="not the sum"):
        is_correct("What is 12 + 7?", "19", 20)


@pytest.mark.parametrize(
    "response",
    [
        "2 + 5 = 6.",  # a false equation with the right number: other operands
        "9 +  = 6.",  # an operand missing
        "2 + 4 = 6.5",  # a decimal
        "2 + 4 = 6. Or 7.",  # trailing text
        "= 6, 5, 7",  # guesses listed
        "6 or 16",
        "6/1",
        "The answer is 6.",
        "-6",
        "\u0666",  # Arabic-Indic six: int() reads it, the grader does not
        "\uff16",  # a fullwidth six
        "2 + 4 = " + "6" * 5000,  # no ValueError from int()'s digit limit: no answer
    ],
)
def test_no_grade_by_format_or_guesses(response: str) -> None:
    """Only a whole answer counts: the equation with the prompt's own operands, or the bare sum."""
    assert not is_correct("What is 2 + 4?", response, 6)
    assert reward("What is 2 + 4?", response, 6) == 0.0


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("12 + 7 = 19.", 1.0),
        ("19", 1.0),
        ("Adding the two numbers together gives 19, which is the sum.", 0.0),  # not an answer's form
        ("I do not know.", 0.0),
        ("12 + 7 = 9.", 0.0),  # a dropped ten earns nothing: no partial credit
        ("12 + 7 = 20.", 0.0),
        ("12 + 7 =", 0.0),  # the format alone earns nothing
    ],
)
def test_reward_shape(response: str, expected: float) -> None:
    assert reward("What is 12 + 7?", response, 19) == pytest.approx(expected)


def test_task_data_is_labelled_correctly(out: Path) -> None:
    sft = _read_jsonl(out / "sft.jsonl")
    assert len(sft) == 200
    chat = [row for row in sft if "messages" in row]
    assert 0.3 <= len(chat) / len(sft) <= 0.7
    flawed = carries = 0
    for row in sft:
        if "messages" in row:
            user, assistant = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            prompt, response = user["content"], assistant["content"]
        else:
            prompt, response = row["prompt"], row["response"]
        a, b = _pair(prompt)
        assert response.startswith(f"{a} + {b} = ")
        if has_carry(a, b):
            carries += 1
            # The teacher's one flaw: a dropped carry, on carry sums only.
            assert parse_answer(response, a, b) in (a + b, a + b - 10)
            flawed += not is_correct(prompt, response, a + b)
        else:
            assert is_correct(prompt, response, a + b)
    assert 0.55 <= flawed / carries <= 0.85  # teacher_carry_error 0.7

    preferences = _read_jsonl(out / "preferences.jsonl")
    assert len(preferences) == 200
    same = [row for row in preferences if row["same_format"]]
    assert 0.6 <= len(same) / len(preferences) <= 0.9
    for row in preferences:
        a, b = _pair(row["prompt"])
        assert is_correct(row["prompt"], row["chosen"], a + b) and row["chosen"] == format_answer(a, b, a + b)
        assert not is_correct(row["prompt"], row["rejected"], a + b)
        guess = parse_answer(row["rejected"], a, b)
        if row["same_format"]:
            assert row["rejected"].startswith(f"{a} + {b} = ") and guess is not None and guess >= 0
        else:
            assert guess is None
        chosen, rejected = (reward(row["prompt"], row[k], a + b) for k in ("chosen", "rejected"))
        assert chosen > rejected
    # A wrong tens digit is as often too high as too low, on sums with a carry too: "the larger
    # sum wins" is no shortcut for the reward model.
    for carry in (True, False):
        tens = [parse_answer(r["rejected"], *_pair(r["prompt"])) - sum(_pair(r["prompt"])) for r in same
                if has_carry(*_pair(r["prompt"])) == carry
                and (parse_answer(r["rejected"], *_pair(r["prompt"])) - sum(_pair(r["prompt"]))) % 10 == 0]  # fmt: skip
        assert len(tens) > 15 and 0.25 <= sum(d > 0 for d in tens) / len(tens) <= 0.75, (carry, tens)

    for name in ("ppo_prompts.jsonl", "eval_prompts.jsonl"):
        for row in _read_jsonl(out / name):
            assert sum(_pair(row["prompt"])) == row["answer"]
    held = [_pair(row["prompt"]) for row in _read_jsonl(out / "eval_preferences.jsonl")]
    assert held == [_pair(row["prompt"]) for row in _read_jsonl(out / "eval_prompts.jsonl")]


def _tens_share(rows: list[dict[str, Any]]) -> float:
    same = [row for row in rows if row["same_format"]]
    misses = [parse_answer(r["rejected"], *_pair(r["prompt"])) - sum(_pair(r["prompt"])) for r in same]
    return sum(abs(m) == 10 for m in misses) / len(misses)


def _hedge_share(rows: list[dict[str, Any]]) -> float:
    return sum(not row["same_format"] for row in rows) / len(rows)


@pytest.mark.parametrize(("field", "measure", "low", "high"), [("preference_tens_share", _tens_share, 0.5, 0.9),
                                                               ("preference_hedge_share", _hedge_share, 0.1, 0.4)])
def test_pair_shares_move_the_training_pairs_and_not_the_held_out_ones(
    tmp_path: Path, field: str, measure: Any, low: float, high: float
) -> None:
    shares, held_out = [], []
    for share in (low, high):
        root = tmp_path / str(share)
        generate(_small(root).model_copy(update={"preference_pairs": 2000, field: share}))
        shares.append(measure(_read_jsonl(root / "preferences.jsonl")))
        held_out.append((root / "eval_preferences.jsonl").read_bytes())
    assert abs(shares[0] - low) <= 0.05 and abs(shares[1] - high) <= 0.04, shares
    assert held_out[0] == held_out[1]


def test_eval_pairs_are_held_out_from_everything(
    out: Path, docs: dict[str, str], truth: dict[str, Any]
) -> None:
    eval_pairs = [_pair(row["prompt"]) for row in _read_jsonl(out / "eval_prompts.jsonl")]
    assert len(eval_pairs) == len(set(eval_pairs)) == 50
    seen = {_pair(row["prompt"]) for row in _read_jsonl(out / "ppo_prompts.jsonl")}
    seen |= {_pair(row["prompt"]) for row in _read_jsonl(out / "preferences.jsonl")}
    every_training_pair = [_pair(row["prompt"]) for row in _read_jsonl(out / "preference_prompts.jsonl")]
    blocked = set(eval_pairs) | {(b, a) for a, b in eval_pairs}
    assert len(every_training_pair) == len(set(every_training_pair)) == 50 * 50 - len(blocked)  # max_operand 49
    seen |= set(every_training_pair)
    for row in _read_jsonl(out / "sft.jsonl"):
        seen.add(_pair(row["messages"][0]["content"] if "messages" in row else row["prompt"]))
    for text in docs.values():
        for match in _ARITHMETIC.findall(text):
            a, b, _ = (int(x) for x in match if x)
            seen.add((a, b))
    commuted = {(b, a) for a, b in eval_pairs}
    assert not (set(eval_pairs) | commuted) & seen
