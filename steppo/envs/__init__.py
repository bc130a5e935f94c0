"""Text environments: the interface, action parsing, and the built-in environments."""

from steppo.envs.base import EnvError, EnvSettings, Task, TextEnv, Transition

__all__ = ["EnvError", "EnvSettings", "Task", "TextEnv", "Transition"]
