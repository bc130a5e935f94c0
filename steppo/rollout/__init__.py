"""Agent rollout: concurrent episodes, batched generation, environment workers.

The names below load on first use (PEP 562), so importing a submodule such as
`steppo.rollout.envproc` (the entry point of environment processes) does not import torch or
transformers through `steppo.rollout.engine`.
"""

from steppo.lazy import lazy_exports

_EXPORTS = {
    "CONTEXTS": "steppo.rollout.engine",
    "RolloutEngine": "steppo.rollout.engine",
    "RolloutError": "steppo.rollout.engine",
    "RolloutResult": "steppo.rollout.engine",
    "RolloutSettings": "steppo.rollout.engine",
    "episode_generator": "steppo.rollout.engine",
    "LocalBackend": "steppo.rollout.local",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
