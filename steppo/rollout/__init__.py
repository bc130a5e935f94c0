"""Agent rollout: concurrent episodes, batched generation, environment workers."""

from steppo.rollout.engine import (
    CONTEXTS,
    RolloutEngine,
    RolloutError,
    RolloutResult,
    RolloutSettings,
    episode_generator,
)
from steppo.rollout.local import LocalBackend

__all__ = [
    "CONTEXTS",
    "LocalBackend",
    "RolloutEngine",
    "RolloutError",
    "RolloutResult",
    "RolloutSettings",
    "episode_generator",
]
