"""PPO / GRPO math on hand-built tensors with answers worked out by hand."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pipelines.rlhf.ppo_math import (
    adaptive_kl_coef,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_loss,
    masked_mean,
    masked_whiten,
    token_mean,
    policy_loss,
    token_logprobs,
    token_rewards,
    value_loss,
)


def test_gae_matches_hand_computation() -> None:
    # One response of 3 tokens and one of 2 (padded); gamma=0.9, lambda=0.5.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.5, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # Row 0: delta2 = 1 - 0.3 = 0.7; delta1 = 0 + 0.9*0.3 - 0.2 = 0.07; delta0 = 0.9*0.2 - 0.1 = 0.08
    a2 = 0.7
    a1 = 0.07 + 0.45 * a2
    a0 = 0.08 + 0.45 * a1
    # Row 1: the padded value 7.0 and reward 9.0 must not leak in.
    b1 = 2.0 - 0.5
    b0 = 0.5 + 0.9 * 0.5 - 1.0 + 0.45 * b1
    expected = torch.tensor([[a0, a1, a2], [b0, b1, 0.0]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values * mask)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    values = torch.tensor([[0.3, -0.1, 0.2, 0.4]])
    mask = torch.ones(1, 4)
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(rewards, [1]), 1), [1])
    torch.testing.assert_close(adv, to_go - values)


def test_token_rewards_put_score_on_last_token() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = token_rewards(torch.tensor([1.0, 2.0]), kl, mask, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2 + 2.0, 0.0, 0.0]]))


def test_kl_estimators() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    expected = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), expected)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_k1_and_k3_estimate_the_true_kl() -> None:
    # Sample from p, estimate KL(p || q) with both estimators, compare with the exact value.
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.3, 0.3, 0.4])
    exact = (p * (p / q).log()).sum()
    x = torch.multinomial(p, 200_000, replacement=True)
    for estimator in ("k1", "k3"):
        est = kl_estimate(p.log()[x], q.log()[x], estimator).mean()
        assert abs(est - exact) < 0.01, estimator


def test_masked_mean_and_whiten_ignore_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.5]))
    w = masked_whiten(x, mask)
    std = torch.tensor([1.0, 2.0, 3.0, 4.0]).std()
    torch.testing.assert_close(w, torch.tensor([[-1.5, -0.5, 0.0], [0.5, 1.5, 0.0]]) / std, atol=1e-6, rtol=1e-5)
    assert w[mask.bool()].mean().abs() < 1e-6


def test_grpo_advantages_are_group_normalised() -> None:
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = grpo_advantages(scores, group_size=4)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(adv[:4], (torch.tensor([1.0, 0.0, 0.0, 1.0]) - 0.5) / (std + 1e-6))
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # all equal: no signal, and no NaN
    with pytest.raises(ValueError, match="groups of 3"):
        grpo_advantages(scores, group_size=3)


def test_grpo_skipped_samples_leave_their_group() -> None:
    # Group 1: the third sample was skipped (its score 0 is a placeholder, not a reward).
    # Group 2: one valid sample only: nothing to compare it with, advantage 0.
    scores = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0])
    valid = torch.tensor([True, True, False, True, True, False, False, False])
    adv = grpo_advantages(scores, group_size=4, valid=valid)
    kept = torch.tensor([1.0, 0.5, 0.0])  # the valid scores of group 1
    expected = (kept - kept.mean()) / (kept.std() + 1e-6)
    torch.testing.assert_close(adv[[0, 1, 3]], expected)
    assert adv[2] == 0.0
    torch.testing.assert_close(adv[4:], torch.zeros(4))
    # With every sample valid it is the plain group normalisation.
    torch.testing.assert_close(grpo_advantages(scores, 4, valid=torch.ones(8, dtype=torch.bool)), grpo_advantages(scores, 4))


def test_policy_loss_clips_both_ways() -> None:
    old = torch.zeros(1, 4)
    # ratios e^0.5 ≈ 1.65 and e^-0.5 ≈ 0.61, with positive and negative advantages.
    logp = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, clip_frac, approx_kl = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    # max(-A r, -A clip(r)): A>0, r>1+eps -> -1.2; A<0, r>1 -> r; A>0, r<1-eps -> -r; A<0, r<1-eps -> 0.8
    expected = (-1.2 + r_hi - r_lo + 0.8) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert clip_frac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.125)


def test_policy_loss_gradient_is_advantage_at_ratio_one() -> None:
    logp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, _, _ = policy_loss(logp, torch.zeros(2, 3), adv, mask, clip_eps=0.2)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv * mask / 4)


def test_micro_batch_losses_divided_by_the_mini_batch_tokens_add_up_to_its_token_mean() -> None:
    """Two micro-batches of 5 and 1 tokens, and one of skipped samples (mask 0): each divides its sum
    by the mini-batch's 6 tokens, so their sum is the mini-batch's token mean (a mean of the
    micro-batches' own means would weigh the 1-token micro-batch as much as the 5-token one, and
    count the skipped one as a zero)."""
    logp = torch.tensor([[-0.1, -0.2, -0.3], [-0.4, -0.5, 0.0], [-0.6, 0.0, 0.0], [-0.7, -0.8, -0.9]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 0.0], [3.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    old = logp.detach() + 0.05
    whole, whole_clip, whole_kl = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    (whole_grad,) = torch.autograd.grad(whole, logp)
    parts = [policy_loss(logp[rows], old[rows], adv[rows], mask[rows], 0.2, divisor=6.0) for rows in ([0, 1], [2], [3])]
    summed = sum(p[0] for p in parts)
    (summed_grad,) = torch.autograd.grad(summed, logp)
    torch.testing.assert_close(summed, whole)
    torch.testing.assert_close(summed_grad, whole_grad)
    torch.testing.assert_close(sum(p[1] for p in parts), whole_clip)
    torch.testing.assert_close(sum(p[2] for p in parts), whole_kl)
    assert parts[2][0].item() == 0.0  # the skipped samples add nothing, and divide nothing
    mean_of_means = sum(masked_mean(x, m) for x, m in ((adv[:2], mask[:2]), (adv[2:3], mask[2:3]))) / 2
    assert mean_of_means.item() != pytest.approx(token_mean(adv, mask).item())
    assert token_mean(adv, mask, divisor=6.0).item() == pytest.approx(token_mean(adv, mask).item())
    values, returns = torch.randn(4, 3), torch.randn(4, 3)
    v_whole, _ = value_loss(values, values, returns, mask, clip=0.2)
    v_parts = sum(value_loss(values[r], values[r], returns[r], mask[r], 0.2, divisor=6.0)[0] for r in ([0, 1], [2], [3]))
    torch.testing.assert_close(v_parts, v_whole)
    ref = old - 0.3
    k_whole = kl_loss(logp, ref, mask)
    torch.testing.assert_close(sum(kl_loss(logp[r], ref[r], mask[r], divisor=6.0) for r in ([0, 1], [2], [3])), k_whole)


def test_value_loss_clipped_and_unclipped() -> None:
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2)
    plain, _ = value_loss(values, old, returns, mask, clip=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.01) / 2)
    # First value moved 1.0 > clip 0.2: clipped prediction 0.2 has error 1.8^2 = 3.24 > 1.
    clipped, frac = value_loss(values, old, returns, mask, clip=0.2)
    assert clipped.item() == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_token_logprobs_and_entropy() -> None:
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    torch.testing.assert_close(token_logprobs(logits, torch.tensor([[1, 0]])), torch.tensor([[math.log(0.5), math.log(0.75)]]))
    ent = entropy_from_logits(logits)
    torch.testing.assert_close(ent, torch.tensor([[math.log(2.0), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]]))


def test_response_logits_are_the_full_forwards_response_columns() -> None:
    """Only the response's positions go through the output layer (``logits_to_keep``); they must be
    the very logits of a full forward at columns P - 1 .. P + A - 2, with ragged prompts (left
    padding) and responses (right padding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.experience import Samples, collate, response_logits

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    prompts, responses = [[5, 6, 7], [8, 9], [10, 11, 12, 13]], [[20, 21], [22, 23, 24, 25], [26]]
    samples = Samples(prompts, responses, [[0.0] * len(r) for r in responses], ["", "", ""], 0, [False] * 3)
    batch = collate(samples, pad_id=0)
    p, a = batch.prompt_len, batch.response_mask.shape[1]
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids).logits  # fmt: skip
        kept = response_logits(model, batch)
    assert kept.shape == (3, a, 64)
    torch.testing.assert_close(kept, full[:, p - 1 : p - 1 + a], rtol=0, atol=1e-5)


