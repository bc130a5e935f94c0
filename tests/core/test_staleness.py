"""Asynchronous training: staleness is corrected once (decoupled PPO), never twice (issue 12)."""

import math

import pytest
import torch

from steppo.core.algorithms import preset
from steppo.core.batch import StepBatch
from steppo.core.credit import Credit
from steppo.core.losses import aggregation_weights, policy_loss, ratio_units
from steppo.core.records import Step, Trajectory

W = 1.35  # pi_prox / pi_behav of the step (geometric mean over its tokens), below the cap 2
CLIP = 0.2


def _stale_batch():
    """One step of two tokens; behaviour log-probs are the rollout's, proximal ones the
    trainer's recomputation: token log-ratios log W + 0.1 and log W - 0.1 (mean log W)."""
    behav = [-1.0, -2.0]
    prox = [behav[0] + math.log(W) + 0.1, behav[1] + math.log(W) - 0.1]
    step = Step(prompt_ids=[1], response_ids=[2, 3], logprobs=behav, reward=1.0, terminated=True)
    batch = StepBatch.from_trajectories([Trajectory(steps=[step], id="a", group_id="g")])
    return batch, torch.tensor(prox)


def _gradient(batch, prox, advantage, old_mode):
    """d loss / d theta at theta = 0, where log pi_theta = log pi_prox + theta on every token:
    the trainer's path (advantages corrected by `correct_staleness`, ratio denominator from
    `ratio_denominator`, then `policy_loss`)."""
    from steppo.trainer.update import Scored, correct_staleness, ratio_denominator

    algo = preset("steppo")
    scored = Scored(logprobs=prox, step_values=None, token_values=None, bootstrap=None, ref_logprobs=None)
    credit = Credit(step_advantages=torch.tensor([advantage]), token_advantages=torch.full((2,), advantage), returns=None)
    if old_mode == "recompute":
        w = correct_staleness(algo, batch, scored, credit, cap=2.0, old_logprobs=old_mode)
        torch.testing.assert_close(w, torch.full((2,), W))
    else:  # what trainer.old_logprobs=rollout used to do: weight the advantages AND take the ratio vs pi_behav
        with pytest.raises(ValueError, match="old_logprobs=recompute"):
            correct_staleness(algo, batch, scored, credit, cap=2.0, old_logprobs=old_mode)
        credit.token_advantages = credit.token_advantages * W
    theta = torch.zeros((), requires_grad=True)
    units, n = ratio_units(algo.ratio_level, batch.token_step, batch.token_traj, batch.num_steps, batch.num_trajectories)
    weights = aggregation_weights(algo.aggregation, batch.token_step, batch.step_traj)
    loss, _ = policy_loss(prox + theta, ratio_denominator(old_mode, batch, scored), credit.token_advantages, weights,
                          units, n, CLIP, CLIP)
    loss.backward()
    return float(theta.grad)


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_decoupled_ppo_gradient_is_the_staleness_weight_for_both_signs(advantage):
    """At theta = theta_prox the ratio against the proximal policy is 1 (inside the clip), so
    loss = -A W r and d loss / d theta = -A W * d r / d theta = -A W = -+1.35."""
    batch, prox = _stale_batch()
    grad = _gradient(batch, prox, advantage, "recompute")
    assert grad == pytest.approx(-advantage * W, abs=1e-6)
    assert abs(grad) == pytest.approx(1.35, abs=1e-6)


def test_ratio_against_the_behaviour_policy_corrects_twice():
    """The refused combination, by hand: the ratio vs pi_behav is W = 1.35 > 1 + 0.2, so for
    A = +1 the clipped branch binds (gradient 0) and for A = -1 the unclipped one does:
    loss = A W * W r, gradient W^2 = 1.8225. Neither is the decoupled 1.35."""
    batch, prox = _stale_batch()
    assert _gradient(batch, prox, 1.0, "rollout") == 0.0
    assert _gradient(batch, prox, -1.0, "rollout") == pytest.approx(W * W, abs=1e-5)


def test_config_refuses_async_training_with_rollout_log_probs():
    from steppo.config import Config, ConfigError, TrainerConfig

    cfg = Config(trainer=TrainerConfig(async_rollout=True, old_logprobs="rollout"))
    with pytest.raises(ConfigError, match=r"trainer\.async_rollout=true with trainer\.old_logprobs=rollout") as err:
        cfg.validate()
    assert "set trainer.old_logprobs=recompute" in str(err.value)
    Config(trainer=TrainerConfig(async_rollout=True, old_logprobs="recompute")).validate()
    Config(trainer=TrainerConfig(async_rollout=False, old_logprobs="rollout")).validate()


def test_config_refusal_through_overrides():
    from steppo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="corrects staleness twice"):
        load_config(overrides=["trainer.async_rollout=true", "trainer.old_logprobs=rollout"])
    assert load_config(overrides=["trainer.async_rollout=true"]).trainer.old_logprobs == "recompute"
