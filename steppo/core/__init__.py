"""The pure core: step records, batch layouts, credit assignment, losses, algorithm presets.

No model loading, no I/O, no text: token ids and tensors in, tensors out.
"""

from steppo.core.algorithms import PRESETS, AlgorithmConfig, ConfigError, preset
from steppo.core.batch import LAYOUTS, StepBatch, TokenLayout, build_layout
from steppo.core.credit import ESTIMATORS, Credit, estimate_credit, step_gae, token_gae, whiten
from steppo.core.losses import (
    aggregation_weights,
    kl_loss,
    policy_loss,
    ratio_units,
    segment_mean,
    value_loss,
)
from steppo.core.records import RecordError, Step, Trajectory

__all__ = [
    "AlgorithmConfig",
    "ConfigError",
    "Credit",
    "ESTIMATORS",
    "LAYOUTS",
    "PRESETS",
    "RecordError",
    "Step",
    "StepBatch",
    "TokenLayout",
    "Trajectory",
    "aggregation_weights",
    "build_layout",
    "estimate_credit",
    "kl_loss",
    "policy_loss",
    "preset",
    "ratio_units",
    "segment_mean",
    "step_gae",
    "token_gae",
    "value_loss",
    "whiten",
]