def test_adaptive_kl_coefficient_moves_towards_target() -> None:
    assert adaptive_kl_coef(0.1, observed_kl=1.0, target_kl=0.5, samples=100, horizon=1000) == pytest.approx(0.1 * 1.02)
    assert adaptive_kl_coef(0.1, observed_kl=0.25, target_kl=0.5, samples=100, horizon=1000) == pytest.approx(0.1 * 0.98)
    assert adaptive_kl_coef(0.1, observed_kl=0.55, target_kl=0.5, samples=100, horizon=1000) == pytest.approx(0.1 * 1.01)


def test_grpo_without_std_scaling_only_centres_each_group() -> None:
    # An all-correct group whose scores differ only by a 0.1 length penalty: scaled by the std,
    # that difference becomes a unit-size advantage; centred only, it stays 0.1-sized.
    scores = torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.0, 0.0, 0.0])
    centred = grpo_advantages(scores, group_size=4, scale=False)
    torch.testing.assert_close(centred, torch.tensor([0.025, 0.025, 0.025, -0.075, 0.75, -0.25, -0.25, -0.25]))
    scaled = grpo_advantages(scores, group_size=4)
    assert scaled[3].abs() > 1.0 > centred[3].abs() * 10


def test_kl_loss_is_k3_of_the_current_policy_and_pulls_it_back() -> None:
    # Hand computation: delta = ref - logp; k3 = e^delta - delta - 1, averaged over real tokens.
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    expected = ((math.exp(-0.5) + 0.5 - 1) + (math.exp(1.0) - 1.0 - 1)) / 2
    loss = kl_loss(logp, ref, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d/dlogp of e^(ref-logp) - (ref-logp) - 1 is 1 - e^(ref-logp): a gradient step moves logp to ref.
    assert logp.grad[0, 0].item() == pytest.approx((1 - math.exp(-0.5)) / 2, rel=1e-6)
    assert logp.grad[0, 1].item() == pytest.approx((1 - math.exp(1.0)) / 2, rel=1e-6)
    assert logp.grad[0, 2].item() == 0.0
    assert kl_loss(ref, ref, mask).item() == 0.0


def test_the_reference_computes_in_the_learners_dtype() -> None:
    # bf16 learner (DeepSpeed on a GPU) beside a float32 reference: a KL of rounding at step 1.
    from actors.reference import reference_dtype
    from pipelines.rlhf.config import PpoConfig

    cpu = PpoConfig(reward_function="m:f", prompts="p")
    gpu = PpoConfig(reward_function="m:f", prompts="p", learner={"use_gpu": True})
    assert (reference_dtype(cpu), reference_dtype(gpu)) == (torch.float32, torch.bfloat16)


def test_kl_loss_stays_finite_where_the_policy_all_but_rules_out_a_padding_token() -> None:
    # The learner's log-probs are unmasked: at padding, log p(pad) can sit far below float32's
    # exp range while the reference's is 0 there. The loss and its gradient ignore padding.
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    sharp = torch.tensor([[-1.0, -2.0, -200.0]], requires_grad=True)
    loss = kl_loss(sharp, ref, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sharp.grad).all()
    assert loss.item() == kl_loss(torch.tensor([[-1.0, -2.0, 0.0]]), ref, mask).item()
    assert sharp.grad[0, 2].item() == 0.0


# --- the rollout-reward trend (pipelines.rlhf.trend) ---------------------------------------------


def test_prompt_rewards_average_valid_samples_and_drop_all_skipped_prompts() -> None:
    from pipelines.rlhf.trend import prompt_rewards

    total = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.25, 0.75])
    valid = torch.tensor([True, False, False, False, True, True])
    assert prompt_rewards([7, 3, 9], total, valid, k=2) == [[7, 1.0], [9, 0.5]]


