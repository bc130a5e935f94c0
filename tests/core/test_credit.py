import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steppo.core.batch import StepBatch
from steppo.core.credit import (
    ESTIMATOR_REGISTRY,
    ESTIMATORS,
    TOKEN_ESTIMATORS,
    discounted_returns,
    estimate_credit,
    get_estimator,
    grpo,
    register_estimator,
    rloo,
    step_gae,
    step_gae_credit,
    token_gae,
    whiten,
)
from steppo.core.records import Step, Trajectory
from tests.conftest import make_batch
from tests.core.helpers import credit_of

T = torch.tensor


def _traj(rewards, lengths=None, group="g", tid="t", end="terminated", anchors=None, boot=None):
    lengths = lengths or [1] * len(rewards)
    steps = []
    for i, (r, n) in enumerate(zip(rewards, lengths)):
        last = i == len(rewards) - 1
        steps.append(
            Step(
                prompt_ids=[1] * (i + 1),
                response_ids=[2] * n,
                logprobs=[-1.0] * n,
                reward=r,
                terminated=last and end == "terminated",
                truncated=last and end == "truncated",
                anchor=None if anchors is None else anchors[i],
            )
        )
    return Trajectory(steps=steps, id=tid, group_id=group, bootstrap_ids=boot)


# ----------------------------------------------------------------------------- step_gae


def test_step_gae_hand_computed_terminated_and_truncated():
    rewards, values, mask = T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[True, True, True]])
    adv, ret = step_gae(rewards, values, mask, T([0.0]), gamma=0.9, lam=0.8)
    # delta = [0.04, 0.03, 0.3]; A2 = 0.3, A1 = 0.03 + 0.72 * 0.3, A0 = 0.04 + 0.72 * A1
    torch.testing.assert_close(adv, T([[0.21712, 0.246, 0.3]]))
    torch.testing.assert_close(ret, T([[0.71712, 0.846, 1.0]]))
    adv_trunc, _ = step_gae(rewards, values, mask, T([2.0]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv_trunc, T([[1.15024, 1.542, 2.1]]))


@st.composite
def step_tensors(draw):
    B = draw(st.integers(1, 6))
    Tm = draw(st.integers(1, 7))
    lengths = draw(st.lists(st.integers(1, Tm), min_size=B, max_size=B))
    floats = st.floats(-3, 3, allow_nan=False, width=32)
    rewards = T(draw(st.lists(st.lists(floats, min_size=Tm, max_size=Tm), min_size=B, max_size=B)))
    values = T(draw(st.lists(st.lists(floats, min_size=Tm, max_size=Tm), min_size=B, max_size=B)))
    boot = T(draw(st.lists(floats, min_size=B, max_size=B)))
    mask = torch.arange(Tm).unsqueeze(0) < T(lengths).unsqueeze(1)
    return rewards, values, mask, boot


def _loop_gae(r, v, boot, gamma, lam):
    adv, nxt_v, nxt_a = [0.0] * len(r), boot, 0.0
    for t in reversed(range(len(r))):
        delta = r[t] + gamma * nxt_v - v[t]
        nxt_a = delta + gamma * lam * nxt_a
        adv[t], nxt_v = nxt_a, v[t]
    return adv


@settings(max_examples=100, deadline=None)
@given(data=step_tensors(), gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_step_gae_matches_a_per_trajectory_loop(data, gamma, lam):
    rewards, values, mask, boot = data
    adv, ret = step_gae(rewards, values, mask, boot, gamma, lam)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        expected = _loop_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), float(boot[b]), gamma, lam)
        torch.testing.assert_close(adv[b, :n], T(expected), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ret[b, :n], adv[b, :n] + values[b, :n])
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


