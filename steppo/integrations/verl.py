"""StepPO inside verl: the step-level estimator, the step-ratio loss and the step critic.

**Loading the plugin.** ``verl.trainer.main_ppo`` runs the trainer in a Ray actor (the
TaskRunner) and the losses in Ray worker processes, so a ``register()`` in the launching script
never reaches them. Importing this module registers everything (idempotently), and verl 0.9.1
imports it in the right processes through the model config's ``external_lib`` key: every
``HFModelConfig`` runs ``import_external_libs(self.external_lib)`` in ``__post_init__``
(``verl/workers/config/model.py``), which happens in the TaskRunner for ``critic.model`` (the
trainer's ``omega_conf_to_dataclass(config.critic)`` before it hands the critic its loss) and for
``actor_rollout_ref.model`` (``_init_tokenizer``), and in every actor worker for
``actor_rollout_ref.model`` (``ActorRolloutRefWorker.init_model``). A verl user types::

    python -m verl.trainer.main_ppo ... \\
        algorithm.adv_estimator=steppo \\
        actor_rollout_ref.actor.policy_loss.loss_mode=steppo \\
        actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum \\
        actor_rollout_ref.model.external_lib=steppo.integrations.verl \\
        critic.enable=True critic.model.external_lib=steppo.integrations.verl \\
        +algorithm.steppo_response_length='${actor_rollout_ref.rollout.response_length}' \\
        +algorithm.steppo_max_steps='${actor_rollout_ref.rollout.multi_turn.max_assistant_turns}'

**Layout.** verl's multi-turn agent loop concatenates a trajectory's turns into one response row
of length L: the model's tokens have ``response_mask == 1``, tool / interaction / chat-template
tokens 0. A **step** is a maximal run of mask-1 tokens. For step k of a row:

* its state value V_k is verl's value at the run's first token (verl reads ``values[:, t]`` from
  the hidden state just before response token t: the state before the step: the paper's step-level credit assignment);
* its reward r_k is the sum of ``token_level_rewards`` over the run's tokens **and over the
  mask-0 tokens after it, up to the next step**: verl's reward manager puts the score on the
  row's last token, which is a tool response or a template token when the row does not end on a
  model token; that reward goes to the step before it (a reward before a row's first step goes
  to the first step; a row without any step has nothing to credit);
* GAE runs over the steps (`steppo.core.credit.step_gae`, as in StepPO's own trainer), with
  V after the last step = 0 if the row terminated, or a bootstrap value if it was truncated
  (see `truncated_rows` and `bootstrap_values`); advantages are whitened over all steps of the
  batch, each step once, and copied to the run's tokens;
* the critic's target R_k = A_k + V_k sits on ONE position per step, the step's first token
  (where V_k is read); ``returns`` is 0 elsewhere. The critic loss (`step_value_loss`, which
  replaces verl's ``value_loss`` when ``critic.model.external_lib`` names this module) regresses
  V only there: 0.5 * max((V - R)^2, (clip(V, V_old +- cliprange_value) - R)^2) summed over a
  row's step boundaries, averaged over rows;
* the policy loss takes one importance ratio per step, the length-normalised geometric mean of
  its token ratios with the log-ratio clamped at +-10 (the paper's step-level importance sampling, as `steppo.core.losses`), clips
  it, and spreads each step's loss over its tokens (divided by the step's length, so a step
  counts once whatever its length); with ``loss_agg_mode=seq-mean-token-sum`` the loss is the
  mean over rows of the sum over steps. ``actor/pg_clipfrac`` is the fraction of steps whose
  clipped branch was strictly chosen.

verl's trainer passes registered estimators only rewards, the mask and its config, not the
critic's values, so registration also wraps ``compute_advantage`` (in ``ray_trainer`` and in the
v1 trainer's ``verl.trainer.ppo.v1.utils``) to hand the whole batch to this estimator; every other
estimator goes through verl's function unchanged.

verl caps transformers below 5.11: it lives in its own venv, see ``scripts/verl_venv.sh``.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import torch

from steppo.core.credit import step_gae, whiten

NAME = "steppo"
MODULE = __name__  # "steppo.integrations.verl": the value for the external_lib keys
LOG_RATIO_CLAMP = 10.0  # the paper's bound on the log importance ratio


def step_runs(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Steps of verl's multi-turn layout.

    Args: response_mask (B, L), 1 on the model's tokens.
    Returns: token_step (B, L) long: index of the step a token belongs to within its row (-1 on
    masked tokens); steps_per_row (B,); K = the most steps in a row.
    """
    mask = response_mask.bool()
    starts = step_starts(mask)
    ordinal = torch.cumsum(starts.long(), dim=1) - 1
    token_step = torch.where(mask, ordinal, torch.full_like(ordinal, -1))
    steps_per_row = starts.sum(1)
    return token_step, steps_per_row, int(steps_per_row.max()) if mask.numel() else 0


