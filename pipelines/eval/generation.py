"""The evaluation's generators: vLLM engines that answer the held-out prompts for model after model.

Starting a vLLM engine costs ~20 s on CPU, while loading new weights into a running one costs well
under a second. So the controller keeps one :class:`EvalGenerator` while consecutive models share
an ``engine_key`` (the same ``config.json`` architecture and the same tokenizer) and loads each
next model in place (``load_weights``, the path PPO's rollout actor uses); a model whose key
differs gets a fresh actor. The engine runs inside the actor's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in its runtime environment), so the weights reach vLLM's
worker as plain tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors.torch import load_file

from core.chat import chat_stop_ids
from core.config import EngineConfig
from core.shards import split

# config.json keys that describe how a model was saved, not what it computes.
_BOOKKEEPING_KEYS = ("_name_or_path", "transformers_version", "use_cache")
# The engine decodes token ids with the tokenizer it started with: a model with other tokenizer
# files needs its own engine.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def engine_key(model_dir: Path) -> str:
    """What two models must share for one to be loaded into an engine started with the other:
    ``config.json`` (bookkeeping keys aside) and the tokenizer files. A short hash."""
    config = json.loads((model_dir / "config.json").read_text())
    shape = {k: v for k, v in config.items() if k not in _BOOKKEEPING_KEYS}
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    for name in _TOKENIZER_FILES:
        path = model_dir / name
        h.update(name.encode() + (path.read_bytes() if path.is_file() else b"<absent>"))
    return h.hexdigest()[:16]


def read_weights(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a Hugging Face directory's safetensors files, as (name, tensor) pairs."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model directory {model_dir} has no *.safetensors weights to load in place")
    return [pair for f in files for pair in load_file(str(f)).items()]


@dataclass
class Responses:
    """``n`` responses to each of ``P`` prompts, grouped by prompt.

    Attributes:
        token_ids: (P, n) lists of response token ids, the stop token included when one was produced.
        texts: (P, n) decoded responses, the stop token excluded.
    """

    token_ids: list[list[list[int]]]
    texts: list[list[str]]


@ray.remote
class EvalGenerator:
    """A vLLM engine for one architecture. Verbs: ``load_weights``, ``generate``.

    Args:
        model_dir: the first model (Hugging Face directory); its tokenizer decodes every response.
        engine: the engine settings (``eval.engine``).
        max_model_len: context length, prompt + response tokens.
    """

    def __init__(self, model_dir: str, engine: EngineConfig, max_model_len: int) -> None:
        # vLLM is imported in the actor only: it sets process-wide state (threads, LD_PRELOAD)
        # that must not leak into the controller or other workers.
        from transformers import AutoTokenizer
        from vllm import LLM

        args = {**engine.vllm_args(), "max_model_len": engine.max_model_len or max_model_len}
        self.llm = LLM(model=model_dir, **args)
        self.stop_ids = chat_stop_ids(AutoTokenizer.from_pretrained(model_dir))
        # Every in-place reload warns that the rotary embedding (which has no weights) loaded
        # none; it is noise (see actors/rollout.py).
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

    def load_weights(self, model_dir: str) -> None:
        """Load another model of the same ``engine_key`` into the running engine, in place.

        The prefix cache is dropped: its KV entries were computed with the old weights.
        """
        pairs = read_weights(Path(model_dir))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pairs)})
        self.llm.reset_prefix_cache()

    def generate(
        self, prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int, seeds: list[int]
    ) -> Responses:
        """``n`` responses to every prompt, all prompts in one batch.

        Args:
            prompt_ids: token lists, chat template applied.
            n: responses per prompt (1 for greedy decoding).
            temperature: 0 decodes greedily.
            max_tokens: most tokens per response; generation also stops at ``<|im_end|>``.
            seeds: one per prompt, its sampler's seed, so a rerun draws the same responses.
        """
        from vllm import SamplingParams, TokensPrompt  # see __init__

        if temperature == 0.0 and n != 1:
            raise ValueError(f"greedy decoding gives one response per prompt, asked for {n}")
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
        params = [
            SamplingParams(
                n=n, temperature=temperature, max_tokens=max_tokens, stop_token_ids=self.stop_ids, seed=seed
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return Responses(
            token_ids=[[list(c.token_ids) for c in out.outputs] for out in outputs],
            texts=[[c.text for c in out.outputs] for out in outputs],
        )


def sample_seeds(seed: int, positions: Iterable[int], n: int) -> list[int]:
    """Each prompt's request seed when it draws ``n`` samples: the prompt at ``position`` gets
    ``seed + position * n``. vLLM seeds a request's ``j``-th sample with its seed + ``j``, so seeds
    ``seed + position`` would give prompt ``i``'s sample ``j + 1`` and prompt ``i + 1``'s sample
    ``j`` one random stream; spaced by ``n``, no two samples share one."""
    return [seed + position * n for position in positions]


def new_generator(model_dir: Path, engine: EngineConfig, max_model_len: int, num_cpus: float, num_gpus: float) -> Any:
    """A new :class:`EvalGenerator` actor for ``model_dir``, its engine inside the actor's process."""
    env = {"VLLM_LOGGING_LEVEL": "WARNING", **engine.vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")}
    return EvalGenerator.options(num_cpus=num_cpus, num_gpus=num_gpus, runtime_env={"env_vars": env}).remote(
        str(model_dir), engine, max_model_len
    )


def merge(parts: list[Responses]) -> Responses:
    """The shards' responses as one, in shard order."""
    return Responses(
        token_ids=[row for part in parts for row in part.token_ids], texts=[row for part in parts for row in part.texts]
    )


class GeneratorPool:
    """Data-parallel vLLM engines: ``replicas`` :class:`EvalGenerator` actors share each batch.

    vLLM's CPU engine steps in one thread, and a small model's step is mostly its scheduler's
    Python, so one engine keeps one core busy however many it may use; a second engine on the
    other core cut the quickstart's preference sampling from 95 s to 63 s. Each ``generate`` cuts the prompts into
    contiguous near-equal shards, one per actor, and each prompt keeps its own seed wherever it
    lands, so the draws do not depend on the number of replicas (the logits may differ in the
    last bits, as vLLM batches other prompts beside each one).

    Args:
        model_dir: the model every engine starts with.
        replicas: engines (actors), each with ``num_cpus`` / ``num_gpus`` Ray resources.
    """

    def __init__(self, model_dir: Path, engine: EngineConfig, max_model_len: int, num_cpus: float,
                 num_gpus: float, replicas: int = 1) -> None:  # fmt: skip
        self.actors = [new_generator(model_dir, engine, max_model_len, num_cpus, num_gpus) for _ in range(replicas)]

    def load_weights(self, model_dir: Path) -> list[ray.ObjectRef]:
        """Every engine loads ``model_dir`` in place (``EvalGenerator.load_weights``); refs to wait on."""
        return [actor.load_weights.remote(str(model_dir)) for actor in self.actors]

    def submit(self, prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int,
               seeds: list[int]) -> list[ray.ObjectRef]:  # fmt: skip
        """Queue one ``EvalGenerator.generate`` per shard of ``prompt_ids``; ``merge(ray.get(refs))``
        is the responses in prompt order. Actors left without a prompt get no call."""
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts")
        shards = [s for s in split(len(prompt_ids), len(self.actors)) if s.stop > s.start]
        return [
            actor.generate.remote(prompt_ids[s], n, temperature, max_tokens, seeds[s])
            for actor, s in zip(self.actors, shards)
        ]

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, max_tokens: int,
                 seeds: list[int]) -> Responses:  # fmt: skip
        """``EvalGenerator.generate`` over every engine at once, the responses in prompt order."""
        return merge(ray.get(self.submit(prompt_ids, n, temperature, max_tokens, seeds)))

    def close(self) -> None:
        """Kill every engine's actor (the engine goes with its process)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
