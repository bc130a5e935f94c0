"""Credit-assignment speed: vectorised estimators vs a per-trajectory Python loop.

Workload: 4,096 trajectories of 1-32 steps, 1-16 response tokens per step, sparse and dense
rewards, groups of 8, a few anchor states per group. For each estimator it times
`steppo.core.credit.estimate_credit` on a collated `StepBatch` (median of several repeats) and
a straightforward reference that loops over trajectories in Python, the style of the paper's
reference code, and checks that both give the same advantages (`max_abs_diff`). ``gae_ms``:
the GAE loop alone at the sizes training runs (`gae_times`).

    python bench/credit.py [--trajectories 4096] [--repeats 5] [--seed 0]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import statistics
import time
from collections import defaultdict

import torch

from steppo.core.algorithms import AlgorithmConfig
from steppo.core.batch import StepBatch
from steppo.core.credit import ESTIMATORS, Values, estimate_credit, step_gae
from steppo.core.records import Step, Trajectory

GAMMA, LAM = 0.95, 0.9


def make_workload(num: int, seed: int) -> list[Trajectory]:
    rng = random.Random(seed)
    trajs = []
    for i in range(num):
        n = rng.randint(1, 32)
        dense = rng.random() < 0.3
        steps = []
        for t in range(n):
            L = rng.randint(1, 16)
            last = t == n - 1
            ends = "terminated" if rng.random() < 0.8 else "truncated"
            steps.append(
                Step(
                    prompt_ids=[1],
                    response_ids=[2] * L,
                    logprobs=[-1.0] * L,
                    reward=(rng.random() if dense else 0.0) + (float(rng.random() < 0.5) if last else 0.0),
                    terminated=last and ends == "terminated",
                    truncated=last and ends == "truncated",
                    anchor=f"s{rng.randrange(6)}",
                )
            )
        trajs.append(Trajectory(steps=steps, id=f"t{i}", group_id=f"g{i // 8}"))
    return trajs


# ----------------------------------------------------------------------------- loop references


def _gae_list(r, v, boot, gammas, lams):
    adv, nxt_v, nxt_a = [0.0] * len(r), boot, 0.0
    for t in reversed(range(len(r))):
        delta = r[t] + gammas[t] * nxt_v - v[t]
        nxt_a = delta + gammas[t] * lams[t] * nxt_a
        adv[t], nxt_v = nxt_a, v[t]
    return adv


def _norm(xs):
    if len(xs) < 2:
        return [0.0] * len(xs)
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return [(x - m) / (sd + 1e-6) for x in xs]


def loop_reference(trajs, estimator, step_values, token_values, boot):
    """Per-trajectory Python loops; returns flat per-step advantages (canonical order)."""
    out: list[float] = []
    s_off = k_off = 0
    by_group = defaultdict(list)
    for b, traj in enumerate(trajs):
        by_group[traj.group_id].append(b)
    outcomes = [traj.total_reward for traj in trajs]
    traj_adv = {}
    if estimator in ("grpo", "gigpo"):
        for members in by_group.values():
            for b, a in zip(members, _norm([outcomes[b] for b in members])):
                traj_adv[b] = a
    if estimator == "rloo":
        for members in by_group.values():
            tot = sum(outcomes[b] for b in members)
            for b in members:
                n = len(members)
                traj_adv[b] = outcomes[b] - (tot - outcomes[b]) / (n - 1) if n > 1 else 0.0
    returns0 = {}
    step_returns = {}
    for b, traj in enumerate(trajs):
        r = [s.reward for s in traj.steps]
        step_returns[b] = _gae_list(r, [0.0] * len(r), 0.0, [GAMMA] * len(r), [1.0] * len(r))
        returns0[b] = step_returns[b][0]
    anchor_adv = {}
    if estimator == "gigpo":
        anchor_groups = defaultdict(list)
        for b, traj in enumerate(trajs):
            for t, s in enumerate(traj.steps):
                anchor_groups[(traj.group_id, s.anchor)].append((b, t))
        for members in anchor_groups.values():
            for (b, t), a in zip(members, _norm([step_returns[b][t] for b, t in members])):
                anchor_adv[(b, t)] = a
    for b, traj in enumerate(trajs):
        n = len(traj.steps)
        bv = 0.0 if traj.terminated else boot[b]
        if estimator == "step_gae":
            adv = _gae_list([s.reward for s in traj.steps], step_values[s_off : s_off + n], bv, [GAMMA] * n, [LAM] * n)
        elif estimator in ("token_gae", "reinforce_pp", "reinforce_pp_baseline"):
            rew, ends = [], []
            for s in traj.steps:
                L = len(s.response_ids)
                rew += [0.0] * (L - 1) + [s.reward]
                ends += [False] * (L - 1) + [True]
            K = len(rew)
            gam = [GAMMA if e else 1.0 for e in ends]
            if estimator == "token_gae":
                lam = [LAM if e else 1.0 for e in ends]
                tok = _gae_list(rew, token_values[k_off : k_off + K], bv, gam, lam)
            else:
                tok = _gae_list(rew, [0.0] * K, 0.0, gam, [1.0] * K)
                if estimator == "reinforce_pp_baseline":
                    base = sum(returns0[m] for m in by_group[traj.group_id]) / len(by_group[traj.group_id])
                    tok = [x - base for x in tok]
            adv, pos = [], 0
            for s in traj.steps:
                adv.append(tok[pos])
                pos += len(s.response_ids)
            k_off += K
            s_off += n
            out += adv
            continue
        elif estimator in ("grpo", "rloo"):
            adv = [traj_adv[b]] * n
        elif estimator == "gigpo":
            adv = [traj_adv[b] + anchor_adv[(b, t)] for t in range(n)]
        else:  # broadcast
            adv = [outcomes[b]] * n
        k_off += sum(len(s.response_ids) for s in traj.steps)
        s_off += n
        out += adv
    return out


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def gae_times(repeats: int) -> dict[str, float]:
    """Milliseconds of `step_gae` (the backward loop) on (B, H) timelines at the sizes training
    runs: batches of 32-512 trajectories, horizons up to 50 steps."""
    out = {}
    for B in (32, 128, 512):
        for H in (16, 50):
            r, v, boot = torch.randn(B, H), torch.randn(B, H), torch.randn(B)
            mask = torch.arange(H) < torch.randint(1, H + 1, (B, 1))
            seconds, _ = _median_time(functools.partial(step_gae, r, v, mask, boot, GAMMA, LAM), 5 * repeats)
            out[f"B{B}_H{H}"] = round(seconds * 1e3, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trajectories", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    trajs = make_workload(args.trajectories, args.seed)
    t0 = time.perf_counter()
    batch = StepBatch.from_trajectories(trajs)
    collate_s = time.perf_counter() - t0
    step_values = torch.randn(batch.num_steps)
    token_values = torch.randn(batch.num_tokens)
    boot = torch.randn(batch.num_trajectories)
    sv, tv, bl = step_values.tolist(), token_values.tolist(), boot.tolist()
    scores = Values(step_values=step_values, token_values=token_values, bootstrap=boot)
    results = {}
    for est in ESTIMATORS:
        algo = AlgorithmConfig(estimator=est, gamma=GAMMA, lam=LAM, whiten=None, normalize_std=True)
        vec_s, credit = _median_time(functools.partial(estimate_credit, batch, scores, algo), args.repeats)
        loop_s, ref = _median_time(functools.partial(loop_reference, trajs, est, sv, tv, bl), max(1, args.repeats // 2))
        diff = float((credit.step_advantages - torch.tensor(ref)).abs().max())
        results[est] = {
            "vectorised_s": round(vec_s, 5),
            "loop_s": round(loop_s, 5),
            "speedup_vs_loop": round(loop_s / vec_s, 1),
            "max_abs_diff": diff,
        }
    print(
        json.dumps(
            {
                "benchmark": "credit",
                "trajectories": batch.num_trajectories,
                "steps": batch.num_steps,
                "action_tokens": batch.num_tokens,
                "collate_s": round(collate_s, 3),
                "torch_threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "estimators": results,
                "gae_ms": gae_times(args.repeats),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
