"""Policy and critic around Hugging Face causal LMs, scored on a `TokenLayout`.

The policy never materialises (rows, length, vocab) logits: it runs the decoder once, takes the
hidden state just before each action token and applies the LM head there only, in chunks.
The critic is a scalar head on a decoder, either its own copy initialised from the policy's
weights (the paper's choice) or the policy's own decoder (cheaper; trained jointly).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from steppo.core.batch import TokenLayout
from steppo.core.losses import entropy_from_logits

LOGIT_CHUNK = 1024  # action tokens per LM-head chunk: bounds the (chunk, vocab) logits


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present; under a launcher (LOCAL_RANK set) bare ``cuda`` is this
    process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"model dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def load_options(model_cfg=None, *, weights: bool = True) -> dict:
    """``from_pretrained`` keywords from a `steppo.config.ModelConfig`: ``revision``,
    ``trust_remote_code`` and (for weights) ``attn_implementation``, those that are set."""
    if model_cfg is None:
        return {}
    out = {"revision": getattr(model_cfg, "revision", None),
           "trust_remote_code": bool(getattr(model_cfg, "trust_remote_code", False)) or None,
           "attn_implementation": getattr(model_cfg, "attn_implementation", None) if weights else None}
    return {k: v for k, v in out.items() if v is not None}


def options_for(path: str | Path, options: dict | None) -> dict:
    """`options` for `path`: a revision names a hub commit, so a local directory drops it."""
    options = dict(options or {})
    if Path(path).expanduser().is_dir():
        options.pop("revision", None)
    return options


def _check_source(path: str | Path) -> None:
    """A path that is neither an existing directory nor hub-shaped: a clear error, not the hub
    client's "Repo id must be in the form ..."."""
    from steppo.config import ConfigError, model_source

    if not Path(path).expanduser().is_dir() and model_source(str(path)) != "hub":
        raise ConfigError(f"model.name: {str(path)!r} is not an existing model directory "
                          f"({Path(path).expanduser().absolute()} does not exist) nor a Hugging Face hub id "
                          f"(owner/name); check the path")


def load_tokenizer(path: str | Path, options: dict | None = None):
    """The tokenizer of a model directory or hub id (`options`: see `load_options`).

    Tokenizers trained here are loaded as `PreTrainedTokenizerFast`: `AutoTokenizer` may pick
    a model-specific class that re-interprets their vocabulary (a `LlamaTokenizer` for a Llama config would add its own
    normaliser and prefix space).
    """
    _check_source(path)
    kw = options_for(path, options)
    kw.pop("attn_implementation", None)
    marker = Path(path) / "tokenizer_config.json"
    if marker.exists() and '"PreTrainedTokenizerFast"' in marker.read_text():
        return PreTrainedTokenizerFast.from_pretrained(str(path), **kw)
    return AutoTokenizer.from_pretrained(str(path), **kw)


def load_causal_lm(path: str | Path, dtype: torch.dtype, device: torch.device,
                   options: dict | None = None) -> PreTrainedModel:
    """A causal LM on `device` (`options`: see `load_options`)."""
    _check_source(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **options_for(path, options))
    return model.to(device)


