"""Rollout generator: a vLLM engine that samples responses and loads new policy weights in place.

The engine runs inside this actor's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the
controller in the actor's runtime environment): new weights then reach vLLM's worker as plain
tensors, with no second serialisation between the engine's processes.

With ``ppo.learner.lora`` the engine keeps the starting weights and serves the policy as a vLLM
LoRA adapter: each sync brings the adapter's tensors only. The installed vLLM loads an adapter
from a directory only (``LoRARequest.lora_path``), so the actor writes them in PEFT format to a
private directory (in ``/dev/shm`` where it exists: memory, not disk), registers them under a new
adapter id per version (vLLM caches adapters by id) and deletes the directory once vLLM has loaded
them; the previous version is removed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch
from transformers import AutoTokenizer

from actors.experience import Samples
from core.chat import chat_stop_ids
from core.config import vllm_lora_rank
from pipelines.rlhf.config import PpoConfig
from pipelines.train.modeling import peft_config, save_adapter


@ray.remote
class RolloutGenerator:
    """Samples responses with vLLM; ``load_weights`` swaps in a newer policy.

    Verbs: ``generate``, ``load_weights``, ``policy_version``.

    Args:
        model_dir: the starting policy (Hugging Face directory).
        ppo: the ``ppo:`` section (``ppo.rollout.engine``; sampling: temperature, top_p, top_k,
            max_response_tokens).
    """

    def __init__(self, model_dir: str, ppo: PpoConfig) -> None:
        # vLLM is imported in the actor only: the engine module sets process-wide state (threads,
        # LD_PRELOAD) that must not leak into the controller or other workers.
        from vllm import LLM

        engine = ppo.rollout.engine
        self.lora = ppo.learner.lora
        lora_args: dict[str, Any] = {}
        if self.lora is not None:
            lora_args = {"enable_lora": True, "max_lora_rank": vllm_lora_rank(self.lora.rank), "max_loras": 1}
        self.llm = LLM(
            model=model_dir,
            **{**engine.vllm_args(), "max_model_len": engine.max_model_len or ppo.max_prompt_tokens + ppo.max_response_tokens},
            # Log-probs after temperature: the distribution the tokens were sampled from, which
            # is what the learner's ratio pi_theta / pi_old must be taken against.
            logprobs_mode="processed_logprobs",
            **lora_args,
        )
        self.stop_ids = chat_stop_ids(AutoTokenizer.from_pretrained(model_dir))
        self.sampling = ppo
        self.version = 0
        self.adapter: Any = None  # LoRA: the vLLM LoRARequest of the loaded version (None: the starting weights)
        # LoRA: each adapter version goes through a directory here (in memory where there is /dev/shm).
        self.adapter_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
        # Every in-place reload warns that the rotary embedding (which has no weights) loaded
        # none; log-probs match the learner's after a reload, so the line is noise.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

    def policy_version(self) -> int:
        """The weight version loaded: 0 is the initial model; it survives only in this process."""
        return self.version

    def generate(self, prompt_ids: list[list[int]], samples_per_prompt: int, seed: int, greedy: bool = False) -> Samples:
        """Sample ``samples_per_prompt`` responses to each prompt.

        Args:
            prompt_ids: token lists, chat template applied.
            samples_per_prompt: responses per prompt; they come back grouped by prompt.
            seed: seeds every sample (sample ``i`` uses ``seed + i``), so a step is reproducible.
            greedy: decode greedily (evaluation); ``samples_per_prompt`` must then be 1.

        Returns:
            The samples, in prompt order, with vLLM's log-prob of every response token.
        """
        from vllm import SamplingParams, TokensPrompt  # see __init__

        cfg = self.sampling
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids for _ in range(samples_per_prompt)]
        params = [
            SamplingParams(
                temperature=0.0 if greedy else cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                max_tokens=cfg.max_response_tokens,
                stop_token_ids=self.stop_ids,
                logprobs=0,  # the sampled token's own log-prob only
                seed=seed + i,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.adapter)
        response_ids, logprobs, texts, truncated = [], [], [], []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            response_ids.append(ids)
            logprobs.append([float(step[token].logprob) for step, token in zip(completion.logprobs, ids)])
            texts.append(completion.text)
            truncated.append(completion.finish_reason == "length")
        return Samples(
            prompt_ids=[list(p["prompt_token_ids"]) for p in prompts],
            response_ids=response_ids,
            logprobs=logprobs,
            texts=texts,
            policy_version=self.version,
            truncated=truncated,
        )

    def load_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Load a full policy state dict (Hugging Face names) into the engine, in place; with LoRA,
        the adapter's tensors (PEFT names) as the engine's one adapter.

        The prefix cache is dropped: its KV entries were computed with the old weights.
        """
        if self.lora is None:
            pairs = list(state.items())
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(pairs)})
        else:
            self._load_adapter(state, version)
        self.llm.reset_prefix_cache()
        self.version = version

    def _load_adapter(self, adapter: dict[str, torch.Tensor], version: int) -> None:
        from vllm.lora.request import LoRARequest  # see __init__

        path = Path(tempfile.mkdtemp(prefix=f"kiln-adapter-v{version}-", dir=self.adapter_dir))
        try:
            save_adapter(adapter, peft_config(self.lora), path)
            request = LoRARequest(lora_name=f"policy-v{version}", lora_int_id=version, lora_path=str(path))
            self.llm.llm_engine.add_lora(request)  # loads it now: a bad adapter fails the sync, not a later step
        finally:
            # The engine holds the weights now (its one adapter slot is never evicted, so it never
            # reads the files again): nothing is left behind, even by an actor killed later.
            shutil.rmtree(path, ignore_errors=True)
        if self.adapter is not None and self.adapter.lora_int_id != version:
            self.llm.llm_engine.remove_lora(self.adapter.lora_int_id)
        self.adapter = request
