"""Typed configuration: every default lives in these dataclasses and nowhere else.

The sections are the settings classes the runtime itself uses, so nothing is copied field by
field: ``algo`` is `steppo.core.algorithms.AlgorithmConfig` (with its presets), ``rollout`` is
`RolloutSettings` (defined here, used by `steppo.rollout.engine`), ``env`` extends
`steppo.envs.base.EnvOptions` (the options `steppo.envs.base.EnvSettings` shares). Every choice
is a `typing.Literal` type from `steppo.core.choices`, checked at load (`_coerce`) and by
`Config.validate`: a bad name is a ConfigError naming the key, the value, the allowed values and
the closest one. Importing this module loads neither torch nor transformers (``steppo --help``
and ``steppo config`` stay quick); ``steppo config`` lists every key with its default and the
help below (`describe`).

A run's config is built from the defaults, then a YAML file (``--config``), then dotted
command-line overrides, and validated as a whole::

    steppo train algo=grpo rollout.temperature=0.8 env=compass trainer.iterations=50

The algorithm section is built in two passes, so no key is silently lost: first the algorithm
*name* is resolved from every source (the YAML's ``algo.name``, then ``algo=NAME`` on the
command line; the last one given wins, default ``steppo``); the section starts from that preset
plus the default job's `DEFAULT_ALGO_KEYS` (the KL anchor to the warm-started policy); then
every other ``algo.*`` key from the YAML and the command line applies in order. So
``--config configs/compass.yaml algo=grpo`` keeps the YAML's ``kl_coef``, and ``algo=steppo``
is exactly the default job. ``env=NAME`` is short for ``env.name=NAME``.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# All torch-free (see the module doc).
from steppo.core.algorithms import PRESETS, AlgorithmConfig, ConfigError, preset
from steppo.core.choices import (
    DEFAULT_ROW_TOKENS,
    Backend,
    Context,
    Dtype,
    LayoutOrAuto,
    OldLogprobs,
    Parallel,
    Schedule,
    TinySize,
    ToolFormat,
    Tracker,
    WorkerKind,
    check_choice,
    check_choices,
    literal_choices,
)
from steppo.envs.base import EnvOptions

__all__ = ["Config", "ConfigError", "RolloutSettings", "describe", "load_config"]


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
        lora_alpha: LoRA scaling numerator (the update is scaled by lora_alpha / lora_rank).
        lora_dropout: dropout on the LoRA branch.
        lora_targets: module names LoRA adapts (those the model has).
        gradient_checkpointing: recompute activations in the backward pass.
        chat_template: the chat template to use instead of the tokenizer's own: a Jinja file's
            path, or ``chatml`` (None = the tokenizer's template).
        revision: the hub revision (branch, tag or commit) of a hub model (None = its default).
        trust_remote_code: allow a hub model's own Python code (its modelling or tokenizer files).
        attn_implementation: attention kernel passed to from_pretrained (eager, sdpa,
            flash_attention_2; None = the transformers default).
        tool_format: the tool-call syntax of tool-calling environments: ``auto`` (the one the
            chat template teaches: ``hermes`` for Qwen's ``<tool_call>``, ``llama3_json``,
            ``mistral``; ``hermes`` when it teaches none) or one of those names.
        native_tools: give the tool schemas to the chat template (``apply_chat_template(tools=...)``)
            and tool results as ``tool`` turns; None = when the template renders tools, false =
            describe them in the system prompt (see ``steppo.models.chat``).
    """

    name: str = "tiny"
    tiny_size: TinySize = "small"
    tiny_vocab: int = 1024
    dtype: Dtype = "float32"
    device: str = "auto"
    lora_rank: int = 0
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    gradient_checkpointing: bool = False
    chat_template: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    tool_format: ToolFormat = "auto"
    native_tools: bool | None = None


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
class EnvConfig(EnvOptions):
    """The environment: `EnvOptions` (penalties, ReAct, step delay: given to the environment as
    they are), and which environment with which overrides of its own defaults.

    Attributes:
        name: a built-in or installed environment name, or an import path module:Class to a TextEnv
            subclass (see ``steppo.envs.registry``).
        max_steps: episode step limit (None = the environment's default).
        show_admissible: list valid commands in observations (None = environment default).
        params: environment-specific settings (see each environment's docstring).
        train_split: the split training samples tasks from.
        eval_split: the held-out split validation reports.
    """

    name: str = "compass"
    max_steps: int | None = None
    show_admissible: bool | None = None
    params: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "dev"


