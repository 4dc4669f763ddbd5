"""The quickstart's checkable task: two-operand addition.

Addition was chosen because a program can grade every answer, so the later stages (SFT, reward
model, PPO) can show that the model got *better at the task*, not only that a loss moved. Pure
Python with no heavy imports: PPO loads ``reward`` as a ``module:function`` reward in its actors.
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"-?\d+")

# Answers longer than this many (whitespace-separated) words are penalised by ``reward``.
MAX_SHORT_WORDS = 8
LENGTH_PENALTY = 0.1
# A wrong answer earns partial credit that falls linearly to zero at this absolute error.
PARTIAL_CREDIT_ERROR_SCALE = 10


def format_prompt(a: int, b: int) -> str:
    """The prompt for ``a + b``, the same everywhere (pretraining text, SFT, PPO, eval).

    Args:
        a: First operand.
        b: Second operand.

    Returns:
        ``"What is {a} + {b}?"``.
    """
    return f"What is {a} + {b}?"


def parse_answer(response: str) -> int | None:
    """The answer a response gives: its first integer (with an optional leading minus).

    Args:
        response: The model's text.

    Returns:
        The first integer in ``response``, or None when it contains none.
    """
    match = _INTEGER.search(response)
    return int(match.group()) if match else None


def is_correct(response: str, answer: int) -> bool:
    """Whether the response's first integer is the right answer.

    Args:
        response: The model's text.
        answer: The true sum.

    Returns:
        True when ``parse_answer(response) == answer``.
    """
    return parse_answer(response) == answer


def reward(prompt: str, response: str, answer: int) -> float:
    """The programmatic reward PPO uses for the addition task; a pure function in [0, 1].

    Shape, with ``err = parse_answer(response) - answer`` and ``long`` meaning more than
    ``MAX_SHORT_WORDS`` (8) whitespace-separated words:

    - no integer in the response: 0.0;
    - ``err == 0``: 1.0, or 0.9 when ``long``;
    - otherwise partial credit ``0.5 * max(0, 1 - |err| / 10)`` (0.45 at |err| = 1, 0 from
      |err| = 10 on), minus 0.1 when ``long``, floored at 0.0 so that a far-off rambling answer
      never scores below an answer with no number at all.

    Args:
        prompt: The prompt (unused; part of the ``module:function`` reward interface).
        response: The model's text.
        answer: The true sum.

    Returns:
        The reward.
    """
    guess = parse_answer(response)
    if guess is None:
        return 0.0
    err = abs(guess - answer)
    credit = 1.0 if err == 0 else 0.5 * max(0.0, 1.0 - err / PARTIAL_CREDIT_ERROR_SCALE)
    penalty = LENGTH_PENALTY if len(response.split()) > MAX_SHORT_WORDS else 0.0
    return max(0.0, credit - penalty)


def correct(prompt: str, response: str, answer: int) -> bool:
    """The task metric, in the ``module:function`` form PPO's evaluation calls: ``is_correct``."""
    return is_correct(response, answer)
