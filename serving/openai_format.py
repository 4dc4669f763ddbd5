"""Pieces of OpenAI responses built from vLLM's outputs: pure functions, no engine.

Log-probabilities come from vLLM as one ``{token_id: Logprob}`` per position (``None`` for a
position without any, as the first prompt token of an echoed prompt); ``token_text(id, logprob)``
names a token as the answer shows it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

# The finite number OpenAI (and vLLM's server) write for a -inf log-probability: JSON has no inf.
_MIN_LOGPROB = -9999.0

TokenText = Callable[[int, Any], str]


def sse(payload: dict[str, Any]) -> str:
    """One Server-Sent Event, exactly as the OpenAI API frames them."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    token_ids: Sequence[int], positions: Sequence[dict[int, Any] | None], k: int, offset: int, token_text: TokenText
) -> dict[str, Any]:
    """The legacy completions format: parallel lists, top alternatives as ``{token: logprob}``.

    Args:
        token_ids: the tokens shown, one per position (an echoed prompt's, then the answer's).
        positions: vLLM's log-probabilities of each position (None: none, e.g. the first prompt token).
        k: alternatives per position (besides the chosen token, which is always among them).
        offset: characters before the first token (a stream's earlier text).
        token_text: the text of a token.
    """
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for token_id, position in zip(token_ids, positions):
        if position is None:
            text, chosen, alternatives = token_text(token_id, None), None, None
        else:
            text = token_text(token_id, position[token_id])
            chosen = max(position[token_id].logprob, _MIN_LOGPROB)
            # The chosen token and the k most likely (k + 1 entries at most, as OpenAI and vLLM).
            alternatives = {token_text(t, lp): max(lp.logprob, _MIN_LOGPROB)
                            for t, lp in position.items() if t == token_id or (lp.rank or 0) <= k}  # fmt: skip
        tokens.append(text)
        token_logprobs.append(chosen)
        top.append(alternatives)
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset}


def chat_logprobs(
    token_ids: Sequence[int], positions: Sequence[dict[int, Any]], k: int, token_text: TokenText
) -> list[dict[str, Any]]:
    """The chat format: one entry per token with its ``k`` top alternatives, most likely first."""
    content = []
    for token_id, position in zip(token_ids, positions):
        text = token_text(token_id, position[token_id])
        alternatives = sorted((lp.rank or 0, t, lp) for t, lp in position.items() if (lp.rank or 0) <= k)
        content.append({
            "token": text,
            "logprob": max(position[token_id].logprob, _MIN_LOGPROB),
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": (s := token_text(t, lp)), "logprob": max(lp.logprob, _MIN_LOGPROB),
                 "bytes": list(s.encode())}
                for _, t, lp in alternatives
            ][:k],
        })  # fmt: skip
    return content


def structured_outputs_args(response_format: Any) -> dict[str, Any] | None:
    """vLLM's ``StructuredOutputsParams`` arguments for a request's ``response_format``
    (None: free text), as vLLM's server maps them."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"json_object": True}
    return {"json": response_format.json_schema.schema_}
