import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steppo.core.batch import StepBatch, build_layout
from steppo.core.losses import segment_mean
from steppo.core.records import RecordError, Step, Trajectory
from tests.conftest import causal_readout, make_batch, make_trajectory
from tests.core.helpers import credit_of


def _step(prompt, response, **kw):
    return Step(prompt_ids=prompt, response_ids=response, logprobs=[-1.0] * len(response), **kw)


def test_step_rejects_mismatched_logprobs_and_empty_ids():
    with pytest.raises(RecordError, match="log-prob"):
        Step(prompt_ids=[1], response_ids=[2, 3], logprobs=[-1.0])
    with pytest.raises(RecordError, match="response"):
        Step(prompt_ids=[1], response_ids=[], logprobs=[])
    with pytest.raises(RecordError, match="prompt"):
        Step(prompt_ids=[], response_ids=[2], logprobs=[-1.0])
    with pytest.raises(RecordError, match="both"):
        _step([1], [2], terminated=True, truncated=True)


def test_trajectory_rejects_early_end_and_stray_bootstrap():
    with pytest.raises(RecordError, match="not the last step"):
        Trajectory(steps=[_step([1], [2], terminated=True), _step([1, 2, 3], [4])], id="a", group_id="g")
    with pytest.raises(RecordError, match="no steps"):
        Trajectory(steps=[], id="a", group_id="g")
    with pytest.raises(RecordError, match="bootstrap"):
        Trajectory(steps=[_step([1], [2], terminated=True)], id="a", group_id="g", bootstrap_ids=[1, 2])


def _two_trajectories():
    # Trajectory a: 3 steps; step 1 extends step 0 (cumulative), step 2 is re-rendered.
    a = Trajectory(
        steps=[
            _step([1, 2, 3], [4, 5], reward=0.0),
            _step([1, 2, 3, 4, 5, 6], [7], reward=0.0),
            _step([9, 9], [8, 8, 8], reward=1.0, terminated=True),
        ],
        id="a",
        group_id="task",
    )
    # Trajectory b: 1 step, truncated, bootstrap state extends its context.
    b = Trajectory(
        steps=[_step([1, 2], [3], reward=0.5, truncated=True)],
        id="b",
        group_id="task",
        bootstrap_ids=[1, 2, 3, 6, 6],
    )
    return [a, b]


def test_step_batch_hand_example():
    batch = StepBatch.from_trajectories(_two_trajectories())
    assert batch.step_slots.tolist() == [[0, 1, 2], [3, -1, -1]]
    assert batch.token_slots.tolist() == [[0, 1, 2, 3, 4, 5], [6, -1, -1, -1, -1, -1]]
    assert batch.step_traj.tolist() == [0, 0, 0, 1]
    assert batch.step_index.tolist() == [0, 1, 2, 0]
    assert batch.response_lengths.tolist() == [2, 1, 3, 1]
    assert batch.token_step.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert batch.terminated.tolist() == [True, False]
    assert batch.truncated.tolist() == [False, True]
    assert batch.group.tolist() == [0, 0]
    assert batch.step_end.tolist() == [
        [False, True, True, False, False, True],
        [True, False, False, False, False, False],
    ]
    assert batch.last_step().tolist() == [2, 3]
    assert batch.step_start.tolist() == [0, 3] and batch.token_start.tolist() == [0, 6]
    assert batch.steps_per_trajectory.tolist() == [3, 1] and batch.tokens_per_trajectory.tolist() == [6, 1]
    assert batch.first_token.tolist() == [0, 2, 3, 6]


def _three_trajectories():
    a, b = _two_trajectories()
    c = Trajectory(
        steps=[
            Step(prompt_ids=[5], response_ids=[6, 7], logprobs=[-0.1, -0.2], reward=2.0, anchor="x", policy_version=4),
            Step(prompt_ids=[5, 6, 7], response_ids=[8], logprobs=[-0.3], reward=-1.0, terminated=True,
                 anchor="y", policy_version=5),
        ],
        id="c",
        group_id="other",
    )
    a.steps[0].anchor = a.steps[2].anchor = "x"
    return [a, b, c]


