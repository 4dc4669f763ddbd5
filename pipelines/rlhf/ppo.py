"""``kiln ppo CONFIG``: RLHF with PPO as cooperating Ray actors, driven by this single controller.

Read top to bottom. Each step:

  1. prompts  — the next ``prompts_per_step`` of a seeded permutation (a function of the step;
     the last ``revisit_steps`` steps draw the first ones' again);
  2. generate — the vLLM rollout actor samples ``samples_per_prompt`` responses with log-probs;
  3. score ∥ reference log-probs ∥ policy log-probs ∥ values — four actors at once;
  4. advantages — per-token KL penalty + GAE (or GRPO's group-normalised scores), here in the
     controller with the pure functions of ``pipelines.rlhf.ppo_math``;
  5. learn — the policy's PPO epochs ∥ the critic's value epochs, on DeepSpeed;
  6. sync  — the learner gathers its (ZeRO-sharded) weights into the object store and the
     rollout engine loads them in place. Next step's rollout log-probs are compared with the
     learner's for the same tokens: ``logprob_mismatch`` must be ~0.

Actors live in ``actors/``, one file per role. The controller owns the algorithm; actors own
compute. Every step is a function of (seed, step): a resumed run repeats nothing and skips nothing.
That is also how the run survives a dead actor (any role, up to ``ppo.max_failures`` times): the
controller kills the others, starts them all again and resumes from the latest checkpoint.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from actors.critic import Critic
from actors.experience import Samples, collate
from actors.group import RankGroup, actor_handles, kill_quietly
from actors.learner import PolicyLearner
from actors.reference import ReferencePolicy
from actors.reward import RewardScorer, Scores, load_function
from actors.rollout import RolloutGenerator
from actors.trainable import mean_records
from cluster.dashboard import StageGauges
from cluster.runtime import init_ray
from core.metrics import MetricsSink, read_metrics
from core.progress import StageProgress, summary_text
from core.rundir import atomic_dir, atomic_write_json, mark_finished, prepare_stage, recover_interrupted
from pipelines.config import KilnConfig
from pipelines.data.tokenizer import load_tokenizer
from pipelines.rlhf.config import PpoConfig
from pipelines.rlhf.ppo_math import (
    adaptive_kl_coef,
    gae,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_whiten,
    sequence_scores,
    token_rewards,
)
from pipelines.eval.scoring import metric_score
from pipelines.rlhf.prompts import Prompt, PromptRecord, drawn_step, load_prompts, prompt_indices
from pipelines.rlhf.trend import prompt_rewards, reward_trend
from pipelines.train.modeling import check_context, check_lora_targets, check_model_dir, check_reward_model

STAGE = "ppo"


class NonFiniteStep(FloatingPointError):
    """NaN or inf in rewards or advantages: the step stopped before it reached the weights."""


class NoValidSample(ValueError):
    """``on_reward_error: skip``, and the reward failed on every sample of a step: nothing to learn from."""


def check_scores(scores: Scores, step: int) -> None:
    """Stop a step whose rewards cannot be learned from, before anything reaches the weights.

    Raises:
        NonFiniteStep: a reward is NaN or infinite.
        NoValidSample: every sample was skipped (a mean over none would be NaN, and the adaptive KL
            coefficient with it, failing every later step and every resume from the checkpoint).
    """
    if not torch.isfinite(scores.total).all():
        raise NonFiniteStep(f"step {step}: non-finite reward {scores.total.tolist()}")
    if not scores.valid.any():
        raise NoValidSample(f"step {step}: the reward failed on every one of its {len(scores.valid)} samples (the "
                            "first named above); nothing was learned from it. Fix the reward, then rerun: the run resumes "
                            "from its latest checkpoint")  # fmt: skip


class ActorFailure(RuntimeError):
    """An actor died once more than ``ppo.max_failures`` allows."""


# --- the actors --------------------------------------------------------------------------------


@dataclass
class Actors:
    rollout: Any
    reward: Any
    reference: Any  # None with LoRA: the learner ranks answer for it (adapter switched off)
    learner: RankGroup
    critic: RankGroup | None
    # The latest published weights, kept so that a restarted rollout actor can be re-sent them.
    weights: ray.ObjectRef | None = None
    version: int = 0

    def roles(self) -> dict[str, Any]:
        """Every actor handle by its role, e.g. ``learner rank 1`` (to name one that died)."""
        named = {"rollout": self.rollout, "reward scorer": self.reward}
        named |= {"reference": self.reference} if self.reference is not None else {}
        named |= {f"learner rank {i}": r for i, r in enumerate(self.learner.ranks)}
        named |= {f"critic rank {i}": r for i, r in enumerate(self.critic.ranks)} if self.critic else {}
        return named

    def all(self) -> list[Any]:
        """Every actor handle, e.g. to kill them all."""
        return list(self.roles().values())

    def ids(self) -> dict[str, str]:
        """Each actor's Ray actor id, by role: which actors a recovery replaced."""
        return {role: actor._actor_id.hex() for role, actor in self.roles().items()}

    def nodes(self) -> dict[str, str]:
        """The Ray node id each actor runs on, by role."""
        where = [a.__ray_call__.remote(lambda _self: ray.get_runtime_context().get_node_id()) for a in self.all()]
        return dict(zip(self.roles(), ray.get(where)))


