"""StepPO inside verl: the step-level estimator and the step-level ratio loss in verl's registries.

Call ``steppo.integrations.verl.register()`` once in the process that runs verl's trainer (e.g.
at the top of your launcher script, before ``verl.trainer.main_ppo`` runs), then two config
lines in the verl PPO run::

    algorithm.adv_estimator=steppo            # step GAE over the turns of a multi-turn response
    actor_rollout_ref.actor.policy_loss.loss_mode=steppo   # one clipped ratio per turn

plus ``critic.enable=True`` (the estimator reads the critic's values).

verl's multi-turn layout concatenates a trajectory's turns into one response row of length L:
the model's tokens have ``response_mask == 1`` and the tool/environment tokens between them 0.
Here a **step** is a maximal run of consecutive response-mask tokens. For each step k of a row:

* its state value is verl's value at the run's first token (verl reads ``values[:, t]`` from the
  hidden state just before response token t, i.e. the state before the step, which is where
  StepPO reads it);
* its reward is the sum of ``token_level_rewards`` over the run's tokens;
* GAE runs over the steps (`steppo.core.credit.step_gae`, the same function StepPO's own trainer
  uses), V after the last step = 0; advantages are whitened over all steps of the batch, each
  step once, and copied to the run's tokens; returns (A + V) likewise, for verl's critic loss;
* the loss takes one importance ratio per step, the length-normalised geometric mean of its
  token ratios (`steppo.core.losses`), clips it, and spreads each step's loss over its tokens
  (divided by the step's length, so a step counts once whatever its length); with verl's
  ``loss_agg_mode=seq-mean-token-sum`` the loss is the mean over rows of the sum over steps.

verl's trainer passes registered estimators only rewards, the mask and its config, not the
critic's values, so `register` also wraps ``ray_trainer.compute_advantage`` to hand ``values``
to this estimator (every other estimator goes through verl's function unchanged).

verl caps transformers below 5.11: it lives in its own venv, see ``scripts/verl_venv.sh``.
"""

from __future__ import annotations

from typing import Any

import torch

from steppo.core.credit import step_gae, whiten

NAME = "steppo"


