"""Checkpoints: written to a temporary directory, then renamed into place (atomic), so an
interrupted save never leaves a half-written checkpoint where `--resume` would find it.

Layout of ``<run>/checkpoints/iter_000040/``::

    policy/               Hugging Face model dir (or LoRA adapter dir) + tokenizer
    critic.safetensors    the critic's trainable weights (when there is a critic): decoder + value
                          head, or with LoRA only its adapters + head (its frozen decoder is the
                          base model's, rebuilt from it on resume)
    trainer_state.pt      iteration, policy version, optimiser and RNG states, how far an
                          ``env=agent`` run had read its data pool (tensors, numbers, lists and dicts only: read with ``torch.load(weights_only=True)``, so a
                          crafted file cannot run code)
    manifest.json         written last: iteration, run id, and size + SHA-256 of every file

`find_resumable` takes the newest checkpoint whose manifest matches its files and whose state
loads, and says why it skipped any newer one (truncated file, missing state, refused pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from steppo.paths import write_text_atomic

if TYPE_CHECKING:
    from steppo.trainer.trainer import Trainer

LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
FORMAT = 2
PREFIX = "iter_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, corrupted, refused)."""


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors, numbers and lists (no arbitrary objects)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [str(name), torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np_keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> dict[str, Path]:
    return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def iteration_of(path: Path) -> int | None:
    """The iteration in a checkpoint directory's name (``iter_000040`` -> 40)."""
    if not path.name.startswith(PREFIX):
        return None
    try:
        return int(path.name[len(PREFIX):])
    except ValueError:
        return None


def checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, newest iteration first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and iteration_of(p) is not None]
    return sorted(found, key=iteration_of, reverse=True)


def remove_stale_tmp(root: Path) -> list[Path]:
    """Delete leftovers of interrupted saves (``.tmp-*`` directories, ``.latest.*`` files)."""
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-") or p.name.startswith(f".{LATEST}."):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def verify(path: Path, run_id: str | None = None) -> str | None:
    """None when the checkpoint is complete and intact; otherwise what is wrong with it."""
    if not (path / MANIFEST).exists():
        return f"no {MANIFEST} (the save was interrupted, or an older StepPO wrote it)"
    manifest = read_manifest(path)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} is unreadable"
    if run_id is not None and manifest.get("run_id") not in (None, run_id):
        return f"it belongs to another run (run id {manifest.get('run_id')})"
    if STATE not in manifest["files"]:
        return f"no {STATE} listed"
    for rel, want in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != want.get("size"):
            return f"{rel} is {size} bytes, the manifest says {want.get('size')} (truncated?)"
        if _sha256(f) != want.get("sha256"):
            return f"{rel} does not match its SHA-256 in the manifest (corrupted)"
    return None


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(
    root: Path, iteration: int, policy_model, tokenizer, critic, state: dict[str, Any], keep: int,
    run_id: str | None = None,
) -> Path:
    """Save and return ``root/iter_XXXXXX``; keep the `keep` newest of this run's checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(root)
    final = root / f"{PREFIX}{iteration:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        policy_model.save_pretrained(tmp / "policy")
        tokenizer.save_pretrained(tmp / "policy")
        if critic is not None:
            save_critic(critic, tmp / "critic.safetensors")
        torch.save({**state, "rng": rng_state()}, tmp / STATE)
        manifest = {
            "format": FORMAT, "iteration": iteration, "run_id": run_id,
            "files": {rel: {"size": p.stat().st_size, "sha256": _sha256(p)} for rel, p in _files(tmp).items()},
        }
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))  # last: marks it complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, final.name)
    prune(root, keep, run_id, final)
    return final


def prune(root: Path, keep: int, run_id: str | None, newest: Path) -> None:
    """Delete this run's checkpoints older than the `keep` newest by recorded iteration
    (never `newest`, never a directory whose manifest names another run)."""
    own = []
    for p in checkpoints(root):
        manifest = read_manifest(p)
        if manifest is None or not isinstance(manifest.get("iteration"), int):
            continue
        if run_id is not None and manifest.get("run_id") not in (None, run_id):
            continue
        own.append((manifest["iteration"], p))
    own.sort(key=lambda item: item[0], reverse=True)
    for _, p in own[keep:]:
        if p != newest:
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint (manifest present and state file listed); see `verify`
    for the full check."""
    for p in checkpoints(root):
        manifest = read_manifest(p)
        if manifest is not None and STATE in manifest.get("files", {}) and (p / STATE).exists():
            return p
    return None


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state, unpickled with ``weights_only=True`` (tensors, numbers, strings,
    lists, tuples and dicts only: anything else is refused, nothing is executed)."""
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for refused globals, RuntimeError/EOFError for torn files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{STATE} was refused or is unreadable ({type(exc).__name__}: {first[:200]})") from exc


def find_resumable(root: Path, say: Callable[[str], None] = print,
                   run_id: str | None = None) -> tuple[Path | None, dict[str, Any] | None, list[Path]]:
    """The newest checkpoint that verifies and whose state loads, its state, and the newer
    checkpoints skipped on the way (each reported through `say`)."""
    skipped = []
    for p in checkpoints(root):
        problem = verify(p, run_id)
        state = None
        if problem is None:
            try:
                state = load_trainer_state(p)
            except CheckpointError as exc:
                problem = str(exc)
        if problem is None and not (isinstance(state, dict) and state.get("iteration") == iteration_of(p)):
            problem = f"{STATE} does not hold the state of iteration {iteration_of(p)}"
        if problem is None:
            if skipped:
                say(f"falling back to the newest intact checkpoint: {p}")
            return p, state, skipped
        say(f"checkpoint {p} is unusable: {problem}")
        skipped.append(p)
    return None, None, skipped


def _frozen(critic) -> set[str]:
    return {n for n, p in critic.named_parameters() if not p.requires_grad}


def save_critic(critic, path: Path) -> None:
    """The critic's weights, without its frozen ones (a LoRA critic's base decoder: as large as
    the policy, and equal to the base model's, which resuming rebuilds it from)."""
    frozen = _frozen(critic)
    if not frozen:
        save_model(critic, str(path))
        return
    state = {k: v.detach().contiguous() for k, v in critic.state_dict().items() if k not in frozen}
    save_file(state, str(path), metadata={"steppo_frozen_left_out": str(len(frozen))})


