"""One policy-optimisation update on a batch of trajectories, in the order it runs:

1. score the batch without gradients: rollout-policy log-probs recomputed (parity check and
   ratio denominator), critic values at the read positions, reference log-probs for KL;
2. credit assignment (the preset's estimator) on per-step inputs;
3. epochs over mini-batches of whole trajectories; each mini-batch is split into micro-batches
   by model-input tokens; every loss uses weights computed once for the whole mini-batch, so
   gradient accumulation is exact (see `steppo.core.losses`);
4. gradient-norm clipping and one optimiser step per mini-batch; a mini-batch whose loss or
   gradient norm is not finite skips its optimiser step (gradients zeroed, counted as
   ``update/skipped_nonfinite``), and `NonFiniteGuard` stops the run after too many in a row.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from steppo.config import Config, TrainerConfig
from steppo.core.algorithms import AlgorithmConfig
from steppo.core.batch import StepBatch, build_layout, input_tokens
from steppo.core.credit import Credit, estimate_credit
from steppo.core.losses import (
    aggregation_weights,
    explained_variance,
    kl_loss,
    policy_loss,
    ratio_units,
    staleness_weights,
    value_loss,
)
from steppo.core.records import Trajectory
from steppo.models.build import Models
from steppo.models.policy import autocast
from steppo.trainer.distributed import Distributed, assign


class NonFiniteError(RuntimeError):
    """Training cannot go on: the loss or gradient norm was not finite too many optimiser steps
    in a row, or the weights themselves became non-finite (nothing was saved with them)."""


class NonFiniteGuard:
    """Counts consecutive optimiser steps skipped for a non-finite loss or gradient norm (over
    mini-batches and iterations); the `limit`-th in a row raises `NonFiniteError`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.streak = 0
        self.iteration: object = None

    def record(self, finite: bool, what: str) -> None:
        if finite:
            self.streak = 0
            return
        self.streak += 1
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"iteration {self.iteration}: {self.streak} optimiser steps in a row had a non-finite {what}; "
                f"stopping before any non-finite weights are used or saved (trainer.max_nonfinite_updates="
                f"{self.limit}); the last checkpoint is intact"
            )


def blocks(trajs: Sequence[Trajectory], layout: str) -> list[list[int]]:
    """Units that mini- and micro-batches never split: one trajectory each, or for the tree
    layout a whole task group (its members share their prompt's tokens)."""
    if layout != "tree":
        return [[i] for i in range(len(trajs))]
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(trajs):
        groups.setdefault(t.group_id, []).append(i)
    return list(groups.values())


def chunk_by_tokens(trajs: Sequence[Trajectory], units: list[list[int]], budget: int, layout: str) -> list[list[int]]:
    """Concatenate `units` (lists of trajectory indices) into consecutive chunks of at most
    `budget` model-input tokens (a unit larger than the budget forms its own chunk)."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for unit in units:
        cost = input_tokens([trajs[i] for i in unit], layout)
        if cur and used + cost > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur += unit
        used += cost
    if cur:
        chunks.append(cur)
    return chunks


def flat_ranges(batch: StepBatch, order: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the full batch's flat step and token tensors of the trajectories in
    `order`, in their canonical order (concatenated); see `StepBatch.flat_ranges`."""
    return batch.flat_ranges(order)


@dataclass
class Scored:
    """No-grad scores of the whole batch in canonical order."""

    logprobs: torch.Tensor  # (N,)
    step_values: torch.Tensor | None  # (S,)
    token_values: torch.Tensor | None  # (N,)
    bootstrap: torch.Tensor | None  # (B,)
    ref_logprobs: torch.Tensor | None  # (N,)