@dataclass
class RolloutSettings:
    """How episodes are run (the ``rollout`` section; `steppo.rollout.engine` runs with it).

    Attributes:
        context: cumulative | window | env (see `steppo.rollout.engine`).
        window: turns kept by the window context.
        max_new_tokens: generation budget of one step (None = the environment's).
        context_limit: longest prompt + response, in tokens.
        temperature: sampling temperature (the trainer scores with the same).
        max_batch: most episodes in one generation call.
        num_envs: environment workers (episodes running at once).
        env_workers: thread | process | ray (see `steppo.rollout.workers`).
        ray_address: Ray cluster for ``ray`` workers (None: start a local one; ``auto``: join
            the running cluster).
        ray_cpus_per_env: CPUs each environment actor reserves (None: 0.25, lowered so that
            rollout.num_envs actors fit the cluster's CPUs; an explicit value that does not fit
            is refused, as the actors would wait forever).
        backend: local (the training model generates, transformers, per-episode KV caches) |
            vllm (a vLLM engine fed the policy's weights after every update; see
            `steppo.rollout.vllm_backend`).
        vllm_gpu_memory_utilization: GPU memory fraction the vLLM engine may take.
        step_timeout_s: longest env.reset / env.step before the episode is failed.
        schedule: continuous | rounds (see `steppo.rollout.engine`).
        kv_cache: keep each episode's keys/values between steps (cumulative context only), so a
            step prefills only its new observation tokens.
        bootstrap_time_limit: treat the environment's step limit as a cut (truncated:
            bootstrap with V(next state)) instead of the end of the task (terminal, return 0).
            Off by default: when the limit is part of the task (ALFWorld's 50 steps, an
            evaluation that counts it as failure) the return after it is 0, the critic never
            sees states beyond it, and bootstrapping from them lets a policy collect value by
            stalling. Context overflows and environment failures always bootstrap.
    """

    context: Context = "cumulative"
    window: int = 2
    max_new_tokens: int | None = None
    context_limit: int = 4096
    temperature: float = 1.0
    max_batch: int = 64
    num_envs: int = 16
    env_workers: WorkerKind = "thread"
    ray_address: str | None = None
    ray_cpus_per_env: float | None = None
    backend: Backend = "local"
    vllm_gpu_memory_utilization: float = 0.4
    step_timeout_s: float = 60.0
    schedule: Schedule = "rounds"
    kv_cache: bool = True
    bootstrap_time_limit: bool = False


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
        max_nonfinite_updates: optimiser steps in a row skipped for a non-finite loss or
            gradient norm before the run stops with an error (nothing non-finite is saved).
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
    layout: LayoutOrAuto = "auto"
    row_tokens: int = DEFAULT_ROW_TOKENS
    old_logprobs: OldLogprobs = "recompute"
    eval_interval: int = 20
    eval_episodes: int = 200
    eval_sampled: bool = True
    checkpoint_interval: int = 20
    keep_checkpoints: int = 2
    sample_trajectories: int = 2
    parallel: Parallel = "auto"
    async_rollout: bool = False
    staleness: int = 1
    is_truncation: float = 2.0
    max_nonfinite_updates: int = 3


@dataclass
class SFTConfig:
    """Behaviour cloning on expert trajectories (warm start).

    Attributes:
        enabled: run SFT before RL in ``steppo train`` (None = only for the ``tiny`` model,
            which starts from random weights).
        demos: expert episodes from the training split.
        epochs: passes over the demos (4: with 2, the ``tiny`` model's cloning of compass sat on
            the plateau where it predicts the marginal action whatever the observation, and left
            it or not depending on bit-level numerics; see README, "The main job").
        lr: learning rate.
        batch_trajectories: demos per optimiser step.
        max_grad_norm: gradient-norm clip of each optimiser step (0 = off).
    """

    enabled: bool | None = None
    demos: int = 1000
    epochs: int = 4
    lr: float = 2e-3
    batch_trajectories: int = 16
    max_grad_norm: float = 1.0


@dataclass
class RunConfig:
    """Where and how a run is recorded.

    Attributes:
        output_dir: run directory (config, metrics, checkpoints, samples, events).
        seed: seeds model init, task sampling and every episode's sampler.
        trackers: any of tensorboard, wandb, mlflow.
        wandb_project: W&B project (W&B honours WANDB_MODE=offline).
        wandb_entity: W&B entity (team or user; None = your default).
        wandb_group: W&B group of runs (``steppo compare`` sets the protocol name).
        wandb_tags: W&B tags.
        mlflow_uri: MLflow tracking URI (a ``sqlite:///...`` URI works offline).
        mlflow_experiment: MLflow experiment (None = the run directory's name; ``steppo compare``
            sets the protocol name, one experiment per protocol).
        cache_dir: where built-in models are cached (None = $STEPPO_CACHE or ~/.cache/steppo).
        progress: progress on stdout: a live bar on a terminal, one line per iteration otherwise.
    """

    output_dir: str = "runs/default"
    seed: int = 0
    trackers: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "steppo"
    wandb_entity: str | None = None
    wandb_group: str | None = None
    wandb_tags: list[str] = field(default_factory=list)
    mlflow_uri: str | None = None
    mlflow_experiment: str | None = None
    cache_dir: str | None = None
    progress: bool = True