def test_select_slices_every_field_hand_example():
    """Batch a (3 steps, 6 tokens), b (1, 1), c (2, 3); select [c, a]: steps 4-5 then 0-2, tokens
    7-9 then 0-5; flat ids renumbered; group and anchor ids dense in order of first appearance."""
    batch = StepBatch.from_trajectories(_three_trajectories())
    steps, tokens = batch.flat_ranges([2, 0])
    assert steps.tolist() == [4, 5, 0, 1, 2] and tokens.tolist() == [7, 8, 9, 0, 1, 2, 3, 4, 5]
    sub = batch.select([2, 0])
    assert sub.step_slots.tolist() == [[0, 1, -1], [2, 3, 4]]
    assert sub.token_slots.tolist() == [[0, 1, 2, -1, -1, -1], [3, 4, 5, 6, 7, 8]]
    assert sub.step_traj.tolist() == [0, 0, 1, 1, 1]
    assert sub.token_step.tolist() == [0, 0, 1, 2, 2, 3, 4, 4, 4]
    assert sub.token_traj.tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    for name in ("step_index", "rewards", "response_lengths", "policy_version"):
        assert torch.equal(getattr(sub, name), getattr(batch, name)[steps]), name
    assert torch.equal(sub.old_logprobs, batch.old_logprobs[tokens])
    for name in ("terminated", "truncated"):
        assert torch.equal(getattr(sub, name), getattr(batch, name)[[2, 0]]), name
    assert batch.group.tolist() == [0, 0, 1] and sub.group.tolist() == [0, 1]
    assert batch.anchor.tolist() == [0, -1, 0, -1, 1, 2] and sub.anchor.tolist() == [0, 1, 2, -1, 2]
    assert sub.first_token.tolist() == [0, 2, 3, 5, 6]
    assert sub.rewards.tolist() == [2.0, -1.0, 0.0, 0.0, 1.0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), num=st.integers(1, 8), data=st.data())
def test_select_equals_collating_the_selected_trajectories(seed, num, data):
    trajs = make_batch(seed, num=num, groups=3)
    idx = data.draw(st.lists(st.integers(0, num - 1), unique=True, max_size=num))
    sub = StepBatch.from_trajectories(trajs).select(idx)
    want = StepBatch.from_trajectories([trajs[i] for i in idx])
    for name in want.__dataclass_fields__:
        assert torch.equal(getattr(sub, name), getattr(want, name)), name
        assert getattr(sub, name).dtype == getattr(want, name).dtype, name


def test_per_step_layout_hand_example():
    layout = build_layout(_two_trajectories(), "per_step", pad_id=0)
    assert layout.input_ids.tolist() == [
        [1, 2, 3, 4, 5, 0, 0],
        [1, 2, 3, 4, 5, 6, 7],
        [9, 9, 8, 8, 8, 0, 0],
        [1, 2, 3, 0, 0, 0, 0],
        [1, 2, 3, 6, 6, 0, 0],  # bootstrap state row for b
    ]
    assert layout.value_rows.tolist() == [0, 1, 2, 3]
    assert layout.value_cols.tolist() == [2, 5, 1, 1]
    assert layout.action_rows.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert layout.action_cols.tolist() == [3, 4, 6, 2, 3, 4, 2]
    assert layout.bootstrap_rows.tolist() == [-1, 4]
    assert layout.bootstrap_cols.tolist() == [-1, 4]
    assert layout.num_input_tokens == 5 + 7 + 5 + 3 + 5


