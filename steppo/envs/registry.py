"""Environment names -> classes, and factories built from an `EnvConfig`.

Third-party environments import their packages only when built, so a missing optional
dependency is an error about that environment, not about StepPO.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from steppo.envs.base import EnvError, TextEnv

ENVIRONMENTS: dict[str, str] = {
    "compass": "steppo.envs.compass:CompassEnv",
}


def env_class(name: str) -> type[TextEnv]:
    if name not in ENVIRONMENTS:
        raise EnvError(f"unknown environment {name!r}; available: {sorted(ENVIRONMENTS)}")
    module, attr = ENVIRONMENTS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def env_factory(cfg) -> Callable[[], TextEnv]:
    """A zero-argument constructor for the configured environment (one instance per worker).

    Args: cfg: `steppo.config.EnvConfig`.
    """
    cls = env_class(cfg.name)
    settings = cls.default_settings()
    updates = {
        "invalid_action_penalty": cfg.invalid_action_penalty,
        "format_penalty": cfg.format_penalty,
    }
    if cfg.max_steps is not None:
        updates["max_steps"] = cfg.max_steps
    if cfg.show_admissible is not None:
        updates["show_admissible"] = cfg.show_admissible
    settings = dataclasses.replace(settings, **updates)
    params = dict(cfg.params)

    def make() -> TextEnv:
        try:
            return cls(settings, **params)
        except TypeError as exc:
            raise EnvError(f"environment {cfg.name!r} rejected its params {params}: {exc}") from exc

    return make
