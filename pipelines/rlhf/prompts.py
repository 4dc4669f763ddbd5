"""Prompt files, the one format PPO, GRPO and ``kiln eval`` read: JSONL of ``{"prompt": str or
chat messages, ...other fields}``; the other fields go to the reward and metric functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.chat import check_messages, tokenize_chat
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
    contents tokenised as text (``<|im_start|>`` typed in a prompt cannot open a turn)."""
    return [tokenize_chat(tokenizer, q.messages, add_generation_prompt=True).ids for q in prompts]
