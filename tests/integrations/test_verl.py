"""The verl plugin: StepPO's estimator and loss on verl's concatenated multi-turn layout equal
StepPO's own (per-step) computation. The registry tests need verl (its own venv:
`bash scripts/verl_venv.sh`); the math tests run everywhere."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steppo.core.credit import step_gae, whiten
from steppo.core.losses import policy_loss
from steppo.integrations.verl import step_advantages, step_ratio_loss, step_runs


def verl_layout(seed: int, rows: int = 4, length: int = 40):
    """Random multi-turn rows: runs of model tokens (mask 1) separated by tool tokens (mask 0),
    with a reward on some model tokens; plus the same data per step, built independently."""
    rng = random.Random(seed)
    mask = torch.zeros(rows, length)
    rewards = torch.zeros(rows, length)
    values = torch.randn(rows, length, generator=torch.Generator().manual_seed(seed))
    steps = []  # per row: list of (start, end) of each run
    for b in range(rows):
        t, runs = rng.randint(0, 2), []
        while t < length - 1:
            n = rng.randint(1, 6)
            end = min(t + n, length)
            mask[b, t:end] = 1
            runs.append((t, end))
            rewards[b, end - 1] = rng.choice([0.0, 0.0, 1.0, -0.5])
            t = end + rng.randint(1, 5)
        steps.append(runs)
    return mask, rewards, values, steps


def test_step_runs_hand_case():
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 1, 1]])
    token_step, per_row, K = step_runs(mask)
    assert token_step.tolist() == [[-1, 0, 0, -1, -1, 1, -1, 2, 2, 2]]
    assert per_row.tolist() == [3] and K == 3


def test_hand_computed_two_step_row():
    # step 0 = tokens 0-1 (V = 0.5 read at its first token), step 1 = token 3 (V = 0.2), reward 1 at the end
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 9.0, 9.0, 0.2]])
    adv, ret = step_advantages(rewards, values, mask, gamma=0.9, lam=1.0, whiten_steps=False)
    # A1 = 1 - 0.2 = 0.8; A0 = 0 + 0.9 * 0.2 - 0.5 + 0.9 * 0.8 = 0.4
    torch.testing.assert_close(adv, torch.tensor([[0.4, 0.4, 0.0, 0.8]]))
    torch.testing.assert_close(ret, torch.tensor([[0.9, 0.9, 0.0, 1.0]]))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 1.0), st.floats(0.5, 1.0))
def test_estimator_equals_steppo_step_gae_over_the_steps(seed, gamma, lam):
    mask, rewards, values, steps = verl_layout(seed)
    K = max(len(r) for r in steps)
    r_steps = torch.zeros(len(steps), K)
    v_steps = torch.zeros(len(steps), K)
    m = torch.zeros(len(steps), K, dtype=torch.bool)
    for b, runs in enumerate(steps):
        for k, (s, e) in enumerate(runs):
            r_steps[b, k] = rewards[b, s:e].sum()
            v_steps[b, k] = values[b, s]
            m[b, k] = True
    adv, ret = step_gae(r_steps, v_steps, m, torch.zeros(len(steps)), gamma, lam)
    adv = whiten(adv, m)
    tok_adv, tok_ret = step_advantages(rewards, values, mask, gamma, lam)
    for b, runs in enumerate(steps):
        for k, (s, e) in enumerate(runs):
            torch.testing.assert_close(tok_adv[b, s:e], adv[b, k].expand(e - s), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tok_ret[b, s:e], ret[b, k].expand(e - s), atol=1e-5, rtol=1e-5)
    assert (tok_adv[mask == 0] == 0).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_loss_equals_steppo_step_ratio_loss(seed):
    mask, _, _, steps = verl_layout(seed)
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(mask.shape, generator=g) * 3
    new = (old + 0.3 * torch.randn(mask.shape, generator=g)).requires_grad_(True)
    step_adv = torch.randn(sum(len(r) for r in steps), generator=g)
    adv = torch.zeros(mask.shape)
    units, weights, k = [], [], 0
    for b, runs in enumerate(steps):
        for s, e in runs:
            adv[b, s:e] = step_adv[k]
            units += [k] * (e - s)
            weights += [1.0 / (e - s)] * (e - s)
            k += 1
    per_token, _ = step_ratio_loss(old, new, adv, mask, 0.2, 0.28)
    valid = mask.bool()
    ref, _ = policy_loss(new[valid], old[valid], adv[valid], torch.tensor(weights), torch.tensor(units), k, 0.2, 0.28)
    torch.testing.assert_close(per_token.sum(), ref, atol=1e-5, rtol=1e-5)
    g1 = torch.autograd.grad(per_token.sum(), new, retain_graph=True)[0]
    g2 = torch.autograd.grad(ref, new)[0]
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_registered_in_verl_and_used_by_its_trainer():
    verl = pytest.importorskip("verl")  # noqa: F841 - runs in the verl venv (scripts/verl_venv.sh)
    from verl import DataProto
    from verl.trainer.ppo import core_algos, ray_trainer

    import steppo.integrations.verl as plugin

    plugin.register()
    plugin.register()  # idempotent
    assert core_algos.get_adv_estimator_fn("steppo") is not None
    assert core_algos.get_policy_loss_fn("steppo") is not None
    mask, rewards, values, _ = verl_layout(3)
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "values": values, "response_mask": mask})
    out = ray_trainer.compute_advantage(data, "steppo", gamma=0.95, lam=0.9)
    adv, ret = step_advantages(rewards, values, mask, 0.95, 0.9)
    torch.testing.assert_close(out.batch["advantages"], adv)
    torch.testing.assert_close(out.batch["returns"], ret)
    # verl's own path for its built-in estimators is untouched
    gae = ray_trainer.compute_advantage(
        DataProto.from_dict(tensors={"token_level_rewards": rewards, "values": values, "response_mask": mask}),
        core_algos.AdvantageEstimator.GAE, gamma=1.0, lam=1.0, config={})
    assert not torch.allclose(gae.batch["advantages"], adv)
    # the registered loss through verl's registry, with verl's ActorConfig
    from verl.workers.config import ActorConfig

    cfg = ActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4, clip_ratio=0.2,
                      rollout_n=1)
    old = -torch.rand(mask.shape)
    new = old + 0.1 * torch.randn(mask.shape)
    loss, metrics = core_algos.get_policy_loss_fn("steppo")(old, new, adv, mask, "seq-mean-token-sum", cfg)
    per_token, _ = step_ratio_loss(old, new, adv, mask, 0.2, 0.2)
    torch.testing.assert_close(loss, (per_token * mask).sum(-1).mean(), atol=1e-5, rtol=1e-5)
    assert "actor/pg_clipfrac" in metrics
