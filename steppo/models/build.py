"""Resolve a model name to weights and assemble policy, critic and reference for a run."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from steppo.core.choices import ConfigError
from steppo.models.builtin import CHATML_TEMPLATE, build_tiny, smollm2_135m
from steppo.models.chat import ChatFormat
from steppo.models.policy import (
    Critic,
    Policy,
    apply_lora,
    load_causal_lm,
    load_options,
    load_tokenizer,
    make_critic,
    resolve_device,
    resolve_dtype,
)
from steppo.paths import default_cache_dir


@dataclass
class Models:
    policy: Policy
    critic: Critic | None
    reference: Policy | None  # None: no KL, or LoRA (the policy with adapters off is the reference)
    tokenizer: object
    chat: ChatFormat
    base_path: Path
    device: torch.device
    dtype: torch.dtype

    def policy_reference(self):
        """Context in which `reference_policy` computes the reference log-probs."""
        return self.policy.reference() if self.reference is None else nullcontext()

    @property
    def reference_policy(self) -> Policy:
        return self.policy if self.reference is None else self.reference


def resolve_base_model(
    name: str, run_dir: Path, corpus: Callable[[], list[str]], tiny_size: str, tiny_vocab: int,
    seed: int, cache_dir: str | None,
) -> Path:
    """The directory holding the initial weights for `name`.

    ``tiny`` is built once per run directory (tokenizer trained on `corpus()`), so resuming or
    evaluating reuses the same vocabulary.
    """
    if name == "tiny":
        target = run_dir / "base_model"
        if not (target / "config.json").exists():
            build_tiny(corpus(), target, vocab_size=tiny_vocab, size=tiny_size, seed=seed)
        return target
    if name == "smollm2-135m":
        return smollm2_135m(Path(cache_dir) if cache_dir else default_cache_dir())
    path = Path(name).expanduser()  # a local directory or a hub id
    if path.is_dir() and not (path / "config.json").exists():
        raise ConfigError(f"model.name={name!r}: the directory {path.absolute()} holds no config.json, so it is "
                          f"not a Hugging Face model directory; check the path")
    return path if path.is_dir() else Path(name)


def chat_template(spec: str) -> str:
    """The text of ``model.chat_template``: ``chatml`` or a Jinja file's path."""
    if spec == "chatml":
        return CHATML_TEMPLATE
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.chat_template={spec!r}: no such file ({path.absolute()}); give a Jinja chat "
                          f"template file or chatml")
    return path.read_text()


def build_models(model_cfg, *, base_path: Path, with_critic: bool, shared_critic: bool,
                 with_reference: bool, temperature: float, policy_dir: Path | None = None,
                 reference_path: Path | None = None) -> Models:
    """Load tokenizer and policy (from `policy_dir` when resuming), then critic and reference
    (frozen weights from `reference_path`, default the base model; with LoRA and no
    `reference_path` the reference is the policy with its adapters switched off).

    Args: model_cfg: `steppo.config.ModelConfig`.
    """
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype)
    weights_dtype = torch.float32 if device.type == "cpu" else dtype
    options = load_options(model_cfg)
    tokenizer = load_tokenizer(base_path, load_options(model_cfg, weights=False))
    if getattr(model_cfg, "chat_template", None):
        tokenizer.chat_template = chat_template(model_cfg.chat_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = ChatFormat(tokenizer, model_cfg.tool_format, model_cfg.native_tools)
    use_lora = model_cfg.lora_rank > 0
    if use_lora:
        base = load_causal_lm(base_path, weights_dtype, device, options)
        if policy_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(policy_dir), is_trainable=True)
        else:
            model = apply_lora(base, model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_dropout, model_cfg.lora_targets)
    else:
        model = load_causal_lm(policy_dir or base_path, weights_dtype, device, options)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(model, temperature=temperature)
    critic = make_critic(policy, shared_critic) if with_critic else None
    reference = None
    if with_reference and (not use_lora or reference_path is not None):  # LoRA alone: adapters disabled
        reference = load_reference(reference_path or base_path, weights_dtype, device, temperature, options)
    return Models(policy, critic, reference, tokenizer, chat, base_path, device, dtype)


def load_reference(path: Path, dtype: torch.dtype, device: torch.device, temperature: float,
                   options: dict | None = None) -> Policy:
    """A frozen policy (`options`: `steppo.models.policy.load_options`)."""
    model = load_causal_lm(path, dtype, device, options).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Policy(model, temperature=temperature)
