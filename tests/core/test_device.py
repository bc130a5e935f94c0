"""Device safety of the core (issue 12): on inputs on one device, every tensor the core creates
is on that device. Checked without a GPU on the `meta` device: meta tensors have no data, so a
CPU tensor mixed into an op raises, and code that reads data back to the host (``int(x)``,
``.item()``, data-dependent shapes such as boolean-mask indexing) fails too. On top of that, a
dispatch mode checks the output of every op run inside the core: all must be meta tensors (this
also catches CPU index tensors, which indexing would otherwise accept).
"""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from steppo.core.batch import LAYOUTS, StepBatch, build_layout
from steppo.core.credit import ESTIMATORS, TOKEN_ESTIMATORS, step_gae, token_gae, whiten
from steppo.core.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    RATIO_LEVELS,
    aggregation_weights,
    entropy_from_logits,
    kl_loss,
    kl_penalty,
    policy_loss,
    ratio_units,
    segment_mean,
    staleness_weights,
    value_loss,
)
from tests.conftest import make_batch, make_trajectory
from tests.core.helpers import credit_of

META = torch.device("meta")


class OnlyMeta(TorchDispatchMode):
    """Fail on any op whose output is a tensor off the meta device."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device != META:
                raise AssertionError(f"{func} made a tensor on {t.device}")
        return out


def _meta(x):
    return x.to(META)


def _batch(seed=0, num=7, groups=3, dtype=torch.float32):
    trajs = make_batch(seed, num=num, groups=groups)
    cpu = StepBatch.from_trajectories(trajs)
    cpu.rewards = cpu.rewards.to(dtype)
    return trajs, cpu, cpu.to(META)


def test_the_check_catches_cpu_tensors():
    x = torch.zeros(3, device=META)
    with pytest.raises(RuntimeError):
        torch.zeros(3) + x
    with pytest.raises(RuntimeError):
        int(x.sum())
    with pytest.raises(AssertionError, match="cpu"), OnlyMeta():
        x[torch.arange(2)]  # accepted by indexing, caught by the mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("whiten_mode", [None, "step", "token"])
@pytest.mark.parametrize("token_discount", ["step", "token"])
def test_every_estimator_runs_on_meta(estimator, whiten_mode, token_discount, dtype):
    _, cpu, batch = _batch(dtype=dtype)
    if whiten_mode == "step" and estimator in TOKEN_ESTIMATORS:
        with pytest.raises(ValueError, match="whiten_mode='step'"):  # refused before any work
            credit_of(batch, estimator, token_values=torch.zeros(cpu.num_tokens, device=META), whiten_mode="step")
        return
    S, N, B = cpu.num_steps, cpu.num_tokens, cpu.num_trajectories
    with OnlyMeta():
        credit = credit_of(
            batch, estimator,
            step_values=torch.zeros(S, dtype=dtype, device=META),
            token_values=torch.zeros(N, dtype=dtype, device=META),
            bootstrap=torch.zeros(B, dtype=dtype, device=META),
            gamma=0.9, lam=0.8, whiten_mode=whiten_mode, token_discount=token_discount,
        )
        # the defaults: no bootstrap given (zeros made by the core), values only where needed
        default = credit_of(
            batch, estimator,
            step_values=torch.zeros(S, dtype=dtype, device=META) if estimator == "step_gae" else None,
            token_values=torch.zeros(N, dtype=dtype, device=META) if estimator == "token_gae" else None,
            whiten_mode=whiten_mode, token_discount=token_discount,
        )
    for c in (credit, default):
        assert c.step_advantages.device == META and c.step_advantages.shape == (S,)
        assert c.token_advantages.device == META and c.token_advantages.shape == (N,)
        assert c.step_advantages.dtype == dtype and c.token_advantages.dtype == dtype
        if c.returns is not None:
            assert c.returns.device == META and c.returns.dtype == dtype


@pytest.mark.parametrize("H", [5, 200])
def test_gae_paths_run_on_meta(H):
    B = 3
    rewards, values = torch.zeros(B, H, device=META), torch.zeros(B, H, device=META)
    mask = torch.ones(B, H, dtype=torch.bool, device=META)
    boot = torch.zeros(B, device=META)
    with OnlyMeta():
        outs = [
            *step_gae(rewards, values, mask, boot, 0.9, 0.8),  # float factors
            *step_gae(rewards, values, mask, boot, torch.full((B, H), 0.9, device=META), 0.8),  # per-position
            *token_gae(rewards, values, mask, mask, boot, 0.9, 0.8, "step"),
            *token_gae(rewards, values, mask, mask, boot, 0.9, 0.8, "token"),
            whiten(rewards, mask),
        ]
    assert all(o.device == META and o.shape == (B, H) for o in outs)


@pytest.mark.parametrize("level", RATIO_LEVELS)
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_policy_loss_and_its_gradient_run_on_meta(level, agg, dual_clip):
    _, cpu, batch = _batch()
    N = cpu.num_tokens
    lp = torch.zeros(N, device=META, requires_grad=True)
    with OnlyMeta():
        w = aggregation_weights(agg, batch.token_step, batch.step_traj, cpu.num_trajectories)
        units, n = ratio_units(level, batch.token_step, batch.token_traj, cpu.num_steps, cpu.num_trajectories)
        units_default, _ = ratio_units(level, batch.token_step, batch.token_traj)
        old = torch.zeros(N, device=META)
        loss, stats = policy_loss(lp, old, torch.zeros(N, device=META), w, units, n, dual_clip=dual_clip)
        loss.backward()
        sw = staleness_weights(old, old, units, n, cap=2.0)
    assert loss.device == META and lp.grad.device == META and lp.grad.shape == (N,)
    assert all(v.device == META for v in stats.values())
    assert w.device == META and units.device == units_default.device == META and sw.device == META
    assert w.shape == sw.shape == (N,)


def test_kl_value_entropy_and_segment_mean_run_on_meta():
    M = 6
    x = torch.zeros(M, device=META)
    with OnlyMeta():
        outs = [kl_penalty(x, x, k) for k in KL_ESTIMATORS]
        outs.append(kl_loss(x, x, x))
        for clip in (0.5, None):
            for weights in (None, x):
                loss, stats = value_loss(x, x, x, weights, clip)
                outs += [loss, stats["clip_frac"]]
        outs.append(entropy_from_logits(torch.zeros(M, 5, device=META)))
        outs.append(segment_mean(x, torch.zeros(M, dtype=torch.long, device=META), 2))
        outs.append(aggregation_weights("step-mean", torch.zeros(0, dtype=torch.long, device=META),
                                        torch.zeros(0, dtype=torch.long, device=META)))
    assert all(o.device == META for o in outs)
    x64 = torch.zeros(M, dtype=torch.float64, device=META)
    with OnlyMeta():
        loss, stats = value_loss(x64, x64, x64, None, None)
    assert loss.dtype == stats["clip_frac"].dtype == torch.float64


def test_step_batch_maps_run_on_meta():
    _, cpu, batch = _batch()
    S, N, B = cpu.num_steps, cpu.num_tokens, cpu.num_trajectories
    with OnlyMeta():
        outs = [
            batch.step_mask, batch.token_mask, batch.step_end,
            batch.steps_to_padded(torch.zeros(S, device=META)),
            batch.tokens_to_padded(torch.zeros(N, device=META)),
            batch.padded_to_steps(torch.zeros(cpu.step_slots.shape, device=META)),
            batch.padded_to_tokens(torch.zeros(cpu.token_slots.shape, device=META)),
            batch.steps_to_tokens(torch.zeros(S, device=META)),
            batch.trajectories_to_steps(torch.zeros(B, device=META)),
            batch.last_step(),
        ]
    assert all(o.device == META for o in outs)
    assert outs[2].shape == cpu.token_slots.shape and outs[-1].shape == (B,)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_every_layout_gathers_on_meta(kind):
    rng = random.Random(4)
    trajs = make_batch(2, num=6, groups=2) + [make_trajectory(rng, "x", end="truncated", with_bootstrap=True)]
    layout = build_layout(trajs, kind, row_tokens=48)  # planned on the host, from Python lists
    R, L = layout.input_ids.shape
    moved = layout.to(META)
    assert (moved.tree_mask is not None) == (kind == "tree")
    with OnlyMeta():
        out = torch.zeros(R, L, 3, device=META)
        actions = moved.gather_actions(out)
        actions_unshifted = moved.gather_actions(out, shift=False)
        values = moved.gather_values(out[..., 0])
        boot = moved.gather_bootstrap(out[..., 1])
        mask = moved.action_mask
    N = sum(len(s.response_ids) for t in trajs for s in t.steps)
    assert actions.shape == actions_unshifted.shape == (N, 3)
    assert values.shape == (sum(len(t.steps) for t in trajs),) and boot.shape == (len(trajs),)
    assert all(o.device == META for o in (actions, actions_unshifted, values, boot, mask))


def test_gather_bootstrap_zeroes_trajectories_without_one():
    """The device-safe (masked read) form gives what the boolean-indexing form gave."""
    trajs = make_batch(5, num=5, groups=2)
    for kind in LAYOUTS:
        layout = build_layout(trajs, kind, row_tokens=48)
        out = torch.randn(layout.input_ids.shape)
        has = layout.bootstrap_rows >= 0
        expected = torch.zeros(len(trajs))
        expected[has] = out[layout.bootstrap_rows[has], layout.bootstrap_cols[has]]
        torch.testing.assert_close(layout.gather_bootstrap(out), expected, rtol=0, atol=0)


def test_step_batch_to_moves_every_field():
    _, cpu, batch = _batch()
    for name in cpu.__dataclass_fields__:
        assert getattr(batch, name).device == META
        assert torch.equal(getattr(cpu.to("cpu"), name), getattr(cpu, name))
