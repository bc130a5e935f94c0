import pickle

import pytest

pytest.importorskip("bm25s")

from steppo.envs.actions import tool_call_text  # noqa: E402
from steppo.envs.base import EnvSettings  # noqa: E402
from steppo.envs.qa_data import (  # noqa: E402
    Passage,
    PassageIndex,
    exact_match,
    f1_score,
    hash_split,
    normalize_answer,
    synthetic_kb,
)
from steppo.envs.searchqa import SearchQAEnv  # noqa: E402
from steppo.paths import default_data_dir  # noqa: E402

SMALL = {"train": 60, "dev": 10, "test": 10}


def synthetic(hops=2, settings=None, **kw):
    return SearchQAEnv(settings, source="synthetic", hops=hops, num_tasks=SMALL, **kw)


def play(env, task, actions):
    env.reset(task)
    for action in actions:
        result = env.step(action)
        if result.terminated or result.truncated:
            break
    return result


def data_folder(name):
    root = default_data_dir()
    if root is None or not (root / name).is_dir():
        pytest.skip(f"no {name} data: set STEPPO_DATA to a folder holding {name}/")
    return root / name


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  an   apple, a pear ", "apple pear"),
        ("Theodore", "theodore"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_uses_normalisation_and_aliases():
    assert exact_match("the Beatles.", ["Beatles"]) == 1.0
    assert exact_match("Stanley Hall", ["G. Stanley Hall", "Stanley Hall"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0


def test_f1_by_hand():
    # pred {barack, obama, jr} vs gold {barack, obama}: P = 2/3, R = 1, F1 = 0.8
    assert f1_score("Barack Obama Jr.", ["Barack Obama"]) == pytest.approx(0.8)
    assert f1_score("Paris", ["London"]) == 0.0
    assert f1_score("the cat", ["cat"]) == 1.0
    assert f1_score("no", ["yes"]) == 0.0 and f1_score("yes it is", ["yes"]) == 0.0
    assert f1_score("Obama", ["Michelle Obama", "Barack Obama"]) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- synthetic world


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_synthetic_gold_path_reaches_reward_one(hops):
    env = synthetic(hops)
    for task in env.tasks("dev"):
        actions = env.expert_actions(task)
        assert len(actions) == hops + 1  # one search per hop, then the answer
        env.reset(task)
        for action in actions[:-1]:
            assert not env.step(action).terminated
        q = env._questions[task.payload["qid"]]
        assert set(q.support) <= env.retrieved  # the title queries find every gold passage
        result = env.step(actions[-1])
        assert result.terminated and result.reward == 1.0 and result.info["success"] and result.info["f1"] == 1.0


def test_synthetic_world_is_deterministic_and_needs_search():
    a, b = synthetic_kb(3, 2, SMALL), synthetic_kb(3, 2, SMALL)
    assert a.passages == b.passages and a.splits == b.splits
    assert synthetic_kb(4, 2, SMALL).passages != a.passages
    for q in a.splits["test"]:
        assert q.answers[0] not in q.question  # the answer is only in the passages
    titles = {s: {p.title for q in a.splits[s] for p in a.passages if p.id in q.support} for s in a.splits}
    assert not titles["train"] & titles["test"]  # each split has its own entities


def test_shared_world_asks_new_questions_about_the_same_entities():
    data = synthetic_kb(3, 2, SMALL, world_entities=12)
    assert data.passages == synthetic_kb(3, 2, SMALL, world_entities=12).passages
    assert len(data.passages) == 12 * 5
    asked = {s: {(q.support, q.question) for q in data.splits[s]} for s in data.splits}
    assert not asked["train"] & asked["test"] and not asked["train"] & asked["dev"]
    starts = {s: {q.support[0] for q in data.splits[s]} for s in data.splits}
    assert starts["train"] & starts["test"]  # one world: test questions start at trained entities
    env = SearchQAEnv(source="synthetic", num_tasks=SMALL, world_entities=12)
    task = env.tasks("test")[0]
    result = play(env, task, env.expert_actions(task))
    assert result.terminated and result.reward == 1.0


def test_wrong_answer_gives_zero_and_partial_f1():
    env = synthetic()
    task = next(t for t in env.tasks("train") if len(t.payload["answer"].split()) == 2)
    result = play(env, task, [tool_call_text("answer", text="Nobody Inparticular")])
    assert result.terminated and result.reward == 0.0 and not result.info["success"]
    assert result.info["f1"] == 0.0
    result = play(env, task, [tool_call_text("answer", text=task.payload["answer"].split()[0])])
    assert result.reward == 0.0 and result.info["f1"] == pytest.approx(2 / 3)  # P = 1, R = 1/2


def test_malformed_and_unknown_tool_calls_are_flagged_and_the_episode_continues():
    env = synthetic(settings=EnvSettings(max_steps=6, format_penalty=-0.5, max_new_tokens=128))
    task = env.tasks("train")[0]
    env.reset(task)
    for bad in [
        "I think the answer is 42.",  # no tool call
        '<tool_call>{"name": "search", "arguments": {"query": </tool_call>',  # bad JSON
        tool_call_text("lookup", query="x"),  # unknown tool
        tool_call_text("search"),  # missing argument
    ]:
        result = env.step(bad)
        assert result.info["malformed"] and result.info["invalid_action"]
        assert result.reward == pytest.approx(-0.5) and not result.terminated
    result = env.step(tool_call_text("search", query="   "))
    assert result.info["invalid_action"] and not result.terminated
    for action in env.expert_actions(task):  # the episode still goes on to the answer
        result = env.step(action)
    assert result.terminated and result.reward == 1.0


def test_running_out_of_steps_truncates_with_zero():
    env = synthetic(settings=EnvSettings(max_steps=2, max_new_tokens=128))
    env.reset(env.tasks("train")[0])
    first = env.step(tool_call_text("search", query="anything"))
    assert "answer now" in first.observation and not first.truncated
    last = env.step(tool_call_text("search", query="something"))
    assert last.truncated and last.reward == 0.0 and last.info["f1"] == 0.0


def test_search_shows_numbered_clipped_passages():
    env = synthetic(top_k=2, passage_chars=40)
    env.reset(env.tasks("train")[0])
    lines = env.step(tool_call_text("search", query="company")).observation.splitlines()
    assert [line[:4] for line in lines] == ["[1] ", "[2] "]
    assert all(" is a company." in line and len(line.split(": ", 1)[1]) <= 43 for line in lines)
    assert env.step(tool_call_text("search", query="qqqzzz")).observation.startswith("No passage")


def test_bm25_finds_the_passage_by_exact_title():
    passages = [
        Passage("p0", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level."),
        Passage("p1", "Nuptse", "Nuptse is a mountain two kilometres WSW of Mount Everest."),
        Passage("p2", "Texas Highways", "Texas Highways is a monthly magazine."),
        Passage("p3", "Human Events", "Human Events is a political news website."),
    ]
    index = PassageIndex(passages)
    assert index.search("Texas Highways", 3)[0] == 2
    assert index.search("Nuptse", 3) == [1]
    assert index.search("the of", 3) == [] and index.search("", 3) == []


def test_anchor_is_the_retrieved_set_not_the_text():
    env = synthetic()
    task = env.tasks("train")[0]
    _, info = env.reset(task)
    start = info["anchor"]
    assert env.step("not a tool call").info["anchor"] == start  # nothing found, same state
    search = env.expert_actions(task)[:-1]
    after_one = env.step(search[0]).info["anchor"]
    assert after_one != start
    assert env.step(search[0]).info["anchor"] == after_one  # the same search again: same state
    env.reset(task)
    assert env.anchor() == start
    other = env.tasks("train")[1]
    env.reset(other)
    assert env.anchor() != start  # the question is part of the state


def test_splits_are_disjoint_and_deterministic():
    env = synthetic()
    ids = {s: {t.id for t in env.tasks(s)} for s in ("train", "dev", "test")}
    assert [len(ids[s]) for s in ("train", "dev", "test")] == [60, 10, 10]
    assert not (ids["train"] & ids["dev"]) and not (ids["train"] & ids["test"]) and not (ids["dev"] & ids["test"])
    assert env.tasks("dev") == synthetic().tasks("dev")
    with pytest.raises(ValueError, match="splits"):
        env.tasks("valid")
    assert {hash_split(f"q{i}") for i in range(200)} == {"train", "dev", "test"}
    # sha256(id) % 10: 0-7 train, 8 dev, 9 test (pinned, so the split never drifts)
    assert [hash_split(q) for q in ("5a7613c15542994ccc9186bf", "5adfdef9554299025d62a36b")] == ["train", "test"]


def test_payload_is_small():
    env = synthetic()
    task = env.tasks("train")[0]
    assert set(task.payload) <= {"question", "answer", "aliases", "qid", "task_type"}
    assert task.id == f"searchqa/synthetic/train/{task.payload['qid']}"


def test_registry_factory_builds_and_pickles():
    from steppo.config import EnvConfig
    from steppo.envs.registry import env_factory

    factory = env_factory(EnvConfig(name="searchqa", params={"source": "synthetic", "num_tasks": SMALL}))
    clone = pickle.loads(pickle.dumps(factory))
    env = clone()
    assert isinstance(env, SearchQAEnv) and env.settings.max_steps == 6 and env.settings.max_new_tokens == 128
    task = env.tasks("train")[0]
    assert play(env, task, env.expert_actions(task)).reward == 1.0
    assert env.index is factory().index  # one index per corpus per process


# ----------------------------------------------------------------------------- real data


def test_hotpotqa_splits_and_gold_paths():
    folder = data_folder("hotpotqa")
    env = SearchQAEnv(source="hotpotqa", data_dir=str(folder))
    sizes = {s: len(env.tasks(s)) for s in ("train", "dev", "test")}
    assert sum(sizes.values()) == 588 and min(sizes.values()) > 0
    ids = {s: {t.payload["qid"] for t in env.tasks(s)} for s in sizes}
    assert not (ids["train"] & (ids["dev"] | ids["test"])) and not (ids["dev"] & ids["test"])
    assert all(hash_split(qid) == s for s in ids for qid in ids[s])
    for task in env.tasks("dev")[:5] + env.tasks("train")[:5]:
        result = play(env, task, env.expert_actions(task))
        assert result.terminated and result.reward == 1.0 and result.info["success"]
    assert len(env.data.passages) >= 5721


def test_musique_is_an_evaluation_set_with_gold_paths():
    folder = data_folder("musique")
    env = SearchQAEnv(source="musique", data_dir=str(folder))
    assert len(env.tasks("test")) == 100 and env.tasks("train") == [] and env.tasks("dev") == []
    for task in env.tasks("test")[:5]:
        assert "hop" in task.payload["task_type"]
        result = play(env, task, env.expert_actions(task))
        assert result.terminated and result.reward == 1.0


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        SearchQAEnv(source="hotpotqa", data_dir=str(tmp_path / "nowhere"))
