"""Shared test helpers for the core."""

from __future__ import annotations

import torch

from steppo.core.algorithms import AlgorithmConfig
from steppo.core.batch import StepBatch
from steppo.core.credit import Credit, Values, estimate_credit


def credit_of(
    batch: StepBatch,
    estimator: str,
    *,
    step_values: torch.Tensor | None = None,
    token_values: torch.Tensor | None = None,
    bootstrap: torch.Tensor | None = None,
    whiten_mode: str | None = None,
    **algo,
) -> Credit:
    """`estimate_credit` with the critic's scores and the algorithm's settings as keywords
    (``gamma, lam, token_discount, normalize_std, gigpo_step_weight``); no whitening by default."""
    scores = Values(step_values=step_values, token_values=token_values, bootstrap=bootstrap)
    return estimate_credit(batch, scores, AlgorithmConfig(estimator=estimator, whiten=whiten_mode, **algo))