def _steps(prompt_sets: list[list[int]], reward: Callable[[int, int], float]) -> list[dict[str, Any]]:
    return [{"reward_mean": sum(reward(s, i) for i in ids) / len(ids), "prompt_rewards": [[i, reward(s, i)] for i in ids]}
            for s, ids in enumerate(prompt_sets)]  # fmt: skip


def test_reward_trend_pairs_prompts_that_both_windows_drew() -> None:
    """Prompts that differ a lot in difficulty, a policy that gains 0.05 on each of them: step means
    are swamped by which prompts a step drew, the paired test over prompts is not."""
    from pipelines.rlhf.ppo import prompt_indices
    from pipelines.rlhf.trend import reward_trend

    def reward(step: int, prompt: int) -> float:
        return (prompt % 10) / 10 + (0.05 if step >= 5 else 0.0)

    # 20 prompts, 4 a step: one pass every 5 steps, so the first and the last 5 steps draw the same 20.
    steps = _steps([prompt_indices(s, 4, 20, seed=0) for s in range(10)], reward)
    trend = reward_trend(steps)
    assert trend["reward_gain_test"] == "paired t over 20 prompts"
    assert trend["reward_gain"] == pytest.approx(0.05) and trend["reward_gain_p"] < 1e-10
    assert trend["reward_last_steps"]["mean"] - trend["reward_first_steps"]["mean"] == pytest.approx(0.05)
    assert trend["reward_first_steps"]["steps"] == 5 and len(trend["reward_first_steps"]["ci95"]) == 2


