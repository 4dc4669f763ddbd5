"""The ``generate:`` section: the deterministic quickstart corpus and task data.
"""

from __future__ import annotations

from pydantic import Field

from core.config import Section


class GenerateConfig(Section):
    """The deterministic quickstart corpus and task data (``kiln generate``)."""

    out_dir: str
    seed: int = Field(default=0, ge=0)
    # Unique pretraining documents before duplicates and junk are planted.
    num_documents: int = Field(default=4000, ge=100)
    # Exact copies planted into the corpus.
    exact_duplicates: int = Field(default=200, ge=0)
    # Near-duplicate copies planted, spread over a range of Jaccard similarities.
    near_duplicates: int = Field(default=300, ge=0)
    # Low-quality documents the quality filters should drop.
    junk_documents: int = Field(default=200, ge=0)
    # Addition task: operands are drawn from [0, max_operand].
    max_operand: int = Field(default=49, ge=1)
    sft_examples: int = Field(default=3000, ge=10)
    # Share of the SFT demonstrations of sums that need a carry where the teacher drops it
    # (17 + 25 = 32): a systematic flaw that imitation learns and RL can undo.
    teacher_carry_error: float = Field(default=0.7, ge=0.0, le=1.0)
    preference_pairs: int = Field(default=2000, ge=10)
    # Share of the written pairs' wrong sums (same format) that miss the tens digit; the rest miss
    # the units digit. The held-out pairs kiln eval scores keep one half (eval_preferences.jsonl).
    preference_tens_share: float = Field(default=0.5, ge=0.0, le=1.0)
    # Share of the written pairs whose reject hedges without answering (a different format). The
    # held-out pairs keep one quarter.
    preference_hedge_share: float = Field(default=0.25, ge=0.0, le=1.0)
    ppo_prompts: int = Field(default=512, ge=10)
    eval_prompts: int = Field(default=200, ge=10)
