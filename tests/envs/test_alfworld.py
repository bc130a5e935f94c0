import pytest

pytest.importorskip("alfworld")
pytest.importorskip("textworld")

from steppo.envs.alfworld import ALFWorldEnv  # noqa: E402
from steppo.envs.base import EnvError  # noqa: E402
from steppo.paths import default_data_dir  # noqa: E402

if default_data_dir() is None or not (default_data_dir() / "alfworld" / "manifest.jsonl").exists():
    pytest.skip("ALFWorld game files not available (set STEPPO_DATA)", allow_module_level=True)


@pytest.fixture(scope="module")
def env():
    e = ALFWorldEnv()
    yield e
    e.close()


def test_splits_follow_the_paper_and_never_overlap(env):
    train, seen, unseen = env.tasks("train"), env.tasks("valid_seen"), env.tasks("valid_unseen")
    assert (len(train), len(seen), len(unseen)) == (401, 140, 134)
    files = [{t.payload["game_file"] for t in ts} for ts in (train, seen, unseen)]
    assert not (files[0] & files[1]) and not (files[0] & files[2]) and not (files[1] & files[2])
    assert [t.id for t in env.tasks("dev")] == [t.id for t in seen]
    assert [t.id for t in env.tasks("test")] == [t.id for t in unseen]
    assert {t.payload["task_type"] for t in seen} == set(
        ["pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
         "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"]
    )


@pytest.mark.parametrize("split", ["train", "valid_seen", "valid_unseen"])
def test_walkthrough_wins(env, split):
    task = env.tasks(split)[3]
    obs, info = env.reset(task)
    assert "Your task is to:" in obs and "Admissible commands:" in obs and "Welcome" not in obs
    for action in env.expert_actions(task):
        result = env.step(action)
        assert not result.info["invalid_action"], action
    assert result.terminated and result.reward == 1.0 and result.info["success"]


def test_invalid_action_changes_nothing_and_anchor_is_the_state(env):
    task = env.tasks("valid_seen")[0]
    env.reset(task)
    start = env.anchor()
    result = env.step("dance with the fridge")
    assert result.info["invalid_action"] and result.reward == 0.0 and not result.terminated
    assert env.anchor() == start
    env.step(env.expert_actions(task)[0])
    assert env.anchor() != start


def test_task_type_filter_and_missing_data_are_clear():
    env = ALFWorldEnv(task_types=["pick_two_obj_and_place"])
    assert {t.payload["task_type"] for t in env.tasks("train")} == {"pick_two_obj_and_place"}
    with pytest.raises(EnvError, match="unknown ALFWorld task types"):
        ALFWorldEnv(task_types=["juggle"])
    with pytest.raises(FileNotFoundError, match="data_dir"):
        ALFWorldEnv(data_dir="/nonexistent/alfworld")
