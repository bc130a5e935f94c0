"""In-process generation with the training model (transformers), with per-episode KV caches."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from steppo.models.generation import EpisodeCache, Sample, generate, reusable_prefix


class LocalBackend:
    """Generates with the policy's own weights, so a rollout always uses the latest update.

    With ``kv_cache`` each episode keeps its keys and values between steps: with a cumulative
    context the next prompt extends the cached tokens, so only the observation's tokens are
    prefilled. Caches belong to the weights that made them: `invalidate` (called after every
    update) drops them all.

    Attributes:
        prefill_tokens: prompt tokens fed to the model so far (what caching saves).
        generated_tokens: tokens sampled so far.
    """

    def __init__(self, model: PreTrainedModel, stop_ids: set[int], temperature: float, pad_id: int,
                 kv_cache: bool = True):
        self.model = model
        self.stop_ids = stop_ids
        self.temperature = temperature
        self.pad_id = pad_id
        self.kv_cache = kv_cache
        self._caches: dict[str, EpisodeCache] = {}
        self.prefill_tokens = 0
        self.generated_tokens = 0

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        generators: list[torch.Generator],
        greedy: bool,
        keys: list[str],
    ) -> list[Sample]:
        caches = [self._caches.get(k) for k in keys] if self.kv_cache else None
        was_training = self.model.training
        self.model.eval()
        try:
            samples, kept = generate(
                self.model,
                prompts,
                max_new_tokens,
                self.stop_ids,
                temperature=self.temperature,
                greedy=greedy,
                generators=generators,
                pad_id=self.pad_id,
                caches=caches,
                keep_caches=self.kv_cache,
            )
        finally:
            self.model.train(was_training)
        for i, (key, prompt) in enumerate(zip(keys, prompts)):
            self.prefill_tokens += len(prompt) - reusable_prefix(caches[i] if caches else None, prompt)
            self.generated_tokens += len(samples[i].response_ids)
            if self.kv_cache:
                self._caches[key] = kept[i]
        return samples

    def release(self, key: str) -> None:
        """The episode ended: drop its cache."""
        self._caches.pop(key, None)

    def invalidate(self) -> None:
        """The weights changed: every cached key/value is stale."""
        self._caches.clear()
