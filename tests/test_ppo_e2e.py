"""PPO end to end on 2 CPUs: real vLLM rollouts, real DeepSpeed learner and critic, tiny models.

The policy is a tiny Llama fine-tuned on the addition task inside a fixture (a plain PyTorch
loop over rows from ``pipelines.train.datasets``: test set-up, a minute instead of the quickstart's
pretrain + SFT stages). PPO's prompts and its held-out evaluation prompts never share a pair.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from actors.reward import RewardFunctionError, RewardScorer, Scores
from pipelines.eval.stats import paired_mean_test
from pipelines.quickstart.task import is_correct, operands, parse_answer, reward
from pipelines.rlhf.config import PpoConfig
from pipelines.rlhf.ppo import (
    Actors,
    Prompt,
    State,
    generate,
    latest_checkpoint,
    load_prompts,
    ppo_step,
    restore,
    save_checkpoint,
    start_actors,
)

pytestmark = pytest.mark.slow

def _ppo_config(task: dict[str, Any], **overrides: Any) -> PpoConfig:
    base: dict[str, Any] = {
        "prompts": str(task["prompts"]),
        "eval_prompts": str(task["eval"]),
        "reward_function": "pipelines.quickstart.task:reward",
        "metric_function": "pipelines.quickstart.task:correct",
        "max_prompt_tokens": 32,
        "max_response_tokens": 8,
        "prompts_per_step": 8,
        "samples_per_prompt": 4,
        "minibatches_per_epoch": 2,
        "ppo_epochs": 2,
        "kl_coef": 0.01,
        "learner": {"num_workers": 2, "cpus_per_worker": 0.25, "zero_stage": 3, "micro_batch_per_worker": 8,
                    "learning_rate": 2.0e-4},
        "critic": {"num_workers": 1, "cpus_per_worker": 0.25, "micro_batch_per_worker": 16, "learning_rate": 1.0e-3},
        "rollout": {"num_cpus": 0.5, "engine": {"dtype": "float32"}},
    }  # fmt: skip
    return PpoConfig.model_validate({**base, **overrides})


def _start(task: dict[str, Any], p: PpoConfig) -> tuple[Actors, list[Prompt], int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(task["policy"]))
    prompts, skipped = load_prompts(Path(p.prompts), tok, p.max_prompt_tokens)
    assert skipped == 0
    actors = start_actors(p, task["policy"], None, task["policy"])
    return actors, prompts, tok.pad_token_id


def _kill_all(actors: Actors) -> None:
    for a in actors.all():
        ray.kill(a)


def _weights(actors: Actors) -> dict[str, torch.Tensor]:
    refs = actors.learner.get(lambda r: r.publish_weights.remote())
    return ray.get(refs[0][0])


def _sampled_eval(actors: Actors, prompts: list[Prompt], p: PpoConfig, samples: int) -> dict[str, Any]:
    """Mean reward and accuracy over ``samples`` responses per prompt at temperature 1 (fixed seed),
    and each prompt's share of right answers (``per_prompt``, for a paired test)."""
    out = generate(actors, [q.ids for q in prompts], p.model_copy(update={"samples_per_prompt": samples}), seed=12345)
    fields = [q for q in prompts for _ in range(samples)]
    rewards = [reward(q.prompt, t, **q.fields) for q, t in zip(fields, out.texts)]
    correct = [is_correct(q.prompt, t, q.fields["answer"]) for q, t in zip(fields, out.texts)]
    answered = [parse_answer(t, *operands(q.prompt)) is not None for q, t in zip(fields, out.texts)]
    n = len(out.texts)
    per_prompt = [sum(correct[i : i + samples]) / samples for i in range(0, n, samples)]
    return {"reward": sum(rewards) / n, "accuracy": sum(correct) / n, "answered": sum(answered) / n, "per_prompt": per_prompt}


