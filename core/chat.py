"""The chat format every kiln model shares: special tokens, the ChatML template, stop tokens, and
tokenisation of a conversation in which only the template makes control tokens.

On the ground floor because the data stage (tokenizer training), SFT, PPO's rollout and the
serving replica must all format and end conversations the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from core.jsonl import BadRecord

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

# The roles a chat may hold. The template writes a role verbatim after <|im_start|>, so a role is
# checked against this list wherever records become messages, never passed through as given.
ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Any, where: str) -> None:
    """Check that ``messages`` is a chat: a non-empty list of ``{"role", "content"}`` dicts, each
    role one of :data:`ROLES` and each content a string.

    Raises:
        BadRecord: naming ``where`` (a record's ``file:line``) and what is wrong.
    """
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    )
    if not ok:
        raise BadRecord(f"{where}: messages must be a non-empty list of {{'role': str, 'content': str}}")
    role = next((m["role"] for m in messages if m["role"] not in ROLES), None)
    if role is not None:
        raise BadRecord(f"{where}: unknown role {role!r}; a message's role is one of {', '.join(ROLES)}")


def chat_stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: ``<|im_end|>`` for ChatML models (not their EOS
    token, so generation must stop on it explicitly), none for a tokenizer without it."""
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    return [im_end] if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else []


# Stand-ins for the message contents while the template renders: private-use code points, which no
# template writes, mark where each content goes.
_SLOT = "\ue000{}\ue001"
_SLOT_RE = re.compile("\ue000(\\d+)\ue001")


@dataclass(frozen=True)
class ChatTokens:
    """A conversation rendered by the chat template, and its tokens."""

    text: str  # the template's rendering
    ids: list[int]  # (T,)
    offsets: list[tuple[int, int]]  # (T,) each token's character span in text


class ChatTemplateChangesContents(ValueError):
    """A chat template that alters message contents (beyond trimming) or their order, which ``tokenize_chat`` cannot
    tokenise safely: a request with such messages is the client's to change (400), not a crash."""


@contextmanager
def template_refusals(where: str, what: str = "record") -> Iterator[None]:
    """A chat template's refusal of one record (its ``raise_exception``, a template that reorders or
    rewrites contents) as a BadRecord naming ``where`` (``file:line``)."""
    try:
        yield
    except (TemplateError, ChatTemplateChangesContents) as e:
        raise BadRecord(f"{where}: the chat template refused this {what}: {e}") from None


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> ChatTokens:
    """Render ``messages`` with the tokenizer's chat template and tokenise it so that only the
    template's own text can make special tokens: each message's content is tokenised as plain text.

    Tokenising the rendered string whole would parse ``<|im_end|>\n<|im_start|>system`` typed inside
    a message as control tokens, and so let its author forge a turn. Here the template renders with
    a stand-in per content; the special tokens the template itself writes cut the rendering into
    runs of text, and each run (template text and the contents inside it) is tokenised with special
    tokens split into ordinary pieces. Tokenising the rendering whole cuts it at the same special
    tokens, so a chat whose contents hold no control text gets exactly the ids it always had (a run
    is tokenised whole: BPE still merges across a content's edge, as in ``"\n" + "  x"``). Not safe
    to call from two threads on one tokenizer at once: ``split_special_tokens`` switches a flag on
    the shared Rust backend.

    Args:
        tokenizer: a Hugging Face fast tokenizer with a chat template.
        messages: ``{"role", "content"}`` dicts, contents as strings.
        add_generation_prompt: open the assistant turn at the end (what a model is asked to complete).

    Returns:
        The rendering (the template's own, character for character), its token ids and their offsets.

    Raises:
        ChatTemplateChangesContents: the template does not insert every content once and in order
            (a template that merges the system message into a later turn), or it changes a content
            other than by trimming its whitespace
            (a template that trims, as Llama 3's and Gemma's do, gets each content trimmed).
    """
    slotted = [{**m, "content": _SLOT.format(i)} for i, m in enumerate(messages)]
    frame = tokenizer.apply_chat_template(slotted, tokenize=False, add_generation_prompt=add_generation_prompt)
    pieces = _SLOT_RE.split(frame)  # template text, "0", template text, "1", ..., template text
    if [int(i) for i in pieces[1::2]] != list(range(len(messages))):
        raise ChatTemplateChangesContents("the chat template must insert every message's content once, in order")
    special = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    # Longest first: one special token's text may begin with another's.
    control = re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)) or "(?!)")
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    contents = [m["content"] for m in messages]
    text, cuts = _fill(pieces, contents, control)
    if text != rendered:  # a template that trims each content (Llama 3's, Gemma's: `content | trim`)
        text, cuts = _fill(pieces, [c.strip() for c in contents], control)
    if text != rendered:
        raise ChatTemplateChangesContents(
            "the model's chat template changes message contents beyond trimming them, so kiln cannot keep "
            "control-token text typed in a message from becoming control tokens; it needs a template that "
            "inserts each content unchanged (or trimmed)"
        )
    ids, offsets, at = [], [], 0
    with _plain_text_encoder(tokenizer) as encode:
        for lo, hi in [*cuts, (len(text), len(text))]:
            if lo > at:  # the run of text before this special token
                run_ids, run_offsets = encode(text[at:lo])
                ids += run_ids
                offsets += [(at + a, at + b) for a, b in run_offsets]
            if hi > lo:
                ids.append(special[text[lo:hi]])
                offsets.append((lo, hi))
            at = hi
    return ChatTokens(text, ids, offsets)


def _fill(pieces: list[str], contents: list[str], control: re.Pattern[str]) -> tuple[str, list[tuple[int, int]]]:
    """The rendering with ``contents`` in the template's slots, and where in it each special token
    the template itself wrote (found in ``pieces``' template text only) starts and ends."""
    text, cuts = "", []
    for k, piece in enumerate(pieces):
        if k % 2 == 1:
            text += contents[int(piece)]
            continue
        cuts += [(len(text) + m.start(), len(text) + m.end()) for m in control.finditer(piece)]
        text += piece
    return text, cuts


@contextmanager
def _plain_text_encoder(tokenizer: Any) -> Iterator[Callable[[str], tuple[list[int], list[tuple[int, int]]]]]:
    """text -> (ids, character offsets), special tokens' text split into ordinary pieces.

    The Rust tokenizer itself with its ``encode_special_tokens`` flag on, for the block: what
    ``tokenizer(text, add_special_tokens=False, split_special_tokens=True)`` computes, without the
    Python wrapper's per-call cost (5x faster here; the reward model's 36,000 conversations took
    11 s through the wrapper). A backend that pads or truncates on its own goes through the wrapper,
    which turns both off for the call.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.padding is not None or backend.truncation is not None:
        def wrapped(run: str) -> tuple[list[int], list[tuple[int, int]]]:
            enc = tokenizer(run, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
            return enc["input_ids"], enc["offset_mapping"]

        yield wrapped
        return
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        def direct(run: str) -> tuple[list[int], list[tuple[int, int]]]:
            enc = backend.encode_batch([run], add_special_tokens=False)[0]  # batch: releases the GIL
            return enc.ids, enc.offsets

        yield direct
    finally:
        backend.encode_special_tokens = previous
