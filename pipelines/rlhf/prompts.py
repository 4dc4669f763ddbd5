"""Prompt files, the one format PPO, GRPO and ``kiln eval`` read: JSONL of ``{"prompt": str or
chat messages, ...other fields}``; the other fields go to the reward and metric functions. Also
PPO's tokenised prompts and which of them a step draws (a function of the seed and the step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.chat import check_messages, template_refusals, tokenize_chat
from core.jsonl import BadRecord, read_jsonl


@dataclass(frozen=True)
class PromptRecord:
    """One prompt record: as given (string or chat messages), its other fields, its source line."""

    prompt: Any
    fields: dict[str, Any]
    where: str

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The prompt as chat messages (a string is one user turn), as PPO's prompts are."""
        return [{"role": "user", "content": self.prompt}] if isinstance(self.prompt, str) else list(self.prompt)


def read_prompts(path: Path) -> list[PromptRecord]:
    """The prompts of a JSONL file: ``{"prompt": str or chat messages, ...other fields}``.

    Raises:
        FileNotFoundError: the file does not exist (naming it).
        BadRecord: a line is not JSON or has no usable ``prompt`` (naming ``file:line``): not a
            non-empty string nor chat messages with known roles; or the file has no prompt at all.
    """
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} not found")
    prompts = []
    for lineno, record in read_jsonl(path):
        prompt = record.get("prompt")
        if not (isinstance(prompt, str) and prompt) and not (isinstance(prompt, list) and prompt):
            raise BadRecord(f"{path}:{lineno}: 'prompt' must be a non-empty string or a list of chat messages")
        if isinstance(prompt, list):
            check_messages(prompt, f"{path}:{lineno}")
        prompts.append(PromptRecord(prompt, {k: v for k, v in record.items() if k != "prompt"}, f"{path}:{lineno}"))
    if not prompts:
        raise BadRecord(f"{path}: no prompts")
    return prompts


def prompt_ids(tokenizer: Any, prompts: list[PromptRecord]) -> list[list[int]]:
    """Each prompt's token ids: the chat template with the assistant turn opened (what is sampled),
    contents tokenised as text (``<|im_start|>`` typed in a prompt cannot open a turn).

    Raises:
        BadRecord: the chat template refused a prompt (its ``raise_exception``, or it reorders or
            rewrites contents), naming the prompt's ``file:line``.
    """
    out = []
    for q in prompts:
        with template_refusals(q.where, "prompt"):
            out.append(tokenize_chat(tokenizer, q.messages, add_generation_prompt=True).ids)
    return out


# --- PPO's prompts: tokenised, and drawn by step ------------------------------------------------


@dataclass
class Prompt:
    """One prompt: as given (string or chat messages), its token ids, its other fields, and the
    ``file:line`` it came from (named when a function fails on it)."""

    prompt: Any
    ids: list[int]
    fields: dict[str, Any]
    where: str = ""


def load_prompts(path: Path, tokenizer: Any, max_tokens: int) -> tuple[list[Prompt], int]:
    """Prompts of a JSONL file, chat template applied; those over ``max_tokens`` are skipped.

    Returns:
        (prompts, skipped count).

    Raises:
        FileNotFoundError: the file does not exist.
        BadRecord: a line is not JSON or has no usable ``prompt`` (naming file:line).
    """
    records = read_prompts(path)
    ids = prompt_ids(tokenizer, records)
    kept = [Prompt(r.prompt, i, r.fields, r.where) for r, i in zip(records, ids) if len(i) <= max_tokens]
    return kept, len(records) - len(kept)


def drawn_step(step: int, max_steps: int, revisit: int) -> int:
    """Whose prompts step ``step`` (0-based) draws: its own, or, in the last ``revisit`` steps,
    those of the first ``revisit`` again (``ppo.revisit_steps``)."""
    first_revisit = max_steps - revisit
    return step - first_revisit if revisit and step >= first_revisit else step


def prompt_indices(step: int, count: int, total: int, seed: int) -> list[int]:
    """Prompts of one step: positions ``[step * count, (step + 1) * count)`` of seeded per-epoch permutations."""
    orders: dict[int, torch.Tensor] = {}  # a step spans at most two epochs
    out = []
    for position in range(step * count, (step + 1) * count):
        epoch, offset = divmod(position, total)
        if epoch not in orders:
            orders[epoch] = torch.randperm(total, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(orders[epoch][offset]))
    return out
