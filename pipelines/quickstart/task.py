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

# A prompt as ``format_prompt`` writes it, and the two answers the grader accepts as stating a sum:
# the equation with the prompt's operands (either order) or the bare sum. ASCII digits only, spaces
# and the final period optional; anything else states no sum. Numbers of at most nine digits.
_PROMPT = re.compile(r"What is ([0-9]{1,9}) \+ ([0-9]{1,9})\?")
_EQUATION = re.compile(r"\s*([0-9]{1,9})\s*\+\s*([0-9]{1,9})\s*=\s*([0-9]{1,9})\s*\.?\s*")
_BARE = re.compile(r"\s*([0-9]{1,9})\s*\.?\s*")


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


def operands(prompt: str | list[dict[str, str]]) -> tuple[int, int]:
    """The operands of a prompt ``format_prompt`` wrote (as text, or as the last user turn of chat
    messages).

    Raises:
        ValueError: naming the prompt, when it is not ``"What is {a} + {b}?"``.
    """
    if isinstance(prompt, list):
        prompt = next((m.get("content", "") for m in reversed(prompt) if m.get("role") == "user"), "")
    match = _PROMPT.fullmatch(prompt) if isinstance(prompt, str) else None
    if match is None:
        raise ValueError(f"not a quickstart prompt ('What is A + B?'): {str(prompt)[:80]!r}")
    return int(match[1]), int(match[2])


def parse_answer(response: str, a: int, b: int) -> int | None:
    """The sum a response to ``a + b`` states, when it is a whole answer and nothing else.

    Accepted: ``"{a} + {b} = {s}."`` with the prompt's operands in either order, or the bare
    ``"{s}"`` (spaces and the final period optional, ASCII digits). Anything else states no sum:
    other operands (``"2 + 5 = 6."`` for ``2 + 4``: the right number in a false equation), more numbers (``"42 or 32"``),
    trailing or leading words, a sign, a decimal. So a grade cannot be had by format or by
    listing guesses.

    Args:
        response: The model's text.
        a: The prompt's first operand.
        b: The prompt's second operand.

    Returns:
        The stated sum, or None.
    """
    if (match := _EQUATION.fullmatch(response)) is not None:
        same_operands = sorted((int(match[1]), int(match[2]))) == sorted((a, b))
        return int(match[3]) if same_operands else None
    match = _BARE.fullmatch(response)
    return int(match[1]) if match is not None else None


def is_correct(prompt: str | list[dict[str, str]], response: str, answer: int) -> bool:
    """Whether the response to ``prompt`` states ``answer`` (``parse_answer``); ``answer`` must be
    the prompt's sum.

    Raises:
        ValueError: the prompt is not the quickstart's, or ``answer`` is not its sum.
    """
    a, b = operands(prompt)
    if answer != a + b:
        raise ValueError(f"answer {answer} is not the sum of {prompt!r}")
    return parse_answer(response, a, b) == answer


def reward(prompt: str | list[dict[str, str]], response: str, answer: int) -> float:
    """The programmatic reward for the addition task: 1.0 for the right sum stated as a whole
    answer (``parse_answer``), 0.0 otherwise. No partial credit: a sum off by ten (a dropped
    carry) is as wrong as any other, and a format alone earns nothing.

    Args:
        prompt: The prompt (its operands are checked against the equation the response states).
        response: The model's text.
        answer: The true sum.
    """
    return 1.0 if is_correct(prompt, response, answer) else 0.0


def correct(prompt: str | list[dict[str, str]], response: str, answer: int) -> bool:
    """The task metric, in the ``module:function`` form PPO's evaluation calls: ``is_correct``."""
    return is_correct(prompt, response, answer)