@pytest.fixture(scope="module")
def system(ray_local: None, task: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three PPO steps (2 ZeRO-3 learner ranks + critic), a rollout-actor kill, a checkpoint and a resume."""
    p = _ppo_config(task)
    actors, prompts, pad = _start(task, p)
    before = _weights(actors)
    state = State(kl_coef=p.kl_coef)
    records = [ppo_step(actors, prompts, p, state, pad) for _ in range(3)]
    after = _weights(actors)

    ray.kill(actors.rollout, no_restart=False)  # Ray restarts it with the initial weights
    records.append(ppo_step(actors, prompts, p, state, pad))
    restarted_version = ray.get(actors.rollout.policy_version.remote())

    ckpt_root = tmp_path_factory.mktemp("ppo-ckpt")
    save_checkpoint(actors, state, ckpt_root, keep=2)
    continued = ppo_step(actors, prompts, p, state, pad)
    resumed_state = restore(actors, latest_checkpoint(ckpt_root))
    resumed_step = resumed_state.step
    replayed = ppo_step(actors, prompts, p, resumed_state, pad)
    # One more step with the KL penalty as a loss term in the learner instead of in the reward.
    kl_as_loss = ppo_step(actors, prompts, p.model_copy(update={"kl_penalty": "loss", "kl_coef": 0.5}), resumed_state, pad)
    out = {"p": p, "records": records, "before": before, "after": after, "restarted_version": restarted_version,
           "version": actors.version, "continued": continued, "replayed": replayed, "resumed_step": resumed_step,
           "kl_as_loss": kl_as_loss,
           "checkpoints": sorted(x.name for x in ckpt_root.iterdir())}  # fmt: skip
    _kill_all(actors)
    return out


def test_every_policy_parameter_changes(system: dict[str, Any]) -> None:
    before, after = system["before"], system["after"]
    assert before.keys() == after.keys() and len(before) > 10
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters not updated by PPO: {unchanged}"


def test_rollout_logprobs_match_the_learner_after_every_sync(system: dict[str, Any]) -> None:
    # Step 1 samples with the initial weights, later steps with freshly synced ones; the
    # learner's log-probs for the very same tokens must agree in every case.
    for r in system["records"] + [system["continued"], system["replayed"]]:
        assert r["logprob_mismatch"] < 1e-4 and r["logprob_mismatch_max"] < 1e-3, r
    assert all(math.isfinite(r[k]) for r in system["records"] for k in ("policy_loss", "value_loss", "kl", "entropy"))
    assert [r["step"] for r in system["records"]] == [1, 2, 3, 4]
    # The policy's and the critic's gradient norms, each its own (the critic's overwrote the policy's).
    assert all(math.isfinite(r["grad_norm"]) and math.isfinite(r["value_grad_norm"]) for r in system["records"])
    assert any(r["grad_norm"] != r["value_grad_norm"] for r in system["records"])


def test_killed_rollout_actor_is_restarted_and_resynced(system: dict[str, Any]) -> None:
    # Without the resync the restarted engine would sample from the initial weights and the
    # mismatch above (record 4) would be large.
    assert system["restarted_version"] == system["records"][3]["step"]  # the engine follows again
    assert system["records"][3]["logprob_mismatch"] < 1e-4


def test_resume_from_checkpoint_continues_the_step_count_and_replays_exactly(system: dict[str, Any]) -> None:
    assert system["checkpoints"] == ["step-00000004"]
    assert system["resumed_step"] == 4
    continued, replayed = system["continued"], system["replayed"]
    assert continued["step"] == replayed["step"] == 5
    # Same weights, optimizer, prompts and sampling seeds: the same step again.
    for key in ("reward_mean", "response_length", "kl"):
        assert replayed[key] == pytest.approx(continued[key], abs=1e-5), key
    assert replayed["policy_loss"] == pytest.approx(continued["policy_loss"], abs=1e-4)


def test_kl_penalty_as_a_loss_term_reaches_the_learner(system: dict[str, Any]) -> None:
    # After six updates the policy has left the reference: the learner's k3 term is positive.
    r = system["kl_as_loss"]
    assert r["step"] == 6 and math.isfinite(r["policy_loss"])
    assert r["kl_loss"] > 0 and math.isfinite(r["kl_loss"])
    assert "kl_loss" not in system["replayed"]  # kl_penalty: reward adds no loss term


def test_reward_function_errors_name_the_function_and_sample(ray_local: None) -> None:
    # The quickstart reward needs the prompt's "answer" field: without it, it raises.
    p = PpoConfig(prompts="unused.jsonl", reward_function="pipelines.quickstart.task:reward")
    scorer = RewardScorer.remote(p, None)
    with pytest.raises(RewardFunctionError, match=r"pipelines\.quickstart\.task:reward failed on sample 1 .*answer"):
        try:
            ray.get(scorer.score.remote(["What is 1 + 1?"] * 2, ["2", "3"], [{"answer": 2}, {}]))
        except ray.exceptions.RayTaskError as e:
            raise e.cause from None
    skipping = RewardScorer.remote(p.model_copy(update={"on_reward_error": "skip"}), None)
    scores = ray.get(skipping.score.remote(["What is 1 + 1?"] * 2, ["2", "3"], [{"answer": 2}, {}]))
    assert scores.valid.tolist() == [True, False] and scores.total.tolist() == [1.0, 0.0]
    ray.kill(scorer)
    ray.kill(skipping)


def test_held_out_prompts_all_over_the_limit_fail_before_any_actor(
    task: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A held-out file none of whose prompts fits max_prompt_tokens is an error naming it, not a
    run that silently measures nothing."""
    import json

    from pipelines.config import parse_config
    from pipelines.rlhf import ppo

    def no_actor(*args: Any) -> None:
        raise AssertionError("Ray started before the inputs were checked")

    monkeypatch.setattr(ppo, "init_ray", no_actor)
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "What is 1 + 2? " * 12, "answer": 3}) + "\n" for _ in range(3)))
    section = _ppo_config(task, eval_prompts=str(long), policy=str(task["policy"])).model_dump(mode="json")
    cfg = parse_config({"run": {"name": "r", "root": str(tmp_path)}, "ppo": section})
    with pytest.raises(ValueError, match=r"every one of the 3 prompts in .*long\.jsonl is over max_prompt_tokens \(32\)"):
        ppo.run(cfg)


