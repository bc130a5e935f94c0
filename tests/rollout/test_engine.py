import time
from pathlib import Path

import pytest
import torch

from steppo.core.batch import StepBatch, build_layout
from steppo.envs.base import EnvSettings
from steppo.envs.compass import CompassEnv
from steppo.rollout.engine import RolloutEngine, RolloutError, RolloutSettings
from steppo.rollout.local import LocalBackend


def make_engine(models, factory=None, kv_cache=True, **settings):
    kw = dict(max_new_tokens=6, num_envs=4, schedule="rounds", step_timeout_s=5.0)
    kw.update(settings)
    env = (factory or CompassEnv)()
    backend = LocalBackend(models.policy.model, {models.chat.end_of_turn_id}, 1.0, models.tokenizer.pad_token_id,
                           kv_cache=kv_cache)
    return RolloutEngine(factory or CompassEnv, models.chat, backend, RolloutSettings(**kw),
                         env.instructions(), env.settings)


def run(engine, n=6, split="train", **kw):
    tasks = CompassEnv().tasks(split)[:n]
    return engine.run(tasks, [t.id for t in tasks], seed=0, **kw)


def test_cumulative_context_extends_exactly_and_logprobs_match_the_trainer(tiny_models):
    engine = make_engine(tiny_models)
    result = run(engine)
    engine.close()
    assert len(result.trajectories) == 6
    for traj in result.trajectories:
        for prev, nxt in zip(traj.steps, traj.steps[1:]):
            assert nxt.prompt_ids[: len(prev.context_ids)] == prev.context_ids
        assert traj.steps[-1].done
    batch = StepBatch.from_trajectories(result.trajectories)
    layout = build_layout(result.trajectories, "prefix_shared", tiny_models.tokenizer.pad_token_id)
    assert layout.num_rows == len(result.trajectories)  # one chain per episode
    with torch.no_grad():
        lp, _, _ = tiny_models.policy(layout)
    assert float((lp - batch.old_logprobs).abs().max()) < 1e-4


def test_window_context_keeps_exact_ids_of_the_last_turns(tiny_models):
    chat = tiny_models.chat
    engine = make_engine(tiny_models, context="window", window=1)
    result = run(engine, n=4)
    engine.close()
    for traj in result.trajectories:
        first = traj.steps[0].prompt_ids
        for prev, step in zip(traj.steps, traj.steps[1:]):
            turn = prev.response_ids + chat.observation_ids(prev.info["observation"], not prev.response_truncated)
            assert step.prompt_ids == first + turn


def test_env_context_renders_a_fresh_prompt_each_step(tiny_models):
    engine = make_engine(tiny_models, context="env")
    result = run(engine, n=4)
    engine.close()
    for traj in result.trajectories:
        for prev, step in zip(traj.steps, traj.steps[1:]):
            text = tiny_models.tokenizer.decode(step.prompt_ids)
            assert f"Now: {prev.info['observation']}" in text
            assert "A treasure is buried" in text
        if len(traj.steps) >= 3:
            assert "Recent actions:" in tiny_models.tokenizer.decode(traj.steps[2].prompt_ids)


def test_response_budget_marks_truncated_responses(tiny_models):
    engine = make_engine(tiny_models, max_new_tokens=1)
    result = run(engine, n=3)
    engine.close()
    steps = [s for t in result.trajectories for s in t.steps]
    assert all(len(s.response_ids) == 1 for s in steps)
    cut = [s for s in steps if s.response_ids[-1] != tiny_models.chat.end_of_turn_id]
    assert cut and all(s.response_truncated for s in cut)