class StepRatios:
    """Each step's importance ratio in the last epoch of the update, for the batch's first
    `num_steps` steps in canonical order (the sample trajectories of samples.jsonl): the
    length-normalised geometric mean of the step's token ratios against the ratio denominator,
    exp(mean(new - old log-prob)), with the loss's log-ratio clamp; recorded from the log-probs
    the loss already computes (no extra forward pass, no effect on the update)."""

    def __init__(self, num_steps: int):
        self.num_steps = num_steps
        self._sum = torch.zeros(num_steps, dtype=torch.float64)
        self._count = torch.zeros(num_steps, dtype=torch.float64)
        self.ratio: torch.Tensor | None = None  # (num_steps,), NaN where a step was not seen
        self.clipped: torch.Tensor | None = None  # (num_steps,) bool: outside [1 - clip_low, 1 + clip_high]

    def add(self, token_step: torch.Tensor, token_log_ratio: torch.Tensor) -> None:
        keep = token_step < self.num_steps
        self._sum.index_add_(0, token_step[keep], token_log_ratio[keep].double())
        self._count.index_add_(0, token_step[keep], torch.ones(int(keep.sum()), dtype=torch.float64))

    def finish(self, algo: AlgorithmConfig, dist: Distributed) -> None:
        dist.all_reduce_sum(self._sum, self._count)
        log_ratio = (self._sum / self._count).clamp(-algo.log_ratio_clamp, algo.log_ratio_clamp)
        self.ratio = torch.exp(log_ratio)  # 0/0 -> NaN: not seen
        self.clipped = (self.ratio < 1.0 - algo.clip_low) | (self.ratio > 1.0 + algo.clip_high)


@torch.no_grad()
def score_batch(models: Models, algo: AlgorithmConfig, trajs: Sequence[Trajectory], batch: StepBatch,
                layout_kind: str, budget: int, pad_id: int, row_tokens: int | None = None,
                dist: Distributed | None = None) -> Scored:
    """Scores of the whole batch; under `dist` each rank scores its share (balanced by tokens)
    and the results are summed over ranks, so every rank returns the global scores."""
    device = models.device
    logprobs = torch.zeros(batch.num_tokens)
    step_values = torch.zeros(batch.num_steps) if algo.critic else None
    token_values = torch.zeros(batch.num_tokens) if algo.critic_level == "token" else None
    bootstrap = torch.zeros(batch.num_trajectories) if algo.critic else None
    ref = torch.zeros(batch.num_tokens) if algo.uses_reference else None
    # FSDP forwards are collectives: they run through the sharded modules, as many on every
    # rank; otherwise the plain modules score (no DDP hooks needed without gradients).
    sharded = dist is not None and dist.strategy == "fsdp"
    policy = dist.policy if sharded else models.policy
    critic = dist.critic if sharded else models.critic
    units = blocks(trajs, layout_kind)
    mine = assign(trajs, units, dist.world, layout_kind)[dist.rank] if dist else units
    groups: list[list[int] | None] = list(chunk_by_tokens(trajs, mine, budget, layout_kind))
    if sharded:
        groups += [None] * (dist.max_int(len(groups)) - len(groups))
    was = policy.training
    policy.eval()
    for group in groups:
        real = group is not None
        group = group if real else units[0]  # FSDP: a rank with less work runs a discarded forward
        step_idx, tok_idx = flat_ranges(batch, group)
        layout = build_layout([trajs[i] for i in group], layout_kind, pad_id, row_tokens).to(device)
        with autocast(device, models.dtype):
            lp, _, hidden = policy(layout)
            values = None
            if algo.critic:
                values = critic.values(hidden) if critic.shared else critic(layout)
            ref_lp = None
            if ref is not None:
                with models.policy_reference():
                    ref_lp, _, _ = models.reference_policy(layout)
        if not real:
            continue
        logprobs[tok_idx] = lp.float().cpu()
        if values is not None:
            step_values[step_idx] = layout.gather_values(values).float().cpu()
            bootstrap[torch.tensor(group)] = layout.gather_bootstrap(values).float().cpu()
            if token_values is not None:
                token_values[tok_idx] = layout.gather_actions(values).float().cpu()
        if ref_lp is not None:
            ref[tok_idx] = ref_lp.float().cpu()
    policy.train(was)
    if dist is not None:
        dist.all_reduce_sum(logprobs, step_values, token_values, bootstrap, ref)
    return Scored(logprobs, step_values, token_values, bootstrap, ref)


