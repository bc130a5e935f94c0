import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steppo.core.losses import (
    aggregation_weights,
    entropy_from_logits,
    explained_variance,
    kl_loss,
    kl_penalty,
    policy_loss,
    ratio_units,
    segment_mean,
    value_loss,
)

T = torch.tensor


def _loss(lp, old, adv, token_step, step_traj, level="token", agg="token-mean", **kw):
    token_traj = step_traj[token_step]
    units, n = ratio_units(level, token_step, token_traj)
    w = aggregation_weights(agg, token_step, step_traj)
    return policy_loss(lp, old, adv, w, units, n, **kw)


def test_token_ppo_clip_hand_computed():
    lp = T([math.log(1.5), math.log(0.5)], requires_grad=True)
    loss, stats = _loss(lp, T([0.0, 0.0]), T([1.0, -1.0]), T([0, 1]), T([0, 0]))
    # ratio 1.5 with A=1 -> max(-1.5, -1.2) = -1.2; ratio 0.5 with A=-1 -> max(0.5, 0.8) = 0.8
    torch.testing.assert_close(loss, T(-0.2))
    assert stats["clip_frac"].item() == 1.0
    loss.backward()
    assert torch.all(lp.grad == 0)  # both clipped


def test_dual_clip_bounds_negative_advantage_losses():
    lp = T([math.log(5.0)], requires_grad=True)
    plain, _ = _loss(lp, T([0.0]), T([-1.0]), T([0]), T([0]))
    dual, _ = _loss(lp, T([0.0]), T([-1.0]), T([0]), T([0]), dual_clip=3.0)
    torch.testing.assert_close(plain, T(5.0))
    torch.testing.assert_close(dual, T(3.0))
    with pytest.raises(ValueError, match="dual_clip"):
        _loss(lp, T([0.0]), T([-1.0]), T([0]), T([0]), dual_clip=0.5)


def test_step_ratio_is_the_geometric_mean_and_clips_per_step():
    # One step of two tokens with log-ratios 0.0 and 0.3: w = exp(0.15) = 1.162 > 1.1.
    lp = T([0.0, 0.3], requires_grad=True)
    loss, stats = _loss(lp, T([0.0, 0.0]), T([1.0, 1.0]), T([0, 0]), T([0]), level="step", clip_low=0.1, clip_high=0.1)
    torch.testing.assert_close(stats["ratio_mean"], T(math.exp(0.15)))
    torch.testing.assert_close(loss, T(-1.1))
    loss.backward()
    # The whole step is clipped, token 0 included although its own ratio is exactly 1.
    assert torch.all(lp.grad == 0)
    lp2 = T([0.0, 0.3], requires_grad=True)
    _loss(lp2, T([0.0, 0.0]), T([1.0, 1.0]), T([0, 0]), T([0]), level="token", clip_low=0.1, clip_high=0.1)[0].backward()
    assert lp2.grad[0] != 0 and lp2.grad[1] == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), eps=st.sampled_from([0.2, 0.05, 3e-4]))
