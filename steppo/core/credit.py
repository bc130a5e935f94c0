"""Credit assignment: from rewards (and critic values) to advantages, for every preset.

Every estimator reads the same per-step inputs, on padded per-trajectory timelines:
``rewards, values, mask (B, T)`` for steps, ``(B, K)`` for action tokens, ``bootstrap (B,)``
(V of the state after the last step: 0 when the episode terminated, the critic's value of the
next state when it was truncated). Computation is vectorised over the batch; the only Python
loop runs backwards over the horizon. Padding (``mask == False``) never influences a result,
and results at padding are 0.

Each estimator is one function ``fn(batch, scored, algo) -> Credit`` (a `StepBatch`, the
critic's `Scores`, the `AlgorithmConfig`), registered under its name with `register_estimator`
in `ESTIMATOR_REGISTRY`, StepPO's `step_gae_credit` first. `estimate_credit` looks the preset's
estimator up there and applies the shared whitening; a `Credit` holds advantages per step and
per action token (a step's advantage copied to its tokens for step estimators). The tensor
kernels below them (`step_gae`, `token_gae`, `grpo`, ...) work on padded timelines and flat
group ids; one backward loop (`_gae`) computes every GAE and discounted return.

One normalisation rule everywhere (GRPO's group std, GiGPO's anchor groups, `whiten`): the
standard deviation uses Bessel's correction, sqrt(sum (x - mean)^2 / (n - 1)), as verl does;
a single entry (or a group of one) normalises to 0, never NaN.

Device-safe: every tensor is created on the inputs' device with their dtype, and no result
depends on reading data back to the host (counts come from shapes), so the same code runs on
CPU, GPU and the `meta` device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from steppo.core.batch import StepBatch

# The estimator names (defined with the config's choices, torch-free), importable from here.
from steppo.core.choices import (  # noqa: F401
    CRITIC_ESTIMATORS,
    ESTIMATORS,
    GROUP_ESTIMATORS,
    TOKEN_ESTIMATORS,
    WHITEN_MODES,
)

if TYPE_CHECKING:  # the presets import the names above from here: no import cycle at runtime
    from steppo.core.algorithms import AlgorithmConfig

EPS = 1e-8


# --------------------------------------------------------------------------- the registry


class Scores(Protocol):
    """What the estimators read of the critic's no-grad scores, in canonical order; None where
    not scored. The trainer's `Scored` is one; `Values` builds one directly."""

    @property
    def step_values(self) -> torch.Tensor | None:
        """(S,) V(s_t) at each step boundary (a step critic)."""

    @property
    def token_values(self) -> torch.Tensor | None:
        """(N,) V at every action token (a token critic)."""

    @property
    def bootstrap(self) -> torch.Tensor | None:
        """(B,) V(next state) of truncated trajectories (ignored where terminated; 0 if None)."""


@dataclass(frozen=True)
class Values:
    """`Scores` given directly (tests, benchmarks, callers without the trainer)."""

    step_values: torch.Tensor | None = None  # (S,)
    token_values: torch.Tensor | None = None  # (N,)
    bootstrap: torch.Tensor | None = None  # (B,)


@dataclass
class Credit:
    """Advantages (and critic targets) in canonical flat order.

    Shapes: ``step_advantages (S,)``, ``token_advantages (N,)``; ``returns`` is the critic target,
    ``(S,)`` for a step critic, ``(N,)`` for a token critic, ``None`` without a critic.
    """

    step_advantages: torch.Tensor
    token_advantages: torch.Tensor
    returns: torch.Tensor | None

    @classmethod
    def from_steps(
        cls, batch: StepBatch, step_advantages: torch.Tensor, returns: torch.Tensor | None = None
    ) -> Credit:
        """(S,) advantages per step, each copied to every action token of its step."""
        return cls(step_advantages, batch.steps_to_tokens(step_advantages), returns)

    @classmethod
    def from_tokens(
        cls, batch: StepBatch, token_advantages: torch.Tensor, returns: torch.Tensor | None = None
    ) -> Credit:
        """(N,) advantages per action token; a step's is its first token's (that of the state s_t)."""
        return cls(token_advantages[batch.first_token], token_advantages, returns)


CreditFn = Callable[[StepBatch, Scores, "AlgorithmConfig"], Credit]
# Estimator name -> fn(batch, scored, algo) -> Credit, in the order they are defined below.
ESTIMATOR_REGISTRY: dict[str, CreditFn] = {}