def load_critic(critic, path: Path) -> None:
    """Load `save_critic`'s file into `critic` (built as at the start: its frozen weights are the
    base model's); every weight the file should hold must be there."""
    frozen = _frozen(critic)
    if not frozen:
        load_model(critic, str(path / "critic.safetensors"))
        return
    state = load_file(str(path / "critic.safetensors"), device=str(next(critic.parameters()).device))
    missing, unexpected = critic.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise CheckpointError(f"{path / 'critic.safetensors'} does not fit the critic: missing {missing[:3]}, "
                              f"unexpected {list(unexpected)[:3]}")


# ----------------------------------------------------------------------------- a trainer's checkpoint


def save_trainer(trainer: Trainer) -> Path | None:
    """Write a checkpoint of `trainer` (rank 0; every rank takes part in gathering sharded
    state). Optimiser states are saved in the single-process layout whatever the world size,
    so runs resume on any number of ranks; an FSDP policy is saved from its full copy."""
    from steppo.trainer import distributed as dist_lib

    dist, models = trainer.dist, trainer.models

    def opt_state(opt, module) -> dict | None:
        if opt is None:
            return None
        return {"opt": dist_lib.full_optimizer_state(dist, module, opt.opt), "sched": opt.sched.state_dict()}

    state = {"iteration": trainer.iteration, "policy_version": trainer.policy_version, "env_steps": trainer.env_steps,
             "sft_done": trainer.sft_done, "policy_opt": opt_state(trainer.policy_opt, models.policy),
             "critic_opt": opt_state(trainer.critic_opt, models.critic),
             "pool_offset": getattr(trainer.generation.engine, "offset", None)}  # env=agent: the pool read so far
    policy_model, critic = models.policy.model, models.critic
    if dist.strategy == "fsdp":
        policy_model = trainer.generation.rollout_copy.model  # refreshed after every update
        if trainer.critic_copy is not None:
            trainer.critic_copy.load_state_dict(dist_lib.full_state_dict(models.critic))
            critic = trainer.critic_copy
    path = None
    if dist.is_main:
        path = save_checkpoint(trainer.out / "checkpoints", trainer.iteration, policy_model, models.tokenizer,
                               critic, state, trainer.cfg.trainer.keep_checkpoints, run_id=trainer.run_id)
    dist.barrier()
    return path


def restore_trainer(trainer: Trainer, state: dict[str, Any]) -> None:
    """Counters, policy version, optimiser and RNG states of a checkpoint (the weights are
    loaded when the models are built, before they are wrapped)."""
    from steppo.trainer import distributed as dist_lib

    trainer.iteration, trainer.env_steps = state["iteration"], state["env_steps"]
    trainer.generation.version = state["policy_version"]
    trainer.sft_done = state.get("sft_done", True)
    if state.get("pool_offset") is not None and hasattr(trainer.generation.engine, "resume"):
        trainer.generation.engine.resume(state["pool_offset"], state["policy_version"])
    for opt, module, key in ((trainer.policy_opt, trainer.models.policy, "policy_opt"),
                             (trainer.critic_opt, trainer.models.critic, "critic_opt")):
        if opt is not None:
            dist_lib.load_optimizer_state(trainer.dist, module, opt.opt, state[key]["opt"])
            opt.sched.load_state_dict(state[key]["sched"])
    set_rng_state(state["rng"])
