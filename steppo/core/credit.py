"""Credit assignment: from rewards (and critic values) to advantages, for every preset.

Every estimator reads the same per-step inputs, on padded per-trajectory timelines:
``rewards, values, mask (B, T)`` for steps, ``(B, K)`` for action tokens, ``bootstrap (B,)``
(V of the state after the last step: 0 when the episode terminated, the critic's value of the
next state when it was truncated). Computation is vectorised over the batch; the only Python
loop runs backwards over the horizon. Padding (``mask == False``) never influences a result,
and results at padding are 0.

`estimate_credit` dispatches by estimator name from a `StepBatch` and returns advantages per
step and per action token (the step's advantage copied to its tokens for step estimators).

One normalisation rule everywhere (GRPO's group std, GiGPO's anchor groups, `whiten`): the
standard deviation uses Bessel's correction, sqrt(sum (x - mean)^2 / (n - 1)), as verl does;
a single entry (or a group of one) normalises to 0, never NaN.

Device-safe: every tensor is created on the inputs' device with their dtype, and no result
depends on reading data back to the host (counts come from shapes), so the same code runs on
CPU, GPU and the `meta` device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steppo.core.batch import StepBatch

EPS = 1e-8

ESTIMATORS = (
    "step_gae",
    "token_gae",
    "grpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "gigpo",
    "broadcast",
)
CRITIC_ESTIMATORS = {"step_gae": "step", "token_gae": "token"}
# Estimators whose advantages differ between the tokens of one step.
TOKEN_ESTIMATORS = ("token_gae", "reinforce_pp", "reinforce_pp_baseline")
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline", "gigpo")
WHITEN_MODES = (None, "step", "token")


# --------------------------------------------------------------------------- generic helpers


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
    """Backward GAE over a left-aligned timeline; gamma/lam may be (B, H) per-position factors.

    delta_h = r_h + gamma_h * V_{h+1} - V_h, A_h = delta_h + gamma_h * lam_h * A_{h+1}, where the
    value after the last real position is `bootstrap` and A after it is 0.
    """
    B, H = rewards.shape
    if isinstance(gamma, float) and isinstance(lam, float) and H <= _CLOSED_FORM_MAX_H:
        return _gae_closed_form(rewards, values, mask, bootstrap, gamma, lam)
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


# Up to this horizon, constant-factor GAE is one (B, H) x (H, H) product instead of a loop.
_CLOSED_FORM_MAX_H = 128


def _gae_closed_form(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    bootstrap: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A_h = sum_{k >= h} (gamma lam)^(k - h) delta_k, as delta @ D with D[k, h] = c^(k-h)."""
    B, H = rewards.shape
    lengths = mask.sum(1, keepdim=True)
    pos = torch.arange(H, device=rewards.device).unsqueeze(0)
    next_values = torch.cat([values[:, 1:], values.new_zeros(B, 1)], dim=1)
    next_values = torch.where(pos == lengths - 1, bootstrap.to(values.dtype).unsqueeze(1), next_values)
    delta = torch.where(mask, rewards + gamma * next_values - values, 0)
    k = torch.arange(H, dtype=rewards.dtype, device=rewards.device)
    gap = k.unsqueeze(1) - k.unsqueeze(0)  # gap[k, h] = k - h
    discount = torch.where(gap >= 0, (gamma * lam) ** gap.clamp(min=0), 0).to(rewards.dtype)
    adv = delta @ discount
    return adv, torch.where(mask, adv + values, 0)


# --------------------------------------------------------------------------- step level


