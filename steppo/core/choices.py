"""Every named choice of the config, as `typing.Literal` types, and the one check of them.

Torch-free (so `steppo.config` and ``steppo --help`` load without torch): the config's dataclass
fields are annotated with these types, `steppo.config` checks every value against them at load
(`check_choice`, `check_choices`), and the runtime modules import the name tuples from here
(``from steppo.core.credit import ESTIMATORS`` etc. keep working). A tuple is always derived from
its Literal type, so each list of names is written once.

Two numeric defaults that torch code and the config share live here too (`DEFAULT_ROW_TOKENS`,
`RAY_CPUS_PER_ENV`), for the same reason.
"""

from __future__ import annotations

import difflib
import functools
import types
import typing
from typing import Any, Literal, get_args

__all__ = [
    "AGGREGATIONS", "CONTEXTS", "CRITIC_ESTIMATORS", "ConfigError", "DEFAULT_ROW_TOKENS", "ESTIMATORS",
    "GROUP_ESTIMATORS", "KL_ESTIMATORS", "LAYOUTS", "PARALLEL", "RATIO_LEVELS", "RAY_CPUS_PER_ENV", "SCHEDULES",
    "TOKEN_ESTIMATORS", "TRACKERS", "WHITEN_MODES", "WORKER_KINDS", "check_choice", "check_choices", "literal_choices",
]


class ConfigError(ValueError):
    """A configuration that cannot run, with the reason and the fix."""


# --------------------------------------------------------------------------- credit (steppo.core.credit)

Estimator = Literal["step_gae", "token_gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gigpo",
                    "broadcast"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
CRITIC_ESTIMATORS = {"step_gae": "step", "token_gae": "token"}
# Estimators whose advantages differ between the tokens of one step.
TOKEN_ESTIMATORS = ("token_gae", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline", "gigpo")
Whiten = Literal["step", "token"]
WHITEN_MODES = (None, *get_args(Whiten))
TokenDiscount = Literal["step", "token"]

# --------------------------------------------------------------------------- losses (steppo.core.losses)

RatioLevel = Literal["token", "step", "trajectory"]
RATIO_LEVELS: tuple[str, ...] = get_args(RatioLevel)
Aggregation = Literal["token-mean", "step-mean", "trajectory-mean"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)

# --------------------------------------------------------------------------- training (steppo.core.batch, trainer)

Layout = Literal["per_step", "prefix_shared", "packed", "tree"]
LAYOUTS: tuple[str, ...] = get_args(Layout)
LayoutOrAuto = Literal["auto", Layout]
OldLogprobs = Literal["recompute", "rollout"]
Parallel = Literal["auto", "none", "ddp", "fsdp"]
PARALLEL: tuple[str, ...] = get_args(Parallel)
DEFAULT_ROW_TOKENS = 2048  # most tokens in one packed/tree row (trainer.row_tokens)

# --------------------------------------------------------------------------- rollout (steppo.rollout)

Context = Literal["cumulative", "window", "env"]
CONTEXTS: tuple[str, ...] = get_args(Context)
Schedule = Literal["continuous", "rounds"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
WorkerKind = Literal["thread", "process", "ray"]
WORKER_KINDS: tuple[str, ...] = get_args(WorkerKind)
Backend = Literal["local", "vllm"]
RAY_CPUS_PER_ENV = 0.25  # CPUs each Ray environment actor reserves (rollout.ray_cpus_per_env)

# --------------------------------------------------------------------------- model and run

Dtype = Literal["float32", "bfloat16", "float16"]
TinySize = Literal["small", "base"]
ToolFormat = Literal["auto", "hermes", "llama3_json", "mistral"]  # steppo.envs.actions.TOOL_SYNTAXES, or auto
Tracker = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS: tuple[str, ...] = get_args(Tracker)


# --------------------------------------------------------------------------- the check


def check_choice(value: Any, allowed: tuple, key: str) -> Any:
    """`value` if it is one of `allowed`, else a ConfigError naming the key, the value, the
    allowed values and the closest one."""
    if any(value is a or (type(value) is type(a) and value == a) for a in allowed):
        return value
    names = [a for a in allowed if isinstance(a, str)]
    close = difflib.get_close_matches(value, names, n=1) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]}?)" if close else ""
    shown = ", ".join("null" if a is None else str(a) for a in allowed)
    leaf = key.rpartition(".")[2]
    raise ConfigError(f"{key}: unknown {leaf} {value!r}; choose one of {shown}{hint}")


def literal_choices(hint: Any) -> tuple | None:
    """The values a Literal hint allows (None added for ``Literal[...] | None``), else None."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if literals and all(typing.get_origin(a) is Literal or a is type(None) for a in args):
            return tuple(v for a in literals for v in typing.get_args(a)) + ((None,) if type(None) in args else ())
    return None


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, tuple, bool], ...]:
    """(field, allowed values, is a list of them) for every Literal-typed field of a dataclass."""
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        if typing.get_origin(hint) is list and typing.get_args(hint):
            allowed = literal_choices(typing.get_args(hint)[0])
            if allowed is not None:
                out.append((name, allowed, True))
            continue
        allowed = literal_choices(hint)
        if allowed is not None:
            out.append((name, allowed, False))
    return tuple(out)


def check_choices(section: Any, path: str) -> None:
    """Check every Literal-typed field of the dataclass instance `section` (config section
    `path`, e.g. ``rollout``) with `check_choice`."""
    for name, allowed, is_list in _choice_fields(type(section)):
        value = getattr(section, name)
        for v in (value if is_list else [value]):
            check_choice(v, allowed, f"{path}.{name}")