def start_actors(p: PpoConfig, policy: Path, reward_model: Path | None, critic_init: Path,
                 keep: Actors | None = None, replace: str | None = None) -> Actors:  # fmt: skip
    """Create every role's actor(s) from the ``ppo:`` section, with the resources it gives them.

    With ``keep``, only the group ``replace`` (``rollout``, ``reward scorer``, ``reference``,
    ``learner`` or ``critic``: see ``group_of``) is created anew; the others are ``keep``'s.
    """
    # In-process engine: weights reach its worker as tensors. Per-reload INFO lines are noise.
    env = {"VLLM_LOGGING_LEVEL": "WARNING", **p.rollout.engine.vllm_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")}
    where = {"scheduling_strategy": p.scheduling_strategy}

    def options(m: Any) -> dict[str, Any]:
        return {"num_cpus": m.cpus_per_worker, "num_gpus": 1 if m.use_gpu else 0, **where}

    makers: dict[str, Callable[[], Any]] = {
        "rollout": lambda: RolloutGenerator.options(
            num_cpus=p.rollout.num_cpus, num_gpus=p.rollout.num_gpus, max_restarts=p.rollout.max_restarts,
            runtime_env={"env_vars": env}, **where,
        ).remote(str(policy), p),
        "reward scorer": lambda: RewardScorer.options(num_cpus=p.reward.num_cpus, num_gpus=p.reward.num_gpus, **where).remote(
            p, str(reward_model) if reward_model else None
        ),
        # With LoRA the reference is the learner's own base model (adapter off): no second copy.
        "reference": lambda: None if p.learner.lora else ReferencePolicy.options(
            num_cpus=p.reference.num_cpus, num_gpus=p.reference.num_gpus, **where
        ).remote(str(policy), p),
        "learner": lambda: RankGroup(PolicyLearner, p.learner.num_workers, options(p.learner), p, str(policy)),
        "critic": lambda: RankGroup(Critic, p.critic.num_workers, options(p.critic), p, str(critic_init))
        if p.advantage == "gae" else None,
    }  # fmt: skip
    kept = {} if keep is None else {"rollout": keep.rollout, "reward scorer": keep.reward, "reference": keep.reference,
                                    "learner": keep.learner, "critic": keep.critic}  # fmt: skip
    made: dict[str, Any] = {}
    only = None if keep is None else replace  # the groups this call makes
    try:
        for group, make in makers.items():
            made[group] = kept[group] if keep is not None and group != replace else make()
        # Constructors run asynchronously (a rank group's set-up waits on its own): one that failed
        # raises here, while the actors made before it can still be ended.
        ray.get([a.__ray_call__.remote(lambda _self: None) for a in actor_handles(made, only)])
    except BaseException:  # none of the new actors outlives a failed start
        for actor in actor_handles(made, only):
            kill_quietly(actor)
        raise
    actors = Actors(made["rollout"], made["reward scorer"], made["reference"], made["learner"], made["critic"])
    if keep is not None and replace != "rollout":  # the engine holds these weights (generate's resync check)
        actors.weights, actors.version = keep.weights, keep.version
    return actors


def group_of(role: str) -> str:
    """The group that is restarted when ``role`` dies: a rank takes its whole group (its collective)."""
    return role.split(" rank ")[0]


def sync_weights(actors: Actors) -> None:
    """Learner → object store → rollout engine; the version counts updates."""
    refs = actors.learner.get(lambda r: r.publish_weights.remote())
    actors.weights = refs[0][0]
    actors.version += 1
    ray.get(actors.rollout.load_weights.remote(actors.weights, actors.version))


def _rollout_version(actors: Actors, timeout_s: float = 600.0) -> int:
    """The rollout actor's weight version, waiting while Ray restarts it (vLLM start-up takes a while)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actors.rollout.policy_version.remote())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def generate(actors: Actors, prompt_ids: list[list[int]], p: PpoConfig, seed: int, greedy: bool = False) -> Samples:
    """Sample with the rollout actor; a restarted actor is re-sent the current weights first.

    Raises:
        ray.exceptions.ActorDiedError: the actor crashed more than ``rollout.max_restarts`` times.
    """
    for attempt in range(p.rollout.max_restarts + 1):
        try:
            if actors.version and _rollout_version(actors) != actors.version:
                print(f"kiln: rollout actor restarted; re-sending policy version {actors.version}", flush=True)
                ray.get(actors.rollout.load_weights.remote(actors.weights, actors.version))
            samples = ray.get(actors.rollout.generate.remote(prompt_ids, 1 if greedy else p.samples_per_prompt, seed, greedy))
            if samples.policy_version == actors.version:
                return samples
            # Restarted between the check and the call: it sampled the initial weights. Again.
        except ray.exceptions.ActorUnavailableError:
            # Died mid-call and is being restarted (max_restarts): wait, resync, sample again.
            if attempt == p.rollout.max_restarts:
                raise
    raise RuntimeError(f"the rollout actor sampled with other weights than version {actors.version} "
                       f"{p.rollout.max_restarts + 1} times (restarted each time?)")


# --- one step -----------------------------------------------------------------------------------


@dataclass
class State:
    """What a checkpoint restores besides the models: the step and the adaptive KL coefficient."""

    step: int = 0
    kl_coef: float = 0.0
    eval_before: dict[str, float] = field(default_factory=dict)


def ppo_step(actors: Actors, prompts: list[Prompt], p: PpoConfig, state: State, pad_id: int) -> dict[str, Any]:
    """One PPO step: generate, score, advantages, learn, sync. Returns the step's metrics."""
    t_start = time.perf_counter()
    indices = prompt_indices(drawn_step(state.step, p.max_steps, p.revisit_steps), p.prompts_per_step, len(prompts),
                             p.seed)  # fmt: skip
    chosen = [prompts[i] for i in indices]
    k = p.samples_per_prompt

    # 2. generate
    samples = generate(actors, [q.ids for q in chosen], p, seed=(p.seed * 1_000_003 + state.step) * 10_000)
    t_generate = time.perf_counter()

    # 3. score ∥ reference ∥ policy log-probs ∥ values, all on the same batch in the object store
    batch = collate(samples, pad_id)
    batch_ref = ray.put(batch)
    scores_ref = actors.reward.score.remote(
        [q.prompt for q in chosen for _ in range(k)], samples.texts, [q.fields for q in chosen for _ in range(k)]
    )
    if actors.reference is not None:
        ref_refs = [actors.reference.logprobs.remote(batch_ref)]
    else:  # LoRA: each learner rank's share, with its adapter switched off
        ref_refs = actors.learner.call(lambda r: r.reference_logprobs.remote(batch_ref))
    old_refs = actors.learner.call(lambda r: r.logprobs.remote(batch_ref))
    value_refs = actors.critic.call(lambda r: r.values.remote(batch_ref)) if actors.critic else []
    scores: Scores = ray.get(scores_ref)
    old_parts = ray.get(old_refs)
    old_logprobs = torch.cat([lp for lp, _ in old_parts])  # (B, A)
    entropies = torch.cat([e for _, e in old_parts])  # (B,)
    values = torch.cat(ray.get(value_refs)) if value_refs else torch.zeros_like(old_logprobs)  # (B, A)
    batch = batch.with_fields(old_logprobs=old_logprobs, ref_logprobs=torch.cat(ray.get(ref_refs)), values=values)
    t_score = time.perf_counter()

    # 4. advantages
    check_scores(scores, state.step)
    mask = batch.response_mask * scores.valid.unsqueeze(1)  # (B, A) skipped samples take no part
    truncated = torch.tensor(samples.truncated, dtype=torch.bool)  # (B,)
    seq_scores = sequence_scores(scores.total, truncated, p.reward_clip, p.missing_eos_penalty)
    kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, p.kl_estimator) * mask  # (B, A)
    kl_per_sample = kl.sum(1)  # (B,)
    # The KL penalty is either part of the reward, or a loss term the learner adds (kl_penalty).
    reward_kl_coef = state.kl_coef if p.kl_penalty == "reward" else 0.0
    if p.advantage == "gae":
        rewards = token_rewards(seq_scores, kl, mask, reward_kl_coef)
        advantages, returns = gae(rewards, batch.values, mask, p.gamma, p.lam)
        if p.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
    else:
        # GRPO in the same loop: a reward-side KL penalty joins the sequence score before normalising.
        adv = grpo_advantages(seq_scores - reward_kl_coef * kl_per_sample, k, valid=scores.valid,
                              scale=p.grpo_scale_by_std)  # (B,)
        advantages = adv.unsqueeze(1) * mask
        returns = torch.zeros_like(mask)
    batch = batch.with_fields(response_mask=mask, advantages=advantages, returns=returns)
    if not torch.isfinite(batch.advantages).all():
        raise NonFiniteStep(f"step {state.step}: non-finite advantages; the update was not applied")

    # 5. learn: policy ∥ critic
    batch_ref = ray.put(batch)
    loss_kl_coef = state.kl_coef if p.kl_penalty == "loss" else 0.0
    learn_refs = actors.learner.call(lambda r: r.update.remote(batch_ref, state.step, p.ppo_epochs, loss_kl_coef))
    critic_refs = actors.critic.call(lambda r: r.update.remote(batch_ref, state.step, p.ppo_epochs)) if actors.critic else []
    learned = mean_records(ray.get(learn_refs))
    # The critic's gradient norm under a name of its own: it overwrote the policy's grad_norm.
    valued = {("value_grad_norm" if k == "grad_norm" else k): v
              for k, v in (mean_records(ray.get(critic_refs)) if critic_refs else {}).items()}  # fmt: skip
    t_learn = time.perf_counter()

    # 6. sync
    sync_weights(actors)
    t_sync = time.perf_counter()

    observed_kl = kl_per_sample[scores.valid].mean().item()
    record = {
        "step": state.step + 1,
        # Skipped samples (on_reward_error: skip) have no reward: they leave every mean.
        "reward_mean": scores.total[scores.valid].mean().item(),
        "reward_function_mean": scores.function[scores.valid].mean().item(),
        "reward_model_mean": scores.model[scores.valid].mean().item(),
        "kl": observed_kl,
        "kl_coef": state.kl_coef,
        "entropy": entropies[scores.valid].mean().item(),
        "response_length": batch.response_mask.sum(1)[scores.valid].mean().item(),
        "truncated": truncated[scores.valid].float().mean().item(),  # cut at max_response_tokens
        # vLLM's log-probs against the learner's for the very same tokens and weights.
        "logprob_mismatch": masked_mean((batch.old_logprobs - batch.rollout_logprobs).abs(), mask).item(),
        "logprob_mismatch_max": ((batch.old_logprobs - batch.rollout_logprobs).abs() * mask).max().item(),
        "skipped_samples": int((~scores.valid).sum()),
        # [prompt index, mean reward of its valid samples]: reward_trend pairs steps by prompt.
        "prompt_rewards": prompt_rewards(indices, scores.total, scores.valid, k),
        **learned,
        **valued,
        "time_generate_s": t_generate - t_start,
        "time_score_s": t_score - t_generate,
        "time_learn_s": t_learn - t_score,
        "time_sync_s": t_sync - t_learn,
        "time_step_s": t_sync - t_start,
    }
    if p.kl_target is not None:
        state.kl_coef = adaptive_kl_coef(state.kl_coef, observed_kl, p.kl_target, batch.size, p.kl_horizon)
    state.step += 1
    return record