def test_prefix_shared_layout_hand_example():
    layout = build_layout(_two_trajectories(), "prefix_shared", pad_id=0)
    assert layout.input_ids.tolist() == [
        [1, 2, 3, 4, 5, 6, 7],  # steps 0 and 1 of a share one row
        [9, 9, 8, 8, 8, 0, 0],  # step 2 of a was re-rendered: new row
        [1, 2, 3, 6, 6, 0, 0],  # b and its bootstrap state extend one row
    ]
    assert layout.value_rows.tolist() == [0, 0, 1, 2]
    assert layout.value_cols.tolist() == [2, 5, 1, 1]
    assert layout.action_rows.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert layout.action_cols.tolist() == [3, 4, 6, 2, 3, 4, 2]
    assert layout.bootstrap_rows.tolist() == [-1, 2]
    assert layout.bootstrap_cols.tolist() == [-1, 4]
    assert layout.num_input_tokens == 7 + 5 + 5
    assert layout.action_mask.sum() == 7


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown layout"):
        build_layout(_two_trajectories(), "zigzag")


def test_truncated_without_bootstrap_reads_last_response_token():
    traj = Trajectory(steps=[_step([1, 2], [3, 4], truncated=True)], id="x", group_id="g")
    for kind in ("per_step", "prefix_shared"):
        layout = build_layout([traj], kind)
        assert (layout.bootstrap_rows.item(), layout.bootstrap_cols.item()) == (0, 3)


def _per_step_numbers(trajs, kind):
    """Per-step log-prob sums, step ratios, values, bootstrap values and advantages that a
    causal model gives in this layout."""
    batch = StepBatch.from_trajectories(trajs)
    layout = build_layout(trajs, kind, row_tokens=48)
    out = causal_readout(layout)
    token_logprobs = -torch.nn.functional.softplus(layout.gather_actions(out[..., 0]) * 3)
    values = layout.gather_values(out[..., 1])
    token_values = layout.gather_actions(out[..., 1])
    boot = layout.gather_bootstrap(out[..., 2])
    S = batch.num_steps
    logprob_sums = torch.zeros(S, dtype=torch.float64).index_add_(0, batch.token_step, token_logprobs)
    log_ratio = segment_mean(token_logprobs - batch.old_logprobs.double(), batch.token_step, S)
    credit = credit_of(
        batch, "step_gae", step_values=values.float(), bootstrap=boot.float(), gamma=0.9, lam=0.8, whiten_mode="step"
    )
    token_credit = credit_of(
        batch, "token_gae", token_values=token_values.float(), bootstrap=boot.float(), gamma=0.9, lam=0.8
    )
    return dict(
        logprob_sums=logprob_sums,
        step_ratio=log_ratio.exp(),
        values=values,
        bootstrap=boot,
        step_adv=credit.step_advantages,
        token_adv=credit.token_advantages,
        token_gae_adv=token_credit.token_advantages,
        token_gae_ret=token_credit.returns,
    )


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), num=st.integers(1, 8))
def test_all_layouts_give_identical_per_step_results(seed, num):
    trajs = make_batch(seed, num=num, groups=3, shared_prompts=seed % 4 != 0)
    a = _per_step_numbers(trajs, "per_step")
    for kind in ("prefix_shared", "packed", "tree"):
        b = _per_step_numbers(trajs, kind)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, msg=f"{kind}: {key}")
    tokens = [build_layout(trajs, k, row_tokens=64).num_input_tokens for k in ("per_step", "prefix_shared", "packed", "tree")]
    assert tokens[0] >= tokens[1] == tokens[2] >= tokens[3]


def test_prefix_shared_reads_each_shared_token_once():
    rng = random.Random(3)
    trajs = [make_trajectory(rng, f"t{i}", num_steps=6, cumulative=True, end="terminated") for i in range(4)]
    shared = build_layout(trajs, "prefix_shared")
    assert shared.num_rows == 4  # one chain per trajectory
    distinct = sum(len(t.steps[-1].context_ids) for t in trajs)
    assert shared.num_input_tokens == distinct
    assert build_layout(trajs, "per_step").num_input_tokens == sum(
        len(s.context_ids) for t in trajs for s in t.steps
    )


