"""Agent rollout: concurrent episodes, batched generation, environment workers.

The names below load on first use (PEP 562), so importing a submodule such as
`steppo.rollout.envproc` (the entry point of environment processes) does not import torch or
transformers through `steppo.rollout.engine`.
"""

import importlib

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


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'steppo.rollout' has no attribute {name!r}")