BUILTIN_MODELS = ("tiny", "smollm2-135m")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def model_source(name: str) -> str | None:
    """``builtin``, ``local`` (an existing directory), ``hub`` (shaped like owner/name) or None."""
    if name in BUILTIN_MODELS:
        return "builtin"
    path = Path(name).expanduser()
    if path.is_dir():
        return "local"
    if path.exists() or name.startswith(("/", "./", "../", "~")) or Path(name.split("/", 1)[0]).is_dir():
        return None  # a file, or a path that is not there (its first folder exists here)
    return "hub" if _HUB_ID.match(name) else None


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def preflight(config: Config) -> None:
    """Checks that depend on this machine, run before any work: the device exists, and a hub
    model can be had (from the cache when offline). Raises ConfigError naming the key."""
    device = config.model.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={device} but CUDA is not available on this machine "
                              f"(torch {torch.__version__}); use model.device=auto or model.device=cpu")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"model.device={device}: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device not in ("auto", "cpu") and not device.startswith("mps"):
        raise ConfigError(f"model.device={device!r}: use auto, cpu, cuda or cuda:N")
    name = config.model.name
    if model_source(name) != "hub":
        return
    where = "a local model directory"
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json", cache_dir=None), str):
            raise ConfigError(f"model.name={name!r} is not a local directory, and as a Hugging Face hub id it is "
                              f"not in the local cache while HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set; download "
                              f"it first (huggingface-cli download {name}) or point model.name at {where}")
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(name, "config.json", etag_timeout=5)
    except Exception as exc:  # offline, unknown repo, gated, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(f"model.name={name!r} is not a local directory and could not be fetched from the "
                          f"Hugging Face hub ({type(exc).__name__}: {first}); check the id and the network, "
                          f"set HF_HUB_OFFLINE=1 to use the cache, or point model.name at {where}") from exc


# The default job's algorithm keys, applied on top of whichever preset is chosen (before the YAML's
# and the command line's algo.* keys): a KL anchor to the warm-started policy (see README).
DEFAULT_ALGO_KEYS: dict[str, Any] = {"kl_coef": 0.05}
DEFAULT_ALGORITHM = "steppo"


