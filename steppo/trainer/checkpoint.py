"""Checkpoints: written to a temporary directory, then renamed into place (atomic), so an
interrupted save never leaves a half-written checkpoint where `--resume` would find it.

Layout of ``<run>/checkpoints/iter_000040/``::

    policy/               Hugging Face model dir (or LoRA adapter dir) + tokenizer
    critic.safetensors    critic decoder + value head (when there is a critic)
    trainer_state.pt      iteration, policy version, optimiser and RNG states
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

LATEST = "latest"


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: Path, iteration: int, policy_model, tokenizer, critic, state: dict[str, Any], keep: int
) -> Path:
    """Save and return ``root/iter_XXXXXX``; keep the `keep` newest."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        policy_model.save_pretrained(tmp / "policy")
        tokenizer.save_pretrained(tmp / "policy")
        if critic is not None:
            save_model(critic, str(tmp / "critic.safetensors"))
        torch.save({**state, "rng": rng_state()}, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(root / LATEST, final.name)
    for old in sorted(p for p in root.glob("iter_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    marker = root / LATEST
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)


def load_critic(critic, path: Path) -> None:
    load_model(critic, str(path / "critic.safetensors"))