def test_all_layouts_agree_with_a_real_transformer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from steppo.models.policy import run_decoder

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )
    ).eval()
    trajs = make_batch(11, num=6, groups=2)
    results = {}
    for kind in ("per_step", "prefix_shared", "packed", "tree"):
        layout = build_layout(trajs, kind, row_tokens=80)
        with torch.no_grad():
            hidden = run_decoder(model.model, layout)
            logp = torch.log_softmax(model.lm_head(hidden), -1)
        targets = layout.input_ids[layout.action_rows, layout.action_cols]
        token_lp = layout.gather_actions(logp).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        results[kind] = (token_lp, layout.gather_values(hidden[..., 0]), layout.gather_bootstrap(hidden[..., 1]))
    assert build_layout(trajs, "tree", row_tokens=80).tree_mask is not None
    for kind in ("prefix_shared", "packed", "tree"):
        for a, b in zip(results["per_step"], results[kind]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=kind)


def test_empty_batch_collates():
    batch = StepBatch.from_trajectories([])
    assert batch.num_trajectories == 0 and batch.num_steps == 0 and batch.num_tokens == 0
    layout = build_layout([], "prefix_shared")
    assert layout.num_rows == 0


def test_outputs_at_unread_positions_change_nothing():
    rng = random.Random(5)
    trajs = [make_trajectory(rng, f"t{i}") for i in range(6)]
    for kind in ("per_step", "prefix_shared", "packed", "tree"):
        layout = build_layout(trajs, kind, row_tokens=48)
        out = causal_readout(layout)[..., 0]
        read = torch.zeros_like(layout.attention_mask)
        read[layout.action_rows, layout.action_pred_cols] = True
        read[layout.value_rows, layout.value_cols] = True
        has = layout.bootstrap_rows >= 0
        read[layout.bootstrap_rows[has], layout.bootstrap_cols[has]] = True
        noisy = torch.where(read, out, torch.randn_like(out) * 1e3)
        torch.testing.assert_close(layout.gather_actions(noisy), layout.gather_actions(out))
        torch.testing.assert_close(layout.gather_values(noisy), layout.gather_values(out))
        torch.testing.assert_close(layout.gather_bootstrap(noisy), layout.gather_bootstrap(out))
        assert not read[~layout.attention_mask].any()  # nothing is read at padding


def _group_pair():
    a = Trajectory(
        steps=[_step([1, 2, 3], [4, 5]), _step([1, 2, 3, 4, 5, 6], [7], terminated=True)], id="a", group_id="task"
    )
    b = Trajectory(steps=[_step([1, 2, 3], [8], terminated=True)], id="b", group_id="task")
    return [a, b]


def test_packed_layout_hand_example():
    layout = build_layout(_group_pair(), "packed", row_tokens=100)
    assert layout.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 8]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]]
    assert layout.action_cols.tolist() == [3, 4, 6, 10]
    assert layout.action_pred_cols.tolist() == [2, 3, 5, 9]
    assert layout.value_cols.tolist() == [2, 5, 9]
    # A row budget smaller than both chains puts each in its own row.
    assert build_layout(_group_pair(), "packed", row_tokens=8).num_rows == 2


def test_tree_layout_shares_the_group_prompt_hand_example():
    layout = build_layout(_group_pair(), "tree", row_tokens=100)
    assert layout.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 6, 3]]
    assert layout.action_cols.tolist() == [3, 4, 6, 7]
    assert layout.action_pred_cols.tolist() == [2, 3, 5, 2]  # b's first token is read off the root
    assert layout.value_cols.tolist() == [2, 5, 2]
    visible = layout.tree_mask[0]
    assert visible[7].nonzero().flatten().tolist() == [0, 1, 2, 7]  # branch b sees the root only
    assert visible[6].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert layout.num_input_tokens == 8 < build_layout(_group_pair(), "packed").num_input_tokens == 11
