import pickle
import threading

import pytest

pytest.importorskip("textworld")

from steppo.envs import textworld_games  # noqa: E402
from steppo.envs.base import EnvError, EnvSettings  # noqa: E402
from steppo.envs.textworld_games import TextWorldEnv, clean_feedback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Game .* is not fully supported")  # jericho, see the module

TINY = {
    "tw-simple": {},
    "tw-coin_collector": {"level": 1},
    "custom": {"world_size": 2, "nb_objects": 2, "quest_length": 1},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("textworld_cache")


def make(cache, challenge, **kw):
    return TextWorldEnv(challenge=challenge, challenge_settings=TINY[challenge], cache_dir=str(cache), **kw)


@pytest.mark.parametrize("challenge", sorted(TINY))
def test_walkthrough_wins(cache, challenge):
    env = make(cache, challenge)
    task = env.tasks("train")[0]
    obs, info = env.reset(task)
    assert "-= " in obs and "$$" not in obs and not obs.endswith("=-0/1")  # banner and status line gone
    assert "Admissible commands:" in obs and "look" in info["admissible"] and info["anchor"]
    total = 0.0
    for action in env.expert_actions(task):
        result = env.step(action)
        assert not result.info.get("invalid_action"), action
        total += result.reward
    assert result.terminated and result.info["success"] and total == result.info["score"] > 0
    assert "Would you like to RESTART" not in result.observation
    with pytest.raises(EnvError, match="after the TextWorld episode ended"):
        env.step("look")
    env.close()


def test_invalid_command_is_flagged_penalised_and_changes_nothing(cache):
    env = make(cache, "tw-coin_collector", settings=EnvSettings(max_steps=50, invalid_action_penalty=-0.1))
    _, info = env.reset(env.tasks("train")[0])
    result = env.step("dance wildly")
    assert result.info["invalid_action"] and not result.terminated and result.reward == pytest.approx(-0.1)
    assert result.info["anchor"] == info["anchor"] and result.info["score"] == 0
    assert not env.step("take coin").info.get("invalid_action")
    env.close()


def test_anchor_is_stable_under_look_and_inventory_and_changes_after_a_real_move(cache):
    env = make(cache, "tw-simple")
    task = env.tasks("train")[0]
    _, info = env.reset(task)
    assert env.step("look").info["anchor"] == info["anchor"]
    assert env.step("inventory").info["anchor"] == info["anchor"]
    assert env.step(env.expert_actions(task)[0]).info["anchor"] != info["anchor"]
    env.close()


def test_intermediate_reward_follows_the_winning_policy(cache):
    env = make(cache, "tw-simple", intermediate_reward=True)
    task = env.tasks("train")[0]
    env.reset(task)
    assert env.step("examine king-size bed").reward == 0.0
    env.reset(task)
    assert [env.step(a).reward for a in env.expert_actions(task)[:2]] == [1.0, 1.0]
    env.close()


def test_games_are_generated_once_and_reused(cache, monkeypatch):
    env = make(cache, "tw-coin_collector")
    task = env.tasks("train")[0]
    env.reset(task)
    game = env.game_dir(task) / "game.z8"
    mtime = game.stat().st_mtime_ns

    def no_generation(*args):
        raise AssertionError("the cached game was generated again")

    monkeypatch.setattr(textworld_games, "generate_game", no_generation)
    again = make(cache, "tw-coin_collector")
    again.reset(task)
    assert again.expert_actions(task) == ["take coin"] and game.stat().st_mtime_ns == mtime
    env.close()
    again.close()


def test_concurrent_first_resets_generate_one_complete_game(cache):
    envs = [make(cache, "tw-coin_collector") for _ in range(2)]
    task = envs[0].tasks("dev")[0]
    threads = [threading.Thread(target=env.reset, args=(task,)) for env in envs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = envs[0].game_dir(task)
    assert sorted(p.name for p in folder.iterdir()) == ["game.json", "game.ni", "game.z8"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folder left
    for env in envs:
        assert env.step("take coin").info["success"]
        env.close()


def test_splits_use_disjoint_seeds_and_held_out_content():
    env = TextWorldEnv(challenge="tw-cooking", num_tasks={"train": 5, "dev": 5, "test": 5})
    seeds = {s: {t.seed for t in env.tasks(s)} for s in ("train", "dev", "test")}
    assert not (seeds["train"] & seeds["dev"] or seeds["train"] & seeds["test"] or seeds["dev"] & seeds["test"])
    assert [t.payload["settings"]["split"] for t in (env.tasks(s)[0] for s in ("train", "dev", "test"))] == [
        "train", "valid", "test"]
    assert env.tasks("dev") == TextWorldEnv(challenge="tw-cooking", num_tasks={"dev": 5}).tasks("dev")
    simple = TextWorldEnv(challenge="tw-simple", num_tasks={"test": 1})
    assert simple.tasks("test")[0].payload["settings"]["test"]
    assert not simple.tasks("train")[0].payload["settings"]["test"]
    with pytest.raises(ValueError, match="splits"):
        env.tasks("valid")


@pytest.mark.parametrize("kwargs, message", [
    ({"challenge": "zork"}, "unknown textworld challenge"),
    ({"challenge": "tw-coin_collector", "challenge_settings": {"level": 0}}, "1..300"),
    ({"challenge": "tw-coin_collector", "challenge_settings": {"lvl": 3}}, "no setting"),
    ({"challenge": "tw-simple", "challenge_settings": {"rewards": "often"}}, "one of"),
    ({"challenge": "tw-cooking", "challenge_settings": {"recipe": 1, "take": 2}}, "take <= recipe"),
    ({"challenge": "custom", "challenge_settings": {"world_size": 2.5}}, "integer"),
    ({"challenge": "custom", "num_tasks": {"train": -1}}, "num_tasks"),
])
def test_bad_params_give_env_errors(kwargs, message):
    with pytest.raises(EnvError, match=message):
        TextWorldEnv(**kwargs)


def test_clean_feedback_strips_the_banner_prompt_and_status_line():
    raw = ("\n\n  ________  __\n |        \\|  \\\n  \\$$$$$$$$| $$\n\nYour objective is to win.\n\n"
           "-= Den =-\nA den.\n\n\n\n>          -= Den =-0/1")
    assert clean_feedback(raw, at_reset=True) == "Your objective is to win.\n\n-= Den =-\nA den."


def test_registry_factory_builds_the_env_and_pickles(cache):
    from steppo.config import EnvConfig
    from steppo.envs.registry import env_factory

    params = {"challenge": "tw-coin_collector", "challenge_settings": {"level": 1}, "cache_dir": str(cache)}
    factory = pickle.loads(pickle.dumps(env_factory(EnvConfig(name="textworld", params=params))))
    env = factory()
    assert isinstance(env, TextWorldEnv) and env.settings.max_steps == 50
    obs, _ = env.reset(env.tasks("train")[0])
    assert "coin" in obs
    env.close()
