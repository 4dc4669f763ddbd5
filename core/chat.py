"""The chat format every kiln model shares: special tokens, the ChatML template, stop tokens.

On the ground floor because the data stage (tokenizer training), SFT, PPO's rollout and the
serving replica must all format and end conversations the same way.
"""

from __future__ import annotations

from typing import Any

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# ChatML: every message is "<|im_start|>{role}\n{content}<|im_end|>\n"; a generation prompt
# opens the assistant turn. SFT masks everything but the assistant content and its <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: ``<|im_end|>`` for ChatML models (not their EOS
    token, so generation must stop on it explicitly), none for a tokenizer without it."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    return [im_end] if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else []