def compute_credit(algo: AlgorithmConfig, batch: StepBatch, scored: Scored) -> Credit:
    """The preset's credit: its estimator from the registry of `steppo.core.credit` (`Scored`
    gives the critic's values), then the shared whitening."""
    return estimate_credit(batch, scored, algo)


def ratio_denominator(mode: str, batch: StepBatch, scored: Scored) -> torch.Tensor:
    """(N,) log-probs the clipped ratio is taken against: ``recompute`` = the trainer's own
    scores at the start of the update (the proximal policy), ``rollout`` = the sampler's."""
    return scored.logprobs if mode == "recompute" else batch.old_logprobs


def correct_staleness(algo: AlgorithmConfig, batch: StepBatch, scored: Scored, credit: Credit, cap: float,
                      old_logprobs: str = "recompute") -> torch.Tensor:
    """Decoupled PPO for a stale (asynchronous) batch; returns the weights w (N,).

    The advantages are multiplied by w = min(pi_prox / pi_behaviour, cap) per ratio unit (see
    `steppo.core.losses.staleness_weights`) and the update's ratio is taken against the
    proximal policy (``old_logprobs=recompute``), so at theta = theta_prox the gradient is
    w * A * grad log pi for either sign of A. Against the behaviour policy (``rollout``) the
    staleness would be corrected twice, so that is refused.
    """
    if old_logprobs != "recompute":
        raise ValueError(
            "asynchronous training weights the advantages by pi_prox / pi_behaviour already: the "
            f"ratio must be taken against the proximal policy (old_logprobs=recompute), got {old_logprobs!r}"
        )
    units, n_units = ratio_units(algo.ratio_level, batch.token_step, batch.token_traj,
                                 batch.num_steps, batch.num_trajectories)
    w = staleness_weights(scored.logprobs, batch.old_logprobs, units, n_units, cap)
    credit.token_advantages = credit.token_advantages * w
    return w