def register_estimator(name: str) -> Callable[[CreditFn], CreditFn]:
    """Decorator: register ``fn(batch, scored, algo) -> Credit`` as the estimator `name` (as
    verl's ``register_adv_est``)."""

    def register(fn: CreditFn) -> CreditFn:
        if name in ESTIMATOR_REGISTRY:
            taken = ESTIMATOR_REGISTRY[name].__name__
            raise ValueError(f"estimator {name!r} is registered already, by {taken}")
        ESTIMATOR_REGISTRY[name] = fn
        return fn

    return register


def get_estimator(name: str) -> CreditFn:
    """The registered estimator `name`; a ValueError naming the known ones for any other name."""
    if name not in ESTIMATOR_REGISTRY:
        raise ValueError(f"unknown estimator {name!r}; choose one of {tuple(ESTIMATOR_REGISTRY)}")
    return ESTIMATOR_REGISTRY[name]


def estimate_credit(batch: StepBatch, scored: Scores, algo: AlgorithmConfig) -> Credit:
    """Advantages for a batch: the registered estimator ``algo.estimator``, then the shared
    whitening ``algo.whiten``.

    Whitening: ``"step"`` over steps (each step once, whatever its length), ``"token"`` over
    action tokens (long steps weigh more), None leaves them; both with the unbiased std (see the
    module doc). ``"step"`` needs one advantage per step, so it is refused for the token-level
    estimators (`TOKEN_ESTIMATORS`). The estimators read ``algo.gamma, lam, token_discount,
    normalize_std, gigpo_step_weight`` and, where they need a critic, `scored`.

    All tensors are created on the batch's device (see the module doc).
    """
    estimator, mode = get_estimator(algo.estimator), algo.whiten
    if mode not in WHITEN_MODES:
        raise ValueError(f"whiten_mode must be one of {WHITEN_MODES}, got {mode!r}")
    if mode == "step" and algo.estimator in TOKEN_ESTIMATORS:
        raise ValueError(
            f"whiten_mode='step' with the token-level estimator {algo.estimator!r} would replace "
            "every token's advantage by its step's first token's; use whiten_mode='token' or None"
        )
    credit = estimator(batch, scored, algo)
    if mode == "step":
        adv = credit.step_advantages
        return Credit.from_steps(batch, whiten(adv, torch.ones_like(adv, dtype=torch.bool)), credit.returns)
    if mode == "token":
        adv = credit.token_advantages
        return Credit.from_tokens(batch, whiten(adv, torch.ones_like(adv, dtype=torch.bool)), credit.returns)
    return credit


# --------------------------------------------------------------------------- the estimators


@register_estimator("step_gae")
def step_gae_credit(batch: StepBatch, scored: Scores, algo: AlgorithmConfig) -> Credit:
    """StepPO: GAE over the steps of each trajectory (the paper's step-level credit assignment), the critic read at step boundaries.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t);  A_t = delta_t + gamma lam A_{t+1};
    R_t = A_t + V(s_t) (the critic targets, (S,)), with V(s_{T+1}) = the bootstrap (0 after a
    terminated step).
    """
    values = _needs(scored.step_values, "step_gae needs step_values: the critic's V_t at each step boundary")
    adv, ret = step_gae(
        _step_rewards(batch), batch.steps_to_padded(values), batch.step_mask, _bootstrap(batch, scored),
        algo.gamma, algo.lam,
    )
    return Credit.from_steps(batch, batch.padded_to_steps(adv), batch.padded_to_steps(ret))


@register_estimator("token_gae")
def token_gae_credit(batch: StepBatch, scored: Scores, algo: AlgorithmConfig) -> Credit:
    """PPO: GAE over each trajectory's action tokens, the critic read at every token (`token_gae`).

    delta_i = r_i + g_i V_{i+1} - V_i;  A_i = delta_i + g_i l_i A_{i+1};  R_i = A_i + V_i, a step's
    reward on its last token. With ``token_discount="step"`` g, l are gamma, lam across a step
    boundary and 1 inside a step, so A_i = R_t - V_i telescopes, R_t the step-level GAE return on
    the values at each step's first token: O(T), not O(K) (pinned against `token_gae`).
    """
    values = _needs(scored.token_values, "token_gae needs token_values: the critic's V at every action token")
    boot = _bootstrap(batch, scored)
    if algo.token_discount == "step":
        first_values = batch.steps_to_padded(values[batch.first_token])
        _, ret = step_gae(_step_rewards(batch), first_values, batch.step_mask, boot, algo.gamma, algo.lam)
        returns = batch.steps_to_tokens(batch.padded_to_steps(ret))
        return Credit.from_tokens(batch, returns - values, returns)
    adv, ret = token_gae(
        _token_rewards(batch), batch.tokens_to_padded(values), batch.token_mask, batch.step_end, boot,
        algo.gamma, algo.lam, algo.token_discount,
    )
    return Credit.from_tokens(batch, batch.padded_to_tokens(adv), batch.padded_to_tokens(ret))


