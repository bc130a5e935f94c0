"""The verl plugin: StepPO's estimator and loss on verl's concatenated multi-turn layout equal
StepPO's own (per-step) computation; rewards on mask-0 tokens, truncation, the step critic, the
log-ratio clamp and clip_frac by hand. The tests that need verl (its own venv:
`bash scripts/verl_venv.sh`) skip without it; the math tests run everywhere."""

import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steppo.core.credit import step_gae, whiten
from steppo.core.losses import policy_loss
from steppo.integrations.verl import (
    _advantage_from_batch,
    step_advantages,
    step_ratio_loss,
    step_runs,
    step_starts,
    step_value_loss_matrix,
    truncated_rows,
)

ROOT = Path(__file__).resolve().parents[2]


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
            if end < length and rng.random() < 0.3:  # a reward on the tool tokens after the run
                rewards[b, min(t, length) - 1] += rng.choice([1.0, -0.25])
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
    # the critic's target R = A + V sits on each step's first token only
    torch.testing.assert_close(ret, torch.tensor([[0.9, 0.0, 0.0, 1.0]]))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 1.0), st.floats(0.5, 1.0))
def test_estimator_equals_steppo_step_gae_over_the_steps(seed, gamma, lam):
    mask, rewards, values, steps = verl_layout(seed)
    K = max(len(r) for r in steps)
    r_steps = torch.zeros(len(steps), K)
    v_steps = torch.zeros(len(steps), K)
    m = torch.zeros(len(steps), K, dtype=torch.bool)
    for b, runs in enumerate(steps):
        for k, (s, _end) in enumerate(runs):
            # a step's reward: its tokens and the tool tokens after it, up to the next step
            nxt = runs[k + 1][0] if k + 1 < len(runs) else mask.shape[1]
            r_steps[b, k] = rewards[b, (0 if k == 0 else s):nxt].sum()
            v_steps[b, k] = values[b, s]
            m[b, k] = True
    adv, ret = step_gae(r_steps, v_steps, m, torch.zeros(len(steps)), gamma, lam)
    adv = whiten(adv, m)
    tok_adv, tok_ret = step_advantages(rewards, values, mask, gamma, lam)
    for b, runs in enumerate(steps):
        for k, (s, e) in enumerate(runs):
            torch.testing.assert_close(tok_adv[b, s:e], adv[b, k].expand(e - s), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tok_ret[b, s], ret[b, k], atol=1e-5, rtol=1e-5)
    assert (tok_adv[mask == 0] == 0).all()
    assert (tok_ret[~step_starts(mask)] == 0).all()


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


def test_reward_on_a_tool_token_goes_to_the_step_before_it():
    # row 0: step 0 = tokens 0-1, step 1 = token 3; the score sits on token 5, a tool response
    # (mask 0): it is step 1's reward, not dropped. Row 1: 0.5 before the first step goes to
    # step 0, and 1.0 on the tool token 3 between the steps to step 0 too.
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 9.0, 9.0, 0.2, 9.0, 9.0], [9.0, 0.1, 9.0, 9.0, 0.3, 9.0]])
    adv, ret = step_advantages(rewards, values, mask, gamma=0.9, lam=1.0, whiten_steps=False)
    # row 0: A1 = 1 - 0.2 = 0.8; A0 = 0 + 0.9 * 0.2 - 0.5 + 0.9 * 0.8 = 0.4
    # row 1: A1 = 0 - 0.3 = -0.3; A0 = 1.5 + 0.9 * 0.3 - 0.1 + 0.9 * (-0.3) = 1.4
    torch.testing.assert_close(adv, torch.tensor([[0.4, 0.4, 0.0, 0.8, 0.0, 0.0], [0.0, 1.4, 1.4, 0.0, -0.3, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.9, 0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.5, 0.0, 0.0, 0.0, 0.0]]))