def test_context_overflow_ends_the_episode_as_truncated_without_crashing(tiny_models):
    first = make_engine(tiny_models, context_limit=10_000)
    probe = run(first, n=1).trajectories[0].steps[0]
    first.close()
    # Room for the first prompt but not for the second.
    engine = make_engine(tiny_models, context_limit=len(probe.prompt_ids) + 6 + 2)
    result = run(engine, n=4)
    engine.close()
    reasons = {e.end_reason for e in result.episodes}
    assert "context_overflow" in reasons
    for traj in result.trajectories:
        if traj.end_reason == "context_overflow":
            assert traj.truncated and traj.bootstrap_ids is None
    assert result.metrics()["rollout/context_overflows"] > 0
    # A first prompt over the budget: no steps, no trajectory, counted.
    tiny = make_engine(tiny_models, context_limit=8)
    out = run(tiny, n=2)
    tiny.close()
    assert out.trajectories == [] and all(e.end_reason == "context_overflow" for e in out.episodes)


def test_malformed_tool_calls_are_counted_not_fatal(tiny_models):
    def factory():
        return CompassEnv(EnvSettings(max_steps=3, format_penalty=-0.1), action_format="tool_call")
    engine = make_engine(tiny_models, factory=factory)
    result = run(engine, n=4)
    engine.close()
    m = result.metrics()
    assert m["rollout/malformed_action_frac"] > 0.5  # an untrained model rarely writes a valid call
    assert all(s.reward == pytest.approx(-0.1) for t in result.trajectories for s in t.steps if "Invalid action" in s.info["observation"])


class RaisingEnv(CompassEnv):
    def _act(self, action):
        if self.steps_taken >= 2:
            raise RuntimeError("simulator crashed")
        return super()._act(action)


class HangingEnv(CompassEnv):
    def _act(self, action):
        if self.task.seed % 2 == 0 and self.steps_taken >= 2:
            time.sleep(60)
        return super()._act(action)


def test_raising_environment_fails_only_its_episode(tiny_models):
    engine = make_engine(tiny_models, factory=lambda: RaisingEnv(EnvSettings(max_steps=5)))
    result = run(engine, n=4)
    engine.close()
    failed = [e for e in result.episodes if e.end_reason == "env_error"]
    assert failed and "simulator crashed" in failed[0].error
    assert result.metrics()["rollout/env_failures"] == len(failed)
    assert engine.pool.replaced == len(failed)


def test_an_environment_that_always_fails_is_a_clear_error(tiny_models):
    def broken():
        raise OSError("game files missing")

    engine = make_engine(tiny_models, factory=CompassEnv)
    engine.pool = type(engine.pool)(broken, 2)
    with pytest.raises(RolloutError, match="game files missing"):
        run(engine, n=2)


def test_hanging_environment_times_out_and_others_finish(tiny_models):
    engine = make_engine(tiny_models, factory=lambda: HangingEnv(EnvSettings(max_steps=4)), step_timeout_s=1.0,
                         schedule="continuous")
    t0 = time.perf_counter()
    result = run(engine, n=4)
    engine.close()
    assert time.perf_counter() - t0 < 30
    reasons = [e.end_reason for e in result.episodes]
    timed_out = [e for e in result.episodes if e.end_reason == "env_timeout"]
    assert timed_out and len(timed_out) < len(reasons)
    assert all(e.task.seed % 2 == 0 for e in timed_out)


def test_rounds_schedule_is_reproducible(tiny_models):
    outs = []
    for _ in range(2):
        engine = make_engine(tiny_models)
        outs.append([[s.response_ids for s in t.steps] for t in run(engine, n=5).trajectories])
        engine.close()
    assert outs[0] == outs[1]


def _hung_environment_is_replaced(tiny_models, kind):
    """Episodes on `kind` workers where every other environment hangs: those time out, their
    workers are replaced, the others finish."""
    import functools

    factory = functools.partial(HangingEnv, EnvSettings(max_steps=4))
    engine = make_engine(tiny_models, factory=factory, env_workers=kind, step_timeout_s=3.0,
                         schedule="continuous", num_envs=2)
    result = run(engine, n=4)
    engine.close()
    reasons = [e.end_reason for e in result.episodes]
    assert "env_timeout" in reasons and any(r != "env_timeout" for r in reasons)
    assert engine.pool.replaced >= 1
    return result


