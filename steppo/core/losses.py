"""Losses on flat action-token tensors (canonical order, see `steppo.core.batch`).

Aggregation is explicit: every loss is ``sum_i w_i * loss_i`` with per-token weights ``w``
computed once for the whole mini-batch by `aggregation_weights`, so splitting a mini-batch into
micro-batches (gradient accumulation) changes nothing and the weighting of long versus short
steps or trajectories is a stated choice, not an accident of row counts (the paper's reference code counted mini-batches in rows):

* ``token-mean``: every action token weighs 1/N; a long step or trajectory weighs more.
* ``step-mean`` (seq-mean-token-mean with the step as the sequence): tokens are averaged within
  their step, then steps averaged; every step weighs the same whatever its length.
* ``trajectory-mean``: tokens averaged within a step, steps within a trajectory, then
  trajectories; every trajectory weighs the same whatever its number of steps.

Device-safe: tensors are created on the inputs' device and nothing reads data back to the host
(counts are tensors or come from shapes), so the losses run on CPU, GPU and `meta` alike.
"""

from __future__ import annotations

import torch

from steppo.core.choices import AGGREGATIONS, KL_ESTIMATORS, RATIO_LEVELS  # noqa: F401 (importable from here)


def segment_mean(x: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(M,) values, (M,) segment ids -> (num_segments,) means (0 for empty segments)."""
    total = torch.zeros(num_segments, dtype=x.dtype, device=x.device).index_add_(0, segment, x)
    count = torch.zeros(num_segments, dtype=x.dtype, device=x.device).index_add_(
        0, segment, torch.ones_like(x)
    )
    return total / count.clamp(min=1)


def aggregation_weights(
    mode: str,
    token_step: torch.Tensor,
    step_traj: torch.Tensor,
    num_trajectories: int | None = None,
) -> torch.Tensor:
    """(N,) weights summing to 1 over the mini-batch's action tokens (see module doc).

    Args: token_step (N,) step of each token; step_traj (S,) trajectory of each step;
    num_trajectories: a bound on the trajectory ids (ids < num_trajectories), default S (every
    trajectory of a `StepBatch` has a step). Counts stay tensors on the inputs' device (no
    host sync); the weights are float32 on that device.
    """
    N = token_step.shape[0]
    device = token_step.device
    ones = torch.ones(N, device=device)
    if N == 0:
        return ones
    if mode == "token-mean":
        return ones / N
    S = step_traj.shape[0]
    step_len = torch.zeros(S, device=device).index_add_(0, token_step, ones)
    has_tokens = step_len > 0
    if mode == "step-mean":
        num_steps = has_tokens.sum()
        return 1.0 / (step_len[token_step] * num_steps)
    if mode == "trajectory-mean":
        B = S if num_trajectories is None else num_trajectories
        steps_in_traj = torch.zeros(B, device=device).index_add_(0, step_traj, has_tokens.to(ones.dtype))
        num_traj = (steps_in_traj > 0).sum()
        traj = step_traj[token_step]
        return 1.0 / (step_len[token_step] * steps_in_traj[traj] * num_traj)
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")


def ratio_units(
    level: str,
    token_step: torch.Tensor,
    token_traj: torch.Tensor,
    num_steps: int | None = None,
    num_trajectories: int | None = None,
) -> tuple[torch.Tensor, int]:
    """(N,) unit id per token that shares one importance ratio, and the size of the id range.

    The size is a bound for `segment_mean` (ids < size; unused ids are empty units): the
    number of steps / trajectories when given (a `StepBatch` knows them from its shapes),
    otherwise N (every unit holds a token, so there are at most N). It never reads the data,
    so no device sync.
    """
    N = token_step.shape[0]
    if level == "token":
        return torch.arange(N, device=token_step.device), N
    if level == "step":
        return token_step, N if num_steps is None else num_steps
    if level == "trajectory":
        return token_traj, N if num_trajectories is None else num_trajectories
    raise ValueError(f"unknown ratio level {level!r}; choose one of {RATIO_LEVELS}")


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    units: torch.Tensor,
    num_units: int,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 10.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate with one importance ratio per unit (token, step or trajectory).

    For unit u with tokens i: log r_u = mean_{i in u} (log pi(a_i) - log pi_old(a_i)), clamped
    to +-log_ratio_clamp; r_u = exp(log r_u) (the length-normalised geometric mean of the token
    ratios; the plain token ratio when units are tokens). The objective is

        loss = sum_i w_i loss_i,  loss_i = max(-A_i r_u, -A_i clip(r_u, 1 - clip_low, 1 + clip_high))
        dual clip (A_i < 0): loss_i = min(loss_i, -A_i * dual_clip)

    and its gradient is the exact autograd gradient: r_u is a differentiable function of all
    of the unit's tokens, so token j of unit u receives
    ``(r_u / |u|) * sum_{i in u} w_i dloss_i/dr_u * grad log pi(a_j)`` for every pairing of
    ratio level and aggregation (with a step ratio, step-mean weights and a step-constant
    advantage this is ``w_j dloss_j/dr_u r_u grad log pi(a_j)``, the per-step objective of
    the paper's step-level importance sampling). A unit's tokens must all be in the call (micro-batches keep steps and
    trajectories whole). Where the log-ratio clamp binds, r_u is constant and the unit gets no
    gradient.

    Args: logprobs, old_logprobs, advantages, weights, units (N,); num_units: a bound on the
    unit ids (see `ratio_units`). Returns the loss and detached statistics (each a weighted
    mean over the tokens).
    """
    token_log_ratio = logprobs - old_logprobs
    unit_log_ratio = segment_mean(token_log_ratio, units, num_units)
    log_ratio = unit_log_ratio[units].clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must exceed 1, got {dual_clip}")
        per_token = torch.where(
            advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token
        )
    loss = (weights * per_token).sum()
    with torch.no_grad():
        stats = {
            "clip_frac": (weights * (clipped > unclipped).float()).sum(),
            "ratio_mean": (weights * ratio).sum(),
            "approx_kl": (weights * kl_penalty(old_logprobs, logprobs.detach(), "k3")).sum(),
        }
    return loss, stats


