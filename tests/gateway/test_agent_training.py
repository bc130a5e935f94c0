"""``steppo train env=agent``: an OpenAI-SDK agent (examples/searchqa_agent.py) trained through
the gateway, through the real entry point; and agents that fail or return garbage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from steppo.cli import main
from steppo.gateway.pool import read_pool
from tests.test_cli_runs import TINY

pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[2]
FAST = [a for a in TINY if not a.startswith(("rollout.max_new_tokens", "env.max_steps"))] + ["rollout.max_new_tokens=24"]


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from examples.searchqa_agent import write_tasks

    path = tmp_path / "tasks.jsonl"
    write_tasks(str(path), train=20, dev=4)
    return path


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_an_openai_sdk_agent_trains_through_the_gateway(tmp_path, tasks):
    out = tmp_path / "run"
    assert main(["train", *FAST, "env.name=agent", "env.params={entrypoint: 'examples.searchqa_agent:run', tasks: "
                 f"'{tasks}', concurrency: 4}}", "trainer.iterations=2", f"run.output_dir={out}"]) == 0
    rows = [r for r in _rows(out) if r["iteration"] >= 1]
    assert [r["iteration"] for r in rows] == [1, 2]
    assert all(r["gateway/retokenized_turns"] == 0 and r["gateway/prefix_extended_frac"] == 1.0 for r in rows)
    assert all("policy/loss" in r and r["rollout/episodes"] == 4 for r in rows)
    pool = read_pool(out / "pool")
    assert len(pool.trajectories) >= 8 and not pool.skipped  # training and evaluation episodes, all in the pool
    assert all(s.policy_version in (0, 1, 2) for t in pool.trajectories for s in t.steps)
    assert {s.policy_version for t in pool.trajectories for s in t.steps} >= {0, 1}


def test_asynchronous_training_consumes_the_agents_episodes_with_their_step_level_weights(tmp_path, tasks):
    """trainer.async_rollout: the agents play the next iteration (through the gateway, on the
    rollout thread) while this one updates; the lag is measured and bounded by the staleness."""
    out = tmp_path / "run"
    assert main(["train", *FAST, "env.name=agent", "env.params={entrypoint: 'examples.searchqa_agent:run', tasks: "
                 f"'{tasks}', concurrency: 4}}", "trainer.iterations=3", "trainer.async_rollout=true",
                 "trainer.staleness=1", f"run.output_dir={out}"]) == 0
    rows = [r for r in _rows(out) if "policy/loss" in r]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert max(r["async/staleness_max"] for r in rows) == 1 and all(r["async/staleness_max"] <= 1 for r in rows)
    assert all(r["gateway/retokenized_turns"] == 0 for r in rows)


BROKEN = '''
import math
def raises(task, base_url):
    raise RuntimeError("the agent crashed")
def nan(task, base_url):
    import openai
    openai.OpenAI(base_url=base_url, api_key="x").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    return math.nan
'''


@pytest.mark.parametrize("fn, why", [("raises", "RuntimeError: the agent crashed"), ("nan", "finite number")])
def test_an_agent_that_crashes_or_returns_nan_stops_clearly_and_is_never_trained_on(tmp_path, tasks, monkeypatch,
                                                                                   capsys, fn, why):
    (tmp_path / "broken_agent.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("broken_agent", None)
    out = tmp_path / "run"
    rc = main(["train", *FAST, "env.name=agent", f"env.params={{entrypoint: 'broken_agent:{fn}', tasks: '{tasks}'}}",
               "trainer.iterations=2", f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 1 and "every agent episode of this round failed" in err and why in err
    rows = _rows(out) if (out / "metrics.jsonl").exists() else []
    assert not any("policy/loss" in r for r in rows)  # nothing was trained on
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("iter_*"))
    for t in read_pool(out / "pool").trajectories:  # what reached the pool is marked, not a finished episode
        assert t.end_reason == "agent_error" and t.steps[-1].truncated


def test_a_smolagents_agent_runs_rollouts_and_an_update_through_the_gateway(tmp_path, tasks):
    pytest.importorskip("smolagents")
    out = tmp_path / "run"
    assert main(["train", *FAST, "env.name=agent", "env.params={entrypoint: 'examples.smolagents_searchqa:run', "
                 f"tasks: '{tasks}', concurrency: 4}}", "trainer.iterations=1", "rollout.context_limit=8192",
                 f"run.output_dir={out}"]) == 0
    [row] = [r for r in _rows(out) if r["iteration"] == 1]
    assert "policy/loss" in row and row["gateway/steps"] >= 4
    # smolagents re-renders its memory: counted, never silent
    assert row["gateway/retokenized_turns"] > 0 or row["gateway/prefix_extended_frac"] == 1.0


KILLER = '''
import os, signal
from pathlib import Path
import openai

def run(task, base_url):
    marker = Path(os.environ["KILL_MARKER"])
    if "/sessions/it2-2-" in base_url and not marker.exists():  # the third episode of iteration 2
        marker.write_text(base_url)
        os.kill(os.getpid(), signal.SIGKILL)
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": task["id"]}], max_tokens=4)
    return float(len(r.choices[0].message.content or "") % 2)
'''


def test_a_trainer_killed_mid_round_resumes_from_the_pool_without_losing_or_repeating_an_episode(tmp_path, tasks):
    """kill -9 during iteration 2 (two of its four episodes finished in the pool), then --resume:
    iteration 2 is replayed with its two finished episodes taken from the pool, not played again."""
    import os
    import subprocess

    (tmp_path / "killer_agent.py").write_text(KILLER)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "steppo.cli", "train", *FAST, "env.name=agent",
            f"env.params={{entrypoint: 'killer_agent:run', tasks: '{tasks}', concurrency: 1}}",
            "trainer.iterations=3", f"run.output_dir={out}"]
    env = {**os.environ, "KILL_MARKER": str(tmp_path / "killed"), "PYTHONPATH": str(ROOT)}
    first = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == -9 and (tmp_path / "killed").exists(), first.stderr[-2000:]
    before = read_pool(out / "pool").trajectories
    it2 = [t.group_id for t in before if t.group_id.startswith("it2-")]
    assert [g.split("-")[1] for g in it2] == ["0", "1"]  # two of iteration 2's episodes reached the pool
    again = subprocess.run([sys.executable, "-m", "steppo.cli", "train", f"run.output_dir={out}", "--resume"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = {r["iteration"]: r for r in _rows(out) if "policy/loss" in r}
    assert sorted(rows) == [1, 2, 3] and rows[2]["rollout/episodes"] == 4
    assert rows[2]["gateway/resumed_trajectories"] == 2  # taken from the pool ...
    after = read_pool(out / "pool").trajectories
    keys = [t.group_id.rsplit("-", 1)[0] for t in after if t.group_id.startswith("it2-")]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 4  # ... and not played a second time
    assert len([t for t in after if t.group_id.startswith("it3-")]) == 4