def _decoder(model: nn.Module) -> nn.Module:
    """The transformer stack (without LM head) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def run_decoder(decoder: nn.Module, layout: TokenLayout) -> torch.Tensor:
    """(R, L, H) hidden states of a layout's rows.

    Rows are right-padded, so causal attention alone keeps every real token from seeing
    padding (only pad positions see real tokens, and nothing reads them): no 2-D mask is
    passed and attention can take its fused causal path. Packed rows restart their position
    ids at every chain, from which the model derives block-diagonal attention (flash-attention
    varlen on GPU); tree rows pass their explicit (R, 1, L, L) mask.
    """
    mask = layout.tree_mask[:, None] if layout.tree_mask is not None else None
    out = decoder(input_ids=layout.input_ids, position_ids=layout.position_ids, attention_mask=mask, use_cache=False)
    return out.last_hidden_state


class Policy(nn.Module):
    """A causal LM as a policy over action tokens.

    `temperature` divides the logits both when sampling and when scoring, so rollout and
    training log-probs are of the same distribution.
    """

    def __init__(self, model: PreTrainedModel, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError("the policy's sampling temperature must be positive (use greedy=True to decode greedily)")
        self.model = model
        self.temperature = temperature

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def decoder(self) -> nn.Module:
        return _decoder(self.model)

    @property
    def lm_head(self) -> nn.Module:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_output_embeddings()

    def hidden_states(self, layout: TokenLayout) -> torch.Tensor:
        """(R, L, H) last hidden states of the layout's rows."""
        return run_decoder(self.decoder, layout)

    def action_logprobs(
        self, hidden: torch.Tensor, layout: TokenLayout, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N,) log pi(a_i | context) of each action token, and optionally (N,) entropies."""
        h = layout.gather_actions(hidden)  # state just before each action token
        targets = layout.input_ids[layout.action_rows, layout.action_cols]
        logps, ents = [], []
        for start in range(0, h.shape[0], LOGIT_CHUNK):
            logits = self.lm_head(h[start : start + LOGIT_CHUNK]).float() / self.temperature
            logp = torch.log_softmax(logits, dim=-1)
            logps.append(logp.gather(-1, targets[start : start + LOGIT_CHUNK, None]).squeeze(-1))
            if with_entropy:
                ents.append(entropy_from_logits(logits))
        lp = torch.cat(logps) if logps else h.new_zeros(0, dtype=torch.float32)
        ent = (torch.cat(ents) if ents else h.new_zeros(0, dtype=torch.float32)) if with_entropy else None
        return lp, ent

    def forward(self, layout: TokenLayout, with_entropy: bool = False):
        hidden = self.hidden_states(layout)
        lp, ent = self.action_logprobs(hidden, layout, with_entropy)
        return lp, ent, hidden

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside, the policy computes the reference policy (LoRA adapters disabled)."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield
        else:
            raise RuntimeError("a full-weight policy has no built-in reference; keep a frozen copy")


class Critic(nn.Module):
    """V(state) = w . h + b on a decoder's last hidden state.

    With ``decoder=None`` the critic is shared: it reads hidden states the policy computed and
    owns only the head. The head starts at zero so initial values are 0.
    """

    def __init__(self, hidden_size: int, decoder: nn.Module | None = None):
        super().__init__()
        self.decoder = decoder
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def shared(self) -> bool:
        return self.decoder is None

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, L, H) -> (R, L) values at every position."""
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def forward(self, layout: TokenLayout) -> torch.Tensor:
        """(R, L) values, running the critic's own decoder."""
        if self.decoder is None:
            raise RuntimeError("a shared critic reads the policy's hidden states; call values()")
        return self.values(run_decoder(self.decoder, layout))


def make_critic(policy: Policy, shared: bool) -> Critic:
    """A critic on a copy of the policy's decoder (initialised from its weights) or shared."""
    hidden = policy.model.config.get_text_config().hidden_size
    decoder = None if shared else copy.deepcopy(policy.decoder)
    return Critic(hidden, decoder).to(policy.device)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the base model's names; peft LoRA adapters merged in (the model
    is left as it was)."""
    if hasattr(model, "merge_adapter"):  # peft: merge, read, unmerge
        model.merge_adapter()
        try:
            return {k.replace(".base_layer.", "."): v.detach().clone()
                    for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
        finally:
            model.unmerge_adapter()
    return {k: v.detach() for k, v in model.state_dict().items()}


def save_merged(model: nn.Module, path) -> None:
    """Save `model` as a plain transformers model directory (LoRA adapters merged in)."""
    if hasattr(model, "merge_adapter"):
        model.get_base_model().save_pretrained(path, state_dict=merged_state_dict(model))
    else:
        model.save_pretrained(path)


def apply_lora(model: PreTrainedModel, rank: int, alpha: float, dropout: float, targets: list[str] | str):
    """Wrap `model` with LoRA adapters (peft); only adapter weights stay trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("LoRA needs peft: pip install 'steppo[models]'") from exc
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; nothing on CPU (slower there) or for fp32."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()
