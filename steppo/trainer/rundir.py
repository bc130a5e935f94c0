"""Run directories: one run per directory, its id, and what a resume cleans up.

A directory holds a run when it has any of `RUN_FILES`; other files (a comparison's
``protocol.yaml``) are left alone. A new run into a run's directory is refused unless
``--overwrite``; ``--resume`` continues it from its newest intact checkpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from steppo.core.algorithms import ConfigError
from steppo.paths import write_text_atomic
from steppo.trainer import checkpoint as ckpt

# What makes a directory a run's (other files, e.g. a comparison's protocol.yaml, are left alone).
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "evals.jsonl", "samples.jsonl", "checkpoints", "base_model",
             "sft_model", "tensorboard", "wandb")


def run_files(out: Path) -> list[str]:
    """The run files present in `out` (empty: no run there)."""
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, say: Callable[[str], None]) -> None:
    """One run per directory: a new run into a directory holding another one is refused
    (it would reuse that run's tokenizer and mix metrics and checkpoints) unless `overwrite`,
    which deletes the old run's files first."""
    found = run_files(out)
    if resume or not found:
        return
    if not overwrite:
        raise ConfigError(
            f"run.output_dir={out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
            f"--overwrite to delete it and start again, or choose another run.output_dir"
        )
    say(f"--overwrite: deleting the previous run in {out}: {', '.join(found)}")
    remove_run(out)


def remove_run(out: Path) -> None:
    """Delete the run files in `out` (and `out` itself when that leaves it empty)."""
    for name in run_files(out):
        _remove(out / name)


def run_id(out: Path, main: bool) -> str | None:
    """This run's id (``run.json``), recorded in every checkpoint's manifest so pruning and
    resuming only ever touch the run's own checkpoints."""
    path = out / "run.json"
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        if not main:
            return None
    new = uuid.uuid4().hex
    path.write_text(json.dumps({"run_id": new}) + "\n")
    return new


def code_version() -> dict:
    """The code this process runs: StepPO's version and, when the package lives in a git
    checkout, its commit and whether that checkout had uncommitted changes (None otherwise)."""
    import steppo

    where = Path(steppo.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"steppo": steppo.__version__, "commit": commit, "dirty": None if status is None else bool(status)}


def record_attempt(out: Path, from_iteration: int) -> None:
    """Append this attempt (start or resume) and the code it runs to ``run.json``'s ``attempts``:
    a run resumed at another commit says so."""
    path = out / "run.json"
    info = json.loads(path.read_text())
    info.setdefault("attempts", []).append(
        {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "from_iteration": from_iteration,
         **code_version()})
    write_text_atomic(path, json.dumps(info) + "\n")


def clean_for_resume(out: Path, run_id: str | None, resume_from: Path | None, broken: list[Path],
                     say: Callable[[str], None]) -> None:
    """Rank 0, resuming: drop what an interrupted attempt left (temporary checkpoint
    directories, checkpoints that failed verification); with no intact checkpoint at all,
    start the run again from iteration 0 (its records are cleared by `RunLog`)."""
    root = out / "checkpoints"
    for p in ckpt.remove_stale_tmp(root):
        say(f"removed {p} (left by an interrupted save)")
    for p in broken:
        manifest = ckpt.read_manifest(p) or {}
        if manifest.get("run_id") not in (None, run_id):
            continue  # not this run's: leave it alone
        shutil.rmtree(p, ignore_errors=True)
        say(f"removed unusable checkpoint {p}")
    if resume_from is None:
        say(f"no intact checkpoint under {root}: starting this run again from iteration 0 with its "
            f"config (clearing metrics.jsonl, samples.jsonl and tensorboard/ of the interrupted attempt)")
        (root / ckpt.LATEST).unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    elif root.joinpath(ckpt.LATEST).exists() and (root / ckpt.LATEST).read_text().strip() != resume_from.name:
        (root / ckpt.LATEST).write_text(resume_from.name)