def test_a_step_whose_every_sample_was_skipped_stops_before_the_weights() -> None:
    """``on_reward_error: skip`` with every sample failed: a clear error, not NaN means that turn
    the adaptive KL coefficient NaN (and fail every later step and every resume)."""
    from pipelines.rlhf.ppo import NonFiniteStep, NoValidSample, check_scores

    def scores(total: list[float], valid: list[bool]) -> Scores:
        t = torch.tensor(total)
        return Scores(total=t, model=torch.zeros_like(t), function=t, valid=torch.tensor(valid))

    check_scores(scores([1.0, 0.0], [True, False]), 3)  # one skipped sample: the step goes on
    with pytest.raises(NoValidSample, match=r"step 3: the reward failed on every one of its 2 samples"):
        check_scores(scores([0.0, 0.0], [False, False]), 3)
    with pytest.raises(NonFiniteStep, match="step 3: non-finite reward"):
        check_scores(scores([float("nan"), 0.0], [True, True]), 3)


def test_ppo_improves_reward_and_accuracy_on_held_out_prompts(ray_local: None, task: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    # GRPO (the critic-free advantage of the same loop): a fresh critic's values are noise for
    # the first steps, and this test has 32 steps.
    p = _ppo_config(task, advantage="grpo", learner={"num_workers": 1, "cpus_per_worker": 0.5, "micro_batch_per_worker": 16,
                                                     "learning_rate": 1.5e-4})  # fmt: skip
    actors, prompts, pad = _start(task, p)
    held_out, _ = load_prompts(task["eval"], AutoTokenizer.from_pretrained(str(task["policy"])), p.max_prompt_tokens)
    # 48 samples a prompt: the paired test's noise on 30 prompts is mostly sampling noise.
    before = _sampled_eval(actors, held_out, p, samples=48)
    state = State(kl_coef=p.kl_coef)
    rewards = [ppo_step(actors, prompts, p, state, pad)["reward_mean"] for _ in range(32)]
    after = _sampled_eval(actors, held_out, p, samples=48)
    _kill_all(actors)
    delta, p_value = paired_mean_test(before.pop("per_prompt"), after.pop("per_prompt"))
    print(f"held-out before {before} after {after}; paired delta {delta:.3f} p={p_value:.2g}; "
          f"training rewards {[round(r, 3) for r in rewards]}")
    assert after["reward"] > before["reward"] + 0.05, (before, after)
    # Not reward hacking: the task's own metric (exact answers) improves too, beyond the noise of
    # the held-out prompts (a paired test of each prompt's share of right answers, before vs after).
    assert after["accuracy"] > before["accuracy"] + 0.03, (before, after)
    assert delta > 0 and p_value < 0.05, (delta, p_value)


def test_responses_cut_at_the_token_limit_are_counted(system: dict[str, Any]) -> None:
    # A response is cut (vLLM's finish reason "length") only at the limit: each cut one is 8 tokens
    # long, so a step's mean length is at least 8 x its cut share.
    limit = system["p"].max_response_tokens
    records = system["records"] + [system["continued"], system["replayed"], system["kl_as_loss"]]
    for r in records:
        assert 0 <= r["truncated"] <= 1 and r["response_length"] >= limit * r["truncated"] - 1e-6, r
    assert any(r["truncated"] > 0 for r in records)
