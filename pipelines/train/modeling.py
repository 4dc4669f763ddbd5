"""Model I/O: build a Llama from config or load a local Hugging Face directory; export one.

Every model kiln writes is a plain Hugging Face directory (``config.json``, ``model.safetensors``,
tokenizer files), so ``transformers`` and vLLM load it unchanged. The reward model is a
``LlamaForSequenceClassification`` with ``num_labels=1``: its score is read at the last non-pad
token, which is why every model here carries the tokenizer's ``pad_token_id`` in its config.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipelines.train.config import ModelConfig

Head = Literal["lm", "reward"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The ``transformers`` config of a new model of the configured size for ``tokenizer``."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def check_model_dir(path: str | Path) -> Path:
    """Fail early, naming the path, if ``path`` is not a loadable HF model directory.

    Raises:
        FileNotFoundError: the directory or its config/weights are missing.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} not found (no config.json)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"model directory {path} has no weights (*.safetensors)")
    return path


def build_model(
    head: Head,
    tokenizer: PreTrainedTokenizerBase,
    arch: ModelConfig | None = None,
    path: str | Path | None = None,
) -> PreTrainedModel:
    """A causal LM or a scalar reward model in float32, new from ``arch`` or loaded from ``path``.

    A reward model loaded from a causal-LM directory keeps the trunk and gets a new score head.
    The caller seeds torch first: every data-parallel rank must build identical weights.
    """
    if path is None:
        assert arch is not None, "build_model needs arch or path"
        config = llama_config(arch, tokenizer)
    else:
        config = AutoConfig.from_pretrained(str(path))
    # The reward score is taken at the last non-pad token, and SFT pads: the model must know PAD.
    config.pad_token_id = tokenizer.pad_token_id
    if head == "reward":
        config.num_labels = 1
    cls = LlamaForCausalLM if head == "lm" else LlamaForSequenceClassification
    if path is None:
        return cls(config).float()
    return cls.from_pretrained(str(path), config=config, dtype=torch.float32)


def save_hf_model(
    model: PreTrainedModel,
    state_dict: dict[str, torch.Tensor],
    tokenizer_dir: str | Path,
    out_dir: Path,
) -> None:
    """Write ``model``'s config with a consolidated ``state_dict`` and the tokenizer to ``out_dir``.

    ``state_dict`` holds full (gathered) tensors: under ZeRO-3 the module's own parameters are
    empty placeholders, so its state must come from the gather, not from ``model.state_dict()``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.use_cache = True  # switched off for training; generation wants it
    model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