def step_starts(response_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: True on the first token of each step (where the step's V is read)."""
    mask = response_mask.bool()
    prev = torch.zeros_like(mask)
    prev[:, 1:] = mask[:, :-1]
    return mask & ~prev


def reward_steps(response_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) long: the step each position's reward goes to (-1 in rows without a step).

    A model token's own step; a mask-0 token's nearest preceding step; before the first step,
    the first step.
    """
    starts = step_starts(response_mask)
    ordinal = (torch.cumsum(starts.long(), dim=1) - 1).clamp(min=0)
    has_step = starts.any(1, keepdim=True)
    return torch.where(has_step, ordinal, torch.full_like(ordinal, -1))


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


def row_lengths(response_mask: torch.Tensor, token_level_rewards: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) long: each row's response length (its last non-pad position + 1).

    From the response part of ``attention_mask`` when given (verl's legacy trainer, responses
    right-padded to ``rollout.response_length``); else 1 + the last position that is a model
    token or carries a nonzero reward (verl's v1 trainer hands the estimator no attention mask;
    its reward sits on the row's last token).
    """
    L = response_mask.shape[1]
    if attention_mask is not None:
        return attention_mask[:, -L:].long().sum(1)
    seen = response_mask.bool()
    if token_level_rewards is not None:
        seen = seen | (token_level_rewards != 0)
    pos = torch.arange(1, L + 1, device=response_mask.device)[None].expand_as(seen)
    return torch.where(seen, pos, torch.zeros_like(pos)).max(1).values


def _cfg_get(config: Any, key: str) -> Any:
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get(key)
    try:
        return config.get(key)  # DictConfig, verl's BaseConfig
    except Exception:  # noqa: BLE001 - any config object without .get
        return getattr(config, key, None)


def truncated_rows(response_mask: torch.Tensor, lengths: torch.Tensor, flag: Any = None,
                   response_length: int | None = None, max_steps: int | None = None) -> torch.Tensor:
    """(B,) bool: rows that ended by a limit, not by the episode ending (the paper's reference code treated them as terminal).

    A row is truncated when any of
      * ``flag`` (per row) is true: a ``truncated`` entry of the batch or of ``non_tensor_batch``
        (e.g. an agent loop's ``extra_fields["truncated"]``, which verl's legacy trainer turns
        into a ``non_tensor_batch`` column);
      * its response fills the response length: ``lengths >= response_length`` (the length limit;
        verl's ToolAgentLoop stops there);
      * it has ``max_steps`` steps or more (the turn limit, ``multi_turn.max_assistant_turns``).
    verl 0.9.1's agent loops record no termination reason, so these are the signals it exposes;
    a row cut because its next tool response would not fit is truncated only by the flag.
    """
    B = response_mask.shape[0]
    out = torch.zeros(B, dtype=torch.bool, device=response_mask.device)
    if flag is not None:
        out |= torch.as_tensor([bool(x) for x in list(flag)], dtype=torch.bool, device=out.device).reshape(B)
    if response_length is not None:
        out |= lengths >= int(response_length)
    if max_steps is not None:
        out |= step_starts(response_mask).sum(1) >= int(max_steps)
    return out


def bootstrap_values(values: torch.Tensor, response_mask: torch.Tensor, lengths: torch.Tensor,
                     truncated: torch.Tensor) -> torch.Tensor:
    """(B,) V after the last step: 0 for terminated rows; for truncated ones

    * the row ends on mask-0 tokens after its last step (a tool / interaction response): the
      value at the row's last position, ``values[b, n-1]``, the closest verl gets to the state
      after the step (it has read the step and the response up to its last token; verl's
      ``values`` stop there, the critic is never read after a row's final token);
    * the row ends on a model token (the last step was cut, or a turn limit stopped it): no
      state after it exists in ``values``; the last step's own value V_T stands in.
    """
    B, L = values.shape
    rows = torch.arange(B, device=values.device)
    last = (lengths - 1).clamp(min=0, max=L - 1)
    mask = response_mask.bool()
    starts = step_starts(mask)
    pos = torch.arange(L, device=values.device)[None].expand(B, L)
    last_start = torch.where(starts, pos, torch.full_like(pos, -1)).max(1).values
    v_last_step = values[rows, last_start.clamp(min=0)].float()
    ends_off_step = (lengths > 0) & ~mask[rows, last] & (last_start >= 0)
    boot = torch.where(ends_off_step, values[rows, last].float(), v_last_step)
    return torch.where(truncated & (last_start >= 0), boot, torch.zeros_like(boot))


def step_advantages(token_level_rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor,
                    gamma: float = 1.0, lam: float = 1.0, whiten_steps: bool = True,
                    truncated: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """StepPO's estimator on verl's layout. All (B, L); truncated (B,) bool or None (all rows
    terminated); lengths (B,) (default `row_lengths`).

    Returns token advantages (the step's A on each of its tokens) and returns (the step's
    target R on the step's first token only, 0 elsewhere).
    """
    with torch.no_grad():
        token_step, steps_per_row, K = step_runs(response_mask)
        rewards = _scatter_steps(token_level_rewards, reward_steps(response_mask), K, "sum")
        v = _scatter_steps(values, token_step, K, "first")
        step_mask = torch.arange(rewards.shape[1], device=rewards.device)[None] < steps_per_row[:, None]
        if truncated is None:
            boot = torch.zeros(rewards.shape[0], device=rewards.device)
        else:
            if lengths is None:
                lengths = row_lengths(response_mask, token_level_rewards)
            boot = bootstrap_values(values, response_mask, lengths, truncated.bool())
        adv, ret = step_gae(rewards, v, step_mask, boot, gamma, lam)
        if whiten_steps:
            adv = whiten(adv, step_mask)
        idx = token_step.clamp(min=0)
        valid = token_step >= 0
        token_adv = torch.where(valid, adv.gather(1, idx), 0.0)
        token_ret = torch.where(step_starts(response_mask), ret.gather(1, idx), 0.0)
    return token_adv, token_ret


def step_ratio_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, clip_low: float, clip_high: float,
                    rollout_is_weights: torch.Tensor | None = None,
                    log_ratio_clamp: float = LOG_RATIO_CLAMP) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss matrix (B, L) of the step-ratio clipped surrogate (see module doc).

    Each step's log-ratio is the mean over its tokens of (log_prob - old_log_prob), clamped to
    +-log_ratio_clamp (where the clamp binds the ratio is constant and the step gets no gradient,
    as in `steppo.core.losses.policy_loss`); its clipped loss max(-r A, -clip(r, 1 - clip_low,
    1 + clip_high) A) (A = the step's advantage) is spread evenly over the step's tokens.
    ``clip_frac`` = the fraction of steps where the clipped branch is strictly the larger loss.
    """
    token_step, steps_per_row, K = step_runs(response_mask)
    B, L = log_prob.shape
    valid = token_step >= 0
    flat = (torch.arange(B, device=log_prob.device)[:, None] * max(K, 1) + token_step.clamp(min=0))[valid]
    n = B * max(K, 1)
    log_ratio = (log_prob - old_log_prob)[valid]
    sums = torch.zeros(n, device=log_prob.device, dtype=log_ratio.dtype).index_add(0, flat, log_ratio)
    lens = torch.zeros(n, device=log_prob.device).index_add(0, flat, torch.ones_like(log_ratio, dtype=torch.float32))
    mean_lr = sums / lens.clamp(min=1)
    step_log_ratio = mean_lr.clamp(-log_ratio_clamp, log_ratio_clamp)
    step_adv = torch.zeros(n, device=log_prob.device).index_put((flat,), advantages[valid].float())
    ratio = torch.exp(step_log_ratio)
    unclipped = -step_adv * ratio
    clipped = -step_adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    per_token = torch.zeros_like(log_prob, dtype=torch.float32)
    per_token[valid] = (loss / lens.clamp(min=1))[flat]
    if rollout_is_weights is not None:
        per_token = per_token * rollout_is_weights
    has = lens > 0
    with torch.no_grad():
        stats = {
            "clip_frac": (clipped > unclipped)[has].float().mean() if has.any() else torch.zeros(()),
            "ratio_mean": ratio[has].mean() if has.any() else torch.ones(()),
            "steps": has.sum(),
        }
    return per_token, stats


def step_value_loss_matrix(vpreds: torch.Tensor, values: torch.Tensor, returns: torch.Tensor,
                           response_mask: torch.Tensor, cliprange_value: float | None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped value loss at the step boundaries only.

    Returns (loss matrix (B, L): 0.5 * max((V - R)^2, (V_old + clip(V - V_old) - R)^2) on each
    step's first token, 0 elsewhere; the boundary mask (B, L); clip_frac over the boundaries,
    counting positions where the clipped error is strictly larger).
    """
    where = step_starts(response_mask)
    err = (vpreds - returns) ** 2
    if cliprange_value is not None:
        clipped_v = values + (vpreds - values).clamp(-cliprange_value, cliprange_value)
        err_clipped = (clipped_v - returns) ** 2
        per = torch.maximum(err, err_clipped)
        clip = (err_clipped > err) & where
    else:
        per = err
        clip = torch.zeros_like(where)
    frac = clip.sum() / where.sum().clamp(min=1)
    return 0.5 * per * where, where, frac.detach()


def _names_plugin(external_lib: Any) -> bool:
    if external_lib is None:
        return False
    libs = [external_lib] if isinstance(external_lib, str) else list(external_lib)  # str or (List)Config
    return any(str(x) == MODULE for x in libs)


def step_value_loss(config: Any, model_output: Any, data: Any, dp_group: Any = None):
    """verl's critic ``value_loss`` signature; StepPO's step critic when ``critic.model.external_lib``
    names this module, verl's own loss otherwise.

    The step critic's loss is the mean over rows of the sum of `step_value_loss_matrix` over the
    row's step boundaries (verl's ``seq-mean-token-sum`` with the boundary mask, normalised by
    verl's ``global_batch_size`` like the actor's loss), so each step counts once.
    """
    from verl.workers.utils import losses as vl

    original = getattr(vl, "_steppo_original_value_loss", None) or vl.value_loss
    model = getattr(config, "model", None)
    if not _names_plugin(getattr(model, "external_lib", None)):
        return original(config, model_output, data, dp_group)
    from verl.trainer.ppo.core_algos import agg_loss
    from verl.utils.metric import AggregationType, Metric
    from verl.workers.utils.padding import no_padding_2_padding

    vpreds = no_padding_2_padding(model_output["values"], data)
    dp_size = data["dp_size"]
    global_batch_size = data["global_batch_size"]
    summed = dp_size > 1 or data["batch_num_tokens"] is not None or global_batch_size is not None
    padded = data.select("values", "returns", "response_mask").to_padded_tensor()
    loss_mat, where, frac = step_value_loss_matrix(vpreds, padded["values"], padded["returns"],
                                                   padded["response_mask"], config.cliprange_value)
    vf_loss = agg_loss(loss_mat=loss_mat, loss_mask=where, loss_agg_mode="seq-mean-token-sum", dp_size=dp_size,
                       global_batch_size=global_batch_size)
    vpred_mean = (vpreds * where).sum() / where.sum().clamp(min=1)
    metrics = {
        "critic/vf_loss": Metric(value=vf_loss, aggregation=AggregationType.SUM if summed else AggregationType.MEAN),
        "critic/vf_clipfrac": frac.item(),
        "critic/vpred_mean": vpred_mean.detach().item(),
    }
    return vf_loss, metrics


def _advantage_from_batch(data: Any, gamma: float, lam: float, config: Any) -> Any:
    """StepPO's estimator on a verl ``DataProto``: writes ``advantages`` and ``returns``."""
    batch = data.batch
    mask = batch["response_mask"]
    rewards = batch["token_level_rewards"]
    attention = batch["attention_mask"] if "attention_mask" in batch.keys() else None
    lengths = row_lengths(mask, rewards, attention)
    flag = None
    if "truncated" in batch.keys():
        flag = batch["truncated"].reshape(-1).tolist()
    elif "truncated" in getattr(data, "non_tensor_batch", {}):
        flag = data.non_tensor_batch["truncated"]
    response_length = _cfg_get(config, "steppo_response_length")
    if response_length is None and attention is not None:
        response_length = mask.shape[1]  # the legacy trainer pads every row to rollout.response_length
    truncated = truncated_rows(mask, lengths, flag, response_length, _cfg_get(config, "steppo_max_steps"))
    adv, ret = step_advantages(rewards, batch["values"], mask, gamma, lam, truncated=truncated, lengths=lengths)
    batch["advantages"] = adv
    batch["returns"] = ret
    return data


def _wrap_compute_advantage(module: Any) -> None:
    original = getattr(module, "compute_advantage", None)
    if original is None or getattr(original, "_steppo", False):
        return

    def compute_advantage(data, adv_estimator, *args, **kwargs):
        if str(getattr(adv_estimator, "value", adv_estimator)) != NAME:
            return original(data, adv_estimator, *args, **kwargs)
        gamma = kwargs.get("gamma", args[0] if len(args) > 0 else 1.0)
        lam = kwargs.get("lam", args[1] if len(args) > 1 else 1.0)
        config = kwargs.get("config", args[4] if len(args) > 4 else None)
        if "response_mask" not in data.batch.keys():
            from verl.trainer.ppo.ray_trainer import compute_response_mask

            data.batch["response_mask"] = compute_response_mask(data)
        return _advantage_from_batch(data, gamma, lam, config)

    compute_advantage._steppo = True
    compute_advantage.__wrapped__ = original
    module.compute_advantage = compute_advantage


def register() -> None:
    """Register ``steppo`` as a verl advantage estimator and policy loss, and install the step
    critic loss and the ``compute_advantage`` hand-off (idempotent; runs on import)."""
    from verl.trainer.ppo import core_algos

    if NAME not in core_algos.ADV_ESTIMATOR_REGISTRY:

        @core_algos.register_adv_est(NAME)
        def steppo_adv(token_level_rewards, response_mask, config=None, values=None, **_: Any):
            if values is None:
                raise ValueError("the steppo estimator reads the critic's values: set critic.enable=True")
            gamma, lam = _cfg_get(config, "gamma"), _cfg_get(config, "lam")
            gamma = 1.0 if gamma is None else gamma
            lam = 1.0 if lam is None else lam
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
            metrics = {"actor/pg_clipfrac": float(stats["clip_frac"]),
                       "actor/step_ratio_mean": float(stats["ratio_mean"])}
            return loss, metrics

    # the critic loss: trainers pass `partial(value_loss, config=critic_cfg)` to the critic workers
    try:
        from verl.workers.utils import losses as vl
    except ImportError:  # pragma: no cover - older verl
        vl = None
    if vl is not None and not hasattr(vl, "_steppo_original_value_loss"):
        vl._steppo_original_value_loss = vl.value_loss
        vl.value_loss = step_value_loss
    base = sys.modules.get("verl.trainer.ppo.v1.trainer_base")  # bound `value_loss` at its import
    if base is not None and vl is not None and getattr(base, "value_loss", None) is vl._steppo_original_value_loss:
        base.value_loss = step_value_loss

    # the estimator needs the critic's values: hand it the batch (legacy and v1 trainers)
    try:
        from verl.trainer.ppo import ray_trainer
    except ImportError:  # pragma: no cover - trainer deps missing in this process
        ray_trainer = None
    if ray_trainer is not None:
        _wrap_compute_advantage(ray_trainer)
    v1 = sys.modules.get("verl.trainer.ppo.v1.utils")  # else it binds the wrapped one when imported
    if v1 is not None:
        _wrap_compute_advantage(v1)


def registered() -> bool:
    """True once the estimator and the loss are in verl's registries of this process."""
    from verl.trainer.ppo import core_algos

    return NAME in core_algos.ADV_ESTIMATOR_REGISTRY and NAME in core_algos.POLICY_LOSS_REGISTRY


# Register on import: `actor_rollout_ref.model.external_lib` / `critic.model.external_lib` import
# this module in verl's TaskRunner and worker processes. Without verl (StepPO's main venv) the
# math above still imports.
if importlib.util.find_spec("verl") is not None:
    register()
