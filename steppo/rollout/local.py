"""In-process generation with the training model (transformers, KV cache per call)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from steppo.models.generation import Sample, generate


class LocalBackend:
    """Generates with the policy's own weights, so a rollout always uses the latest update."""

    def __init__(self, model: PreTrainedModel, stop_ids: set[int], temperature: float, pad_id: int):
        self.model = model
        self.stop_ids = stop_ids
        self.temperature = temperature
        self.pad_id = pad_id

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        generators: list[torch.Generator],
        greedy: bool,
        keys: list[str],
    ) -> list[Sample]:
        was_training = self.model.training
        self.model.eval()
        try:
            return generate(
                self.model,
                prompts,
                max_new_tokens,
                self.stop_ids,
                temperature=self.temperature,
                greedy=greedy,
                generators=generators,
                pad_id=self.pad_id,
            )
        finally:
            self.model.train(was_training)

    def release(self, key: str) -> None:
        """Nothing is kept between calls."""