def step_runs(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Steps of verl's multi-turn layout.

    Args: response_mask (B, L), 1 on the model's tokens.
    Returns: token_step (B, L) long: index of the step a token belongs to within its row (-1 on
    masked tokens); steps_per_row (B,); K = the most steps in a row.
    """
    mask = response_mask.bool()
    prev = torch.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    starts = mask & ~prev
    ordinal = torch.cumsum(starts.long(), dim=1) - 1
    token_step = torch.where(mask, ordinal, torch.full_like(ordinal, -1))
    steps_per_row = starts.sum(1)
    return token_step, steps_per_row, int(steps_per_row.max()) if mask.numel() else 0


def _scatter_steps(x: torch.Tensor, token_step: torch.Tensor, K: int, reduce: str) -> torch.Tensor:
    """(B, L) token values -> (B, K) per step: the sum over the run, or the value at its first token."""
    B, L = x.shape
    out = torch.zeros(B, max(K, 1), dtype=torch.float32, device=x.device)
    valid = token_step >= 0
    rows = torch.arange(B, device=x.device)[:, None].expand(B, L)[valid]
    cols = token_step[valid]
    if reduce == "sum":
        out.index_put_((rows, cols), x[valid].float(), accumulate=True)
    else:  # first token of each run
        first = valid.clone()
        first[:, 1:] &= token_step[:, 1:] != token_step[:, :-1]
        out[torch.arange(B, device=x.device)[:, None].expand(B, L)[first], token_step[first]] = x[first].float()
    return out


def step_advantages(token_level_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                    gamma: float = 1.0, lam: float = 1.0, whiten_steps: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """StepPO's estimator on verl's layout. All (B, L); returns token advantages and returns."""
    with torch.no_grad():
        token_step, steps_per_row, K = step_runs(response_mask)
        rewards = _scatter_steps(token_level_rewards, token_step, K, "sum")
        v = _scatter_steps(values, token_step, K, "first")
        step_mask = torch.arange(rewards.shape[1], device=rewards.device)[None] < steps_per_row[:, None]
        adv, ret = step_gae(rewards, v, step_mask, torch.zeros(rewards.shape[0], device=rewards.device), gamma, lam)
        if whiten_steps:
            adv = whiten(adv, step_mask)
        idx = token_step.clamp(min=0)
        valid = token_step >= 0
        token_adv = torch.where(valid, adv.gather(1, idx), 0.0)
        token_ret = torch.where(valid, ret.gather(1, idx), 0.0)
    return token_adv, token_ret


def step_ratio_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, clip_low: float, clip_high: float,
                    rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss matrix (B, L) of the step-ratio clipped surrogate (see module doc).

    Each step's ratio is exp(mean over its tokens of (log_prob - old_log_prob)); its clipped
    loss -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) (A = the step's advantage, constant
    over its tokens) is spread evenly over the step's tokens.
    """
    token_step, steps_per_row, K = step_runs(response_mask)
    B, L = log_prob.shape
    valid = token_step >= 0
    flat = (torch.arange(B, device=log_prob.device)[:, None] * max(K, 1) + token_step.clamp(min=0))[valid]
    n = B * max(K, 1)
    log_ratio = (log_prob - old_log_prob)[valid]
    sums = torch.zeros(n, device=log_prob.device, dtype=log_ratio.dtype).index_add(0, flat, log_ratio)
    lens = torch.zeros(n, device=log_prob.device).index_add(0, flat, torch.ones_like(log_ratio, dtype=torch.float32))
    step_log_ratio = (sums / lens.clamp(min=1)).clamp(-20.0, 20.0)
    step_adv = torch.zeros(n, device=log_prob.device).index_put((flat,), advantages[valid].float())
    ratio = torch.exp(step_log_ratio)
    surr = torch.minimum(ratio * step_adv, ratio.clamp(1 - clip_low, 1 + clip_high) * step_adv)
    per_token = torch.zeros_like(log_prob, dtype=torch.float32)
    per_token[valid] = (-surr / lens.clamp(min=1))[flat]
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights
    has = lens > 0
    stats = {
        "clip_frac": ((ratio - 1).abs() > torch.where(step_adv > 0, clip_high, clip_low))[has].float().mean(),
        "ratio_mean": ratio[has].mean().detach(),
        "steps": has.sum(),
    }
    return per_token, stats


def register() -> None:
    """Register ``steppo`` as a verl advantage estimator and policy loss (idempotent)."""
    from verl.trainer.ppo import core_algos, ray_trainer

    if NAME not in core_algos.ADV_ESTIMATOR_REGISTRY:

        @core_algos.register_adv_est(NAME)
        def steppo_adv(token_level_rewards, response_mask, config=None, values=None, **_: Any):
            if values is None:
                raise ValueError("the steppo estimator reads the critic's values: set critic.enable=True")
            gamma = getattr(config, "gamma", 1.0) if config is not None else 1.0
            lam = getattr(config, "lam", 1.0) if config is not None else 1.0
            return step_advantages(token_level_rewards, values, response_mask, gamma, lam)

    if NAME not in core_algos.POLICY_LOSS_REGISTRY:

        @core_algos.register_policy_loss(NAME)
        def steppo_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-sum",
                        config=None, rollout_is_weights=None):
            clip = getattr(config, "clip_ratio", 0.2)
            low = getattr(config, "clip_ratio_low", None) or clip
            high = getattr(config, "clip_ratio_high", None) or clip
            per_token, stats = step_ratio_loss(old_log_prob, log_prob, advantages, response_mask, low, high,
                                               rollout_is_weights)
            info = getattr(config, "global_batch_info", None) or {}
            loss = core_algos.agg_loss(loss_mat=per_token, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **info)
            metrics = {"actor/pg_clipfrac": float(stats["clip_frac"]), "actor/step_ratio_mean": float(stats["ratio_mean"])}
            return loss, metrics

    original = ray_trainer.compute_advantage
    if getattr(original, "_steppo", False):
        return

    def compute_advantage(data, adv_estimator, *args, **kwargs):
        if str(getattr(adv_estimator, "value", adv_estimator)) != NAME:
            return original(data, adv_estimator, *args, **kwargs)
        gamma = kwargs.get("gamma", args[0] if len(args) > 0 else 1.0)
        lam = kwargs.get("lam", args[1] if len(args) > 1 else 1.0)
        if "response_mask" not in data.batch.keys():
            data.batch["response_mask"] = ray_trainer.compute_response_mask(data)
        adv, ret = step_advantages(data.batch["token_level_rewards"], data.batch["values"],
                                   data.batch["response_mask"], gamma, lam)
        data.batch["advantages"] = adv
        data.batch["returns"] = ret
        return data

    compute_advantage._steppo = True
    ray_trainer.compute_advantage = compute_advantage