@dataclass
class Config:
    """A run's whole configuration, one dataclass per section (``steppo config`` lists them)."""

    algo: AlgorithmConfig = field(default_factory=lambda: preset(DEFAULT_ALGORITHM, **DEFAULT_ALGO_KEYS))
    model: ModelConfig = field(default_factory=ModelConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        self.algo.validate()  # checks its own choices
        for section in dataclasses.fields(self):  # every other section's Literal-typed choices (also
            if section.name != "algo":            # checked at load; this catches values set in code)
                check_choices(getattr(self, section.name), section.name)
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
        need(t.eval_interval >= 0 and t.checkpoint_interval >= 0, "intervals must be >= 0")
        need(t.keep_checkpoints >= 1, "trainer.keep_checkpoints must be >= 1")
        need(r.max_new_tokens is None or r.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1 (or null)")
        need(
            r.max_new_tokens is None or r.context_limit > r.max_new_tokens,
            f"rollout.context_limit ({r.context_limit}) must exceed rollout.max_new_tokens ({r.max_new_tokens})",
        )
        need(r.temperature > 0, "rollout.temperature must be > 0 (evaluation decodes greedily on its own)")
        need(r.num_envs >= 1 and r.max_batch >= 1, "rollout.num_envs and rollout.max_batch must be >= 1")
        need(r.step_timeout_s > 0, "rollout.step_timeout_s must be > 0")
        need(self.env.step_delay_s >= 0, "env.step_delay_s must be >= 0")
        need(t.staleness >= 1, "trainer.staleness must be >= 1 (rollouts ahead of the update)")
        need(t.is_truncation >= 1.0, "trainer.is_truncation must be >= 1")
        need(t.max_nonfinite_updates >= 1, "trainer.max_nonfinite_updates must be >= 1")
        need(
            not (t.async_rollout and t.old_logprobs == "rollout"),
            "trainer.async_rollout=true with trainer.old_logprobs=rollout corrects staleness twice "
            "(advantages weighted by min(pi_prox / pi_behaviour, c) and the ratio taken against the "
            "behaviour policy); set trainer.old_logprobs=recompute (decoupled PPO: the ratio against "
            "the proximal policy) or trainer.async_rollout=false",
        )
        need(self.model.lora_rank >= 0, "model.lora_rank must be >= 0")
        need(self.critic.warmup_iterations >= 0, "critic.warmup_iterations must be >= 0")
        need(
            not (self.critic.shared and self.model.lora_rank > 0 and self.algo.critic),
            "critic.shared with LoRA would train the value head on frozen features only; "
            "use a separate critic (critic.shared=false)",
        )
        need(self.sft.demos >= 1 and self.sft.epochs >= 0 and self.sft.lr > 0, "sft.demos >= 1, sft.epochs >= 0, sft.lr > 0")
        need(self.sft.batch_trajectories >= 1,
             f"sft.batch_trajectories must be >= 1 (demos per optimiser step), got {self.sft.batch_trajectories}")
        need(self.sft.max_grad_norm >= 0,
             f"sft.max_grad_norm must be >= 0 (0 = no clipping), got {self.sft.max_grad_norm}")
        need(self.env.max_steps is None or self.env.max_steps >= 1,
             f"env.max_steps must be >= 1 (or null for the environment's default), got {self.env.max_steps}")
        need(t.max_grad_norm >= 0, f"trainer.max_grad_norm must be >= 0 (0 = no clipping), got {t.max_grad_norm}")
        need(r.window >= 0, f"rollout.window must be >= 0 (turns the window context keeps), got {r.window}")
        from steppo.envs.registry import check_env_name

        problem = check_env_name(self.env.name)  # a built-in or installed name, or module:Class
        need(problem is None, str(problem))
        need(model_source(self.model.name) is not None,
             f"model.name={self.model.name!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}), nor an "
             f"existing local model directory, nor a Hugging Face hub id (owner/name); check the path")
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
    allowed = literal_choices(hint)  # a Literal, or a Literal or None
    if allowed is not None:
        return check_choice(value, allowed, key)
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
        if top == "algo":
            value = {k: v for k, v in value.items() if k != "name"}  # resolved by `load_config`
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


def _algorithm_name(layers: list[dict[str, Any]]) -> str:
    """The algorithm a run uses: the last ``algo.name`` (or ``algo: NAME``) among the layers."""
    name = DEFAULT_ALGORITHM
    for tree in layers:
        algo = tree.get("algo")
        if isinstance(algo, dict):
            algo = algo.get("name", name)
        if algo is None:
            continue
        if not isinstance(algo, str) or algo not in PRESETS:
            raise ConfigError(f"unknown algorithm {algo!r}; choose one of {sorted(PRESETS)}")
        name = algo
    return name


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then the overrides; validated.

    The algorithm name is resolved from all of them first, then every ``algo.*`` key applies
    in order on top of that preset and `DEFAULT_ALGO_KEYS` (see the module doc).
    """
    layers = []
    if path is not None:
        layers.append(read_yaml(path))
    layers.append(parse_overrides(overrides or []))
    return _build(layers)


def _build(layers: list[dict[str, Any]], validate: bool = True) -> Config:
    config = Config(algo=preset(_algorithm_name(layers), **DEFAULT_ALGO_KEYS))
    for tree in layers:
        _apply(config, tree)
    return config.validate() if validate else config


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML mapping from `path`; a missing, unreadable or malformed file is a ConfigError
    naming the file (and the line of a YAML error)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {path} {'is a directory' if p.is_dir() else 'does not exist'}"
                          f"; pass the path of a YAML file (e.g. --config configs/compass.yaml)")
    try:
        with p.open() as f:  # a stream, so YAML errors name the file rather than "<unicode string>"
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- describing

_ENTRY = re.compile(r"^(\w+(?:\s*,\s*\w+)*):\s*(.*)$")


def _attributes(doc: str) -> dict[str, str]:
    """The ``Attributes:`` section of one docstring: name -> its text on one line."""
    lines = inspect.cleandoc(doc).splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Attributes:"), None)
    out: dict[str, str] = {}
    if start is None:
        return out
    names: list[str] = []
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent or depth == 0:
            break  # the end of the section
        text = " ".join(line.split())
        match = _ENTRY.match(text) if depth == indent else None
        if match:  # a new entry; anything else continues the current one
            names = [n.strip() for n in match.group(1).split(",")]
            text = match.group(2)
        for n in names:
            out[n] = f"{out.get(n, '')} {text}".strip()
    return out


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its help on one line, read from the ``Attributes:`` sections of the
    docstrings of `cls` and its bases (an entry ``a, b: text`` documents both; continuation
    lines are indented deeper; markup backticks are dropped)."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:  # a class's own docstring first, then its bases'
        doc = klass.__dict__.get("__doc__")
        for name, text in (_attributes(doc) if doc else {}).items():
            out.setdefault(name, re.sub(r"`+", "", text))
    return out


def describe(config: Config | None = None) -> list[tuple[str, Any, str]]:
    """``(section.key, default, help)`` for every key of `config` (default: the default job), in
    the dataclasses' order; the help comes from their docstrings (`field_help`)."""
    config = Config() if config is None else config
    rows = []
    for section in dataclasses.fields(config):
        obj = getattr(config, section.name)
        helps = field_help(type(obj))
        for f in dataclasses.fields(obj):
            rows.append((f"{section.name}.{f.name}", getattr(obj, f.name), helps.get(f.name, "")))
    return rows


def yaml_value(value: Any) -> str:
    """`value` as a one-line YAML scalar or flow collection (what ``key=VALUE`` overrides read)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def defaults_yaml(config: Config | None = None) -> str:
    """The defaults (`describe`) as a YAML config file, each key's help as a comment."""
    lines = ["# StepPO's defaults (steppo config --yaml): every key, its default and what it does."]
    section = None
    for key, value, text in describe(config):
        top, _, name = key.partition(".")
        if top != section:
            lines.append(f"{top}:")
            section = top
        lines.append(f"  {name}: {yaml_value(value)}" + (f"  # {text}" if text else ""))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- resuming

# Keys a resumed run may not change without --force: they define the weights, tokenizer and
# optimiser state in the checkpoint, the task stream, or (run.seed) the run's determinism.
RUN_DEFINING = (
    "model.name", "model.tiny_size", "model.tiny_vocab", "model.lora_rank", "model.lora_alpha",
    "model.lora_dropout", "model.lora_targets", "env.name", "env.params", "algo.name", "algo.estimator",
    "algo.critic", "critic.shared", "run.seed",
)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and not (prefix == "env." and k == "params"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_dir_from(path: str | Path | None, overrides: list[str] | None) -> Path:
    """The run directory named by the command line (``run.output_dir=``), else the config file,
    else the default."""
    for tree in (parse_overrides(overrides or []), read_yaml(path) if path is not None else {}):
        run = tree.get("run")
        if isinstance(run, dict) and run.get("output_dir") is not None:
            return Path(str(run["output_dir"]))
    return Path(RunConfig().output_dir)


def resume_config(path: str | Path | None = None, overrides: list[str] | None = None,
                  force: bool = False) -> tuple[Config, list[str]]:
    """The config of a run being resumed: its saved ``config.yaml``, then only the keys given
    explicitly (the ``--config`` file's and the command line's), validated; and one line per
    changed key. Changing a `RUN_DEFINING` key is refused unless `force`."""
    out = run_dir_from(path, overrides)
    saved_path = out / "config.yaml"
    if not saved_path.exists():
        raise ConfigError(f"nothing to resume in {out}: no {saved_path.name} (is run.output_dir right? drop "
                          f"--resume to start a new run there)")
    saved = read_yaml(saved_path, "saved run config")
    try:
        before = _build([saved])
    except ConfigError as exc:
        raise ConfigError(f"{saved_path}: {exc}") from exc
    explicit = ([read_yaml(path)] if path is not None else []) + [parse_overrides(overrides or [])]
    name = _algorithm_name([saved, *explicit])
    if name != before.algo.name:  # a different preset (forced): start from it, not the old algo keys
        saved = {k: v for k, v in saved.items() if k != "algo"}
    moved = Path(before.run.output_dir).resolve() != out.resolve()
    explicit.append({"run": {"output_dir": str(out) if moved else before.run.output_dir}})  # where the run is now
    after = _build([saved, *explicit], validate=False)  # what would change is said before any other error
    old, new = _flat(before.to_dict()), _flat(after.to_dict())
    changed = [k for k in new if old.get(k) != new[k]]
    blocked = [k for k in changed if k in RUN_DEFINING]
    if blocked and not force:
        what = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in blocked)
        raise ConfigError(f"resuming {out} would change {what}: the checkpoint's weights, tokenizer, optimiser "
                          f"state or determinism depend on {'it' if len(blocked) == 1 else 'them'}; start a new "
                          f"run in another run.output_dir, or pass --force to resume anyway")
    lines = [f"resume: {k}: {old.get(k)!r} -> {new[k]!r}{' (forced)' if k in blocked else ''}" for k in changed]
    return after.validate(), lines
