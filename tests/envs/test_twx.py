import pickle

import pytest

pytest.importorskip("textworld_express")

from steppo.envs.base import EnvError, EnvSettings  # noqa: E402
from steppo.envs.twx import TextWorldExpressEnv  # noqa: E402

SMALL = {
    "coin": {"numLocations": 3, "includeDoors": 0},
    "cookingworld": {"numLocations": 2, "numIngredients": 2, "numDistractorItems": 2, "includeDoors": 0},
    "twc": {"numLocations": 2, "numItemsToPutAway": 2},
    "mapreader": {"numLocations": 5, "maxDistanceApart": 2},
}


@pytest.fixture(scope="module")
def envs():
    made = {game: TextWorldExpressEnv(game=game, game_params=params) for game, params in SMALL.items()}
    yield made
    for env in made.values():
        env.close()


@pytest.mark.parametrize("game", sorted(SMALL))
def test_gold_path_reaches_success(envs, game):
    env = envs[game]
    for task in env.tasks("train")[:2] + env.tasks("test")[:1]:
        obs, info = env.reset(task)
        assert obs.startswith("Your task is") or obs.startswith("You are hungry")
        assert "Admissible commands:" in obs and set(info["admissible"]) and info["anchor"]
        actions = env.expert_actions(task)
        assert actions == env.expert_actions(task)  # cached: the jar may return another path later
        for action in actions:
            result = env.step(action)
            assert not result.info.get("invalid_action"), action
        assert result.terminated and result.info["success"]
        assert result.info["score"] == pytest.approx(1.0)


def test_expert_actions_leave_the_episode_in_progress_untouched(envs):
    env = envs["cookingworld"]
    task, other = env.tasks("train")[:2]
    env.reset(task)
    env.step("take cookbook")
    anchor = env.anchor()
    env.expert_actions(other)
    assert env.anchor() == anchor
    assert env.step("read cookbook").observation.startswith("Gather all following ingredients")


def test_invalid_action_is_flagged_penalised_and_changes_nothing():
    env = TextWorldExpressEnv(EnvSettings(max_steps=None, invalid_action_penalty=-0.1), game="coin",
                              game_params=SMALL["coin"])
    try:
        obs, info = env.reset(env.tasks("train")[0])
        result = env.step("fly to the moon")
        assert result.info["invalid_action"] and not result.terminated
        assert result.reward == pytest.approx(-0.1) and result.info["anchor"] == info["anchor"]
        assert env.settings.max_steps == 40  # the game's default
    finally:
        env.close()


def test_anchor_is_stable_under_a_no_op_and_changes_after_a_move(envs):
    for game, move in (("coin", "move"), ("cookingworld", "take cookbook")):
        env = envs[game]
        _, info = env.reset(env.tasks("train")[0])
        assert env.step("look around").info["anchor"] == info["anchor"]
        assert env.step("inventory").info["anchor"] == info["anchor"]
        command = next(a for a in info["admissible"] if a.startswith(move))
        assert env.step(command).info["anchor"] != info["anchor"]


def test_commands_match_case_insensitively(envs):
    # Responses arrive lower-cased (parse_command); twc objects may not be ("dirty green T-shirt").
    env = envs["twc"]
    task = env.tasks("train")[3]
    actions = env.expert_actions(task)
    assert any(a != a.lower() for a in actions)
    env.reset(task)
    for action in actions:
        result = env.step(action.lower())
        assert not result.info.get("invalid_action"), action
    assert result.info["success"]


def test_splits_are_the_package_folds_disjoint_and_deterministic():
    env = TextWorldExpressEnv(game="coin", num_tasks={"train": 5, "dev": 5, "test": 5})
    seeds = {s: [t.seed for t in env.tasks(s)] for s in ("train", "dev", "test")}
    assert seeds == {"train": [0, 1, 2, 3, 4], "dev": list(range(10000, 10005)), "test": list(range(20000, 20005))}
    ids = {s: {t.id for t in env.tasks(s)} for s in seeds}
    assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])
    assert env.tasks("dev")[0].payload == {"task_type": "coin", "game": "coin", "params": {}, "fold": "dev"}
    assert env.tasks("test") == TextWorldExpressEnv(game="coin", num_tasks={"test": 5}).tasks("test")
    with pytest.raises(ValueError, match="splits"):
        env.tasks("valid")


@pytest.mark.parametrize("kwargs, message", [
    ({"game": "zork"}, "unknown twx game"),
    ({"game": "coin", "game_params": {"numRooms": 3}}, "no param"),
    ({"game": "coin", "game_params": {"numLocations": "abc"}}, "must be an integer"),
    ({"game": "twc", "game_params": {"numLocations": 4}}, "1..3"),
    ({"game": "coin", "num_tasks": {"train": 5000}}, "num_tasks"),
])
def test_bad_params_give_env_errors(kwargs, message):
    with pytest.raises(EnvError, match=message):
        TextWorldExpressEnv(**kwargs)


def test_unplayable_params_give_an_env_error_at_reset():
    env = TextWorldExpressEnv(game="mapreader", game_params={"numLocations": 2, "maxDistanceApart": 8})
    try:
        with pytest.raises(EnvError, match="could not generate mapreader"):
            for task in env.tasks("train")[:20]:
                env.reset(task)
    finally:
        env.close()


def test_registry_factory_builds_the_env_and_pickles():
    from steppo.config import EnvConfig
    from steppo.envs.registry import env_factory

    factory = env_factory(EnvConfig(name="twx", max_steps=12, params={"game": "twc", "game_params": SMALL["twc"]}))
    factory = pickle.loads(pickle.dumps(factory))
    env = factory()
    try:
        assert isinstance(env, TextWorldExpressEnv) and env.settings.max_steps == 12
        obs, _ = env.reset(env.tasks("dev")[0])
        assert obs.startswith("Your task is to pick up objects")
    finally:
        env.close()
