"""Custom environments without editing the package (issue 15, item 4): ``env=module:Class``
import paths (the README's `examples/guess.py`, trained through the real entry point), installed
packages' ``steppo.envs`` entry points, and clear errors for bad paths."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from steppo.cli import main
from steppo.config import ConfigError, load_config
from steppo.envs.base import EnvError
from steppo.envs.registry import env_class, env_factory

ROOT = Path(__file__).resolve().parents[1]
GUESS = "examples.guess:GuessEnv"
TINY = [
    "trainer.trajectories_per_iteration=4", "trainer.eval_episodes=2", "rollout.num_envs=4",
    "model.device=cpu", "run.progress=false", "trainer.micro_batch_tokens=2048", "critic.warmup_iterations=0",
    "trainer.eval_sampled=false", "trainer.eval_interval=0", "run.trackers=[]", "run.seed=0",
]


@pytest.fixture
def in_root(monkeypatch):
    """Run from the repository root, as the README does (import paths are relative to it); the
    working directory the registry adds to sys.path is dropped again afterwards."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_the_readme_shows_examples_guess_py_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Write your own environment", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks and blocks[0] == (ROOT / "examples" / "guess.py").read_text()
    assert f"steppo train env={GUESS}" in section


def test_the_expert_solves_every_task_within_the_step_limit(in_root):
    env = env_class(GUESS)()
    for task in env.tasks("dev"):
        env.reset(task)
        actions = env.expert_actions(task)
        results = [env.step(a) for a in actions]
        assert len(actions) <= env.settings.max_steps and results[-1].reward == 1.0 and results[-1].terminated


def test_train_with_an_import_path_env_through_the_cli(in_root, tmp_path):
    out = tmp_path / "run"
    assert main(["train", f"env={GUESS}", *TINY, "sft.enabled=true", "sft.demos=16", "sft.epochs=1",
                 "trainer.iterations=1", f"run.output_dir={out}"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["env"]["name"] == GUESS
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rollout/episodes" in r for r in records)
    sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert "number from 1 to 16" in json.dumps(sample)


def test_process_env_workers_build_an_import_path_env(tmp_path, monkeypatch):
    from steppo.rollout.workers import ProcessEnvWorker

    (tmp_path / "guess_in_cwd.py").write_text((ROOT / "examples" / "guess.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    worker = ProcessEnvWorker(env_factory(load_config(overrides=["env=guess_in_cwd:GuessEnv"]).env))
    try:
        task = worker.submit("tasks", "dev").result(timeout=60)[0]
        worker.submit("reset", task).result(timeout=30)
        assert worker.submit("step", "guess 8").result(timeout=30).observation in ("Correct!", "Higher.", "Lower.")
    finally:
        worker.close()


def test_the_console_script_finds_an_env_in_the_working_directory(tmp_path):
    """`steppo` (not `python -m`) does not put the working directory on sys.path; the registry does."""
    (tmp_path / "mine.py").write_text((ROOT / "examples" / "guess.py").read_text())
    code = ("import sys; sys.path = [p for p in sys.path if p not in ('', '.', sys.argv[1])]; "
            "from steppo.config import load_config; from steppo.envs.registry import env_factory; "
            "env = env_factory(load_config(overrides=['env=mine:GuessEnv']).env)(); print(env.name)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "guess", out.stderr


@pytest.mark.parametrize("name, message", [
    ("examples.nowhere:GuessEnv", "no module named 'examples.nowhere'"),
    ("examples.guess:Nowhere", "has no attribute 'Nowhere'; its TextEnv classes: GuessEnv"),
    ("examples.guess:random", "is a module, not a subclass of steppo.envs.base.TextEnv"),
    ("examples.guess:SPLITS", "is a dict, not a subclass"),
    ("steppo.envs.base:TextEnv", "does not implement _act, _reset, tasks"),
    ("examples.guess:Guess:Env", "an import path is 'module:Class'"),
    ("nowhere", "unknown environment env.name='nowhere'"),
])
def test_bad_env_names_are_clear_errors_at_config_time(in_root, name, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[f"env.name={name}"])
    with pytest.raises(EnvError, match=re.escape(message)):
        env_class(name)


def test_a_module_that_fails_to_import_names_its_error(tmp_path, monkeypatch):
    (tmp_path / "broken_env.py").write_text("import not_a_real_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(EnvError, match="importing broken_env failed: No module named 'not_a_real_dependency_xyz'"):
        env_class("broken_env:Env")


def test_an_installed_package_registers_envs_by_entry_point(tmp_path, monkeypatch, in_root):
    dist = tmp_path / "my_envs-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-envs\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(f"""\
        [steppo.envs]
        guess = {GUESS}
        compass = {GUESS}
        broken = examples.guess:Nowhere
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(overrides=["env=guess"])
    assert env_factory(cfg.env)().name == "guess"
    assert env_class("compass").name == "compass"  # a built-in name is never replaced
    with pytest.raises(ConfigError, match="unknown environment env.name='nowhere'.*'guess'"):
        load_config(overrides=["env=nowhere"])
    with pytest.raises(ConfigError, match="env.name='broken': module examples.guess .* has no attribute 'Nowhere'"):
        load_config(overrides=["env=broken"])


def test_compare_runs_an_import_path_env_in_its_subprocesses(in_root, tmp_path):
    from steppo.compare import run_protocol

    base = {
        "env": {"name": GUESS},
        "model": {"name": "tiny", "tiny_size": "small", "device": "cpu"},
        "sft": {"enabled": False},
        "critic": {"warmup_iterations": 0},
        "rollout": {"num_envs": 4, "schedule": "rounds"},
        "trainer": {"trajectories_per_iteration": 4, "iterations": 1, "eval_interval": 1, "eval_episodes": 2,
                    "eval_sampled": False, "micro_batch_tokens": 2048},
        "run": {"trackers": []},
    }
    proto = tmp_path / "guess.yaml"
    proto.write_text(yaml.safe_dump({"name": "guess", "presets": ["steppo"], "seeds": [0], "base": base}))
    results = run_protocol(proto, out_dir=tmp_path / "results", runs_dir=tmp_path / "runs", jobs=1, threads=1)
    assert results["runs"]["steppo"]["0"]["final_success"] is not None