def test_process_workers_run_episodes_and_kill_a_hung_environment(tiny_models):
    result = _hung_environment_is_replaced(tiny_models, "process")
    ok = [t for t in result.trajectories if t.end_reason != "env_timeout"]
    for traj in ok:
        for prev, nxt in zip(traj.steps, traj.steps[1:]):
            assert nxt.prompt_ids[: len(prev.context_ids)] == prev.context_ids


def _same_episodes_as_threads(tiny_models, kind):
    outs = []
    for k in ("thread", kind):
        engine = make_engine(tiny_models, env_workers=k, num_envs=2)
        outs.append([[s.response_ids for s in t.steps] for t in run(engine, n=3).trajectories])
        engine.close()
    assert outs[0] == outs[1]


def test_process_workers_give_the_same_episodes_as_threads(tiny_models):
    _same_episodes_as_threads(tiny_models, "process")


class SlowEnv(CompassEnv):
    """Records when each step really ran (thread workers share the clock and this list).

    Instances take 0.1, 0.3 or 0.5 s per step, so steps that start together end apart and the
    engine has an early finisher to generate for while the others are still stepping (with one
    delay for all, every step could end before the next generation call starts)."""

    ran: list = []
    made = 0

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.delay = (0.1, 0.3, 0.5)[SlowEnv.made % 3]
        SlowEnv.made += 1

    def _act(self, action):
        start = time.perf_counter()
        time.sleep(self.delay)
        out = super()._act(action)
        SlowEnv.ran.append((start, time.perf_counter(), id(self)))
        return out


def test_environment_steps_overlap_each_other_and_generation(tiny_models):
    SlowEnv.ran.clear()
    engine = make_engine(tiny_models, factory=lambda: SlowEnv(EnvSettings(max_steps=4)), schedule="continuous", num_envs=6)
    result = run(engine, n=6)
    engine.close()

    def overlap(a, b):
        return min(a[1], b[1]) - max(a[0], b[0]) > 0

    ran = SlowEnv.ran
    across_envs = any(overlap(a, b) for a in ran for b in ran if a[2] != b[2])
    with_generation = any(overlap(c, g) for c in ran for g in result.generation_calls)
    assert across_envs and with_generation


@pytest.mark.parametrize("greedy", [True, False])
def test_kv_cached_rollout_matches_re_prefilling(tiny_models, greedy):
    """Same episodes (tokens and log-probs) with and without per-episode KV caches, and the
    cached run prefills only the new observation tokens."""
    runs = {}
    for kv_cache in (False, True):
        engine = make_engine(tiny_models, kv_cache=kv_cache, num_envs=6)
        result = run(engine, n=6, greedy=greedy)
        runs[kv_cache] = (result, engine.backend.prefill_tokens)
        engine.close()
    (plain, plain_prefill), (cached, cached_prefill) = runs[False], runs[True]
    assert [[s.response_ids for s in t.steps] for t in plain.trajectories] == [
        [s.response_ids for s in t.steps] for t in cached.trajectories
    ]
    a = torch.tensor([lp for t in plain.trajectories for s in t.steps for lp in s.logprobs])
    b = torch.tensor([lp for t in cached.trajectories for s in t.steps for lp in s.logprobs])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    assert plain_prefill == sum(len(s.prompt_ids) for t in plain.trajectories for s in t.steps)
    assert cached_prefill < plain_prefill / 2


@pytest.mark.slow
def test_ray_workers_give_the_same_episodes_and_kill_a_hung_environment(tiny_models):
    """Slow (Ray starts a worker process per actor): `python -m pytest -m slow -k ray`."""
    pytest.importorskip("ray")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    try:
        _same_episodes_as_threads(tiny_models, "ray")
        _hung_environment_is_replaced(tiny_models, "ray")
    finally:
        ray.shutdown()