def evaluate(actors: Actors, prompts: list[Prompt], p: PpoConfig, metric: Any) -> dict[str, float]:
    """Greedy responses to held-out prompts: mean reward (of the samples the reward did not skip),
    and the metric function's mean as ``accuracy`` (each call within ``reward_timeout_s``; one that
    fails names the function and the prompt's ``file:line``)."""
    samples = generate(actors, [q.ids for q in prompts], p, seed=0, greedy=True)
    scores: Scores = ray.get(actors.reward.score.remote([q.prompt for q in prompts], samples.texts, [q.fields for q in prompts]))
    out = {"reward": scores.total[scores.valid].mean().item(), "prompts": len(prompts)}  # nan if none is valid
    if skipped := int((~scores.valid).sum()):
        out["skipped"] = skipped
    if metric is not None:
        out["accuracy"] = sum(metric_score(metric, str(p.metric_function), PromptRecord(q.prompt, q.fields, q.where), t,
                                           p.reward_timeout_s) for q, t in zip(prompts, samples.texts)) / len(prompts)  # fmt: skip
    return out


# --- checkpoints -----------------------------------------------------------------------------


def save_checkpoint(actors: Actors, state: State, root: Path, keep: int) -> Path:
    """Policy and critic (DeepSpeed: weights + optimizer) and the controller state, renamed into place."""
    final = root / f"step-{state.step:08d}"
    with atomic_dir(final) as tmp:
        calls = actors.learner.call(lambda r: r.save.remote(str(tmp / "policy")))
        calls += actors.critic.call(lambda r: r.save.remote(str(tmp / "critic"))) if actors.critic else []
        ray.get(calls)
        atomic_write_json(tmp / "state.json", {"step": state.step, "kl_coef": state.kl_coef, "eval_before": state.eval_before})
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    recover_interrupted(root)
    found = sorted(root.glob("step-*"))
    return found[-1] if found else None


