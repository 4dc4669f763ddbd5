"""Quality filters on hand-made documents."""

from __future__ import annotations

import pytest

from pipelines.data.config import FilterConfig
from pipelines.data.filters import first_failure

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

