"""Environment names -> classes, and factories built from an `EnvConfig`.

``env.name`` is one of three things:

- a built-in name (`ENVIRONMENTS`);
- a name an installed package registers under the ``steppo.envs`` entry-point group
  (``[project.entry-points."steppo.envs"] guess = "my_pkg.guess:GuessEnv"`` in its
  pyproject.toml; built-in names win over entry points of the same name);
- an import path ``module:Class`` to a `TextEnv` subclass (``examples.guess:GuessEnv``), looked
  up on ``sys.path`` plus the working directory, so a file next to where you run ``steppo`` works
  without installing it (the ``steppo`` console script, unlike ``python -m``, does not put the
  working directory on ``sys.path``).

Third-party environments import their packages only when built, so a missing optional
dependency is an error about that environment, not about StepPO.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys

from steppo.envs.base import EnvError, EnvOptions, EnvSettings, TextEnv

ENVIRONMENTS: dict[str, str] = {
    "compass": "steppo.envs.compass:CompassEnv",
    "twx": "steppo.envs.twx:TextWorldExpressEnv",
    "textworld": "steppo.envs.textworld_games:TextWorldEnv",
    "alfworld": "steppo.envs.alfworld:ALFWorldEnv",
    "searchqa": "steppo.envs.searchqa:SearchQAEnv",
    "agent": "steppo.envs.agent:AgentTasks",
}
ENTRY_POINT_GROUP = "steppo.envs"
BUILDING_ENV = "STEPPO_BUILDING_ENV"  # set by an environment process while it builds its environment
GUARD_FIX = ("put the script's training code under `if __name__ == \"__main__\":`, or move the environment "
             "class into a module of its own")


def refuse_in_env_process(what: str) -> None:
    """Fail fast, with the fix, when an environment process (``rollout.env_workers=process``)
    is about to start a run of its own: the module it imported to build the environment starts
    training when imported (a script without a ``__main__`` guard), and every process would
    start another run's processes instead of ever answering."""
    if os.environ.get(BUILDING_ENV):
        raise EnvError(f"{what} was started inside an environment process while it imported the environment's "
                       f"module ({os.environ[BUILDING_ENV]}): that module starts training when imported; "
                       + GUARD_FIX)


def installed_environments() -> dict[str, str]:
    """Names registered by installed packages (entry-point group ``steppo.envs``) -> their
    import paths; names that are built in are left out (the built-in wins)."""
    from importlib.metadata import entry_points

    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in ENVIRONMENTS:
            found.setdefault(ep.name, ep.value)
    return found


def available_environments() -> dict[str, str]:
    """Every environment name -> import path: the built-in ones and the installed ones."""
    return {**ENVIRONMENTS, **installed_environments()}


def is_import_path(name: str) -> bool:
    return ":" in name


def with_working_directory() -> None:
    """Put the working directory on ``sys.path`` (last, so it never shadows an installed
    package) for import-path environments; ``python -m`` already has it first."""
    cwd = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == cwd for p in sys.path):
        sys.path.append(cwd)


