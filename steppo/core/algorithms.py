"""Algorithm presets: each name fixes the credit estimator, the importance-ratio granularity,
whether a critic is trained, and default hyperparameters (the paper's baselines and step-level
importance sampling).

| preset               | MDP   | credit      | estimator             | ratio      | critic |
|----------------------|-------|-------------|-----------------------|------------|--------|
| steppo               | step  | step        | step_gae              | step       | step   |
| ppo                  | token | token       | token_gae             | token      | token  |
| reinforce_pp         | token | token       | reinforce_pp          | token      | -      |
| reinforce_pp_baseline| token | token/group | reinforce_pp_baseline | token      | -      |
| grpo                 | token | trajectory  | grpo                  | token      | -      |
| rloo                 | token | trajectory  | rloo                  | token      | -      |
| gspo                 | token | trajectory  | grpo                  | trajectory | -      |
| gigpo                | step  | traj + step | gigpo                 | token      | -      |
| lightningrl          | step  | trajectory  | broadcast             | token      | -      |
| steppo_no_step_gae   | step  | token       | token_gae             | step       | token  |
| steppo_no_step_is    | step  | step        | step_gae              | token      | step   |

Clip ranges follow the ratio: 0.2 for token and step ratios (a step ratio is a geometric mean
over a step's tokens, so it moves less than a token ratio but far more than a trajectory ratio),
GSPO's 3e-4 / 4e-4 for the trajectory ratio. A 3e-4 clip on token ratios would cripple a token
baseline, which is what the reference scripts did: clip ranges are chosen per ratio.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Torch-free: the config (`steppo.config`) loads this module without torch.
from steppo.core.choices import (
    CRITIC_ESTIMATORS,
    GROUP_ESTIMATORS,
    TOKEN_ESTIMATORS,
    Aggregation,
    ConfigError,
    Estimator,
    KLEstimator,
    RatioLevel,
    TokenDiscount,
    Whiten,
    check_choices,
)

__all__ = ["PRESETS", "AlgorithmConfig", "ConfigError", "preset"]


@dataclass
class AlgorithmConfig:
    """Everything credit assignment and the losses need; presets fill it, overrides refine it.

    Attributes:
        name: the preset it came from.
        estimator: credit estimator (see `steppo.core.credit.ESTIMATORS`).
        critic: whether a critic is trained; must match the estimator.
        ratio_level: importance-ratio granularity: token, step or trajectory.
        group_size: rollouts per task; group estimators compare them.
        gamma, lam: discount and GAE lambda (lambda = 1 is the reference code's setting).
        whiten: ``step`` (each step once), ``token`` or None; unbiased (Bessel) std. ``step``
            needs per-step advantages: refused for token-level estimators.
        token_discount: ``step`` or ``token``, for token-level estimators (see `token_gae`).
        normalize_std: divide group-centred outcomes by the group std (GRPO) or not.
        gigpo_step_weight: weight omega of GiGPO's anchor-state step term.
        clip_low, clip_high: surrogate clip range [1 - clip_low, 1 + clip_high].
        dual_clip: dual-clip constant for negative advantages (None = off).
        log_ratio_clamp: bound on the log importance ratio before exp.
        aggregation: token-mean, step-mean or trajectory-mean (see `steppo.core.losses`).
        kl_coef, kl_estimator: KL loss against the reference policy (0 = no reference model).
        entropy_coef: entropy bonus.
        value_clip: clip of the value loss (None = off).
        value_coef: weight of the critic loss (it has its own optimiser; kept for shared critics).
    """

    name: str = "steppo"
    estimator: Estimator = "step_gae"
    critic: bool = True
    ratio_level: RatioLevel = "step"
    group_size: int = 1
    gamma: float = 1.0
    lam: float = 1.0
    whiten: Whiten | None = "step"
    token_discount: TokenDiscount = "step"
    normalize_std: bool = True
    gigpo_step_weight: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    log_ratio_clamp: float = 10.0
    aggregation: Aggregation = "step-mean"
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    entropy_coef: float = 0.0
    value_clip: float | None = 0.5
    value_coef: float = 1.0

    @property
    def critic_level(self) -> str | None:
        """``step`` (values at step boundaries), ``token`` (at every action token) or None."""
        return CRITIC_ESTIMATORS.get(self.estimator) if self.critic else None

    @property
    def uses_reference(self) -> bool:
        return self.kl_coef > 0

    def validate(self) -> AlgorithmConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"algo ({self.name}): {msg}")

        check_choices(self, "algo")  # the Literal-typed fields (estimator, ratio_level, ...)
        need(
            not (self.whiten == "step" and self.estimator in TOKEN_ESTIMATORS),
            f"algo.whiten=step with the token-level estimator {self.estimator} would replace every "
            "token's advantage by its step's first token's; set algo.whiten=token or algo.whiten=null",
        )
        needs_critic = self.estimator in CRITIC_ESTIMATORS
        need(
            self.critic or not needs_critic,
            f"estimator {self.estimator} reads critic values but critic is off; "
            "set algo.critic=true or pick a critic-free estimator",
        )
        need(
            needs_critic or not self.critic,
            f"critic is on but estimator {self.estimator} never reads values; set algo.critic=false",
        )
        need(
            self.estimator not in GROUP_ESTIMATORS or self.group_size >= 2,
            f"estimator {self.estimator} compares rollouts of the same task: "
            f"group_size must be >= 2, got {self.group_size}",
        )
        need(self.group_size >= 1, f"group_size must be >= 1, got {self.group_size}")
        need(0.0 <= self.gamma <= 1.0, f"gamma must lie in [0, 1], got {self.gamma}")
        need(0.0 <= self.lam <= 1.0, f"lam must lie in [0, 1], got {self.lam}")
        need(0.0 < self.clip_low < 1.0, f"clip_low must lie in (0, 1), got {self.clip_low}")
        need(self.clip_high > 0.0, f"clip_high must be positive, got {self.clip_high}")
        need(self.dual_clip is None or self.dual_clip > 1.0, "dual_clip must exceed 1 (or be null)")
        need(self.log_ratio_clamp > 0.0, "log_ratio_clamp must be positive")
        need(self.kl_coef >= 0.0 and self.entropy_coef >= 0.0, "kl_coef and entropy_coef must be >= 0")
        need(self.value_clip is None or self.value_clip > 0.0, "value_clip must be positive (or null)")
        return self


def _preset(**kw) -> AlgorithmConfig:
    return AlgorithmConfig(**kw).validate()


_TOKEN_BASE = dict(ratio_level="token", aggregation="token-mean", critic=False, whiten=None)
_GROUP = dict(_TOKEN_BASE, group_size=8)

PRESETS: dict[str, AlgorithmConfig] = {
    "steppo": _preset(name="steppo"),
    "ppo": _preset(name="ppo", estimator="token_gae", **dict(_TOKEN_BASE, critic=True, whiten="token")),
    "reinforce_pp": _preset(name="reinforce_pp", estimator="reinforce_pp", **dict(_TOKEN_BASE, whiten="token")),
    "reinforce_pp_baseline": _preset(
        name="reinforce_pp_baseline", estimator="reinforce_pp_baseline", **dict(_GROUP, whiten="token")
    ),
    "grpo": _preset(name="grpo", estimator="grpo", **_GROUP),
    "rloo": _preset(name="rloo", estimator="rloo", **_GROUP),
    "gspo": _preset(
        name="gspo",
        estimator="grpo",
        **dict(_GROUP, ratio_level="trajectory", aggregation="trajectory-mean", clip_low=3e-4, clip_high=4e-4),
    ),
    "gigpo": _preset(name="gigpo", estimator="gigpo", **_GROUP),
    "lightningrl": _preset(
        name="lightningrl",
        estimator="broadcast",
        **dict(_TOKEN_BASE, whiten="step", aggregation="step-mean"),
    ),
    "steppo_no_step_gae": _preset(
        name="steppo_no_step_gae", estimator="token_gae", whiten="token"
    ),
    "steppo_no_step_is": _preset(name="steppo_no_step_is", ratio_level="token"),
}


def preset(name: str, **overrides) -> AlgorithmConfig:
    """A copy of a preset with overrides applied and validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"unknown algo keys {sorted(unknown)}; known: {sorted(fields)}")
    return dataclasses.replace(PRESETS[name], **overrides).validate()
