"""The ``ppo:`` section of the kiln config: prompts, rewards, the algorithm, and each actor role.

The rollout generator is a vLLM engine like a serving replica: both use ``core.config.EngineConfig``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from core.config import DeepSpeedSettings, EngineConfig, Section
from pipelines.train.config import LoraSettings


class OptimizedModelConfig(DeepSpeedSettings):
    """A model trained inside PPO (the policy or the critic) on DeepSpeed, one actor per rank.

    The learning rate is constant after ``warmup_steps`` (optimizer steps) of linear warm-up.
    """

    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: float = Field(default=0.5, gt=0.0)
    micro_batch_per_worker: int = Field(default=16, ge=1)
    learning_rate: float = Field(default=1.0e-5, gt=0.0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0.0)


class LearnerConfig(OptimizedModelConfig):
    """The policy.

    With ``lora`` the learner trains an adapter only; the reference log-probs are the learner's
    own with the adapter switched off (no reference actor, no second copy of the weights), and
    each sync sends the rollout engine the adapter alone, as a vLLM LoRA adapter.
    """

    # Train a LoRA adapter instead of every weight (null: full fine-tuning).
    lora: LoraSettings | None = None

    @model_validator(mode="after")
    def _no_lora_dropout(self) -> "LearnerConfig":
        # The old log-probs are taken without dropout; with it, PPO's ratio would not start at 1.
        if self.lora is not None and self.lora.dropout:
            raise ValueError(f"lora.dropout must be 0 for the PPO learner (got {self.lora.dropout})")
        return self


class CriticConfig(OptimizedModelConfig):
    """The value model (GAE only)."""

    # Model directory to start from (null: the reward model when one is used, else the policy);
    # the scalar head of a reward model becomes the per-token value head.
    init_from: str | None = None


class RolloutConfig(Section):
    """The vLLM rollout generator."""

    num_cpus: float = Field(default=0.5, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    # Times Ray restarts a crashed generator (it is re-sent the current weights before it samples).
    max_restarts: int = Field(default=3, ge=0)
    engine: EngineConfig = EngineConfig()


class HelperActorConfig(Section):
    """Resources of an inference-only actor (reference policy, reward)."""

    num_cpus: float = Field(default=0.25, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    # torch intra-op threads on CPU.
    threads: int = Field(default=1, ge=1)


class PpoConfig(Section):
    """``kiln ppo``: RLHF with PPO (GAE + critic) or GRPO on cooperating Ray actors."""

    # Policy to start from, also the frozen reference (null: <run>/sft/model).
    policy: str | None = None
    # JSONL of {"prompt": str or chat messages, ...}; other fields are passed to the reward
    # and metric functions as keyword arguments (e.g. the quickstart's "answer").
    prompts: str
    # Held-out prompts (same format) on which reward and metric are measured before, during
    # and after training (null: no evaluation).
    eval_prompts: str | None = None
    # Reward model directory from `kiln reward-model` (null: none), and its weight in the reward.
    reward_model: str | None = None
    reward_model_weight: float = 1.0
    # A Python reward "module:function" called as f(prompt, response, **fields) -> float
    # (null: none), and its weight. At least one of the two rewards must be given.
    reward_function: str | None = None
    reward_function_weight: float = 1.0
    # A reward function that raises: stop the run (naming function and sample) or skip the
    # sample (its reward becomes 0 and it is masked out of the update; counted).
    on_reward_error: Literal["stop", "skip"] = "stop"
    # Seconds one call of the reward function may take; a longer one is a reward error like any
    # other (on_reward_error). A hung call cannot be stopped: it is abandoned, and its thread runs
    # on in the reward actor until it returns or the run ends.
    reward_timeout_s: float = Field(default=60.0, gt=0.0)
    # The task metric for evaluation, "module:function"(prompt, response, **fields) -> bool or a
    # score in [0, 1]; its mean is reported as accuracy (null: none).
    metric_function: str | None = None
    # Prompts longer than this (tokens, chat template included) are skipped and counted.
    max_prompt_tokens: int = Field(default=128, ge=1)
    # Most tokens sampled per response.
    max_response_tokens: int = Field(default=64, ge=1)
    # Prompts per PPO step, and responses sampled for each (a GRPO group).
    prompts_per_step: int = Field(default=16, ge=1)
    samples_per_prompt: int = Field(default=4, ge=1)
    # Sampling of the rollouts (PPO's ratio is exact only at temperature 1, top_p 1, top_k -1).
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    # gae: per-token advantages from the critic; grpo: no critic, sequence rewards normalised
    # within the samples of each prompt.
    advantage: Literal["gae", "grpo"] = "gae"
    gamma: float = Field(default=1.0, ge=0.0, le=1.0)
    lam: float = Field(default=0.95, ge=0.0, le=1.0)
    # Whiten GAE advantages over the batch's response tokens.
    whiten_advantages: bool = True
    # GRPO: divide each group's centred scores by the group's standard deviation (false: only
    # subtract the group mean, as Dr. GRPO does).
    grpo_scale_by_std: bool = True
    # Per-token KL penalty to the reference: coefficient, estimator (k1 or k3), and an optional
    # target KL per sample that adapts the coefficient (Ziegler et al.; null: fixed coefficient).
    kl_coef: float = Field(default=0.05, ge=0.0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float | None = Field(default=None, gt=0.0)
    kl_horizon: int = Field(default=10000, ge=1)
    # Where the KL penalty acts: reward (subtracted from the reward, as InstructGPT's PPO) or loss
    # (kl_coef x the k3 estimate of KL(pi_theta || ref) added to the policy loss, as the GRPO paper
    # and TRL do; the reward is then the task's alone). With grpo, a KL term inside the reward is
    # normalised with it: in a group whose samples score alike, the KL noise becomes the advantage.
    kl_penalty: Literal["reward", "loss"] = "reward"
    # PPO ratio clip, value clip (null: none) and score clip to [-reward_clip, reward_clip].
    clip_eps: float = Field(default=0.2, gt=0.0)
    value_clip: float | None = Field(default=0.2, gt=0.0)
    reward_clip: float | None = Field(default=5.0, gt=0.0)
    # Subtracted from the score of a response cut at max_response_tokens before its stop token, as
    # TRL's missing_eos_penalty: otherwise the reward model scores the cut text as if it were whole
    # (null: none). The share of cut responses is logged every step either way (truncated).
    missing_eos_penalty: float | None = Field(default=None, gt=0.0)
    # Passes over each rollout batch, and optimizer steps (mini-batches) per pass.
    ppo_epochs: int = Field(default=2, ge=1)
    minibatches_per_epoch: int = Field(default=2, ge=1)
    max_steps: int = Field(default=50, ge=1)
    # The last revisit_steps steps draw the prompts of the first revisit_steps again, so that the
    # rollout-reward trend in the stage summary (those first steps against those last) is a paired
    # test over the same prompts, free of their difficulty; 0: every step draws new prompts (and
    # the trend compares the first and last 5 steps' means).
    revisit_steps: int = Field(default=0, ge=0)
    # Steps between evaluations on eval_prompts (greedy decoding), and between checkpoints.
    eval_every_steps: int = Field(default=10, ge=1)
    checkpoint_every_steps: int = Field(default=10, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    # Dead actors the run survives (any role: a learner or critic rank, the reference, the reward
    # scorer, a rollout actor past rollout.max_restarts): each time the controller restarts the
    # dead actor's group (every actor before the first checkpoint), keeps the rest, and resumes
    # from the latest checkpoint (the steps since are replayed exactly). One more ends the run; 0:
    # the first ends it.
    max_failures: int = Field(default=3, ge=0)
    # How Ray places the actors: DEFAULT (the local node first, then others as it fills) or
    # SPREAD (over the cluster's nodes, e.g. to use every machine's CPUs).
    scheduling_strategy: Literal["DEFAULT", "SPREAD"] = "DEFAULT"
    seed: int = Field(default=0, ge=0)
    learner: LearnerConfig = LearnerConfig()
    critic: CriticConfig = CriticConfig(learning_rate=5.0e-5)
    rollout: RolloutConfig = RolloutConfig()
    reference: HelperActorConfig = HelperActorConfig()
    reward: HelperActorConfig = HelperActorConfig()

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @model_validator(mode="after")
    def _consistent(self) -> "PpoConfig":
        if self.reward_model is None and self.reward_function is None:
            raise ValueError("give reward_model, reward_function or both")
        for name in ("reward_function", "metric_function"):
            value = getattr(self, name)
            if value is not None and value.count(":") != 1:
                raise ValueError(f"{name}: expected 'module:function', got {value!r}")
        minibatch, rem = divmod(self.samples_per_step, self.minibatches_per_epoch)
        if rem:
            raise ValueError(
                f"prompts_per_step x samples_per_prompt ({self.samples_per_step}) must be a multiple "
                f"of minibatches_per_epoch ({self.minibatches_per_epoch})"
            )
        models = [("learner", self.learner)] + ([("critic", self.critic)] if self.advantage == "gae" else [])
        for name, m in models:
            if minibatch % (m.micro_batch_per_worker * m.num_workers):
                raise ValueError(
                    f"a mini-batch of {minibatch} samples must be a multiple of {name}.micro_batch_per_worker "
                    f"x {name}.num_workers ({m.micro_batch_per_worker} x {m.num_workers})"
                )
        if 2 * self.revisit_steps > self.max_steps:
            raise ValueError(f"revisit_steps ({self.revisit_steps}) may be at most half of max_steps ({self.max_steps})")
        room = self.rollout.engine.max_model_len
        if room is not None and room < self.max_prompt_tokens + self.max_response_tokens:
            raise ValueError(f"rollout.engine.max_model_len ({room}) is shorter than max_prompt_tokens + "
                             f"max_response_tokens ({self.max_prompt_tokens} + {self.max_response_tokens})")  # fmt: skip
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError("kl_target adapts kl_coef by multiplying it, so a kl_coef of 0 stays 0: "
                             "give a kl_coef > 0 to start from")
        if self.advantage == "grpo" and self.samples_per_prompt < 2:
            raise ValueError("advantage grpo needs samples_per_prompt >= 2 (it compares samples of a prompt)")
        return self


class PreferencesConfig(Section):
    """``kiln preferences``: comparisons of the policy's own answers, labelled by a function.

    InstructGPT's labellers ranked the SFT model's samples, so its reward model learnt the errors
    that policy makes. Here ``label_function`` stands in for the labeller: it accepts or rejects
    each distinct response, and each pair puts an accepted response above a rejected one to the
    same prompt. The pairs (``<run>/preferences/pairs.jsonl``) go to the reward model's data.
    """

    # Model sampled (null: <run>/sft/model).
    policy: str | None = None
    # JSONL of {"prompt", ...}; the other fields go to the label function as keyword arguments.
    prompts: str
    # "module:function"(prompt, response, **fields) -> bool: whether a response is acceptable.
    label_function: str = Field(pattern=r"^[^:]+:[^:]+$")
    # Responses sampled per prompt, and the most pairs one prompt gives (each with its own rejected response).
    samples_per_prompt: int = Field(default=16, ge=2)
    pairs_per_prompt: int = Field(default=2, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)
    # Longer prompts (tokens, chat template included) are skipped and counted.
    max_prompt_tokens: int = Field(default=256, ge=1)
    max_response_tokens: int = Field(default=256, ge=1)
    # The file's prompt i draws its samples from seed + i * samples_per_prompt onwards (a skipped
    # prompt moves no other's draws); the pairing draws from seed too.
    seed: int = Field(default=0, ge=0)
    # The vLLM engine, and the Ray CPUs and GPUs of each of its actors.
    engine: EngineConfig = EngineConfig()
    num_cpus: float = Field(default=1.0, ge=0.0)
    num_gpus: float = Field(default=0.0, ge=0.0)
    # Engines (actors) that share the prompts, data-parallel (pipelines.eval.generation.GeneratorPool).
    num_replicas: int = Field(default=1, ge=1)