def _three_rows():
    """Row 0 fills the response (6 tokens) and ends on a tool response; row 1 has 2 steps (the turn
    limit) and ends on a model token at length 4; row 2 ended by itself (1 step, length 3)."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 0.0],
                         [1.0, 0.0, 1.0, 1.0, 0.0, 0.0],
                         [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
    response = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2, [1.0] * 3 + [0.0] * 3])
    attention = torch.cat([torch.ones(3, 2), response], 1)  # 2 prompt tokens
    rewards = torch.zeros(3, 6)
    rewards[2, 2] = 1.0
    values = torch.tensor([[0.5, 9.0, 9.0, 0.2, 9.0, 0.7],
                           [0.3, 9.0, 0.6, 9.0, 9.0, 9.0],
                           [0.4, 9.0, 9.0, 9.0, 9.0, 9.0]])
    return mask, attention, rewards, values


def _batch(mask, attention, rewards, values, non_tensor=None):
    batch = {"response_mask": mask, "token_level_rewards": rewards, "values": values}
    if attention is not None:
        batch["attention_mask"] = attention
    return SimpleNamespace(batch=batch, non_tensor_batch=non_tensor or {})


def test_truncated_rows_bootstrap_and_terminated_rows_do_not():
    mask, attention, rewards, values = _three_rows()
    lengths = attention[:, 2:].sum(1).long()
    assert truncated_rows(mask, lengths, response_length=6, max_steps=2).tolist() == [True, True, False]
    # the rule as the trainer applies it: response width 6 from the attention mask, turn limit 2
    data = _advantage_from_batch(_batch(mask, attention, rewards, values), 0.9, 1.0, {"steppo_max_steps": 2})
    adv, ret = data.batch["advantages"], data.batch["returns"]
    # row 0 ends on a tool response: bootstrap with the value at its last position, 0.7
    #   A1 = 0.9 * 0.7 - 0.2 = 0.43; A0 = 0.9 * 0.2 - 0.5 + 0.9 * 0.43 = 0.067
    # row 1 ends on a model token: no value after its last step exists, its own V_T = 0.6 stands in
    #   A1 = 0.9 * 0.6 - 0.6 = -0.06; A0 = 0.9 * 0.6 - 0.3 + 0.9 * (-0.06) = 0.186
    # row 2 terminated: A0 = 1 - 0.4 = 0.6
    raw = torch.tensor([0.067, 0.43, 0.186, -0.06, 0.6])
    white = whiten(raw, torch.ones(5, dtype=torch.bool))  # once per step over the batch
    torch.testing.assert_close(adv[0, [0, 3]], white[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv[1, [0, 2]], white[2:4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adv[2, 0], white[4], atol=1e-5, rtol=1e-5)
    expected_ret = torch.tensor([[0.567, 0, 0, 0.63, 0, 0], [0.486, 0, 0.54, 0, 0, 0], [1.0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(ret, expected_ret, atol=1e-5, rtol=1e-5)
    # without the turn limit, row 1 terminates (A1 = -0.6); an explicit per-row flag truncates row 2
    data = _advantage_from_batch(_batch(mask, attention, rewards, values, {"truncated": [False, False, True]}),
                                 0.9, 1.0, {})
    ret = data.batch["returns"]
    # row 1 terminated: A1 = -0.6, A0 = 0.9 * 0.6 - 0.3 + 0.9 * (-0.6) = -0.3, so R = A + V = 0, 0
    torch.testing.assert_close(ret[1, [0, 2]], torch.tensor([0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret[2, 0], torch.tensor(1.0 + 0.9 * 0.4), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ret[0, 3], torch.tensor(0.63), atol=1e-6, rtol=1e-6)  # still fills the response


def test_v1_layout_without_attention_mask_needs_the_response_length_key():
    # verl's v1 trainer hands compute_advantage no attention mask: lengths come from the mask and
    # the reward (row 0's score sits on its last token), the response length from the config key
    mask, _, rewards, values = _three_rows()
    rewards[0, 5] = 0.5
    data = _advantage_from_batch(_batch(mask, None, rewards, values), 1.0, 1.0, {"steppo_response_length": 6})
    # row 0: truncated at length 6, ends on a tool token: A1 = 0.5 + 0.7 - 0.2 = 1.0, R1 = 1.2
    torch.testing.assert_close(data.batch["returns"][0, 3], torch.tensor(1.2), atol=1e-6, rtol=1e-6)
    data = _advantage_from_batch(_batch(mask, None, rewards, values), 1.0, 1.0, {})
    torch.testing.assert_close(data.batch["returns"][0, 3], torch.tensor(0.5), atol=1e-6, rtol=1e-6)


def test_step_value_loss_regresses_v_at_step_boundaries_only():
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0]])  # one target per step (its first token)
    old = torch.tensor([[0.8, 5.0, 5.0, 1.0, 5.0]])
    vpred = torch.tensor([[0.9, -7.0, 3.0, 1.2, 4.0]])  # far off elsewhere: must not count
    loss, where, frac = step_value_loss_matrix(vpred, old, returns, mask, 0.5)
    assert where.tolist() == [[True, False, False, True, False]]
    # step 0: 0.5 * (0.9 - 1)^2 = 0.005; step 1: 0.5 * (1.2 - 2)^2 = 0.32; both inside the clip
    # (|V - V_old| <= 0.5), so nothing is strictly clipped
    torch.testing.assert_close(loss, torch.tensor([[0.005, 0.0, 0.0, 0.32, 0.0]]), atol=1e-6, rtol=1e-6)
    assert frac.item() == 0.0
    # V moved past the clip away from the target: the clipped error is strictly larger there
    loss, _, frac = step_value_loss_matrix(torch.tensor([[0.0, 0, 0, 2.0, 0]]), old, returns, mask, 0.5)
    # step 0: V = 0 -> clipped 0.3: max(1.0, 0.49) = 1.0; step 1: V = 2 -> clipped 1.5: max(0, 0.25)
    torch.testing.assert_close(loss, torch.tensor([[0.5, 0.0, 0.0, 0.125, 0.0]]), atol=1e-6, rtol=1e-6)
    assert frac.item() == 0.5


def test_step_log_ratio_clamped_at_10():
    mask = torch.ones(1, 2)
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), 30.0, requires_grad=True)  # step log-ratio 30 -> clamped to 10
    per_token, stats = step_ratio_loss(old, new, torch.full((1, 2), -1.0), mask, 0.2, 0.2)
    # A = -1: max(r, clip(r)) = r = e^10 (unclipped branch), spread over the 2 tokens
    torch.testing.assert_close(per_token, torch.full((1, 2), math.exp(10.0) / 2), rtol=1e-5, atol=0)
    (grad,) = torch.autograd.grad(per_token.sum(), new)
    # where the clamp binds the ratio is a constant: no gradient (as steppo.core.losses.policy_loss)
    torch.testing.assert_close(grad, torch.zeros(1, 2))
    inside = torch.full((1, 2), 0.1, requires_grad=True)  # log-ratio 0.1: unclamped, d(sum)/dlogp_i = r / 2
    per_token, _ = step_ratio_loss(old, inside, torch.full((1, 2), -1.0), mask, 0.2, 0.2)
    (grad,) = torch.autograd.grad(per_token.sum(), inside)
    torch.testing.assert_close(grad, torch.full((1, 2), math.exp(0.1) / 2), rtol=1e-5, atol=0)
    assert stats["clip_frac"].item() == 0.0
    per_token, stats = step_ratio_loss(old, new.detach(), torch.ones(1, 2), mask, 0.2, 0.2)
    torch.testing.assert_close(per_token, torch.full((1, 2), -1.2 / 2))  # A = +1: clipped at 1.2
    assert stats["clip_frac"].item() == 1.0


def test_clip_frac_counts_steps_whose_clipped_branch_is_strictly_chosen():
    # 5 one-token steps, ratios 1.5, 1.5, 0.5, 1.0, 1.5 with advantages +1, -1, -1, +1, 0, clip 0.2:
    # step 0: -1.5 vs -1.2 -> clipped; step 1: 1.5 vs 1.2 -> unclipped; step 2: 0.5 vs 0.8 -> clipped;
    # step 3: inside the range; step 4: A = 0, both 0 -> not clipped. clip_frac = 2 / 5
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    ratio = torch.tensor([[1.5, 1.0, 1.5, 1.0, 0.5, 1.0, 1.0, 1.0, 1.5]])
    adv = torch.tensor([[1.0, 0.0, -1.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0]])
    per_token, stats = step_ratio_loss(torch.zeros(1, 9), ratio.log(), adv, mask, 0.2, 0.2)
    assert abs(stats["clip_frac"].item() - 0.4) < 1e-6
    torch.testing.assert_close(per_token, torch.tensor([[-1.2, 0, 1.5, 0, 0.8, 0, -1.0, 0, 0.0]]))


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


FRESH_WORKER = r"""
import sys
from verl.trainer.ppo import core_algos
from verl.utils.import_utils import import_external_libs
from verl.workers.utils import losses

