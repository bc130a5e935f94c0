"""The Python API is the CLI (issue 15, item 10): ``load_config(overrides=[...])`` builds the
config ``steppo train ...`` builds; and scripts without an ``if __name__ == "__main__":`` guard
work with process env workers (fresh ``python -m steppo.rollout.envproc`` interpreters, never a
multiprocessing spawn that re-imports ``__main__``), or fail fast with the fix, never hang."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import steppo.trainer.trainer as trainer_module
from steppo.cli import main
from steppo.config import Config, load_config
from steppo.envs import registry
from steppo.envs.base import EnvError
from steppo.rollout import envproc

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.trajectories_per_iteration=4", "trainer.eval_episodes=1", "rollout.num_envs=2",
        "sft.enabled=false", "model.device=cpu", "run.progress=false", "trainer.micro_batch_tokens=2048",
        "critic.warmup_iterations=0", "trainer.eval_sampled=false", "trainer.eval_interval=0", "run.trackers=[]",
        "trainer.iterations=1", "env.max_steps=3", "rollout.env_workers=process"]


class _Built(Exception):
    pass


def _cli_config(monkeypatch, argv):
    """The config `steppo.cli.main(argv)` hands the Trainer."""
    seen = []

    def capture(cfg, **_):
        seen.append(cfg)
        raise _Built

    monkeypatch.setattr(trainer_module, "Trainer", capture)
    with pytest.raises(_Built):
        main(argv)
    return seen[0]


@pytest.mark.parametrize("extra", [[], ["trainer.iterations=20"], ["algo.kl_coef=0.1", "rollout.temperature=0.8"]])
def test_overrides_in_python_equal_the_cli(monkeypatch, extra):
    api = load_config(overrides=["algo=steppo", *extra])
    assert api == _cli_config(monkeypatch, ["train", "algo=steppo", *extra])
    assert api == _cli_config(monkeypatch, ["train", *extra, "algo=steppo"])
    if not extra:  # algo=steppo is exactly the default job, in every form
        assert api == load_config() == load_config(overrides=[]) == Config()
        assert api.algo.name == "steppo" and api.algo.kl_coef == 0.05


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_an_unguarded_script_trains_with_process_env_workers(tmp_path):
    out = _script(tmp_path, "train_unguarded.py", f"""\
        from steppo.config import load_config
        from steppo.trainer.trainer import Trainer

        trainer = Trainer(load_config(overrides={[*FAST, "env=examples.guess:GuessEnv",
                                                  f"run.output_dir={tmp_path / 'run'}"]!r}))
        try:
            trainer.train()
        finally:
            trainer.close()
        print("DONE")
        """)
    assert out.returncode == 0 and out.stdout.strip().endswith("DONE"), out.stderr[-3000:]


def test_an_unguarded_script_that_is_its_own_environment_fails_fast_with_the_fix(tmp_path):
    guess = (ROOT / "examples" / "guess.py").read_text()
    out = _script(tmp_path, "own_env.py", guess + textwrap.dedent(f"""
        from steppo.config import load_config
        from steppo.trainer.trainer import Trainer

        Trainer(load_config(overrides={[*FAST, "env=own_env:GuessEnv", f"run.output_dir={tmp_path / 'run'}"]!r}))
        """).replace("\n        ", "\n"))
    assert out.returncode != 0
    assert "if __name__ == \\\"__main__\\\":" in out.stderr or 'if __name__ == "__main__":' in out.stderr
    assert "own_env" in out.stderr


def test_an_environment_process_never_starts_a_run_or_more_processes(tmp_path, monkeypatch):
    """A module that starts process workers when imported, built only in the child: the child
    refuses (and says why) instead of starting processes of its own, without end."""
    from steppo.rollout.workers import EnvFailure, ProcessEnvWorker

    assert envproc.BUILDING_ENV == registry.BUILDING_ENV
    (tmp_path / "spawns_on_import.py").write_text(textwrap.dedent("""\
        from steppo.envs.registry import EnvFactory
        from steppo.envs.base import EnvSettings
        from steppo.rollout.workers import ProcessEnvWorker

        ProcessEnvWorker(EnvFactory("compass", EnvSettings(), {}))
        """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    worker = ProcessEnvWorker(registry.EnvFactory("spawns_on_import:Env", registry.EnvSettings(), {}))
    try:
        with pytest.raises(EnvFailure, match="inside an environment process.*__main__"):
            worker.submit("tasks", "dev").result(timeout=60)
    finally:
        worker.close()
    monkeypatch.setenv(registry.BUILDING_ENV, "x:Y")
    with pytest.raises(EnvError, match="starts training when imported"):
        registry.env_factory(load_config().env)