def step_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    bootstrap: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """StepPO's estimator: GAE over steps (spec §3).

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


# --------------------------------------------------------------------------- token level


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
    comparison with step-level methods (the reference code's defect, spec §8.4).

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


# --------------------------------------------------------------------------- trajectory level


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


# --------------------------------------------------------------------------- dispatch


@dataclass
class Credit:
    """Advantages (and critic targets) in canonical flat order.

    Shapes: ``step_advantages (S,)``, ``token_advantages (N,)``; ``returns`` is the critic target,
    ``(S,)`` for a step critic, ``(N,)`` for a token critic, ``None`` without a critic.
    """

    step_advantages: torch.Tensor
    token_advantages: torch.Tensor
    returns: torch.Tensor | None


def estimate_credit(
    batch: StepBatch,
    estimator: str,
    *,
    step_values: torch.Tensor | None = None,
    token_values: torch.Tensor | None = None,
    bootstrap: torch.Tensor | None = None,
    gamma: float = 1.0,
    lam: float = 1.0,
    whiten_mode: str | None = None,
    token_discount: str = "step",
    normalize_std: bool = True,
    gigpo_step_weight: float = 1.0,
) -> Credit:
    """Advantages for a batch by estimator name.

    Args:
        step_values: (S,) V_t per step; needed by ``step_gae``.
        token_values: (N,) V per action token; needed by ``token_gae``.
        bootstrap: (B,) V(next state) of truncated trajectories (ignored where terminated);
            zeros if omitted.
        whiten_mode: ``"step"`` whitens over steps (each step once, whatever its length),
            ``"token"`` over action tokens (long steps weigh more), None leaves them; both
            with the unbiased std (see module doc). ``"step"`` needs one advantage per step,
            so it is refused for the token-level estimators (`TOKEN_ESTIMATORS`).

    All tensors are created on the batch's device (see module doc).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {ESTIMATORS}")
    if whiten_mode not in WHITEN_MODES:
        raise ValueError(f"whiten_mode must be one of {WHITEN_MODES}, got {whiten_mode!r}")
    if whiten_mode == "step" and estimator in TOKEN_ESTIMATORS:
        raise ValueError(
            f"whiten_mode='step' with the token-level estimator {estimator!r} would replace every "
            "token's advantage by its step's first token's; use whiten_mode='token' or None"
        )
    B = batch.num_trajectories
    dtype = batch.rewards.dtype
    boot = batch.rewards.new_zeros(B) if bootstrap is None else bootstrap.to(dtype)
    boot = torch.where(batch.terminated, 0.0, boot)
    step_mask = batch.step_mask
    rewards = batch.steps_to_padded(batch.rewards)
    outcomes = batch.rewards.new_zeros(B).index_add_(0, batch.step_traj, batch.rewards)
    returns = None

    if estimator == "step_gae":
        if step_values is None:
            raise ValueError("step_gae needs step_values: the critic's V_t at each step boundary")
        adv, ret = step_gae(rewards, batch.steps_to_padded(step_values), step_mask, boot, gamma, lam)
        step_adv, returns = batch.padded_to_steps(adv), batch.padded_to_steps(ret)
        token_adv = None
    elif estimator in ("token_gae", "reinforce_pp", "reinforce_pp_baseline"):
        if estimator == "token_gae" and token_values is None:
            raise ValueError("token_gae needs token_values: the critic's V at every action token")
        first_tok = torch.cumsum(batch.response_lengths, 0) - batch.response_lengths
        if token_discount == "step":
            # Inside a step gamma = lam = 1, so token GAE telescopes to A_i = R_t - V_i, where
            # R_t is step t's return from GAE over steps on the values at each step's first
            # token: O(T) instead of a loop over every token (pinned against `token_gae`).
            if estimator == "token_gae":
                _, ret = step_gae(rewards, batch.steps_to_padded(token_values[first_tok]), step_mask, boot, gamma, lam)
                step_ret = batch.padded_to_steps(ret)
                returns = batch.steps_to_tokens(step_ret)
                token_adv = returns - token_values
            else:
                # REINFORCE++: the discounted return over the whole trajectory (no critic, no
                # bootstrap), so an outcome reward reaches every earlier step (spec §8.3).
                token_adv = batch.steps_to_tokens(
                    batch.padded_to_steps(discounted_returns(rewards, step_mask, gamma))
                )
        else:
            step_end = batch.step_end
            tok_rewards = torch.where(step_end, batch.tokens_to_padded(batch.steps_to_tokens(batch.rewards)), 0)
            if estimator == "token_gae":
                values, tok_boot, tok_lam = batch.tokens_to_padded(token_values), boot, lam
            else:
                values, tok_boot, tok_lam = torch.zeros_like(tok_rewards), boot.new_zeros(B), 1.0
            adv, ret = token_gae(
                tok_rewards, values, batch.token_mask, step_end, tok_boot, gamma, tok_lam, token_discount
            )
            token_adv = batch.padded_to_tokens(adv)
            returns = batch.padded_to_tokens(ret) if estimator == "token_gae" else None
        if estimator == "reinforce_pp_baseline" and B:
            # Subtract the group's mean trajectory return from every token's return-to-go.
            start_return = token_adv[first_tok[batch.step_slots[:, 0]]]
            count, total, _ = _group_stats(start_return, batch.group, B)
            token_adv = token_adv - (total / count)[batch.token_traj]
        # A step's advantage is its first token's (the advantage of the state s_t).
        step_adv = token_adv[first_tok]
    elif estimator == "grpo":
        step_adv = batch.trajectories_to_steps(grpo(outcomes, batch.group, normalize_std))
        token_adv = None
    elif estimator == "rloo":
        step_adv = batch.trajectories_to_steps(rloo(outcomes, batch.group))
        token_adv = None
    elif estimator == "gigpo":
        episode = batch.trajectories_to_steps(grpo(outcomes, batch.group, normalize_std))
        step_ret = batch.padded_to_steps(discounted_returns(rewards, step_mask, gamma))
        step_term = gigpo_step_term(step_ret, batch.anchor, normalize_std)
        step_adv = episode + gigpo_step_weight * step_term
        token_adv = None
    else:  # broadcast (LightningRL): the trajectory's outcome copied to every step
        step_adv = batch.trajectories_to_steps(outcomes)
        token_adv = None

    if whiten_mode == "step":
        step_adv = whiten(step_adv, torch.ones_like(step_adv, dtype=torch.bool))
        token_adv = None
    elif whiten_mode == "token":
        base = batch.steps_to_tokens(step_adv) if token_adv is None else token_adv
        token_adv = whiten(base, torch.ones_like(base, dtype=torch.bool))
        first_tok = torch.cumsum(batch.response_lengths, 0) - batch.response_lengths
        step_adv = token_adv[first_tok]
    if token_adv is None:
        token_adv = batch.steps_to_tokens(step_adv)
    return Credit(step_advantages=step_adv, token_advantages=token_adv, returns=returns)
