"""Quality filters on hand-made documents."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.data.config import FilterConfig
from pipelines.data.filters import alpha_words, any_filter_on, first_failure
from pipelines.data.text import normalize

GOOD = (
    "The river ran quietly past the old mill where the miller kept his grain.\n"
    "Children played along the banks while their parents talked about the harvest.\n"
    "Evening came slowly and the lamps were lit one by one across the village."
)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (GOOD, None),
        ("too short to keep", "too_few_words"),
        ("a b c d e f g h i j k l m n o p q r s t u v w x y z", "mean_word_length"),
        ("# heading ... " * 30, "symbol_word_ratio"),
        ("\n".join(["the same line appears here again"] * 10), "duplicate_lines"),
        ("1234 5678 9012 3456 7890 " * 10 + "words", "alpha_words"),
        ("\n".join(f"- {w}pples and oranges from the market stall today" for w in "abcdefghij"), "bullet_lines"),
        ("\n".join(f"this line {w} keeps going for quite a while before it trails off..." for w in "abcdefghij"), "ellipsis_lines"),
    ],
)
def test_each_filter_catches_its_case(text: str, reason: str | None) -> None:
    assert first_failure(text, FilterConfig()) == reason


def test_filters_switch_off_with_null() -> None:
    off = FilterConfig(**{k: None for k in FilterConfig.model_fields})
    assert first_failure("tiny", off) is None
    assert first_failure("tiny", FilterConfig(min_words=None, min_mean_word_length=None)) is None



# --- the fast paths give exactly what the plain definitions give --------------------------------------------

_TEXTS = st.text(alphabet=st.sampled_from(list("ab Z1_-.#…\t\n\r\x0b\x0c\x1c\u00a0\u2003\u3000é²\u0301")), max_size=80)


@settings(max_examples=400, deadline=None)
@given(_TEXTS)
def test_alpha_words_fast_path_counts_words_with_a_letter(text: str) -> None:
    words = text.split()
    expected = sum(1 for w in words if any(c.isalpha() for c in w))
    for fraction in (0.0, 0.5, 0.99):
        cfg = FilterConfig(min_alpha_word_fraction=fraction)
        assert alpha_words(words, [], cfg) == ((expected / len(words) if words else 0.0) < fraction)


@settings(max_examples=400, deadline=None)
@given(_TEXTS)
def test_normalize_equals_its_line_by_line_definition(text: str) -> None:
    spaces = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
    t = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [spaces.sub(" ", line).strip() for line in t.split("\n")]
    assert normalize(text) == re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def test_any_filter_on_is_false_only_when_every_threshold_is_null() -> None:
    off = {name: None for name in FilterConfig.model_fields}
    assert not any_filter_on(FilterConfig(**off))
    assert any_filter_on(FilterConfig()) and any_filter_on(FilterConfig(**{**off, "max_words": 10}))