@register_estimator("grpo")
def grpo_credit(batch: StepBatch, scored: Scores, algo: AlgorithmConfig) -> Credit:
    """GRPO: A_t = (R - mean_g R) / (std_g R + eps) at every step of a trajectory with outcome
    R = sum_t r_t, within its task group g (`grpo`; ``normalize_std=False`` is Dr. GRPO)."""
    adv = grpo(_outcomes(batch), batch.group, algo.normalize_std)
    return Credit.from_steps(batch, batch.trajectories_to_steps(adv))


@register_estimator("rloo")
def rloo_credit(batch: StepBatch, scored: Scores, algo: AlgorithmConfig) -> Credit:
    """RLOO: A_t = R - mean of the other group members' outcomes R', at every step (`rloo`)."""
    return Credit.from_steps(batch, batch.trajectories_to_steps(rloo(_outcomes(batch), batch.group)))


@register_estimator("reinforce_pp")
def reinforce_pp_credit(batch: StepBatch, scored: Scores, algo: AlgorithmConfig) -> Credit:
    """REINFORCE++: A_i = G_i, the discounted return from token i to the end of the trajectory
    (no critic, no bootstrap), so an outcome reward reaches every earlier step (the paper's reference code lost it)."""
    return Credit.from_tokens(batch, _return_to_go(batch, algo.gamma, algo.token_discount))


@register_estimator("reinforce_pp_baseline")
def reinforce_pp_baseline_credit(batch: StepBatch, scored: Scores, algo: AlgorithmConfig) -> Credit:
    """REINFORCE++ with a group baseline: A_i = G_i - mean_{b' in g} G_{b'}(s_0), the return-to-go
    minus the mean trajectory return (G at the first token) of the task group g."""
    rtg = _return_to_go(batch, algo.gamma, algo.token_discount)
    count, total, _ = _group_stats(rtg[batch.token_start], batch.group, batch.num_trajectories)
    return Credit.from_tokens(batch, rtg - (total / count)[batch.token_traj])


@register_estimator("gigpo")
def gigpo_credit(batch: StepBatch, scored: Scores, algo: AlgorithmConfig) -> Credit:
    """GiGPO: A_t = GRPO(R) + omega (G_t - mean_a G) / (std_a G + eps): the episode term plus the
    step's discounted return G_t normalised within its anchor-state group a (`gigpo_step_term`)."""
    episode = batch.trajectories_to_steps(grpo(_outcomes(batch), batch.group, algo.normalize_std))
    returns = discounted_returns(_step_rewards(batch), batch.step_mask, algo.gamma)
    step_term = gigpo_step_term(batch.padded_to_steps(returns), batch.anchor, algo.normalize_std)
    return Credit.from_steps(batch, episode + algo.gigpo_step_weight * step_term)


@register_estimator("broadcast")
def broadcast_credit(batch: StepBatch, scored: Scores, algo: AlgorithmConfig) -> Credit:
    """LightningRL: A_t = R = sum_t r_t, the trajectory's outcome copied to every step."""
    return Credit.from_steps(batch, batch.trajectories_to_steps(_outcomes(batch)))


# --------------------------------------------------------------------------- estimator inputs


def _needs(x: torch.Tensor | None, message: str) -> torch.Tensor:
    if x is None:
        raise ValueError(message)
    return x


def _bootstrap(batch: StepBatch, scored: Scores) -> torch.Tensor:
    """(B,) V(s_{T+1}): the critic's value of the next state where truncated, 0 where terminated."""
    boot = scored.bootstrap
    if boot is None:
        return batch.rewards.new_zeros(batch.num_trajectories)
    return torch.where(batch.terminated, 0.0, boot.to(batch.rewards.dtype))


