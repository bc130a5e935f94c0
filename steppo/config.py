"""Typed configuration: every default lives in these dataclasses and nowhere else.

A run's config is built from the defaults, then a YAML file (``--config``), then dotted
command-line overrides, and validated as a whole::

    steppo train algo=grpo rollout.temperature=0.8 env=compass trainer.iterations=50

``algo=NAME`` (or ``algo: {name: NAME}`` in YAML) starts the algorithm section from a preset
before other ``algo.*`` keys apply; ``env=NAME`` is short for ``env.name=NAME``.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from steppo.core.algorithms import PRESETS, AlgorithmConfig, ConfigError, preset
from steppo.core.batch import LAYOUTS
from steppo.rollout.engine import CONTEXTS, SCHEDULES, RolloutSettings
from steppo.rollout.workers import WORKER_KINDS

__all__ = ["Config", "ConfigError", "load_config"]


@dataclass
class ModelConfig:
    """The policy model.

    Attributes:
        name: ``tiny`` (built here, tokenizer trained on the environment's text),
            ``smollm2-135m`` (offline real model), a local model directory, or a hub id.
        tiny_size: ``small`` (~0.8M parameters) or ``base`` (~5M) for ``tiny``.
        tiny_vocab: BPE vocabulary size for the ``tiny`` tokenizer.
        dtype: float32 | bfloat16 | float16 (autocast on CUDA; CPU stays float32).
        device: auto | cpu | cuda | cuda:N.
        lora_rank: LoRA rank for policy and critic (0 = full fine-tuning).
        gradient_checkpointing: recompute activations in the backward pass.
    """

    name: str = "tiny"
    tiny_size: str = "small"
    tiny_vocab: int = 1024
    dtype: str = "float32"
    device: str = "auto"
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    gradient_checkpointing: bool = False


@dataclass
class CriticConfig:
    """The critic (used only by presets with one).

    Attributes:
        shared: value head on the policy's decoder instead of its own copy of it.
        warmup_iterations: iterations that train only the critic before the policy moves
            (a critic that starts at 0 otherwise feeds noise into the first updates).
    """

    shared: bool = False
    warmup_iterations: int = 3


@dataclass
class EnvConfig:
    """The environment.

    Attributes:
        name: registered environment (see ``steppo.envs.registry``).
        max_steps: episode step limit (None = the environment's default).
        invalid_action_penalty, format_penalty: rewards added for bad actions.
        show_admissible: list valid commands in observations (None = environment default).
        react: ask for a short thought before each action (ReAct prompting, e.g. zero-shot).
        step_delay_s: extra latency per environment step (models slow environments in benchmarks).
        params: environment-specific settings (see each environment's docstring).
        train_split: the split training samples tasks from.
        eval_split: the held-out split validation reports.
    """

    name: str = "compass"
    max_steps: int | None = None
    invalid_action_penalty: float = 0.0
    format_penalty: float = 0.0
    show_admissible: bool | None = None
    react: bool = False
    step_delay_s: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "dev"


@dataclass
class TrainerConfig:
    """The update loop.

    Attributes:
        iterations: rollout + update cycles (an upper bound when max_env_steps is set).
        max_env_steps: stop once this many environment steps were played (0 = no budget);
            comparisons give every method the same budget.
        trajectories_per_iteration: episodes per update, equal across presets; group
            presets play trajectories_per_iteration / group_size tasks, group_size times each.
        epochs: passes over each batch (the paper uses 1).
        minibatch_steps: steps per optimiser step (0 = the whole batch); whole trajectories
            are kept together.
        micro_batch_tokens: model-input tokens per forward/backward (gradient accumulation).
        policy_lr, critic_lr: learning rates (Adam).
        lr_warmup_steps: optimiser steps of linear learning-rate warm-up.
        max_grad_norm: gradient-norm clip (0 = off).
        layout: per_step | prefix_shared | packed | tree | auto (see `steppo.core.batch`;
            auto = prefix_shared for cumulative contexts, per_step otherwise: on CPU/SDPA the
            packed and tree layouts read fewer tokens but need dense attention masks, which cost
            more than they save; see bench/packing.py).
        row_tokens: most tokens in one packed/tree row.
        old_logprobs: recompute (trainer's own pass before the update) | rollout (the
            sampler's numbers).
        eval_interval: iterations between validations (0 = only before and after).
        eval_episodes: held-out episodes per validation (the first ones of the split).
        eval_sampled: also validate with sampling, besides greedy.
        checkpoint_interval: iterations between checkpoints (0 = only at the end).
        keep_checkpoints: most recent checkpoints kept.
        sample_trajectories: trajectories written to samples.jsonl per iteration.
        parallel: auto | none | ddp | fsdp: how several processes (``torchrun``) train;
            auto = DDP when launched on several processes (see `steppo.trainer.distributed`).
        async_rollout: generate the next iterations' episodes while updating on this one's
            (see `steppo.trainer.asynchronous`).
        staleness: async only: most policy versions a batch's behaviour policy may lag the
            policy being updated (rollouts in flight ahead of the update).
        is_truncation: async only: cap c of the truncated step-level importance weight
            min(pi_prox / pi_behaviour, c) that corrects stale batches.
    """

    iterations: int = 60
    max_env_steps: int = 0
    trajectories_per_iteration: int = 32
    epochs: int = 2
    minibatch_steps: int = 64
    micro_batch_tokens: int = 16384
    policy_lr: float = 3e-4
    critic_lr: float = 1e-3
    lr_warmup_steps: int = 20
    max_grad_norm: float = 1.0
    layout: str = "auto"
    row_tokens: int = 2048
    old_logprobs: str = "recompute"
    eval_interval: int = 20
    eval_episodes: int = 200
    eval_sampled: bool = True
    checkpoint_interval: int = 20
    keep_checkpoints: int = 2
    sample_trajectories: int = 2
    parallel: str = "auto"
    async_rollout: bool = False
    staleness: int = 1
    is_truncation: float = 2.0


@dataclass
class SFTConfig:
    """Behaviour cloning on expert trajectories (warm start).

    Attributes:
        enabled: run SFT before RL in ``steppo train`` (None = only for the ``tiny`` model,
            which starts from random weights).
        demos: expert episodes from the training split.
        epochs: passes over the demos.
        lr: learning rate.
        batch_trajectories: demos per optimiser step.
    """

    enabled: bool | None = None
    demos: int = 1000
    epochs: int = 2
    lr: float = 2e-3
    batch_trajectories: int = 16


@dataclass
class RunConfig:
    """Where and how a run is recorded.

    Attributes:
        output_dir: run directory (config, metrics, checkpoints, samples, events).
        seed: seeds model init, task sampling and every episode's sampler.
        trackers: any of tensorboard, wandb, mlflow.
        wandb_project: W&B project (W&B honours WANDB_MODE=offline).
        mlflow_uri: MLflow tracking URI (a ``sqlite:///...`` URI works offline).
        cache_dir: where built-in models are cached (None = $STEPPO_CACHE or ~/.cache/steppo).
        progress: show progress bars.
    """

    output_dir: str = "runs/default"
    seed: int = 0
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "steppo"
    mlflow_uri: str | None = None
    cache_dir: str | None = None
    progress: bool = True


@dataclass
class Config:
    # The embedded default job adds a KL anchor to the warm-started policy (see README).
    algo: AlgorithmConfig = field(default_factory=lambda: preset("steppo", kl_coef=0.05))
    model: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        self.algo.validate()
        t, r = self.trainer, self.rollout

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(t.iterations >= 0, "trainer.iterations must be >= 0")
        need(t.max_env_steps >= 0, "trainer.max_env_steps must be >= 0")
        need(t.trajectories_per_iteration >= 1, "trainer.trajectories_per_iteration must be >= 1")
        need(
            t.trajectories_per_iteration % self.algo.group_size == 0,
            f"trainer.trajectories_per_iteration ({t.trajectories_per_iteration}) must be a multiple "
            f"of algo.group_size ({self.algo.group_size}) so every task gets a full group",
        )
        need(t.epochs >= 1, "trainer.epochs must be >= 1")
        need(t.minibatch_steps >= 0 and t.micro_batch_tokens >= 1, "minibatch_steps >= 0 and micro_batch_tokens >= 1")
        need(t.policy_lr > 0 and t.critic_lr > 0, "learning rates must be positive")
        need(t.lr_warmup_steps >= 0, "trainer.lr_warmup_steps must be >= 0")
        need(t.row_tokens >= 16, "trainer.row_tokens must be >= 16")
        need(t.layout in LAYOUTS + ("auto",), f"trainer.layout must be one of {LAYOUTS + ('auto',)}")
        need(t.old_logprobs in ("recompute", "rollout"), "trainer.old_logprobs must be recompute or rollout")
        need(t.eval_interval >= 0 and t.checkpoint_interval >= 0, "intervals must be >= 0")
        need(t.keep_checkpoints >= 1, "trainer.keep_checkpoints must be >= 1")
        need(t.parallel in ("auto", "none", "ddp", "fsdp"), "trainer.parallel must be auto, none, ddp or fsdp")
        need(r.context in CONTEXTS, f"rollout.context must be one of {CONTEXTS}")
        need(r.schedule in SCHEDULES, f"rollout.schedule must be one of {SCHEDULES}")
        need(r.max_new_tokens is None or r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1 (or null)")
        need(
            r.max_new_tokens is None or r.context_limit > r.max_new_tokens,
            f"rollout.context_limit ({r.context_limit}) must exceed rollout.max_new_tokens ({r.max_new_tokens})",
        )
        need(r.temperature > 0, "rollout.temperature must be > 0 (evaluation decodes greedily on its own)")
        need(r.num_envs >= 1 and r.max_batch >= 1, "rollout.num_envs and rollout.max_batch must be >= 1")
        need(r.step_timeout_s > 0, "rollout.step_timeout_s must be > 0")
        need(r.env_workers in WORKER_KINDS, f"rollout.env_workers must be one of {WORKER_KINDS}")
        need(r.backend in ("local", "vllm"), "rollout.backend must be local or vllm")
        need(self.env.step_delay_s >= 0, "env.step_delay_s must be >= 0")
        need(t.staleness >= 1, "trainer.staleness must be >= 1 (rollouts ahead of the update)")
        need(t.is_truncation >= 1.0, "trainer.is_truncation must be >= 1")
        need(self.model.lora_rank >= 0, "model.lora_rank must be >= 0")
        need(self.critic.warmup_iterations >= 0, "critic.warmup_iterations must be >= 0")
        need(
            not (self.critic.shared and self.model.lora_rank > 0 and self.algo.critic),
            "critic.shared with LoRA would train the value head on frozen features only; "
            "use a separate critic (critic.shared=false)",
        )
        need(self.sft.demos >= 1 and self.sft.epochs >= 0 and self.sft.lr > 0, "sft.demos >= 1, sft.epochs >= 0, sft.lr > 0")
        unknown = set(self.run.trackers) - {"tensorboard", "wandb", "mlflow"}
        need(not unknown, f"unknown trackers {sorted(unknown)}; choose from tensorboard, wandb, mlflow")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def sft_enabled(self) -> bool:
        return self.model.name == "tiny" if self.sft.enabled is None else self.sft.enabled

    @property
    def layout(self) -> str:
        if self.trainer.layout != "auto":
            return self.trainer.layout
        return "prefix_shared" if self.rollout.context == "cumulative" else "per_step"


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check (and gently convert) `value` against a type hint, or raise a ConfigError."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if hint is Any:
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} expects a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} expects a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} expects a string, got {value!r}")
        return value
    return value


def _set(section: Any, path: str, name: str, raw: Any) -> None:
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        close = difflib.get_close_matches(name, list(hints), n=1)
        hint = f" (did you mean {path}.{close[0]}?)" if close else ""
        raise ConfigError(f"unknown key {path}.{name}{hint}")
    setattr(section, name, _coerce(raw, hints[name], f"{path}.{name}"))


def _apply(config: Config, tree: dict[str, Any]) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    for top, value in tree.items():
        if top not in sections:
            close = difflib.get_close_matches(top, sorted(sections), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown config section {top!r}{hint}; sections: {sorted(sections)}")
        if top == "algo" and isinstance(value, str):
            value = {"name": value}
        if top == "env" and isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{top} must be a mapping of keys, got {value!r}")
        if top == "algo" and "name" in value:
            if value["name"] not in PRESETS:
                raise ConfigError(f"unknown algorithm {value['name']!r}; choose one of {sorted(PRESETS)}")
            config.algo = preset(value["name"])
            value = {k: v for k, v in value.items() if k != "name"}
        section = getattr(config, top)
        for name, raw in value.items():
            _set(section, top, name, raw)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "algo=grpo"]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. trainer.iterations=10)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] in ("algo", "env"):
            parts = [parts[0], "name"]  # algo=grpo is algo.name=grpo
        if len(parts) == 1:
            tree[parts[0]] = value  # _apply rejects a bare section with a clear message
            continue
        node = tree.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then the overrides; validated."""
    config = Config()
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of sections")
        _apply(config, data)
    _apply(config, parse_overrides(overrides or []))
    return config.validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `Config.to_dict` (e.g. a run's config.yaml)."""
    config = Config()
    algo = dict(data.get("algo", {}))
    rest = {k: v for k, v in data.items() if k != "algo"}
    if algo:
        config.algo = AlgorithmConfig(**algo)
    _apply(config, rest)
    return config.validate()
