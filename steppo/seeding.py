"""Seeds derived from the run seed and a name (one rule for the trainer, SFT and rollouts).

Every source of randomness is derived from (run.seed, what, iteration, ...) rather than carried
state, so a run resumed from a checkpoint replays the same iterations as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from the repr of `parts`, e.g. ``derived_seed(seed, "tasks", iteration)``."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