@settings(max_examples=60, deadline=None)
@given(data=step_tensors())
def test_step_gae_with_unit_gamma_lambda_is_return_to_go_minus_value(data):
    rewards, values, mask, boot = data
    adv, _ = step_gae(rewards, values, mask, boot, 1.0, 1.0)
    rtg = torch.flip(torch.cumsum(torch.flip(torch.where(mask, rewards, 0), [1]), 1), [1])
    expected = torch.where(mask, rtg + boot.unsqueeze(1) - values, 0)
    torch.testing.assert_close(adv, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(data=step_tensors(), gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_values_and_rewards_at_padding_change_nothing(data, gamma, lam):
    rewards, values, mask, boot = data
    adv, ret = step_gae(rewards, values, mask, boot, gamma, lam)
    noise = torch.randn_like(rewards) * 100
    adv2, ret2 = step_gae(
        torch.where(mask, rewards, noise), torch.where(mask, values, -noise), mask, boot, gamma, lam
    )
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)


@settings(max_examples=60, deadline=None)
@given(data=step_tensors(), gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_truncated_and_terminated_differ_exactly_by_the_bootstrap_term(data, gamma, lam):
    rewards, values, mask, boot = data
    adv_trunc, _ = step_gae(rewards, values, mask, boot, gamma, lam)
    adv_term, _ = step_gae(rewards, values, mask, torch.zeros_like(boot), gamma, lam)
    lengths = mask.sum(1, keepdim=True)
    steps_to_end = lengths - 1 - torch.arange(mask.shape[1]).unsqueeze(0)
    expected = torch.where(mask, (gamma * lam) ** steps_to_end * gamma * boot.unsqueeze(1), 0)
    torch.testing.assert_close(adv_trunc - adv_term, expected, rtol=1e-4, atol=1e-4)


def test_one_step_episode_step_gae_is_ordinary_gae():
    adv, ret = step_gae(T([[0.7]]), T([[0.2]]), T([[True]]), T([0.5]), gamma=0.9, lam=0.3)
    # One step: A = r + gamma * V_next - V, independent of lambda.
    torch.testing.assert_close(adv, T([[0.7 + 0.9 * 0.5 - 0.2]]))


# ----------------------------------------------------------------------------- token_gae


def test_token_gae_hand_computed_step_and_token_discount():
    rewards = T([[0.0, 0.0, 1.0]])
    values = T([[0.1, 0.2, 0.3]])
    mask = T([[True, True, True]])
    step_end = T([[False, True, True]])  # steps of 2 and 1 tokens
    adv, ret = token_gae(rewards, values, mask, step_end, T([0.0]), gamma=0.5, lam=1.0, discount="step")
    torch.testing.assert_close(adv, T([[0.4, 0.3, 0.7]]))
    torch.testing.assert_close(ret, T([[0.5, 0.5, 1.0]]))
    adv, ret = token_gae(rewards, values, mask, step_end, T([0.0]), gamma=0.5, lam=1.0, discount="token")
    torch.testing.assert_close(adv, T([[0.15, 0.3, 0.7]]))
    torch.testing.assert_close(ret, T([[0.25, 0.5, 1.0]]))
    with pytest.raises(ValueError, match="discount"):
        token_gae(rewards, values, mask, step_end, T([0.0]), discount="episode")


def test_token_gae_with_one_token_steps_equals_step_gae():
    rng = random.Random(1)
    trajs = [_traj([rng.random() for _ in range(n)], tid=f"t{n}", end=rng.choice(["terminated", "truncated"])) for n in (1, 3, 5)]
    batch = StepBatch.from_trajectories(trajs)
    values = torch.randn(batch.num_steps)
    boot = torch.randn(3)
    a = credit_of(batch, "step_gae", step_values=values, bootstrap=boot, gamma=0.9, lam=0.7)
    b = credit_of(batch, "token_gae", token_values=values, bootstrap=boot, gamma=0.9, lam=0.7)
    torch.testing.assert_close(a.step_advantages, b.step_advantages)
    torch.testing.assert_close(a.returns, b.returns)


# ----------------------------------------------------------------------------- trajectory level


def test_grpo_hand_computed_and_degenerate_groups():
    out = grpo(T([1.0, 0.0, 1.0, 0.0, 3.0, 1.0, 1.0]), T([0, 0, 0, 0, 1, 2, 2]))
    s = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    torch.testing.assert_close(out, T([s, -s, s, -s, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(grpo(T([2.0, 0.0]), T([0, 0]), normalize_std=False), T([1.0, -1.0]))
    assert grpo(T([]), T([], dtype=torch.long)).numel() == 0


def test_rloo_hand_computed_and_lone_member():
    torch.testing.assert_close(rloo(T([1.0, 0.0, 0.0, 5.0]), T([0, 0, 0, 1])), T([1.0, -0.5, -0.5, 0.0]))


def test_gigpo_combines_episode_and_anchor_step_terms():
    a = _traj([0.0, 1.0], tid="a", anchors=["s0", "s1"])
    b = _traj([0.0, 0.0], tid="b", anchors=["s0", "s2"])
    credit = credit_of(StepBatch.from_trajectories([a, b]), "gigpo", gamma=1.0)
    e = 0.5 / (math.sqrt(0.5) + 1e-6)
    # Episode term +-e; step term: s0 holds a's step 0 (return 1) and b's step 0 (return 0).
    torch.testing.assert_close(credit.step_advantages, T([2 * e, e, -2 * e, -e]))


def test_gigpo_anchors_never_match_across_task_groups():
    a = _traj([1.0], tid="a", group="task1", anchors=["s0"])
    b = _traj([0.0], tid="b", group="task2", anchors=["s0"])
    c = _traj([1.0], tid="c", group="task1", anchors=["s9"])
    credit = credit_of(StepBatch.from_trajectories([a, b, c]), "gigpo")
    torch.testing.assert_close(credit.step_advantages, T([0.0, 0.0, 0.0]))


def test_reinforce_pp_passes_the_outcome_to_earlier_steps():
    batch = StepBatch.from_trajectories([_traj([0.0, 0.0, 1.0], lengths=[1, 2, 1])])
    credit = credit_of(batch, "reinforce_pp", gamma=0.5)
    torch.testing.assert_close(credit.token_advantages, T([0.25, 0.5, 0.5, 1.0]))
    torch.testing.assert_close(credit.step_advantages, T([0.25, 0.5, 1.0]))
    assert credit.returns is None


def test_reinforce_pp_baseline_subtracts_the_group_mean_return():
    batch = StepBatch.from_trajectories([_traj([0.0, 1.0], tid="a"), _traj([0.0], tid="b")])
    credit = credit_of(batch, "reinforce_pp_baseline", gamma=1.0)
    torch.testing.assert_close(credit.token_advantages, T([0.5, 0.5, -0.5]))


def test_broadcast_copies_the_outcome_to_every_step_and_token():
    batch = StepBatch.from_trajectories([_traj([0.5, 1.0], lengths=[2, 1], tid="a"), _traj([-1.0], tid="b")])
    credit = credit_of(batch, "broadcast")
    torch.testing.assert_close(credit.step_advantages, T([1.5, 1.5, -1.0]))
    torch.testing.assert_close(credit.token_advantages, T([1.5, 1.5, 1.5, -1.0]))


def test_discounted_returns_hand_computed():
    out = discounted_returns(T([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]]), T([[True, True, True], [True, False, False]]), 0.5)
    torch.testing.assert_close(out, T([[1.5, 1.0, 2.0], [3.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- whitening


def test_step_whitening_counts_each_step_once_whatever_its_length():
    def credit(lengths):
        batch = StepBatch.from_trajectories([_traj([1.0, 2.0], lengths=lengths)])
        return credit_of(batch, "step_gae", step_values=T([0.0, 0.0]), whiten_mode="step")

    short, long_ = credit([1, 1]), credit([1, 100])
    # Pre-whitening advantages [3, 2]: mean 2.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.707107,
    # so [0.5, -0.5] / 0.707107 = [0.707107, -0.707107].
    torch.testing.assert_close(short.step_advantages, T([0.707107, -0.707107]), atol=1e-6, rtol=0)
    torch.testing.assert_close(long_.step_advantages, short.step_advantages)
    assert torch.all(long_.token_advantages[1:] == long_.step_advantages[1])
    tok = credit_of(
        StepBatch.from_trajectories([_traj([1.0, 2.0], lengths=[1, 100])]),
        "step_gae", step_values=T([0.0, 0.0]), whiten_mode="token",
    )
    assert not torch.allclose(tok.step_advantages, short.step_advantages)


def test_whiten_single_entry_is_zero_not_nan():
    assert whiten(T([5.0]), T([True])).item() == 0.0
    assert whiten(T([5.0, 7.0]), T([True, False])).tolist() == [0.0, 0.0]
    assert whiten(T([]), T([], dtype=torch.bool)).numel() == 0


def test_whiten_uses_the_unbiased_std_hand_computed():
    # [1, 2, 3, 4] (the 99 is masked out): mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5,
    # unbiased variance 5 / 3, std 1.290994: [-1.5, -0.5, 0.5, 1.5] / 1.290994.
    out = whiten(T([1.0, 2.0, 99.0, 3.0, 4.0]), T([True, True, False, True, True]))
    torch.testing.assert_close(out, T([-1.161895, -0.387298, 0.0, 0.387298, 1.161895]), atol=1e-6, rtol=0)


def test_grpo_and_whitening_share_one_std_rule():
    # One group [0, 1, 1, 4]: mean 1.5, deviations^2 2.25 + 0.25 + 0.25 + 6.25 = 9, unbiased std
    # sqrt(9 / 3) = 1.732051; both normalisations give [-1.5, -0.5, -0.5, 2.5] / 1.732051.
    x = T([0.0, 1.0, 1.0, 4.0])
    expected = T([-0.866025, -0.288675, -0.288675, 1.443376])
    torch.testing.assert_close(grpo(x, T([0, 0, 0, 0])), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(whiten(x, torch.ones(4, dtype=torch.bool)), expected, atol=1e-5, rtol=0)
    # broadcast's outcomes whitened per step equal GRPO when there is one group of one-step episodes
    batch = StepBatch.from_trajectories([_traj([float(v)], tid=f"t{i}") for i, v in enumerate(x.tolist())])
    torch.testing.assert_close(
        credit_of(batch, "broadcast", whiten_mode="step").step_advantages,
        credit_of(batch, "grpo").step_advantages, atol=1e-5, rtol=0,
    )


@pytest.mark.parametrize("estimator", TOKEN_ESTIMATORS)
def test_step_whitening_of_token_level_advantages_is_refused(estimator):
    batch = StepBatch.from_trajectories([_traj([0.0, 1.0], lengths=[2, 3], tid="a"), _traj([1.0], tid="b")])
    kw = dict(token_values=0.1 * torch.arange(batch.num_tokens, dtype=torch.float32))
    with pytest.raises(ValueError, match="whiten_mode='token' or None"):
        credit_of(batch, estimator, whiten_mode="step", **kw)
    for mode in ("token", None):
        credit = credit_of(batch, estimator, whiten_mode=mode, gamma=0.5, **kw)
        if estimator == "token_gae":  # A_i = R_t - V_i differs between the tokens of step 1
            assert len(set(credit.token_advantages[2:5].tolist())) == 3


@pytest.mark.parametrize("estimator", TOKEN_ESTIMATORS)
def test_config_refuses_step_whitening_for_token_level_estimators(estimator):
    from steppo.core.algorithms import ConfigError, preset

    base = {"token_gae": "ppo", "reinforce_pp": "reinforce_pp", "reinforce_pp_baseline": "reinforce_pp_baseline"}
    with pytest.raises(ConfigError, match=r"algo.whiten=step .* set algo.whiten=token or algo.whiten=null"):
        preset(base[estimator], whiten="step")
    with pytest.raises(ConfigError, match="algo.whiten=step"):
        preset("steppo", estimator=estimator, critic=estimator == "token_gae",
               group_size=8 if estimator == "reinforce_pp_baseline" else 1)
    for mode in ("token", None):
        assert preset(base[estimator], whiten=mode).whiten == mode


# ----------------------------------------------------------------------------- all estimators


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("whiten_mode", [None, "step", "token"])
def test_every_estimator_is_finite_on_random_and_degenerate_batches(estimator, whiten_mode):
    refused = whiten_mode == "step" and estimator in TOKEN_ESTIMATORS  # see test_step_whitening_..._refused
    cases = [
        make_batch(0, num=7, groups=3),
        make_batch(1, num=1, groups=1),  # group of one
        [_traj([1.0], tid="a"), _traj([1.0], tid="b")],  # zero-variance group
        [],  # empty batch
    ]
    for trajs in cases:
        batch = StepBatch.from_trajectories(trajs)
        kw = dict(
            step_values=torch.randn(batch.num_steps),
            token_values=torch.randn(batch.num_tokens),
            bootstrap=torch.randn(batch.num_trajectories),
            gamma=0.95,
            whiten_mode=whiten_mode,
        )
        if refused:
            with pytest.raises(ValueError, match="whiten_mode='step'"):
                credit_of(batch, estimator, **kw)
            continue
        credit = credit_of(batch, estimator, **kw)
        assert credit.step_advantages.shape == (batch.num_steps,)
        assert credit.token_advantages.shape == (batch.num_tokens,)
        assert torch.isfinite(credit.step_advantages).all()
        assert torch.isfinite(credit.token_advantages).all()


def test_terminated_trajectories_ignore_the_bootstrap_value():
    batch = StepBatch.from_trajectories([_traj([1.0, 0.0], end="terminated")])
    a = credit_of(batch, "step_gae", step_values=T([0.2, 0.3]), bootstrap=T([0.0]))
    b = credit_of(batch, "step_gae", step_values=T([0.2, 0.3]), bootstrap=T([99.0]))
    torch.testing.assert_close(a.step_advantages, b.step_advantages)


def test_estimators_reject_missing_values_and_unknown_names():
    batch = StepBatch.from_trajectories([_traj([1.0])])
    with pytest.raises(ValueError, match="step_values"):
        credit_of(batch, "step_gae")
    with pytest.raises(ValueError, match="token_values"):
        credit_of(batch, "token_gae")
    with pytest.raises(ValueError, match="unknown estimator"):
        credit_of(batch, "td0")
    with pytest.raises(ValueError, match="whiten_mode"):
        credit_of(batch, "grpo", whiten_mode="batch")
    with pytest.raises(ValueError, match=r"unknown estimator 'td0'; choose one of \('step_gae', 'token_gae'"):
        get_estimator("td0")


def test_the_registry_holds_every_estimator_name():
    assert sorted(ESTIMATOR_REGISTRY) == sorted(ESTIMATORS)
    assert len(ESTIMATOR_REGISTRY) == len(ESTIMATORS)
    assert get_estimator("step_gae") is step_gae_credit  # the steppo preset's credit
    with pytest.raises(ValueError, match="registered already"):
        register_estimator("grpo")(lambda batch, scored, algo: None)
    assert ESTIMATOR_REGISTRY["grpo"].__name__ == "grpo_credit"


def test_estimate_credit_takes_the_trainer_scores_and_a_preset():
    """The trainer's call: its `Scored` as the scores, a preset as the settings (whitening too)."""
    from steppo.core.algorithms import preset
    from steppo.trainer.update import Scored

    batch = StepBatch.from_trajectories([_traj([0.0, 1.0], lengths=[2, 1], tid="a"), _traj([0.5], tid="b")])
    values, boot = T([0.1, 0.2, 0.3]), T([0.0, 0.0])
    scored = Scored(logprobs=torch.zeros(4), step_values=values, token_values=None, bootstrap=boot, ref_logprobs=None)
    got = estimate_credit(batch, scored, preset("steppo"))
    want = credit_of(batch, "step_gae", step_values=values, bootstrap=boot, whiten_mode="step")
    torch.testing.assert_close(got.step_advantages, want.step_advantages)
    torch.testing.assert_close(got.token_advantages, want.token_advantages)
    torch.testing.assert_close(got.returns, want.returns)


@settings(max_examples=40, deadline=None)
@given(data=step_tensors(), gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_constant_and_per_position_gae_factors_agree(data, gamma, lam):
    rewards, values, mask, boot = data
    B, H = rewards.shape
    fast = step_gae(rewards, values, mask, boot, gamma, lam)  # float factors
    loop = step_gae(rewards, values, mask, boot, torch.full((B, H), gamma), torch.full((B, H), lam))
    for a, b in zip(fast, loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), gamma=st.floats(0, 1), lam=st.floats(0, 1))
def test_token_level_fast_path_equals_the_token_loop(seed, gamma, lam):
    """With step discounting, token GAE telescopes inside a step; the dispatcher's O(T) path
    must equal the general per-token recursion of `token_gae`."""
    batch = StepBatch.from_trajectories(make_batch(seed, num=5, groups=2))
    g = torch.Generator().manual_seed(seed)
    tv, boot = torch.randn(batch.num_tokens, generator=g), torch.randn(batch.num_trajectories, generator=g)
    boot = torch.where(batch.terminated, 0.0, boot)
    credit = credit_of(batch, "token_gae", token_values=tv, bootstrap=boot, gamma=gamma, lam=lam)
    rewards = torch.where(batch.step_end, batch.tokens_to_padded(batch.steps_to_tokens(batch.rewards)), 0)
    adv, ret = token_gae(
        rewards, batch.tokens_to_padded(tv), batch.token_mask, batch.step_end, boot,
        torch.tensor(gamma), torch.tensor(lam), "step",
    )
    torch.testing.assert_close(credit.token_advantages, batch.padded_to_tokens(adv), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(credit.returns, batch.padded_to_tokens(ret), rtol=1e-4, atol=1e-4)
    fast = credit_of(batch, "reinforce_pp", gamma=gamma, token_discount="step")
    slow_adv, _ = token_gae(
        rewards, torch.zeros_like(rewards), batch.token_mask, batch.step_end,
        torch.zeros(batch.num_trajectories), torch.tensor(gamma), torch.tensor(1.0), "step",
    )
    torch.testing.assert_close(fast.token_advantages, batch.padded_to_tokens(slow_adv), rtol=1e-4, atol=1e-4)