assert "steppo" not in core_algos.ADV_ESTIMATOR_REGISTRY  # nothing registered it before
# exactly the call HFModelConfig.__post_init__ makes with model.external_lib (verl/workers/config/model.py)
import_external_libs(sys.argv[1])
import_external_libs(sys.argv[1])  # idempotent
import steppo.integrations.verl as plugin
assert core_algos.get_adv_estimator_fn("steppo").__name__ == "steppo_adv"
assert core_algos.get_policy_loss_fn("steppo").__name__ == "steppo_loss"
assert losses.value_loss is plugin.step_value_loss
from verl.trainer.ppo import ray_trainer
assert ray_trainer.compute_advantage._steppo
print("OK")
"""


def _fresh(code, *args, env=None):
    pytest.importorskip("verl")
    run_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    out = subprocess.run([sys.executable, "-c", code, *args], cwd="/tmp", env=run_env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_external_lib_registers_in_a_fresh_worker_process():
    # a Ray worker is a fresh interpreter: verl imports `actor_rollout_ref.model.external_lib` /
    # `critic.model.external_lib` there with import_external_libs; that alone must register
    _fresh(FRESH_WORKER, "steppo.integrations.verl")


def test_verl_use_external_modules_env_registers_on_import_verl():
    # verl/__init__.py imports $VERL_USE_EXTERNAL_MODULES (e.g. through ray_kwargs' runtime_env env_vars)
    code = ("import verl\nfrom verl.trainer.ppo import core_algos\n"
            "assert core_algos.get_policy_loss_fn('steppo') and core_algos.get_adv_estimator_fn('steppo')\nprint('OK')")
    _fresh(code, env={"VERL_USE_EXTERNAL_MODULES": "steppo.integrations.verl"})


def test_v1_trainer_imported_first_is_patched_too():
    # the TaskRunner imports the v1 trainer (which binds compute_advantage and value_loss at its
    # import) before critic.model.external_lib loads the plugin
    pytest.importorskip("verl")
    pytest.importorskip("transfer_queue", reason="verl's v1 trainer needs TransferQueue (scripts/verl_venv.sh)")
    code = """
