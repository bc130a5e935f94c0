import pytest

from steppo.envs.compass import CompassEnv


@pytest.mark.parametrize("action_format", ["text", "tool_call"])
@pytest.mark.parametrize("wall_prob", [0.0, 0.3])
def test_gold_path_reaches_success(action_format, wall_prob):
    env = CompassEnv(action_format=action_format, wall_prob=wall_prob)
    for task in env.tasks("dev")[:20]:
        obs, info = env.reset(task)
        assert "treasure is buried" in obs and info["anchor"] == "pos=0,0;t=0"
        for action in env.expert_actions(task):
            result = env.step(action)
        assert result.terminated and result.reward == 1.0 and result.info["success"]


def test_digging_in_the_wrong_place_ends_with_nothing():
    env = CompassEnv()
    task = env.tasks("train")[0]
    env.reset(task)
    result = env.step("dig")
    assert result.terminated and result.reward == 0.0 and not result.info["success"]


def test_invalid_and_malformed_actions_are_flagged_and_penalised():
    from steppo.envs.base import EnvSettings

    env = CompassEnv(EnvSettings(max_steps=8, invalid_action_penalty=-0.1))
    env.reset(env.tasks("train")[0])
    result = env.step("fly away")
    assert result.info["invalid_action"] and not result.terminated and result.reward == pytest.approx(-0.1)
    tool_env = CompassEnv(EnvSettings(format_penalty=-0.5), action_format="tool_call")
    tool_env.reset(tool_env.tasks("train")[0])
    result = tool_env.step("go north")  # not a tool call
    assert result.info["malformed"] and result.reward == pytest.approx(-0.5)
    assert "Invalid action" in result.observation


def test_anchor_is_the_canonical_position_not_the_text():
    env = CompassEnv(wall_prob=0.0)
    env.reset(env.tasks("train")[0])
    env.step("go north")
    env.step("go east")
    a = env.anchor()
    env.reset(env.tasks("train")[0])
    env.step("go east")
    env.step("go north")
    assert env.anchor() == a == "pos=1,1;t=2"


def test_splits_are_disjoint_and_deterministic():
    env = CompassEnv()
    ids = {s: {t.id for t in env.tasks(s)} for s in ("train", "dev", "test")}
    assert not (ids["train"] & ids["dev"]) and not (ids["train"] & ids["test"]) and not (ids["dev"] & ids["test"])
    assert [t.payload for t in env.tasks("dev")[:5]] == [t.payload for t in CompassEnv().tasks("dev")[:5]]
    with pytest.raises(ValueError, match="splits"):
        env.tasks("valid_unseen")