def _outcomes(batch: StepBatch) -> torch.Tensor:
    """(B,) R = sum_t r_t, each trajectory's total reward."""
    return batch.rewards.new_zeros(batch.num_trajectories).index_add_(0, batch.step_traj, batch.rewards)


def _step_rewards(batch: StepBatch) -> torch.Tensor:
    """(B, T) r_t on the padded step timeline, 0 at padding."""
    return batch.steps_to_padded(batch.rewards)


def _token_rewards(batch: StepBatch) -> torch.Tensor:
    """(B, K) each step's reward on its last action token, 0 elsewhere."""
    return torch.where(batch.step_end, batch.tokens_to_padded(batch.steps_to_tokens(batch.rewards)), 0)


def _return_to_go(batch: StepBatch, gamma: float, discount: str) -> torch.Tensor:
    """(N,) discounted return from each action token to the end of its trajectory (no bootstrap),
    discounted once per step (``"step"``: the step's return, copied to its tokens) or at every
    token (``"token"``)."""
    if discount == "step":
        returns = discounted_returns(_step_rewards(batch), batch.step_mask, gamma)
        return batch.steps_to_tokens(batch.padded_to_steps(returns))
    rewards = _token_rewards(batch)
    no_boot = rewards.new_zeros(batch.num_trajectories)
    adv, _ = token_gae(rewards, torch.zeros_like(rewards), batch.token_mask, batch.step_end, no_boot, gamma, 1.0, discount)
    return batch.padded_to_tokens(adv)


# --------------------------------------------------------------------------- kernels: whitening, GAE


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over mask (0 when the mask is empty)."""
    n = mask.sum()
    return torch.where(mask, x, 0).sum() / n.clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries, each entry counted once; 0 outside.

    Unbiased variance (Bessel's correction, sum (x - mean)^2 / (n - 1), as verl's
    ``masked_whiten`` and GRPO's group std here); one entry whitens to 0 rather than NaN.
    """
    mean = masked_mean(x, mask)
    n = mask.sum()
    sq = torch.where(mask, (x - mean) ** 2, 0).sum()
    var = sq / (n - 1).clamp(min=1)
    return torch.where(mask, (x - mean) * torch.rsqrt(var + eps), 0)


def _gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    bootstrap: torch.Tensor,
    gamma: torch.Tensor | float,
    lam: torch.Tensor | float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The one GAE implementation: the backward loop over a left-aligned timeline (B, H),
    vectorised over the batch; gamma/lam are floats or (B, H) per-position factors.

    delta_h = r_h + gamma_h * V_{h+1} - V_h, A_h = delta_h + gamma_h * lam_h * A_{h+1}, where the
    value after the last real position is `bootstrap` (B,) and A after it is 0. Returns
    advantages and returns A + V, (B, H), 0 at padding.
    """
    B, H = rewards.shape
    gamma = torch.as_tensor(gamma, dtype=rewards.dtype, device=rewards.device).expand(B, H)
    lam = torch.as_tensor(lam, dtype=rewards.dtype, device=rewards.device).expand(B, H)
    adv = torch.zeros_like(rewards)
    next_value = bootstrap.to(rewards.dtype)
    next_adv = rewards.new_zeros(B)
    for h in range(H - 1, -1, -1):
        m = mask[:, h]
        delta = rewards[:, h] + gamma[:, h] * next_value - values[:, h]
        a = delta + gamma[:, h] * lam[:, h] * next_adv
        adv[:, h] = torch.where(m, a, 0)
        # Padding lies after the real positions: it hands the bootstrap and a zero advantage on.
        next_value = torch.where(m, values[:, h], next_value)
        next_adv = torch.where(m, a, next_adv)
    returns = torch.where(mask, adv + values, 0)
    return adv, returns


# --------------------------------------------------------------------------- kernels: step level


def step_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    bootstrap: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over steps (the paper's step-level credit assignment), the kernel of StepPO's estimator (`step_gae_credit`).

    delta_t = r_t + gamma V_{t+1} - V_t;  A_t = delta_t + gamma lam A_{t+1};  R_t = A_t + V_t,
    with V_{T+1} = bootstrap (0 after a terminated step, V(next state) after a truncated one).

    Args: rewards, values, mask (B, T); bootstrap (B,). Returns advantages, returns (B, T).
    """
    return _gae(rewards, values, mask, bootstrap, gamma, lam)


