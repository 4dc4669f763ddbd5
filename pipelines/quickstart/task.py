"""The quickstart's checkable task: two-operand addition, answered as an equation.

Addition was chosen because a program can grade every answer, so the later stages (SFT, reward
model, PPO) can show that the model got *better at the task*, not only that a loss moved. The
answer format is ``"{a} + {b} = {s}."``: restating the operands right before the sum gives a tiny
model the digits it adds next to where it writes the result (answering with the bare sum first
was learnt far more slowly). Pure Python with no heavy imports: PPO loads ``reward`` as a
``module:function`` reward in its actors.
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"-?\d+")

# Answers longer than this many (whitespace-separated) words lose LENGTH_PENALTY of their reward.
MAX_SHORT_WORDS = 8
LENGTH_PENALTY = 0.1


def format_prompt(a: int, b: int) -> str:
    """The prompt for ``a + b``, the same everywhere (pretraining text, SFT, PPO, eval).

    Args:
        a: First operand.
        b: Second operand.

    Returns:
        ``"What is {a} + {b}?"``.
    """
    return f"What is {a} + {b}?"


def format_answer(a: int, b: int, value: int) -> str:
    """A response stating ``value`` as the sum: ``"{a} + {b} = {value}."``."""
    return f"{a} + {b} = {value}."


def has_carry(a: int, b: int) -> bool:
    """Whether adding the units digits carries into the tens (e.g. 17 + 25: 7 + 5 = 12)."""
    return a % 10 + b % 10 >= 10


def parse_answer(response: str) -> int | None:
    """The answer a response gives: the first integer after its first ``=``, or, without an
    ``=``, its first integer.

    Args:
        response: The model's text.

    Returns:
        The stated answer, or None when there is none.
    """
    _, eq, after = response.partition("=")
    match = _INTEGER.search(after if eq else response)
    return int(match.group()) if match else None


def is_correct(response: str, answer: int) -> bool:
    """Whether the response states the right sum (``parse_answer(response) == answer``).

    Args:
        response: The model's text.
        answer: The true sum.
    """
    return parse_answer(response) == answer


def reward(prompt: str, response: str, answer: int) -> float:
    """The programmatic reward for the addition task; a pure function in [0, 1].

    1.0 for the right sum, 0.0 for a wrong one or none; a response of more than
    ``MAX_SHORT_WORDS`` words loses ``LENGTH_PENALTY``. No partial credit: a sum off by ten (a
    dropped carry) is as wrong as any other, and a format alone earns nothing.

    Args:
        prompt: The prompt (unused; part of the ``module:function`` reward interface).
        response: The model's text.
        answer: The true sum.

    Returns:
        The reward.
    """
    if not is_correct(response, answer):
        return 0.0
    return 1.0 - (LENGTH_PENALTY if len(response.split()) > MAX_SHORT_WORDS else 0.0)


def correct(prompt: str, response: str, answer: int) -> bool:
    """The task metric, in the ``module:function`` form PPO's evaluation calls: ``is_correct``."""
    return is_correct(response, answer)