def test_reward_trend_without_shared_prompts_is_welch_on_step_means() -> None:
    from pipelines.eval.stats import welch_test
    from pipelines.rlhf.trend import reward_trend

    steps = _steps([[s * 2, s * 2 + 1] for s in range(10)], lambda s, i: (i % 7) / 7)
    trend = reward_trend(steps)
    means = [m["reward_mean"] for m in steps]
    assert trend["reward_gain_test"] == "Welch over step means"
    assert (trend["reward_gain"], trend["reward_gain_p"]) == welch_test(means[:5], means[5:])
    # Records from before prompt_rewards existed: the same.
    assert reward_trend([{"reward_mean": m} for m in means])["reward_gain_test"] == "Welch over step means"



def test_a_short_run_compares_windows_that_share_no_step() -> None:
    """Six steps, window 5: the windows were steps 0-4 and 1-5, sharing four steps (a paired test
    over the four prompts they both drew, gain 0, p 1): now steps 0-2 against 3-5."""
    from pipelines.rlhf.trend import reward_trend

    steps = _steps([[s] for s in range(6)], lambda s, i: s / 5)
    trend = reward_trend(steps)
    assert trend["reward_first_steps"]["steps"] == trend["reward_last_steps"]["steps"] == 3
    assert trend["reward_gain_test"] == "Welch over step means" and trend["reward_gain"] == pytest.approx(0.6)
    assert trend["reward_gain_p"] < 0.05
    one = reward_trend(steps[:1])  # one step: no window at all
    assert one["reward_first_steps"]["steps"] == 0 and math.isnan(one["reward_gain"])

def test_revisit_steps_draw_the_first_steps_prompts_again_and_the_trend_pairs_them() -> None:
    """ppo.revisit_steps: the last steps replay the first steps' prompts; every other step draws
    new ones; the trend over those windows is paired over the replayed prompts."""
    from pipelines.rlhf.config import PpoConfig
    from pipelines.rlhf.ppo import drawn_step, prompt_indices
    from pipelines.rlhf.trend import reward_trend

    assert [drawn_step(s, 10, 3) for s in range(10)] == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    assert [drawn_step(s, 10, 0) for s in range(10)] == list(range(10))
    draws = [prompt_indices(drawn_step(s, 10, 3), 4, 100, seed=0) for s in range(10)]
    assert draws[7:] == draws[:3] and len({i for d in draws[:7] for i in d}) == 28  # 100 prompts: no repeat before
    steps = _steps(draws, lambda s, i: (i % 10) / 10 + (0.05 if s >= 5 else 0.0))
    trend = reward_trend(steps, window=3)
    assert trend["reward_gain_test"] == "paired t over 12 prompts" and trend["reward_gain"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"revisit_steps \(6\) may be at most half of max_steps \(10\)"):
        PpoConfig(reward_function="m:f", prompts="p", max_steps=10, revisit_steps=6)


def test_sequence_scores_penalise_cut_responses_then_clip() -> None:
    from pipelines.rlhf.ppo_math import sequence_scores

    total = torch.tensor([1.0, 1.0, -4.5, 9.0])
    truncated = torch.tensor([False, True, True, False])
    torch.testing.assert_close(sequence_scores(total, truncated, None, None), total)
    torch.testing.assert_close(sequence_scores(total, truncated, 5.0, None), torch.tensor([1.0, 1.0, -4.5, 5.0]))
    # TRL's missing_eos_penalty: only the cut responses pay it, and the clip bounds the result.
    torch.testing.assert_close(sequence_scores(total, truncated, 5.0, 1.0), torch.tensor([1.0, 0.0, -5.0, 5.0]))
    torch.testing.assert_close(sequence_scores(total, truncated, None, 1.0), torch.tensor([1.0, 0.0, -5.5, 9.0]))


