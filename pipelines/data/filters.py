"""Gopher / C4-family quality filters: pure functions over one normalised document.

Each filter is named; ``first_failure`` returns the name of the first one a document fails, so
the data stage can count drops per filter. A threshold set to null in the config switches its
filter off.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pipelines.data.config import FilterConfig

# A word of ASCII text with no letter in it: words are joined by single spaces.
_ASCII_NO_LETTER_WORD = re.compile(r"(?<![^ ])[^ A-Za-z]+(?![^ ])")
_SYMBOLS = ("#", "...", "\u2026")
_BULLETS = ("-", "*", "\u2022", "\u2023", "\u25cf", "\u25e6")


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def too_few_words(words: list[str], lines: list[str], cfg: FilterConfig) -> bool:
    return cfg.min_words is not None and len(words) < cfg.min_words


def too_many_words(words: list[str], lines: list[str], cfg: FilterConfig) -> bool:
    return cfg.max_words is not None and len(words) > cfg.max_words


def mean_word_length(words: list[str], lines: list[str], cfg: FilterConfig) -> bool:
    if cfg.min_mean_word_length is None and cfg.max_mean_word_length is None:
        return False
    if not words:
        return cfg.min_mean_word_length is not None
    mean = sum(map(len, words)) / len(words)
    too_short = cfg.min_mean_word_length is not None and mean < cfg.min_mean_word_length
    too_long = cfg.max_mean_word_length is not None and mean > cfg.max_mean_word_length
    return too_short or too_long


def symbol_word_ratio(words: list[str], lines: list[str], cfg: FilterConfig) -> bool:
    if cfg.max_symbol_word_ratio is None:
        return False
    text = " ".join(words)
    symbols = sum(text.count(symbol) for symbol in _SYMBOLS)
    return _ratio(symbols, len(words)) > cfg.max_symbol_word_ratio


def duplicate_lines(words: list[str], lines: list[str], cfg: FilterConfig) -> bool:
    if cfg.max_duplicate_line_fraction is None:
        return False
    nonblank = [line for line in lines if line]
    repeats = len(nonblank) - len(set(nonblank))
    return _ratio(repeats, len(nonblank)) > cfg.max_duplicate_line_fraction


def alpha_words(words: list[str], lines: list[str], cfg: FilterConfig) -> bool:
    if cfg.min_alpha_word_fraction is None:
        return False
    joined = " ".join(words)
    if joined.isascii():  # the common case, in one regex pass: the letters are A-Z and a-z
        alpha = len(words) - len(_ASCII_NO_LETTER_WORD.findall(joined))
    else:
        alpha = sum(1 for w in words if any(c.isalpha() for c in w))
    return _ratio(alpha, len(words)) < cfg.min_alpha_word_fraction


def bullet_lines(words: list[str], lines: list[str], cfg: FilterConfig) -> bool:
    if cfg.max_bullet_line_fraction is None:
        return False
    nonblank = [line for line in lines if line]
    bullets = sum(1 for line in nonblank if line.startswith(_BULLETS))
    return _ratio(bullets, len(nonblank)) > cfg.max_bullet_line_fraction


def ellipsis_lines(words: list[str], lines: list[str], cfg: FilterConfig) -> bool:
    if cfg.max_ellipsis_line_fraction is None:
        return False
    nonblank = [line for line in lines if line]
    ellipses = sum(1 for line in nonblank if line.endswith(("...", "\u2026")))
    return _ratio(ellipses, len(nonblank)) > cfg.max_ellipsis_line_fraction


# Order matters only for which reason a document that fails several filters is counted under.
FILTERS: dict[str, Callable[[list[str], list[str], FilterConfig], bool]] = {
    "too_few_words": too_few_words,
    "too_many_words": too_many_words,
    "mean_word_length": mean_word_length,
    "symbol_word_ratio": symbol_word_ratio,
    "duplicate_lines": duplicate_lines,
    "alpha_words": alpha_words,
    "bullet_lines": bullet_lines,
    "ellipsis_lines": ellipsis_lines,
}


def any_filter_on(cfg: FilterConfig) -> bool:
    """Whether any filter has a threshold (all null: every document passes, nothing to compute)."""
    return any(value is not None for value in cfg.model_dump().values())


def first_failure(text: str, cfg: FilterConfig) -> str | None:
    """The name of the first quality filter ``text`` fails, or None if it passes them all.

    Words here are whitespace-separated tokens (as Gopher counts them), not dedup's words.
    """
    words = text.split()
    lines = text.split("\n")
    for name, fails in FILTERS.items():
        if fails(words, lines, cfg):
            return name
    return None
