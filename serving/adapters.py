"""LoRA adapters served beside the base model, each under a model id of its own (``serve.adapters``).

An adapter is a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``), as
kiln's LoRA stages export it (``<stage>/model/adapter``) and as ``peft``'s ``save_pretrained``
writes it. The driver checks each one before Serve starts (:func:`check_adapters`); the replica
loads them all into its vLLM engine at start-up, so a bad adapter fails the deployment, not the
first request that names it. A request picks one by its ``model`` field, as with vLLM's
``--lora-modules``; ``/v1/models`` lists them with the base model as their ``parent``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import vllm_lora_rank

# A model id clients can type and that reads the same in logs and metrics.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class Adapter:
    """One checked adapter: the model id it is served as, its directory and its LoRA rank."""

    name: str
    path: str
    rank: int


def check_adapters(adapters: Mapping[str, str], base_name: str) -> list[Adapter]:
    """Check every ``name: directory`` entry of ``serve.adapters`` on the driver.

    Raises:
        ValueError: naming the key path (``serve.adapters.<name>``) and the problem: a name that is
            empty, has spaces or clashes with the base model's; a directory that is missing, has
            no ``adapter_config.json`` or no weights; a config that is not plain LoRA or whose rank
            is above what vLLM can serve.
    """
    checked = []
    for name, directory in adapters.items():
        key = f"serve.adapters.{name}"
        if not _NAME.fullmatch(name):
            raise ValueError(f"{key}: a name is 1-128 letters, digits or ._:/- (the first a letter or digit)")
        if name == base_name:
            raise ValueError(f"{key}: the base model is already served as '{base_name}'; give the adapter another name")
        path = Path(directory).expanduser().resolve()
        config_file = path / "adapter_config.json"
        if not config_file.is_file():
            raise ValueError(f"{key}: {path} is not a PEFT adapter directory (no adapter_config.json)")
        if not any((path / w).is_file() for w in _WEIGHTS):
            raise ValueError(f"{key}: {path} has no adapter weights ({' or '.join(_WEIGHTS)})")
        try:
            config: dict[str, Any] = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{key}: {config_file} is not valid JSON: {e}") from None
        if config.get("peft_type") != "LORA":
            kind = config.get("peft_type")
            raise ValueError(f"{key}: {config_file}: peft_type is {kind!r}; only LORA adapters are served")
        ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
        if not all(isinstance(r, int) and r >= 1 for r in ranks):
            raise ValueError(f"{key}: {config_file}: the LoRA rank 'r' must be a positive integer")
        rank = max(ranks)
        try:
            vllm_lora_rank(rank)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        checked.append(Adapter(name, str(path), rank))
    return checked


def lora_engine_args(adapters: list[Adapter]) -> dict[str, Any]:
    """vLLM engine arguments that let one engine hold every adapter at once (none: no LoRA)."""
    if not adapters:
        return {}
    rank = vllm_lora_rank(max(a.rank for a in adapters))
    return {"enable_lora": True, "max_lora_rank": rank, "max_loras": len(adapters)}


def model_cards(base_name: str, created: int, max_model_len: int, adapters: list[Adapter]) -> list[dict[str, Any]]:
    """``/v1/models``' list: the base model, then each adapter with the base as its ``parent`` (as
    vLLM's server lists LoRA modules; no directory paths, which are the server's business)."""
    card = {"object": "model", "created": created, "owned_by": "kiln", "max_model_len": max_model_len}
    return [{"id": base_name, **card}, *({"id": a.name, **card, "parent": base_name} for a in adapters)]