def load_env_class(target: str, name: str | None = None) -> type[TextEnv]:
    """The `TextEnv` subclass at ``module:Class`` (`name`: what the config called it), or an
    `EnvError` that says what is wrong: a malformed path, a missing module, a module that
    fails to import, a missing attribute, or something that is not a concrete TextEnv."""
    what = f"env.name={name or target!r}"
    module, _, attr = target.partition(":")
    if not module or not attr or ":" in attr:
        raise EnvError(f"{what}: an import path is 'module:Class' (e.g. examples.guess:GuessEnv), got {target!r}")
    with_working_directory()
    running = sys.modules.get(module)
    if module != "__main__" and getattr(getattr(running, "__spec__", None), "_initializing", False):
        raise EnvError(f"{what}: module {module} is still being imported, and its own top-level code asks for "
                       f"the environment (it runs training at import, so it would train inside its own import); "
                       + GUARD_FIX)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise EnvError(f"{what}: no module named {exc.name!r} (searched sys.path and the working directory "
                           f"{os.getcwd()}); check the path, run from the directory that holds it, or install "
                           f"its package") from exc
        raise EnvError(f"{what}: importing {module} failed: {exc} (a dependency of the environment is not "
                       f"installed)") from exc
    except Exception as exc:
        raise EnvError(f"{what}: importing {module} failed: {type(exc).__name__}: {exc}") from exc
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            envs = sorted(k for k, v in vars(mod).items()
                          if isinstance(v, type) and issubclass(v, TextEnv) and v is not TextEnv)
            raise EnvError(f"{what}: module {module} ({getattr(mod, '__file__', '?')}) has no attribute {attr!r}"
                           + (f"; its TextEnv classes: {', '.join(envs)}" if envs else ""))
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, TextEnv)):
        raise EnvError(f"{what}: {target} is a {type(obj).__name__}, not a subclass of steppo.envs.base.TextEnv")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise EnvError(f"{what}: {target} does not implement {missing} (TextEnv needs tasks, _reset and _act)")
    return obj


def env_class(name: str) -> type[TextEnv]:
    """The class of `name`: a built-in or installed name, or an import path ``module:Class``."""
    if is_import_path(name):
        return load_env_class(name)
    if name in ENVIRONMENTS:
        module, attr = ENVIRONMENTS[name].split(":")
        return getattr(importlib.import_module(module), attr)
    installed = installed_environments()
    if name not in installed:
        raise EnvError(unknown_env_message(name))
    return load_env_class(installed[name], name)


def unknown_env_message(name: str) -> str:
    return (f"unknown environment env.name={name!r}; choose one of {sorted(available_environments())}, or give an import "
            f"path module:Class to a TextEnv subclass (e.g. env=examples.guess:GuessEnv)")


def check_env_name(name: str) -> str | None:
    """None when `name` names an environment; otherwise why not. Built-in names are not
    imported (their optional packages load only when built); an import path or an installed
    name is loaded, so a bad one fails at config time, before any work."""
    if name in ENVIRONMENTS:
        return None
    if not is_import_path(name) and name not in installed_environments():
        return unknown_env_message(name)
    try:
        env_class(name)
    except EnvError as exc:
        return str(exc)
    return None


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


def with_tools(factory: EnvFactory, chat) -> EnvFactory:
    """`factory` with its tool settings following the model's chat format (`chat`: a
    `steppo.models.chat.ChatFormat`): its tool-call syntax, and whether its template presents
    the tool schemas."""
    settings = dataclasses.replace(factory.settings, tool_syntax=chat.tool_syntax, native_tools=chat.native_tools)
    return dataclasses.replace(factory, settings=settings)


REACT_MIN_NEW_TOKENS = 96  # response budget of a ReAct step (a short thought, then the action)


def env_factory(cfg) -> EnvFactory:
    """The configured environment's constructor: the environment's default settings, with the
    config's `EnvOptions` fields as they are, and ``max_steps`` / ``show_admissible`` where the
    config sets them (None = the environment's default).

    Args: cfg: `steppo.config.EnvConfig` (an `EnvOptions`).
    """
    refuse_in_env_process("a run (env_factory)")
    settings = env_class(cfg.name).default_settings()
    updates = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EnvOptions)}
    if cfg.react:  # a thought before the action needs room: never less than REACT_MIN_NEW_TOKENS
        updates["max_new_tokens"] = max(settings.max_new_tokens, REACT_MIN_NEW_TOKENS)
    if cfg.max_steps is not None:
        updates["max_steps"] = cfg.max_steps
    if cfg.show_admissible is not None:
        updates["show_admissible"] = cfg.show_admissible
    return EnvFactory(cfg.name, dataclasses.replace(settings, **updates), dict(cfg.params))
