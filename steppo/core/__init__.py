"""The pure core: step records, batch layouts, credit assignment, losses, algorithm presets.

No model loading, no I/O, no text: token ids and tensors in, tensors out.

The names below load on first use (PEP 562), so importing a torch-free submodule such as
`steppo.core.choices` or `steppo.core.algorithms` (what `steppo.config` needs) does not import
torch through `steppo.core.batch`.
"""

from steppo.lazy import lazy_exports

_EXPORTS = {
    "AlgorithmConfig": "steppo.core.algorithms",
    "ConfigError": "steppo.core.algorithms",
    "PRESETS": "steppo.core.algorithms",
    "preset": "steppo.core.algorithms",
    "LAYOUTS": "steppo.core.batch",
    "StepBatch": "steppo.core.batch",
    "TokenLayout": "steppo.core.batch",
    "build_layout": "steppo.core.batch",
    "ESTIMATORS": "steppo.core.credit",
    "Credit": "steppo.core.credit",
    "estimate_credit": "steppo.core.credit",
    "step_gae": "steppo.core.credit",
    "token_gae": "steppo.core.credit",
    "whiten": "steppo.core.credit",
    "aggregation_weights": "steppo.core.losses",
    "kl_loss": "steppo.core.losses",
    "policy_loss": "steppo.core.losses",
    "ratio_units": "steppo.core.losses",
    "segment_mean": "steppo.core.losses",
    "value_loss": "steppo.core.losses",
    "RecordError": "steppo.core.records",
    "Step": "steppo.core.records",
    "Trajectory": "steppo.core.records",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
