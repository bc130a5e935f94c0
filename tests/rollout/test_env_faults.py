"""Bad environment outputs end their episode as ``env_error`` with the reason, never the run
(issue 13, item 3); failed episodes are not trajectories nor successes (item 2)."""

from __future__ import annotations

import pytest

from steppo.envs.actions import parse_tool_call
from steppo.envs.base import EnvSettings, Transition
from steppo.envs.compass import CompassEnv
from tests.rollout.test_engine import make_engine, run


class BadStepEnv(CompassEnv):
    """From its second step on, `step` returns `self.bad` (odd seeds only)."""

    bad: object = None

    def step(self, response):
        out = super().step(response)
        if self.steps_taken >= 2 and self.task.seed % 2 == 1:
            return self.bad(out)
        return out


BAD = {
    "none observation": (lambda t: t._replace(observation=None), "None observation"),
    "nan reward": (lambda t: t._replace(reward=float("nan")), "non-finite reward nan"),
    "inf reward": (lambda t: t._replace(reward=float("inf")), "non-finite reward inf"),
    "str reward": (lambda t: t._replace(reward="1"), "as reward (expected a number)"),
    "short tuple": (lambda t: tuple(t)[:3], "got a tuple of length 3"),
    "string": (lambda t: "moved north", "got str 'moved north'"),
    "info none": (lambda t: t._replace(info=None), "None as info"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_step_output_ends_the_episode_not_the_run(tiny_models, case):
    make_bad, message = BAD[case]
    cls = type("Bad", (BadStepEnv,), {"bad": staticmethod(make_bad)})
    engine = make_engine(tiny_models, factory=lambda: cls(EnvSettings(max_steps=3)), num_envs=2)
    result = run(engine, n=4)
    engine.close()
    failed = result.failed
    assert failed and all(e.end_reason == "env_error" and message in e.error for e in failed), \
        [e.error for e in failed]
    assert any(e.end_reason != "env_error" for e in result.episodes)  # the others played on
    assert {t.task_id for t in result.trajectories}.isdisjoint({e.task.id for e in failed})
    m = result.metrics()
    assert m["rollout/env_failures"] == len(failed)
    ok = [e for e in result.episodes if e not in failed]
    assert m["rollout/success"] == pytest.approx(sum(e.success for e in ok) / len(ok))


class NoneResetEnv(CompassEnv):
    def reset(self, task):
        return (None, {}) if task.seed % 2 else super().reset(task)


def test_none_observation_at_reset_fails_the_episode(tiny_models):
    engine = make_engine(tiny_models, factory=lambda: NoneResetEnv(EnvSettings(max_steps=2)), num_envs=2)
    result = run(engine, n=4)
    engine.close()
    failed = result.failed
    assert failed and all("reset() returned a None observation" in e.error for e in failed)
    assert len(result.trajectories) == 4 - len(failed)


def test_deeply_nested_tool_call_json_is_a_malformed_action():
    deep = "<tool_call>" + "[" * 100_000 + "]" * 100_000 + "</tool_call>"
    assert "nested too deeply" in parse_tool_call(deep).reason
    env = CompassEnv(EnvSettings(max_steps=3, format_penalty=-0.1), action_format="tool_call")
    env.reset(env.tasks("train")[0])
    out = env.step(deep)
    assert isinstance(out, Transition) and out.info["malformed"] and "nested too deeply" in out.observation
    args = '<tool_call>{"name": "move", "arguments": "' + "[" * 100_000 + '"}</tool_call>'
    assert "nested too deeply" in parse_tool_call(args).reason
