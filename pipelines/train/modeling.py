"""Model I/O: build a Llama from config or load a local Hugging Face directory; export one.

Every model kiln writes is a plain Hugging Face directory (``config.json``, ``model.safetensors``,
tokenizer files), so ``transformers`` and vLLM load it unchanged. The reward model is a
``LlamaForSequenceClassification`` with ``num_labels=1``: its score is read at the last non-pad
token, which is why every model here carries the tokenizer's ``pad_token_id`` in its config.

LoRA (``peft``): ``apply_lora`` wraps a model so that only adapters train. Its export is the
merged model (base + (alpha / rank) B @ A, a plain HF directory like any other, so eval, PPO and
serving need nothing new) with the adapter alone in PEFT format in ``adapter/`` beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.jsonl import parse_json
from pipelines.train.config import LoraSettings, ModelConfig

Head = Literal["lm", "reward"]
SCORE_HEAD = "score"  # LlamaForSequenceClassification's head: hidden -> num_labels
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
ADAPTER_DIR = "adapter"  # an exported LoRA model's adapter, in PEFT format, inside the model directory
_PEFT_PREFIX = "base_model.model."  # a PeftModel's state-dict keys are the HF model's behind this


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
        ValueError: its config.json is not a JSON object (naming the file).
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} not found (no config.json)")
    model_config(path)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"model directory {path} has no weights (*.safetensors)")
    return path


def model_config(model_dir: Path) -> dict[str, Any]:
    """A model directory's ``config.json``.

    Raises:
        ValueError: naming the file, when it is not a JSON object.
    """
    path = Path(model_dir) / "config.json"
    config, why = parse_json(path.read_bytes())
    if why or not isinstance(config, dict):
        raise ValueError(f"{path}: not a model config ({why or f'a JSON {type(config).__name__}, not an object'})")
    return config


def check_reward_model(model_dir: Path, where: str) -> Path:
    """Fail early, naming ``where`` (the config key), unless ``model_dir`` is a one-label
    sequence-classification model (a reward model): a causal LM given here loaded with a new,
    random two-label head and failed steps later with a tensor shape error.

    Raises:
        ValueError: naming the key, the directory and what its config.json says.
    """
    config = model_config(model_dir)
    architectures = config.get("architectures") or []
    labels = len(config["id2label"]) if isinstance(config.get("id2label"), dict) else config.get("num_labels", 2)
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures) or labels != 1:
        raise ValueError(f"{where}: {model_dir} is not a reward model (config.json: architectures {architectures}, "
                         f"{labels} labels); give a one-label sequence-classification model, such as the "
                         "reward_model stage's <run>/reward_model/model")  # fmt: skip
    return model_dir


def check_causal_lm(model_dir: Path, where: str) -> Path:
    """Fail early, naming ``where`` (the config key), unless ``model_dir`` holds a causal LM (a
    model with an LM head: a reward model's auxiliary next-token loss trains that head).

    Raises:
        ValueError: naming the key, the directory and the architectures its config.json gives.
    """
    architectures = model_config(model_dir).get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise ValueError(f"{where}: {model_dir} is not a causal LM (config.json: architectures {architectures}); "
                         "the auxiliary next-token loss trains the starting model's LM head")  # fmt: skip
    return model_dir


def check_context(model_dir: Path, tokens: int, where: str) -> None:
    """Fail early if a context of ``tokens`` (prompt + response) exceeds the model's
    ``max_position_embeddings`` (when its config.json gives one).

    Raises:
        ValueError: naming ``where`` (the config section) and both numbers.
    """
    positions = model_config(model_dir).get("max_position_embeddings")
    if positions is not None and tokens > positions:
        raise ValueError(f"{where}: max_prompt_tokens + max_response_tokens ({tokens}) exceed the policy's "
                         f"max_position_embeddings ({positions})")  # fmt: skip


def build_model(
    head: Head,
    tokenizer: PreTrainedTokenizerBase,
    arch: ModelConfig | None = None,
    path: str | Path | None = None,
) -> PreTrainedModel:
    """A causal LM or a scalar reward model in float32, new from ``arch`` (Llama) or loaded from
    ``path`` in the architecture its config names (as the reference actor and vLLM load it: a
    Qwen2 directory loaded as Llama lost its attention biases, and its logits moved by 0.3).

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
    if path is None:
        return (LlamaForCausalLM if head == "lm" else LlamaForSequenceClassification)(config).float()
    auto = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    return auto.from_pretrained(str(path), config=config, dtype=torch.float32)


def last_token_scores(scores: torch.Tensor, ids: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """(B, T, labels) scores of every position → (B, labels) at each row's last non-pad token, by
    ``transformers``' rule for sequence classification (the rightmost position that is not
    ``pad_id``; all-pad rows read position 0; no ``pad_id``: the last position)."""
    if pad_id is None:
        return scores[:, -1]
    positions = torch.arange(ids.shape[-1], device=ids.device, dtype=torch.int32)
    last = (positions * (ids != pad_id)).argmax(-1)  # (B,)
    return scores[torch.arange(len(ids), device=ids.device), last]


class RewardWithLmHead(torch.nn.Module):
    """A reward model that trains with an auxiliary next-token loss (``reward_model.lm_loss_weight``):
    the sequence-classification model, and beside its score head the starting model's LM head on
    the same trunk. ``exported`` gives back the reward model alone.

    ``forward(input_ids, lm_from)`` → (scores (B, 1) as the reward model's own forward computes
    them, next-token logits (B, T - lm_from, V) of the positions from ``lm_from`` on, or None).
    """

    def __init__(self, reward: PreTrainedModel, lm_head: torch.nn.Module) -> None:
        super().__init__()
        self.reward = reward
        self.lm_head = lm_head

    def forward(self, input_ids: torch.Tensor, lm_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.reward.base_model(input_ids=input_ids).last_hidden_state  # (B, T, H), after the final norm
        scores = last_token_scores(self.reward.score(hidden), input_ids, self.reward.config.pad_token_id)
        return scores, None if lm_from is None else self.lm_head(hidden[:, lm_from:])


def with_lm_head(reward: PreTrainedModel, path: str | Path) -> RewardWithLmHead:
    """``reward`` (loaded from the causal LM at ``path``) with that model's LM head beside its
    score head; a tied head stays tied to the reward model's input embeddings.

    Raises:
        ValueError: ``path`` holds no causal LM (``check_causal_lm``).
    """
    check_causal_lm(Path(path), "reward_model.lm_loss_weight")
    lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    head = lm.get_output_embeddings()
    if lm.config.tie_word_embeddings:
        head.weight = reward.get_input_embeddings().weight
    return RewardWithLmHead(reward, head)


def exported(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model and state dict to write as the stage's Hugging Face export: a
    ``RewardWithLmHead``'s reward model alone (its LM head dropped), anything else unchanged."""
    if not isinstance(model, RewardWithLmHead):
        return model, state
    return model.reward, {k.removeprefix("reward."): v for k, v in state.items() if k.startswith("reward.")}


def save_hf_model(
    model: PreTrainedModel,
    state_dict: dict[str, torch.Tensor],
    tokenizer_dir: str | Path,
    out_dir: Path,
) -> None:
    """Write ``model``'s config with a consolidated ``state_dict`` and the tokenizer to ``out_dir``.

    ``state_dict`` holds full (gathered) tensors: under ZeRO-3 the module's own parameters are
    empty placeholders, so its state must come from the gather, not from ``model.state_dict()``.
    A LoRA model (``PeftModel``) is written merged, with its adapter in ``out_dir/adapter``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model, PeftModel):
        config = model.peft_config["default"]
        save_adapter(adapter_state_dict(model, state_dict), config, out_dir / ADAPTER_DIR)
        state_dict = merged_state_dict(state_dict, config.lora_alpha / config.r)
        model = model.get_base_model()
    model.config.architectures = [type(model).__name__]
    model.config.use_cache = True  # switched off for training; generation wants it
    model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)


# --- LoRA --------------------------------------------------------------------------------------


def peft_config(lora: LoraSettings, head: Head = "lm") -> LoraConfig:
    """The ``peft`` config of ``lora`` (plain LoRA: no bias, no rank-stabilised scaling).

    ``head="reward"``: peft's sequence-classification task, which also trains the new score head
    in full (``modules_to_save``), as TRL's reward trainer does with a LoRA config.
    """
    return LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
        bias="none", task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM",
        modules_to_save=[SCORE_HEAD] if head == "reward" else None,
    )  # fmt: skip


def apply_lora(model: PreTrainedModel, lora: LoraSettings) -> PeftModel:
    """``model`` with LoRA adapters on its target modules; every base weight frozen (B starts at 0,
    so the wrapped model computes what ``model`` did). A reward model's score head trains in full."""
    head: Head = "reward" if type(model).__name__.endswith("ForSequenceClassification") else "lm"  # any architecture
    return get_peft_model(model, peft_config(lora, head))


def unmatched_targets(targets: list[str], module_names: list[str]) -> list[str]:
    """The ``targets`` that match none of ``module_names`` as ``peft`` matches them: the whole
    name, or its last dotted parts (``self_attn.q_proj`` matches ``model.layers.0.self_attn.q_proj``)."""
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in module_names)]


def check_lora_targets(lora: LoraSettings, model_dir: str | Path, key: str, head: Head = "lm") -> None:
    """Fail before any worker starts if a ``target_modules`` entry matches no linear module of the
    model the workers build from ``model_dir`` (with ``head``: a reward model has a ``score`` head
    and no ``lm_head``). Cheap: the model is built on the meta device from its ``config.json``.

    Args:
        key: the entry's key path for the message, e.g. ``sft.lora.target_modules``.

    Raises:
        ValueError: naming each unmatched entry and the linear modules that exist.
    """
    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):  # the architecture its config names, as build_model loads it
        if head == "reward":
            config.num_labels = 1
            skeleton: PreTrainedModel = AutoModelForSequenceClassification.from_config(config)
        else:
            skeleton = AutoModelForCausalLM.from_config(config)
    linear = [name for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)]
    missing = unmatched_targets(list(lora.target_modules), linear)
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ValueError(f"{key}: {missing} match no linear module of the model in {model_dir}; "
                         f"its linear modules are {names}")  # fmt: skip


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float, adapter: str = "default") -> dict[str, torch.Tensor]:
    """A LoRA ``PeftModel``'s full state dict → the plain model's, each adapter folded into its
    weight: W + scaling * B @ A (``scaling`` = alpha / rank; B: (out, r), A: (r, in)).

    Keys lose the PEFT prefix and ``.base_layer``; the adapter tensors themselves are dropped. A
    module trained in full (``modules_to_save``: a reward model's score head) keeps its trained copy
    under its own name; peft's untouched original of it is dropped.
    """
    merged = {}
    for key, value in state.items():
        name = key.removeprefix(_PEFT_PREFIX)
        if ".lora_" in name or ".original_module." in name:
            continue
        name = name.replace(f".modules_to_save.{adapter}.", ".")
        module, base, param = name.partition(".base_layer.")
        if base:
            if param == "weight":
                a = state[f"{_PEFT_PREFIX}{module}.lora_A.{adapter}.weight"]
                b = state[f"{_PEFT_PREFIX}{module}.lora_B.{adapter}.weight"]
                value = value + scaling * (b @ a)
            name = f"{module}.{param}"
        merged[name] = value
    return merged


def adapter_state_dict(model: PeftModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors of ``state`` (a full or adapter-only state dict of ``model``) in PEFT's
    file naming (``...q_proj.lora_A.weight``: the adapter name removed), as vLLM and peft load them."""
    return get_peft_model_state_dict(model, state_dict=state)


def save_adapter(adapter: dict[str, torch.Tensor], config: LoraConfig, out_dir: Path) -> None:
    """Write an adapter in PEFT format: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out_dir / "adapter_model.safetensors"))
