"""Training on shared layouts is exact: the same losses and gradients as one row per step."""

import torch

from steppo.config import ModelConfig
from steppo.core.batch import StepBatch, build_layout
from steppo.core.losses import aggregation_weights, policy_loss, ratio_units, value_loss
from steppo.models.build import build_models
from tests.conftest import make_batch


def _loss_and_grads(models, trajs, kind):
    batch = StepBatch.from_trajectories(trajs)
    layout = build_layout(trajs, kind, row_tokens=96)
    for p in list(models.policy.parameters()) + list(models.critic.parameters()):
        p.grad = None
    lp, ent, _ = models.policy(layout, with_entropy=True)
    values = models.critic(layout)
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(batch.num_steps, generator=g)[batch.token_step]
    w = aggregation_weights("step-mean", batch.token_step, batch.step_traj)
    units, n = ratio_units("step", batch.token_step, batch.token_traj)
    pg, _ = policy_loss(lp, batch.old_logprobs, adv, w, units, n)
    v = layout.gather_values(values)
    vl, _ = value_loss(v, torch.zeros_like(v), torch.randn(batch.num_steps, generator=g), clip=None)
    loss = pg + vl - 0.01 * (w * ent).sum()
    loss.backward()
    grads = [p.grad.clone() for p in list(models.policy.parameters()) + list(models.critic.parameters()) if p.grad is not None]
    return loss.detach(), grads


def test_losses_and_gradients_match_the_per_step_layout(tiny_dir):
    torch.manual_seed(0)
    models = build_models(ModelConfig(device="cpu"), base_path=tiny_dir, with_critic=True, shared_critic=False,
                          with_reference=False, temperature=1.0)
    with torch.no_grad():  # give the critic head weights, so its gradients reach the decoder
        models.critic.value_head.weight.normal_(0, 0.1)
    trajs = make_batch(3, num=6, groups=2, vocab=60)
    ref_loss, ref_grads = _loss_and_grads(models, trajs, "per_step")
    for kind in ("prefix_shared", "packed", "tree"):
        loss, grads = _loss_and_grads(models, trajs, kind)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=kind)
        assert len(grads) == len(ref_grads)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=kind)