def test_held_out_figures_leave_skipped_samples_out_and_name_a_failing_metric(monkeypatch: pytest.MonkeyPatch,
                                                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """The held-out reward averaged skipped samples in as 0 (on_reward_error: skip), and the metric
    ran bare in the controller: a raise ended the run with a KeyError naming nothing."""
    from types import SimpleNamespace

    import pipelines.rlhf.ppo as ppo
    from actors.experience import Samples
    from actors.reward import Scores, function_rewards
    from pipelines.rlhf.config import PpoConfig
    from pipelines.rlhf.prompts import Prompt

    samples = Samples([[1]] * 4, [[2]] * 4, [[0.0]] * 4, ["1", "3", "x", "4"], 0, [False] * 4)
    total = torch.tensor([2.0, 0.0, 0.0, 2.0])
    scores = Scores(total=total, model=total, function=torch.zeros(4), valid=torch.tensor([True, False, False, True]))
    fake_reward_actor = SimpleNamespace(score=SimpleNamespace(remote=lambda *args: scores))  # a named fake: no Ray
    monkeypatch.setattr(ppo, "generate", lambda *args, **kw: samples)
    monkeypatch.setattr(ppo.ray, "get", lambda value: value)
    prompts = [Prompt(f"What is {i} + 1?", [1], {"answer": i + 1}, f"eval.jsonl:{i + 1}") for i in range(4)]
    p = PpoConfig(prompts="p.jsonl", reward_function="m:f", metric_function="pipelines.quickstart.task:correct")
    from pipelines.quickstart.task import correct

    out = ppo.evaluate(SimpleNamespace(reward=fake_reward_actor), prompts, p, correct)
    assert out == {"reward": 2.0, "prompts": 4, "skipped": 2, "accuracy": 0.5}  # "1" and "4" are right

    def broken(prompt: str, response: str, **fields: object) -> bool:
        return fields["missing"] == response

    with pytest.raises(ValueError, match=r"metric function m:broken failed on eval\.jsonl:1 \(response '1'\): KeyError"):
        ppo.evaluate(SimpleNamespace(reward=fake_reward_actor), prompts, p.model_copy(update={"metric_function": "m:broken"}),
                     broken)  # fmt: skip

    # Skipped training samples: the first failure is named, the rest counted.
    values, valid = function_rewards(broken, "m:broken", ["q"] * 3, ["a", "b", "c"], [{}] * 3, 5.0, True)
    assert valid.tolist() == [False] * 3
    err = capsys.readouterr().err
    assert "reward function m:broken failed on 3 of 3 samples, skipped" in err and "KeyError: 'missing'" in err


def test_a_rollout_restarted_between_the_check_and_the_call_samples_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray restarted the rollout actor after the version check and before ``generate``: the step
    went on with samples of the initial weights, silently off-policy."""
    from types import SimpleNamespace

    import pipelines.rlhf.ppo as ppo
    from actors.experience import Samples
    from pipelines.rlhf.config import PpoConfig

    engine = {"version": 3}
    calls: list[str] = []

    def sample(*args: object) -> Samples:
        calls.append(f"generate@{engine['version']}")
        if len(calls) == 1:  # restarted just before this call: it samples its initial weights
            engine["version"] = 0
        return Samples([[1]], [[2]], [[0.0]], ["x"], engine["version"], [False])

    def load(weights: object, version: int) -> None:
        calls.append(f"load {version}")
        engine["version"] = version

    fake_rollout = SimpleNamespace(generate=SimpleNamespace(remote=sample), load_weights=SimpleNamespace(remote=load))
    actors = SimpleNamespace(version=3, weights={}, rollout=fake_rollout)  # a named fake: no Ray
    monkeypatch.setattr(ppo.ray, "get", lambda value: value)
    monkeypatch.setattr(ppo, "_rollout_version", lambda a: engine["version"])
    p = PpoConfig(prompts="p.jsonl", reward_function="m:f")
    assert ppo.generate(actors, [[1]], p, seed=0).policy_version == 3
    assert calls == ["generate@3", "load 3", "generate@3"]
