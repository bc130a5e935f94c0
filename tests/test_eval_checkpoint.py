"""``steppo eval --checkpoint`` evaluates with the run's own config (issue 15, item 5): a
checkpoint directory, ``checkpoints/latest`` and the run directory all find the run's
``config.yaml`` (here a run on `examples/guess.py`, not the default compass), command-line
overrides apply on top, and a directory that is none of these is a clear error."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from steppo.cli import main
from steppo.trainer import checkpoint as ckpt
from tests.test_cli_runs import TINY as FAST_RUN

ROOT = Path(__file__).resolve().parents[1]
GUESS = "examples.guess:GuessEnv"
# the fast run of tests/test_cli_runs.py, with its own evaluation size and step limit (later keys win)
TINY = [*FAST_RUN, "trainer.eval_episodes=2", "env.max_steps=3"]


@pytest.fixture(autouse=True)
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # examples.guess resolves from the working directory
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture(scope="module")
def guess_run(tmp_path_factory):
    """A 2-iteration run on the guess environment: checkpoints iter_000001 and iter_000002."""
    out = tmp_path_factory.mktemp("eval") / "run"
    saved, cwd = list(sys.path), os.getcwd()
    try:
        os.chdir(ROOT)
        assert main(["train", f"env={GUESS}", *TINY, "trainer.iterations=2", f"run.output_dir={out}"]) == 0
    finally:
        os.chdir(cwd)
        sys.path[:] = saved
    return out


def _eval(tmp_path, *args):
    out = tmp_path / "eval.json"
    assert main(["eval", *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_of_a_run_directory_uses_its_config_and_newest_checkpoint(guess_run, tmp_path, capsys):
    summary = _eval(tmp_path, "--checkpoint", str(guess_run))
    assert summary["environment"] == GUESS and summary["split"] == "dev"
    assert summary["model"] == str(guess_run / "checkpoints" / "iter_000002") and summary["episodes"] == 2
    assert summary["steps_mean"] <= 3  # the run's env.max_steps=3, not the guess default of 6
    assert "config.yaml" in capsys.readouterr().err


def test_eval_of_a_checkpoint_dir_and_of_latest_with_overrides_on_top(guess_run, tmp_path):
    first = _eval(tmp_path, "--checkpoint", str(guess_run / "checkpoints" / "iter_000001"), "trainer.eval_episodes=3")
    assert first["environment"] == GUESS and first["episodes"] == 3
    assert first["model"].endswith("iter_000001")
    latest = _eval(tmp_path, "--checkpoint", str(guess_run / "checkpoints" / ckpt.LATEST), "--split", "test",
                   "--episodes", "1")
    assert latest["environment"] == GUESS and latest["model"].endswith("iter_000002")
    assert latest["split"] == "test" and latest["episodes"] == 1


def test_eval_of_a_run_skips_a_broken_newest_checkpoint(guess_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(guess_run, run)
    weights = next((run / "checkpoints" / "iter_000002" / "policy").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    summary = _eval(tmp_path, "--checkpoint", str(run))
    assert summary["model"].endswith("iter_000001") and summary["environment"] == GUESS
    assert "skipping checkpoint" in capsys.readouterr().err


def test_eval_of_something_else_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    for path, message in [(tmp_path, "is neither a checkpoint directory"),
                          (tmp_path / "nowhere", "does not exist"),
                          (tmp_path / "notes.txt", "is a file")]:
        assert main(["eval", "--checkpoint", str(path)]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "checkpoints").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err