import importlib
base = importlib.import_module("verl.trainer.ppo.v1.trainer_base")
v1 = importlib.import_module("verl.trainer.ppo.v1.utils")
from verl.utils.import_utils import import_external_libs
import_external_libs("steppo.integrations.verl")
import steppo.integrations.verl as plugin
assert base.value_loss is plugin.step_value_loss, base.value_loss
assert v1.compute_advantage._steppo
print("OK")
"""
    _fresh(code)


def test_step_value_loss_through_verls_value_loss_signature():
    pytest.importorskip("verl")
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.config import CriticConfig
    from verl.workers.utils import losses

    import steppo.integrations.verl as plugin

    B, P, L = 2, 3, 5
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0]])
    returns = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0], [0.0, -1.0, 0.0, 0.0, 0.0]])
    old = torch.zeros(B, L)
    seq = torch.randn(B, P + L)  # the critic's output at every position of prompt + response
    seq[0, P - 1], seq[0, P + 2], seq[1, P] = 0.2, 1.4, -0.6  # what verl reads at the step starts
    data = TensorDict({"prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, L, dtype=torch.long),
                       "attention_mask": torch.ones(B, P + L, dtype=torch.long), "values": old, "returns": returns,
                       "response_mask": mask}, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=None, global_batch_size=None)
    cfg = SimpleNamespace(cliprange_value=0.5, model=SimpleNamespace(external_lib="steppo.integrations.verl"))
    loss, metrics = losses.value_loss(cfg, {"values": seq.reshape(-1)}, data)
    # row 0: 0.5 * max((0.2-1)^2, (0.2-1)^2) + 0.5 * max((1.4-2)^2, (0.5-2)^2) = 0.32 + 1.125;
    # row 1: 0.5 * (-0.6+1)^2 = 0.08 vs clipped (-0.5+1)^2 * 0.5 = 0.125; mean over the 2 rows
    torch.testing.assert_close(loss, torch.tensor((0.32 + 1.125 + 0.125) / 2), atol=1e-5, rtol=1e-5)
    assert abs(metrics["critic/vf_clipfrac"] - 2 / 3) < 1e-6
    # a critic that does not name the plugin keeps verl's own token-level loss
    cfg_plain = CriticConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, cliprange_value=0.5)
    loss_plain, _ = plugin.step_value_loss(cfg_plain, {"values": seq.reshape(-1)}, data)
    ref, _ = losses._steppo_original_value_loss(cfg_plain, {"values": seq.reshape(-1)}, data)
    torch.testing.assert_close(loss_plain, ref)