def ppo_update(models: Models, algo: AlgorithmConfig, trainer: TrainerConfig, layout_kind: str, train_policy: bool,
               trajs: Sequence[Trajectory],
               batch: StepBatch, scored: Scored, credit: Credit, policy_opt: Optimiser,
               critic_opt: Optimiser | None,
               rng: random.Random, pad_id: int, dist: Distributed | None = None,
               guard: NonFiniteGuard | None = None, ratios: StepRatios | None = None) -> dict[str, float]:
    """Epochs of clipped updates; returns mean statistics over optimiser steps (NaN where a
    skipped step's were), with ``update/skipped_nonfinite`` (steps skipped for a non-finite
    loss or gradient norm: gradients zeroed, weights untouched; `guard` stops the run after
    too many in a row) and ``update/optimiser_steps``. `ratios`: filled with the last epoch's
    step ratios of its first steps (see `StepRatios`).

    Under `dist` (see `steppo.trainer.distributed`) every rank runs the same global mini-batch
    schedule on its token-balanced share of each mini-batch, with the mini-batch's weights, so
    the ranks' losses sum to the single-process loss.
    """
    device = models.device
    dist = dist or Distributed(policy=models.policy, critic=models.critic)
    policy, critic = dist.policy, dist.critic
    shared_critic = models.critic is not None and models.critic.shared
    old_lp = ratio_denominator(trainer.old_logprobs, batch, scored)
    token_critic = algo.critic_level == "token"
    old_values = scored.token_values if token_critic else scored.step_values
    sums: dict[str, float] = {}
    n_updates = skipped = 0
    policy.train()
    for epoch in range(trainer.epochs):
        order = blocks(trajs, layout_kind)
        rng.shuffle(order)
        for mb_units in _minibatches(trajs, order, trainer.minibatch_steps):
            mb = [i for unit in mb_units for i in unit]
            sub = batch.select(mb)  # the mini-batch, indexed once
            position = {t: k for k, t in enumerate(mb)}  # trajectory -> its index in `sub`
            weights = aggregation_weights(algo.aggregation, sub.token_step, sub.step_traj)
            units, n_units = ratio_units(algo.ratio_level, sub.token_step, sub.token_traj, sub.num_steps,
                                         sub.num_trajectories)
            n_vals = sub.num_tokens if token_critic else sub.num_steps
            stats: dict[str, float] = {}
            mine = assign(trajs, mb_units, dist.world, layout_kind)[dist.rank]
            micros: list[list[int] | None] = list(chunk_by_tokens(trajs, mine, trainer.micro_batch_tokens, layout_kind))
            micros += [None] * (dist.max_int(len(micros)) - len(micros))
            for micro in micros:
                real = micro is not None
                micro = micro if real else mb_units[0]  # zero-weight: keeps collectives in step
                scale = dist.loss_scale if real else 0.0
                m_steps, m_toks = flat_ranges(batch, micro)  # in the batch
                _, ts = flat_ranges(sub, [position[i] for i in micro])  # the same tokens in `sub`
                layout = build_layout([trajs[i] for i in micro], layout_kind, pad_id, trainer.row_tokens).to(device)
                w = weights[ts].to(device)
                loss = torch.zeros((), device=device)
                with autocast(device, models.dtype):
                    lp, ent, hidden = policy(layout, with_entropy=True)
                    # Policy terms are computed (and logged) during critic warm-up too, but
                    # only enter the loss once the policy trains.
                    pg, pstats = policy_loss(
                        lp, old_lp[m_toks].to(device), credit.token_advantages[m_toks].to(device), w,
                        units[ts].to(device), n_units, algo.clip_low, algo.clip_high, algo.dual_clip,
                        algo.log_ratio_clamp,
                    )
                    policy_terms = pg - algo.entropy_coef * (w * ent).sum()
                    _acc(stats, "policy/loss", pg, real)
                    for k, v in pstats.items():
                        _acc(stats, f"policy/{k}", v, real)
                    if algo.uses_reference:
                        kl = kl_loss(lp, scored.ref_logprobs[m_toks].to(device), w, algo.kl_estimator)
                        policy_terms = policy_terms + algo.kl_coef * kl
                        _acc(stats, "policy/kl_ref", kl, real)
                    _acc(stats, "policy/entropy", (w * ent).sum(), real)
                    if train_policy:
                        loss = loss + policy_terms
                    if critic is not None:
                        values = models.critic.values(hidden) if shared_critic else critic(layout)
                        if token_critic:
                            v, idx = layout.gather_actions(values), m_toks
                        else:
                            v, idx = layout.gather_values(values), m_steps
                        vw = torch.full((len(idx),), 1.0 / max(n_vals, 1), device=device)
                        vl, vstats = value_loss(v, old_values[idx].to(device), credit.returns[idx].to(device), vw, algo.value_clip)
                        loss = loss + algo.value_coef * vl
                        _acc(stats, "critic/loss", vl, real)
                        _acc(stats, "critic/clip_frac", vstats["clip_frac"], real)
                if ratios is not None and real and epoch == trainer.epochs - 1:
                    ratios.add(batch.token_step[m_toks], lp.detach().float().cpu() - old_lp[m_toks])
                if loss.requires_grad:
                    (loss * scale).backward()
            if dist.active:
                stats = _sum_over_ranks(dist, stats)
            # every rank sees the same reduced losses and gradient norms, so all skip together
            if train_policy:
                stats["policy/grad_norm"] = policy_opt.clip(trainer.max_grad_norm)
            else:
                policy_opt.zero_grad()
            if critic_opt is not None:
                stats["critic/grad_norm"] = critic_opt.clip(trainer.max_grad_norm)
            checked = ("policy/loss", "policy/grad_norm") if train_policy else ()
            bad = [k for k in checked + ("critic/loss", "critic/grad_norm") if k in stats and not math.isfinite(stats[k])]
            if bad:
                policy_opt.zero_grad()
                if critic_opt is not None:
                    critic_opt.zero_grad()
                skipped += 1
            else:
                if train_policy:
                    policy_opt.apply()
                if critic_opt is not None:
                    critic_opt.apply()
            if guard is not None:
                guard.record(not bad, " and ".join(k.replace("/", " ").replace("_", " ") for k in bad))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    if ratios is not None:
        ratios.finish(algo, dist)
    out = {k: v / max(n_updates, 1) for k, v in sums.items()}
    out["update/skipped_nonfinite"] = float(skipped)
    out["update/optimiser_steps"] = float(n_updates - skipped)
    return out


