"""Environment names -> classes, and factories built from an `EnvConfig`.

Third-party environments import their packages only when built, so a missing optional
dependency is an error about that environment, not about StepPO.
"""

from __future__ import annotations

import dataclasses
import importlib

from steppo.envs.base import EnvError, EnvOptions, EnvSettings, TextEnv

ENVIRONMENTS: dict[str, str] = {
    "compass": "steppo.envs.compass:CompassEnv",
    "twx": "steppo.envs.twx:TextWorldExpressEnv",
    "textworld": "steppo.envs.textworld_games:TextWorldEnv",
    "alfworld": "steppo.envs.alfworld:ALFWorldEnv",
    "searchqa": "steppo.envs.searchqa:SearchQAEnv",
}


def env_class(name: str) -> type[TextEnv]:
    if name not in ENVIRONMENTS:
        raise EnvError(f"unknown environment {name!r}; available: {sorted(ENVIRONMENTS)}")
    module, attr = ENVIRONMENTS[name].split(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class EnvFactory:
    """A picklable zero-argument constructor (one call per worker, thread or process)."""

    name: str
    settings: EnvSettings
    params: dict

    def __call__(self) -> TextEnv:
        cls = env_class(self.name)
        try:
            return cls(self.settings, **self.params)
        except TypeError as exc:
            raise EnvError(f"environment {self.name!r} rejected its params {self.params}: {exc}") from exc


REACT_MIN_NEW_TOKENS = 96  # response budget of a ReAct step (a short thought, then the action)


def env_factory(cfg) -> EnvFactory:
    """The configured environment's constructor: the environment's default settings, with the
    config's `EnvOptions` fields as they are, and ``max_steps`` / ``show_admissible`` where the
    config sets them (None = the environment's default).

    Args: cfg: `steppo.config.EnvConfig` (an `EnvOptions`).
    """
    settings = env_class(cfg.name).default_settings()
    updates = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EnvOptions)}
    if cfg.react:  # a thought before the action needs room: never less than REACT_MIN_NEW_TOKENS
        updates["max_new_tokens"] = max(settings.max_new_tokens, REACT_MIN_NEW_TOKENS)
    if cfg.max_steps is not None:
        updates["max_steps"] = cfg.max_steps
    if cfg.show_admissible is not None:
        updates["show_admissible"] = cfg.show_admissible
    return EnvFactory(cfg.name, dataclasses.replace(settings, **updates), dict(cfg.params))