def staleness_weights(
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    units: torch.Tensor,
    num_units: int,
    cap: float,
) -> torch.Tensor:
    """(N,) truncated importance weights that correct a stale batch (asynchronous training).

    Decoupled PPO: the clipped ratio is taken against the *proximal* policy (the weights at the
    start of the update, whose log-probs the trainer recomputes), and the advantage is weighted
    by how much more likely the proximal policy makes the action than the *behaviour* policy
    that sampled it. At the step level the weight of a unit (a step, for StepPO) is the
    length-normalised geometric mean of its token ratios, truncated at `cap`:
    ``w_u = min(exp(mean_{i in u}(log pi_prox_i - log pi_behav_i)), cap)``, broadcast to the
    unit's tokens. Weights multiply the advantages (positive, so ``min(r A, clip(r) A) w`` is
    the clipped objective on ``A w``). With no staleness both policies agree and ``w = 1``.

    Args: proximal_logprobs, behaviour_logprobs, units: (N,) per action token; units and the
    id bound num_units from `ratio_units`.
    """
    log_w = segment_mean((proximal_logprobs - behaviour_logprobs).float(), units, num_units)
    return torch.exp(log_w).clamp(max=cap)[units]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.  (N,) -> (N,).

    k1 = log r, k2 = (log r)^2 / 2, k3 = exp(-log r) - 1 + log r (low variance, unbiased,
    non-negative), with log r = log pi - log pi_ref.
    """
    log_r = logprobs - ref_logprobs
    if estimator == "k1":
        return log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        neg = (-log_r).clamp(-20.0, 20.0)
        return torch.exp(neg) - 1.0 - neg
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def kl_loss(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, weights: torch.Tensor, estimator: str = "k3"
) -> torch.Tensor:
    """sum_i w_i KL_i against the reference policy."""
    return (weights * kl_penalty(logprobs, ref_logprobs, estimator)).sum()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits -> (...) entropy of the softmax distribution."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    weights: torch.Tensor | None = None,
    clip: float | None = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss at the critic's read positions.

    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), averaged with `weights`
    (uniform if None). A step-level critic passes one position per step (its boundary); a
    token-level critic one per action token. Shapes: all (M,).
    """
    M = values.shape[0]
    if weights is None:
        dtype = torch.promote_types(values.dtype, torch.float32)  # at least float32 (bf16 values)
        weights = torch.full((M,), 1.0 / max(M, 1), dtype=dtype, device=values.device)
    err = (values - returns) ** 2
    if clip is not None:
        clipped_v = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clipped = (clipped_v - returns) ** 2
        per = torch.maximum(err, err_clipped)
        clip_frac = (weights * (err_clipped > err).float()).sum().detach()
    else:
        per = err
        clip_frac = torch.zeros((), dtype=weights.dtype, device=values.device)
    loss = 0.5 * (weights * per).sum()
    return loss, {"clip_frac": clip_frac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R); nan when Var(R) = 0."""
    if returns.numel() < 2:
        return float("nan")
    var_r = returns.var(unbiased=False)
    if float(var_r) == 0.0:
        return float("nan")
    return float(1.0 - (returns - values).var(unbiased=False) / var_r)