def _sum_over_ranks(dist: Distributed, stats: dict[str, float]) -> dict[str, float]:
    keys = sorted(stats)
    t = torch.tensor([stats[k] for k in keys], dtype=torch.float64)
    dist.all_reduce_sum(t)
    return dict(zip(keys, t.tolist()))


def _acc(stats: dict[str, float], key: str, value: torch.Tensor, real: bool = True) -> None:
    """Sum a statistic over micro-batches (zero-weight padding ones add 0 but create the key)."""
    stats[key] = stats.get(key, 0.0) + (float(value.detach()) if real else 0.0)


class Optimiser:
    """AdamW with linear learning-rate warm-up over the first `warmup_steps` steps (Adam's
    first steps move every weight by about lr, which can wreck a fine-tuned policy), and
    gradient-norm clipping."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, warmup_steps: int):
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / max(warmup_steps, 1)))

    def step(self, max_norm: float) -> float:
        """Clip, step, zero; returns the gradient norm before clipping. A non-finite norm
        skips the step (gradients zeroed, weights and schedule untouched)."""
        norm = self.clip(max_norm)
        if math.isfinite(norm):
            self.apply()
        else:
            self.zero_grad()
        return norm

    def clip(self, max_norm: float) -> float:
        """Clip the gradients; their norm before clipping (NaN/inf: do not `apply`)."""
        params = [p for p in self.params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")) if params else torch.zeros(())
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded gradients is a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def apply(self) -> None:
        """The optimiser and schedule step on the clipped gradients, then zero them."""
        self.opt.step()
        self.sched.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


def _minibatches(trajs: Sequence[Trajectory], units: list[list[int]], steps_per_mb: int) -> list[list[list[int]]]:
    """Consecutive groups of `units` holding about `steps_per_mb` steps each (0 = one group
    with everything); units (trajectories, or task groups for the tree layout) stay whole."""
    if steps_per_mb <= 0:
        return [units]
    groups, cur, count = [], [], 0
    for unit in units:
        cur.append(unit)
        count += sum(len(trajs[i].steps) for i in unit)
        if count >= steps_per_mb:
            groups.append(cur)
            cur, count = [], 0
    if cur:
        groups.append(cur)
    return groups


def critic_metrics(credit: Credit, scored: Scored, algo: AlgorithmConfig) -> dict[str, float]:
    if not algo.critic:
        return {}
    values = scored.token_values if algo.critic_level == "token" else scored.step_values
    return {
        "critic/explained_var": explained_variance(values, credit.returns),
        "critic/value_mean": float(values.mean()) if values.numel() else 0.0,
        "critic/return_mean": float(credit.returns.mean()) if credit.returns.numel() else 0.0,
    }


# ----------------------------------------------------------------------------- one update, in order


def update(models: Models, cfg: Config, trajs: Sequence[Trajectory], policy_opt: Optimiser, critic_opt: Optimiser | None,
           rng: random.Random, pad_id: int, dist: Distributed | None, guard: NonFiniteGuard | None,
           train_policy: bool, policy_version: int) -> tuple[dict[str, float], Scored, Credit, int, StepRatios]:
    """One update on a batch of finished trajectories, top to bottom:

    1. batch: the trajectories as flat step/token records (`StepBatch`);
    2. score: the current policy's log-probs, the critic's values and the reference's
       log-probs, no grad, in one pass over the batch (`score_batch`);
    3. credit: advantages and critic targets by the preset's estimator (`compute_credit`,
       the registry of `steppo.core.credit`);
    4. staleness (asynchronous training only): advantages times the truncated step-level
       weight min(pi_prox / pi_behaviour, c), ratios against the proximal policy
       (`correct_staleness`);
    5. loss: epochs x mini-batches of the clipped policy loss (`steppo.core.losses`) and the
       critic's loss, with the non-finite guard (`ppo_update`);
    6. metrics.

    `cfg`: the run's `Config`; `train_policy`: False during the critic's warm-up;
    `policy_version`: the version being updated (the lag of each step is measured from it).
    Returns (metrics, scored, credit, tokens trained on, the step ratios of the first
    ``trainer.sample_trajectories`` trajectories for samples.jsonl).
    """
    algo, t, layout = cfg.algo, cfg.trainer, cfg.layout
    stale = t.async_rollout
    batch = StepBatch.from_trajectories(trajs)
    scored = score_batch(models, algo, trajs, batch, layout, t.micro_batch_tokens, pad_id, t.row_tokens, dist=dist)
    drift = float((scored.logprobs - batch.old_logprobs).abs().max())
    credit = compute_credit(algo, batch, scored)
    metrics: dict[str, float] = {}
    if stale:
        lag = [policy_version - s.policy_version for traj in trajs for s in traj.steps]
        w = correct_staleness(algo, batch, scored, credit, t.is_truncation, t.old_logprobs)
        metrics.update({"async/staleness_mean": float(np.mean(lag)), "async/staleness_max": float(max(lag)),
                        "async/is_weight_mean": float(w.mean()),
                        "async/is_weight_truncated_frac": float((w >= t.is_truncation).float().mean()),
                        "async/behaviour_logprob_drift_max_abs": drift})
    else:
        metrics["rollout/logprob_parity_max_abs"] = drift
    ratios = StepRatios(sum(len(traj.steps) for traj in trajs[: t.sample_trajectories]))
    metrics.update(ppo_update(models, algo, t, layout, train_policy, trajs, batch, scored, credit, policy_opt,
                              critic_opt, rng, pad_id, dist=dist, guard=guard, ratios=ratios))
    metrics.update(critic_metrics(credit, scored, algo))
    metrics["credit/advantage_mean"] = float(credit.step_advantages.mean())
    metrics["credit/advantage_std"] = float(credit.step_advantages.std()) if batch.num_steps > 1 else 0.0
    for k in range(min(int(batch.step_index.max()) + 1, 8)):
        metrics[f"credit/advantage_step{k}"] = float(credit.step_advantages[batch.step_index == k].mean())
    return metrics, scored, credit, t.epochs * input_tokens(trajs, layout), ratios


def check_finite_weights(it: int, models: Models, dist: Distributed) -> None:
    """Refuse to go on (and so ever to save) with non-finite policy or critic weights."""
    bad = []
    for label, module in (("policy", models.policy), ("critic", models.critic)):
        if module is None:
            continue
        for name, p in module.named_parameters():
            x = p.detach()
            x = x.to_local() if hasattr(x, "to_local") else x  # FSDP2 shard
            if x.numel() and not bool(torch.isfinite(x).all()):
                bad.append(f"{label}.{name}")
    if dist.max_int(len(bad)) > 0:
        raise NonFiniteError(f"iteration {it}: non-finite weights after the update ({', '.join(bad[:3]) or 'on another rank'}"
                             f"{'...' if len(bad) > 3 else ''}); stopping without saving them")