def restore(actors: Actors, checkpoint: Path) -> State:
    calls = actors.learner.call(lambda r: r.load.remote(str(checkpoint / "policy")))
    calls += actors.critic.call(lambda r: r.load.remote(str(checkpoint / "critic"))) if actors.critic else []
    ray.get(calls)
    saved = json.loads((checkpoint / "state.json").read_text())
    sync_weights(actors)
    return State(step=saved["step"], kl_coef=saved["kl_coef"], eval_before=saved["eval_before"])


# --- surviving a dead actor ------------------------------------------------------------------


def dead_roles(actors: Actors, error: Exception, timeout_s: float = 30.0, grace_s: float = 2.0) -> set[str]:
    """The roles of the actors whose death caused ``error`` (``learner rank 1``, ...); ``{"an
    actor"}`` when Ray reported an actor's death but none failed its ping in time; empty: none died.

    A dead actor shows as Ray's actor error where the controller calls it, but a dead learner or
    critic rank can also show first as a task error of a peer whose collective lost it. So every
    actor is asked whether it is alive; an error with no dead actor behind it is the code's own.
    Actors die together (a lost node): after the first death the others get ``grace_s`` more to
    answer, so that every dead one is found.
    """
    if not isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)):
        return set()
    pings = {actor.__ray_ready__.remote(): role for role, actor in actors.roles().items()}
    deadline, dead = time.monotonic() + timeout_s, set()
    while pings:  # a rank stuck in a collective does not answer: wait for the others only
        ready, _ = ray.wait(list(pings), num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
        if not ready:
            break
        role = pings.pop(ready[0])
        try:
            ray.get(ready[0])
        except ray.exceptions.RayActorError:
            dead.add(role)
            deadline = min(deadline, time.monotonic() + grace_s)
    return dead or ({"an actor"} if isinstance(error, ray.exceptions.RayActorError) else set())


# --- the stage -----------------------------------------------------------------------------------


def run(cfg: KilnConfig, force: bool = False, stage: str = STAGE) -> dict[str, Any]:
    """Train with PPO (or resume, or skip if finished); returns the stage summary.

    Args:
        cfg: the run's config.
        force: redo a finished stage.
        stage: the config section and run-directory folder: ``ppo``, or ``grpo`` / ``rlhf`` for a second / third RL
            run from the same SFT model (same section schema).
    """
    p, stage_dir, digest = cfg.stage_section(stage)
    # 0. Inputs are checked before any actor starts.
    policy = check_model_dir(Path(p.policy or cfg.run.dir / "sft" / "model").resolve())
    if p.learner.lora is not None:
        check_lora_targets(p.learner.lora, policy, f"{stage}.learner.lora.target_modules")
    reward_model = (check_reward_model(check_model_dir(Path(p.reward_model).resolve()), f"{stage}.reward_model")
                    if p.reward_model else None)  # fmt: skip
    critic_init = check_model_dir(Path(p.critic.init_from).resolve()) if p.critic.init_from else (reward_model or policy)
    if p.reward_function:
        load_function(p.reward_function)
    metric = load_function(p.metric_function) if p.metric_function else None
    check_context(policy, p.max_prompt_tokens + p.max_response_tokens, stage)
    tokenizer = load_tokenizer(policy)
    prompts, skipped = load_prompts(Path(p.prompts), tokenizer, p.max_prompt_tokens)
    if len(prompts) < p.prompts_per_step:
        raise ValueError(f"ppo: {len(prompts)} usable prompts in {p.prompts} ({skipped} over max_prompt_tokens), "
                         f"fewer than prompts_per_step ({p.prompts_per_step})")  # fmt: skip
    eval_prompts, eval_skipped = (load_prompts(Path(p.eval_prompts), tokenizer, p.max_prompt_tokens)
                                  if p.eval_prompts else ([], 0))  # fmt: skip
    if p.eval_prompts and not eval_prompts:
        raise ValueError(f"{stage}: every one of the {eval_skipped} prompts in {p.eval_prompts} is over max_prompt_tokens "
                         f"({p.max_prompt_tokens}): nothing to measure the policy on")  # fmt: skip
    inputs = [policy, critic_init, Path(p.prompts), *([reward_model] if reward_model else []),
              *([Path(p.eval_prompts)] if p.eval_prompts else [])]
    if (done := prepare_stage(stage_dir, stage, digest, force, inputs)) is not None:
        return done
    print(f"kiln {stage}: {len(prompts)} prompts ({skipped} skipped as too long), {len(eval_prompts)} held out "
          f"({eval_skipped} skipped); {p.advantage} advantages, {p.samples_per_step} samples per step", flush=True)  # fmt: skip

    # 1. Actors; resume from the latest checkpoint, or measure the starting policy. ``_train``
    #    starts the actors (again after one dies) and tears them down however the run ends.
    init_ray(cfg.ray)
    t0 = time.perf_counter()
    start = functools.partial(start_actors, p, policy, reward_model, critic_init)
    after = _train(start, p, stage_dir, prompts, eval_prompts, metric, tokenizer.pad_token_id, stage)
    steps = [m for m in read_metrics(stage_dir, by_step=True) if "reward_mean" in m]
    summary = {
        "model": str(stage_dir / "model"),
        "seconds": round(time.perf_counter() - t0, 1),
        "steps": p.max_steps,
        "prompts_skipped": skipped,
        "eval_before": after["before"],
        "eval_after": after["after"],
        "recoveries": after["recoveries"],
        "nodes": actor_nodes(read_metrics(stage_dir)),
        **reward_trend(steps, window=p.revisit_steps or 5),
        "mean_step_s": sum(m["time_step_s"] for m in steps) / len(steps) if steps else None,
        "sync_share": sum(m["time_sync_s"] for m in steps) / max(sum(m["time_step_s"] for m in steps), 1e-9) if steps else None,
    }
    mark_finished(stage_dir, stage, digest, summary)
    print(f"kiln {stage}: done {summary_text(summary)}", flush=True)
    return summary


def actor_nodes(lines: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The Ray node ids each role's actor ran on, over every start of the actors (``actors`` events)."""
    nodes: dict[str, list[str]] = {}
    for line in lines:
        for role, node in line.get("nodes", {}).items() if line.get("event") == "actors" else ():
            if node not in nodes.setdefault(role, []):
                nodes[role].append(node)
    return nodes


def _train(
    start: Callable[..., Actors], p: PpoConfig, stage_dir: Path, prompts: list[Prompt], eval_prompts: list[Prompt],
    metric: Any, pad_id: int, stage: str, fault: Callable[[Actors, int], None] | None = None,
) -> dict[str, Any]:
    """Start the actors, resume or start, run the loop to ``max_steps``, export the policy.

    The actors are torn down however the run ends: a failed run must not leave them holding the
    cluster. A dead actor costs the steps since the latest checkpoint, up to ``p.max_failures`` times.

    Args:
        start: ``start_actors`` with the run's models (and its ``keep``/``replace`` to restart one group).
        fault: tests only: called as ``fault(actors, step)`` before each step, e.g. to kill one.

    Returns:
        The held-out figures before and after training, and the number of recoveries.
    """
    metrics = MetricsSink(stage_dir, enabled=True, gauges=StageGauges(stage).record)
    checkpoints = stage_dir / "checkpoints"
    actors = start()
    metrics.write({"event": "actors", "nodes": actors.nodes(), "ids": actors.ids(), "time": time.time()})
    try:
        if (ckpt := latest_checkpoint(checkpoints)) is not None:
            state = restore(actors, ckpt)
            print(f"kiln {stage}: resumed from {ckpt.name}", flush=True)
        else:
            state = State(kl_coef=p.kl_coef)
            if eval_prompts:
                state.eval_before = evaluate(actors, eval_prompts, p, metric)
                metrics.write({"step": 0, **{f"eval_{k}": v for k, v in state.eval_before.items()}})
                print(f"kiln {stage}: before training {state.eval_before}", flush=True)

        # 2. The loop. The terminal gets a bar and a line per evaluation; every number of every step
        #    is in metrics.jsonl, TensorBoard and the Ray dashboard.
        recoveries = 0
        with StageProgress(stage, p.max_steps, ("reward_mean", "kl", "eval_accuracy")) as bar:
            bar.update({"step": state.step})
            while state.step < p.max_steps:
                failed = state.step + 1  # the step a dead actor is reported in, whichever phase it died in
                try:
                    if fault is not None:
                        fault(actors, state.step)
                    record = ppo_step(actors, prompts, p, state, pad_id)
                    evaluated = eval_prompts and (state.step % p.eval_every_steps == 0 or state.step == p.max_steps)
                    if evaluated:
                        record.update({f"eval_{k}": v for k, v in evaluate(actors, eval_prompts, p, metric).items()})
                    metrics.write({**record, "recoveries": recoveries})
                    bar.update(record)
                    if evaluated:
                        shown = ("step", "reward_mean", "kl", "eval_reward", "eval_accuracy", "time_step_s")
                        bar.write(f"kiln {stage}: " + " ".join(
                            f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}" for k in shown if k in record))
                    if state.step % p.checkpoint_every_steps == 0 or state.step == p.max_steps:
                        save_checkpoint(actors, state, checkpoints, p.keep_checkpoints)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as error:
                    # A dead actor: start its group again and resume from the latest checkpoint,
                    # which every stateful actor reloads (and the rollout engine is re-sent); with
                    # no checkpoint yet, start every actor again. Steps are functions of (seed,
                    # step): the replay is exact.
                    if not (roles := dead_roles(actors, error)):
                        raise
                    while True:  # an actor dying during the recovery is one more failure
                        recoveries, role = recoveries + 1, ", ".join(sorted(roles))
                        if recoveries > p.max_failures:
                            raise ActorFailure(f"{stage}: the {role} died during step {failed}, failure {recoveries} "
                                               f"of at most {p.max_failures} (ppo.max_failures)") from error  # fmt: skip
                        ckpt = latest_checkpoint(checkpoints)
                        # One group dead: it alone restarts. Several, or one not known: every actor.
                        groups = {group_of(r) for r in roles}
                        one = groups.pop() if ckpt and len(groups) == 1 and "an actor" not in roles else None
                        for r, actor in actors.roles().items():
                            if one is None or group_of(r) == one:
                                ray.kill(actor)
                        new: Actors | None = None
                        try:
                            new = start(keep=actors, replace=one) if one else start()
                            metrics.write({"event": "actors", "nodes": new.nodes(), "ids": new.ids(), "time": time.time()})
                            state = restore(new, ckpt) if ckpt else State(kl_coef=p.kl_coef, eval_before=state.eval_before)
                            actors = new
                            break
                        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as again:
                            # A death, or the code's own error (a corrupt checkpoint): only a death retries.
                            dying = isinstance(again, ray.exceptions.RayActorError)
                            roles = dead_roles(new, again) if new is not None else {"an actor"} if dying else set()
                            if not roles:
                                raise
                            actors, error = new or actors, again
                    metrics.write({"event": "recovery", "role": role, "failed_step": failed, "resumed_step": state.step,
                                   "recoveries": recoveries, "error": f"{type(error).__name__}: {error}"[:2000]})  # fmt: skip
                    rebuilt = f"the {one} restarted" if one else "every actor restarted"
                    bar.write(f"kiln {stage}: the {role} died during step {failed}; {rebuilt}, resumed from "
                              f"{ckpt.name if ckpt else 'the start'} (recovery {recoveries} of {p.max_failures})")  # fmt: skip

        # 3. Export the policy and measure it.
        with atomic_dir(stage_dir / "model") as tmp:
            actors.learner.get(lambda r: r.export.remote(str(tmp)))
        after = evaluate(actors, eval_prompts, p, metric) if eval_prompts else {}
    finally:
        for actor in actors.all():
            kill_quietly(actor)
    atomic_write_json(stage_dir / "eval.json", {"before": state.eval_before, "after": after})
    return {"before": state.eval_before, "after": after, "recoveries": recoveries}