def discounted_returns(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """G_t = r_t + gamma G_{t+1} over each trajectory, G after the last step = 0.  (B, T)."""
    zeros = torch.zeros_like(rewards)
    returns, _ = _gae(rewards, zeros, mask, rewards.new_zeros(rewards.shape[0]), gamma, 1.0)
    return returns


# --------------------------------------------------------------------------- kernels: token level


def token_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    step_end: torch.Tensor,
    bootstrap: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
    discount: str = "step",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's estimator: GAE over the generated tokens of each trajectory, across its steps.

    The timeline is the trajectory's action tokens only (prompt and observation tokens are
    skipped); a step's reward sits on its last token; V at a token is the critic's value of the
    state just before it.

    ``discount="step"`` (default) applies gamma and lam only when crossing a step boundary, so a
    step is discounted once, as in the step-level MDP. ``discount="token"`` applies them at
    every token, the textbook token MDP: with gamma = 0.99 a 500-token step then shrinks the
    next step's credit by 0.99^500 ~ 0.007, which erases cross-step credit and confounds any
    comparison with step-level methods (a defect of the paper's reference code).

    Args: rewards, values, mask, step_end (B, K); bootstrap (B,). Returns advantages, returns.
    """
    if discount == "step":
        g = torch.where(step_end, gamma, 1.0)
        lmb = torch.where(step_end, lam, 1.0)
    elif discount == "token":
        g, lmb = gamma, lam
    else:
        raise ValueError(f"token_gae discount must be 'step' or 'token', got {discount!r}")
    return _gae(rewards, values, mask, bootstrap, g, lmb)


# --------------------------------------------------------------------------- kernels: trajectory level


def _group_stats(
    x: torch.Tensor, index: torch.Tensor, num: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-member group count, sum, and unbiased std (Bessel) of x over members sharing
    `index` (M,); group ids must be < `num` (unused ids are empty groups)."""
    count = x.new_zeros(num).index_add_(0, index, torch.ones_like(x))
    total = x.new_zeros(num).index_add_(0, index, x)
    mean = total / count.clamp(min=1)
    sq = x.new_zeros(num).index_add_(0, index, (x - mean[index]) ** 2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    return count[index], total[index], std[index]


def grpo(
    outcomes: torch.Tensor,
    group: torch.Tensor,
    normalize_std: bool = True,
    num_groups: int | None = None,
) -> torch.Tensor:
    """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps) within each task group.  (B,) -> (B,).

    std_g is the unbiased (Bessel) group std, the rule `whiten` uses too. A group of one or a
    group with equal outcomes gives 0 (no relative signal), never NaN. ``normalize_std=False``
    drops the division (Dr. GRPO). Group ids must be < `num_groups` (default B: every group
    has a member).
    """
    if outcomes.numel() == 0:
        return outcomes.clone()
    num = outcomes.shape[0] if num_groups is None else num_groups
    count, total, std = _group_stats(outcomes, group, num)
    centred = torch.where(count > 1, outcomes - total / count, 0)
    return centred / (std + 1e-6) if normalize_std else centred


def rloo(outcomes: torch.Tensor, group: torch.Tensor, num_groups: int | None = None) -> torch.Tensor:
    """RLOO: A_i = R_i - mean of the other members' outcomes.  (B,) -> (B,); 0 for a lone member.

    Group ids must be < `num_groups` (default B)."""
    if outcomes.numel() == 0:
        return outcomes.clone()
    num = outcomes.shape[0] if num_groups is None else num_groups
    count, total, _ = _group_stats(outcomes, group, num)
    others = (total - outcomes) / (count - 1).clamp(min=1)
    return torch.where(count > 1, outcomes - others, 0)


def gigpo_step_term(
    step_returns: torch.Tensor, anchor: torch.Tensor, normalize_std: bool = True
) -> torch.Tensor:
    """GiGPO's step term: normalise each step's return within its anchor-state group.

    Steps that share a canonical environment state within a task group form a group; a step
    with no anchor (-1) or alone in its group gets 0.  (S,), (S,) -> (S,).

    Anchor ids must be < S (dense ids over the anchored steps, as `StepBatch` assigns them).
    Unanchored steps are put in a spare group S of their own (so they never touch a real
    group's statistics) and then zeroed: no data-dependent indexing.
    """
    S = step_returns.shape[0]
    has = anchor >= 0
    ids = torch.where(has, anchor, S)
    return torch.where(has, grpo(step_returns, ids, normalize_std, num_groups=S + 1), 0)