def test_step_mean_gradient_equals_the_per_step_objective(seed, eps):
    """sum over steps of -min(w_t A_t, clip(w_t) A_t) / S with w_t = exp(mean log-ratio)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (5,), generator=g)
    token_step = torch.repeat_interleave(torch.arange(5), lengths)
    step_traj = T([0, 0, 1, 1, 1])
    N = int(lengths.sum())
    old = -torch.rand(N, generator=g)
    base = old + 0.1 * torch.randn(N, generator=g)
    step_adv = torch.randn(5, generator=g)
    lp = base.clone().requires_grad_(True)
    loss, _ = _loss(lp, old, step_adv[token_step], token_step, step_traj, level="step", agg="step-mean", clip_low=eps, clip_high=eps)
    loss.backward()
    lp_ref = base.clone().requires_grad_(True)
    w = torch.exp(segment_mean(lp_ref - old, token_step, 5))
    ref = -torch.minimum(w * step_adv, torch.clamp(w, 1 - eps, 1 + eps) * step_adv).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=1e-5, atol=1e-6)


def test_one_step_episode_step_ratio_equals_sequence_ratio():
    g = torch.Generator().manual_seed(0)
    lp, old, adv = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.ones(6)
    token_step, step_traj = torch.zeros(6, dtype=torch.long), T([0])
    step = _loss(lp, old, adv, token_step, step_traj, level="step")
    seq = _loss(lp, old, adv, token_step, step_traj, level="trajectory")
    torch.testing.assert_close(step[0], seq[0])
    torch.testing.assert_close(step[1]["ratio_mean"], seq[1]["ratio_mean"])


def test_log_ratio_clamp_keeps_ratios_finite():
    loss, stats = _loss(T([200.0]), T([0.0]), T([-1.0]), T([0]), T([0]))
    torch.testing.assert_close(stats["ratio_mean"], T(math.exp(10.0)))
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_weights_hand_computed():
    token_step = T([0, 0, 0, 1, 2, 2])  # steps of 3, 1, 2 tokens
    step_traj = T([0, 0, 1])
    torch.testing.assert_close(aggregation_weights("token-mean", token_step, step_traj), torch.full((6,), 1 / 6))
    torch.testing.assert_close(
        aggregation_weights("step-mean", token_step, step_traj),
        T([1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 6, 1 / 6]),
    )
    torch.testing.assert_close(
        aggregation_weights("trajectory-mean", token_step, step_traj),
        T([1 / 12, 1 / 12, 1 / 12, 1 / 4, 1 / 4, 1 / 4]),
    )
    with pytest.raises(ValueError, match="aggregation"):
        aggregation_weights("seq-sum", token_step, step_traj)
    assert aggregation_weights("step-mean", T([], dtype=torch.long), T([], dtype=torch.long)).numel() == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), mode=st.sampled_from(["token-mean", "step-mean", "trajectory-mean"]))
def test_micro_batches_with_global_weights_sum_to_the_full_loss(seed, mode):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 5, (6,), generator=g)
    token_step = torch.repeat_interleave(torch.arange(6), lengths)
    step_traj = T([0, 0, 1, 2, 2, 2])
    N = int(lengths.sum())
    lp, old, adv = torch.randn(N, generator=g), torch.randn(N, generator=g), torch.randn(N, generator=g)
    units, n = ratio_units("step", token_step, step_traj[token_step])
    w = aggregation_weights(mode, token_step, step_traj)
    assert abs(float(w.sum()) - 1.0) < 1e-5
    full, _ = policy_loss(lp, old, adv, w, units, n)
    cut = int(torch.cumsum(lengths, 0)[2])  # micro-batches split at a step boundary
    parts = sum(policy_loss(lp[s], old[s], adv[s], w[s], units[s], n)[0] for s in (slice(0, cut), slice(cut, N)))
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- KL, entropy, value


def test_kl_estimators_hand_computed():
    lp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), T([math.log(2)]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), T([0.5 * math.log(2) ** 2]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), T([0.5 - 1 + math.log(2)]))
    torch.testing.assert_close(kl_loss(T([0.0, 0.0]), T([0.0, 0.0]), T([0.5, 0.5])), T(0.0))
    with pytest.raises(ValueError, match="KL"):
        kl_penalty(lp, ref, "k4")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-20, 5), min_size=1, max_size=8), st.lists(st.floats(-20, 5), min_size=1, max_size=8))
def test_k3_is_non_negative(a, b):
    n = min(len(a), len(b))
    assert (kl_penalty(T(a[:n]), T(b[:n]), "k3") >= -1e-6).all()


def test_entropy_of_uniform_logits_is_log_vocab():
    torch.testing.assert_close(entropy_from_logits(torch.zeros(3, 7)), torch.full((3,), math.log(7)))


def test_clipped_value_loss_hand_computed():
    loss, stats = value_loss(T([1.0]), T([0.0]), T([2.0]), clip=0.5)
    # unclipped (1-2)^2 = 1, clipped V = 0.5 -> (0.5-2)^2 = 2.25; 0.5 * max = 1.125
    torch.testing.assert_close(loss, T(1.125))
    assert stats["clip_frac"].item() == 1.0
    loss, _ = value_loss(T([1.0, 3.0]), T([0.0, 0.0]), T([2.0, 3.0]), clip=None)
    torch.testing.assert_close(loss, T(0.25))


def test_explained_variance():
    assert explained_variance(T([1.0, 2.0, 3.0]), T([1.0, 2.0, 3.0])) == 1.0
    assert explained_variance(T([0.0, 0.0]), T([1.0, -1.0])) == 0.0
    assert math.isnan(explained_variance(T([1.0]), T([1.0])))


def test_staleness_weights_are_truncated_per_step_geometric_means():
    from steppo.core.losses import staleness_weights

    # step 0: tokens with log-ratios 0.2 and 0.0 -> exp(0.1); step 1: one token with log-ratio 2 -> capped at 2
    prox = torch.tensor([-1.0, -2.0, -0.5])
    behav = torch.tensor([-1.2, -2.0, -2.5])
    units = torch.tensor([0, 0, 1])
    w = staleness_weights(prox, behav, units, 2, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([math.exp(0.1), math.exp(0.1), 2.0]))
    # the same policy: weight 1 everywhere
    torch.testing.assert_close(staleness_weights(prox, prox, units, 2, cap=2.0), torch.ones(3))


# ----------------------------------------------------------------------------- ratio-unit gradients (issue 12)


def _reference_weights(mode, token_step, step_traj):
    """Aggregation weights by counting, in plain Python (independent of `aggregation_weights`)."""
    ts, traj_of = token_step.tolist(), step_traj.tolist()
    step_len = {s: ts.count(s) for s in set(ts)}
    trajs = {traj_of[s] for s in step_len}
    steps_in = {b: sum(1 for s in step_len if traj_of[s] == b) for b in trajs}
    if mode == "token-mean":
        return [1.0 / len(ts)] * len(ts)
    if mode == "step-mean":
        return [1.0 / (step_len[s] * len(step_len)) for s in ts]
    return [1.0 / (step_len[s] * steps_in[traj_of[s]] * len(trajs)) for s in ts]


def _reference_objective(lp, old, adv, weights, token_step, token_traj, level, clip_low=0.2, clip_high=0.2,
                         dual_clip=None, clamp=10.0):
    """sum_i w_i max(-A_i r_u, -A_i clip(r_u)) (dual clip for A_i < 0), r_u =
    exp(clamp(mean_{i in u} log(pi_i / pi_old_i))), written as a loop over units."""
    key = {"token": list(range(len(lp))), "step": token_step.tolist(), "trajectory": token_traj.tolist()}[level]
    members: dict[int, list[int]] = {}
    for i, u in enumerate(key):
        members.setdefault(u, []).append(i)
    total = torch.zeros((), dtype=lp.dtype)
    for idx in members.values():
        log_r = sum(lp[i] - old[i] for i in idx) / len(idx)
        r = torch.exp(torch.clamp(log_r, -clamp, clamp))
        for i in idx:
            a = adv[i]
            loss_i = torch.maximum(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
            if dual_clip is not None and float(a) < 0:
                loss_i = torch.minimum(loss_i, -a * dual_clip)
            total = total + weights[i] * loss_i
    return total


def _compare_with_reference(lp0, old, adv, token_step, step_traj, level, agg, **kw):
    token_traj = step_traj[token_step]
    w = aggregation_weights(agg, token_step, step_traj)
    torch.testing.assert_close(w, T(_reference_weights(agg, token_step, step_traj), dtype=w.dtype))
    lp = lp0.clone().requires_grad_(True)
    units, n = ratio_units(level, token_step, token_traj)
    loss, _ = policy_loss(lp, old, adv, w, units, n, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    lp_ref = lp0.clone().requires_grad_(True)
    ref = _reference_objective(
        lp_ref, old, adv, w.to(lp0.dtype).detach(), token_step, token_traj, level, kw.get("clip_low", 0.2),
        kw.get("clip_high", 0.2), kw.get("dual_clip"), kw.get("log_ratio_clamp", 10.0),
    )
    (grad_ref,) = torch.autograd.grad(ref, lp_ref)
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
    return loss, grad


def test_gspo_gradient_on_a_multi_step_trajectory_hand_computed():
    """The issue's case: one trajectory, steps of 1 and 3 tokens, A = 1, trajectory ratio and
    trajectory-mean weights [1/2, 1/6, 1/6, 1/6]. log r = mean [0.15, 0, 0, 0] = 0.0375, so
    r = exp(0.0375) = 1.038212 (inside the 0.2 clip), loss = -r and, the ratio depending on
    every token through the mean, d loss / d log pi_i = -r / 4 = -0.259553 for each token
    (the old own-log-prob gradient gave w_i * -r = [-0.519, -0.173, -0.173, -0.173])."""
    lp = T([0.15, 0.0, 0.0, 0.0], requires_grad=True)
    token_step, step_traj = T([0, 1, 1, 1]), T([0, 0])
    loss, _ = _loss(lp, torch.zeros(4), torch.ones(4), token_step, step_traj, level="trajectory", agg="trajectory-mean")
    torch.testing.assert_close(loss, T(-1.038212), rtol=0, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(lp.grad, T([-0.259553] * 4), rtol=0, atol=1e-6)
    _compare_with_reference(T([0.15, 0.0, 0.0, 0.0]), torch.zeros(4), torch.ones(4), token_step, step_traj,
                            "trajectory", "trajectory-mean")


# Two trajectories: steps of 1, 3 tokens and of 2, 1, 2 tokens; token-varying advantages of both signs.
_TS, _ST = T([0, 1, 1, 1, 2, 2, 3, 4, 4]), T([0, 0, 1, 1, 1])
_OLD = T([-1.0, -0.5, -2.0, -0.7, -1.2, -0.3, -0.9, -1.5, -0.4])
_NEW = _OLD + T([0.3, -0.1, 0.05, 0.2, -0.25, 0.1, 0.4, -0.05, 0.15])
_ADV = T([1.0, -0.5, 0.8, -1.2, 0.3, -0.7, 1.5, -0.2, 0.6])


@pytest.mark.parametrize("level", ["token", "step", "trajectory"])
@pytest.mark.parametrize("agg", ["token-mean", "step-mean", "trajectory-mean"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_gradient_is_autograd_of_the_objective_for_every_ratio_level_and_aggregation(level, agg, dual_clip):
    # clip 0.1 binds for some units and not others; dual clip 1.5 binds where r > 1.5 and A < 0
    new = _NEW.clone()
    new[6] += 0.9  # a large token ratio exp(1.3) in step 3 (A = +1.5 there, -0.2 / 0.6 next to it)
    new[2] += 1.2  # and in step 1, next to negative advantages
    new[1] += 0.6  # token 1 (A = -0.5): r = exp(0.5) > 1.5, as are step 1's and trajectory 0's ratios
    loss, _ = _compare_with_reference(new, _OLD, _ADV, _TS, _ST, level, agg, clip_low=0.1, clip_high=0.1,
                                      dual_clip=dual_clip)
    if dual_clip is not None:  # the dual clip binds somewhere
        plain, _ = _loss(new, _OLD, _ADV, _TS, _ST, level=level, agg=agg, clip_low=0.1, clip_high=0.1)
        assert float(loss.detach()) < float(plain.detach()) - 1e-4


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=7),
    level=st.sampled_from(["token", "step", "trajectory"]),
    agg=st.sampled_from(["token-mean", "step-mean", "trajectory-mean"]),
    eps=st.sampled_from([0.2, 0.05, 4e-4]),
    dual_clip=st.sampled_from([None, 1.2, 3.0]),
    step_constant=st.booleans(),
)
def test_gradient_matches_the_objective_over_random_step_lengths(seed, lengths, level, agg, eps, dual_clip,
                                                                  step_constant):
    g = torch.Generator().manual_seed(seed)
    S = len(lengths)
    step_traj = torch.sort(torch.randint(0, 3, (S,), generator=g)).values
    step_traj = torch.unique(step_traj, return_inverse=True)[1]  # dense trajectory ids
    token_step = torch.repeat_interleave(torch.arange(S), T(lengths))
    N = int(token_step.shape[0])
    old = -torch.rand(N, generator=g, dtype=torch.float64) * 2
    new = old + 0.4 * torch.randn(N, generator=g, dtype=torch.float64)
    adv = torch.randn(S if step_constant else N, generator=g, dtype=torch.float64)
    adv = adv[token_step] if step_constant else adv
    _compare_with_reference(new, old, adv, token_step, step_traj, level, agg, clip_low=eps, clip_high=eps,
                            dual_clip=dual_clip)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), lengths=st.lists(st.integers(1, 8), min_size=1, max_size=8))
def test_default_steppo_gradient_is_unchanged(seed, lengths):
    """Step ratio, step-mean weights, step-constant advantages (the `steppo` preset): the
    gradient equals the former per-token form w_i * dloss_i/dr * r_u * grad log pi_i (detached
    unit ratio, each token's own log-prob)."""
    g = torch.Generator().manual_seed(seed)
    S = len(lengths)
    token_step = torch.repeat_interleave(torch.arange(S), T(lengths))
    step_traj = torch.arange(S) // 2
    N = int(token_step.shape[0])
    old = -torch.rand(N, generator=g)
    base = old + 0.2 * torch.randn(N, generator=g)
    adv = torch.randn(S, generator=g)[token_step]
    w = aggregation_weights("step-mean", token_step, step_traj)
    units, n = ratio_units("step", token_step, step_traj[token_step])
    lp = base.clone().requires_grad_(True)
    policy_loss(lp, old, adv, w, units, n)[0].backward()
    lp_old = base.clone().requires_grad_(True)
    log_r = segment_mean((lp_old - old).detach(), units, n)[units].clamp(-10, 10)
    ratio = torch.exp(log_r + lp_old - lp_old.detach())
    per = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2))
    (w * per).sum().backward()
    torch.testing.assert_close(lp.grad, lp_old.grad, rtol=1e-5, atol=1e-7)
