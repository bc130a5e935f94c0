"""Asynchronous vs synchronous StepPO: wall time per iteration with a slow environment.

Workload: the main job's setup (tiny model warm-started by SFT on compass, StepPO, 32 episodes per
update, 2 epochs) with every environment step delayed by ``--delay`` seconds (a browser, a remote
search API), so rollout time is of the order of update time. The same run is done twice, once
synchronously (rollout, then update) and once with ``trainer.async_rollout=true`` (rollout of
iteration k+1 during the update on iteration k, staleness 1, truncated step-level importance
weights).

    python bench/async.py [--iterations 8] [--delay 0.25]

Prints one JSON object: per mode the mean seconds per iteration (rollout wait + update, after
the first iteration), the total RL wall time, rollout and update seconds, training reward and
held-out success; ``speedup`` = synchronous / asynchronous seconds per iteration.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from steppo.config import load_config
from steppo.trainer.trainer import Trainer


def warm_start(args, root: Path) -> str:
    """SFT once, without the step delay (it models the environment during RL only)."""
    cfg = load_config(overrides=[f"sft.demos={args.demos}", f"run.output_dir={root / 'sft'}", "run.trackers=[]",
                                 "run.progress=false", "trainer.eval_episodes=1"])
    trainer = Trainer(cfg, overwrite=True, log=lambda *_: None)
    try:
        trainer.warm_start()
    finally:
        trainer.close()
    return str(root / "sft" / "sft_model")


def run(mode: str, args, sft_policy: str, root: Path) -> dict:
    overrides = [
        f"model.name={sft_policy}", "sft.enabled=false",
        f"trainer.iterations={args.iterations}", "trainer.trajectories_per_iteration=32", "trainer.eval_interval=0",
        f"trainer.eval_episodes={args.eval_episodes}", "trainer.eval_sampled=false", "trainer.checkpoint_interval=0",
        f"env.step_delay_s={args.delay}", "rollout.num_envs=32", "critic.warmup_iterations=1",
        f"trainer.async_rollout={'true' if mode == 'async' else 'false'}", f"run.output_dir={root / mode}",
        "run.trackers=[]", "run.progress=false",
    ]
    trainer = Trainer(load_config(overrides=overrides), overwrite=True, log=lambda *_: None)
    try:
        t0 = time.perf_counter()
        summary = trainer.train()
        wall = time.perf_counter() - t0  # RL iterations + the validations before and after
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (root / mode / "metrics.jsonl").read_text().splitlines()][1:]
    steady = rows[1:] or rows
    out = {
        "seconds_per_iteration": statistics.mean(r["time/iteration_s"] for r in steady),
        "rollout_s_mean": statistics.mean(r["time/rollout_s"] for r in steady),
        "update_s_mean": statistics.mean(r["time/update_s"] for r in steady),
        "rl_wall_s": wall,
        "train_reward_mean": statistics.mean(r["train/reward_mean"] for r in rows),
        "eval_success_before": summary.get("eval/success_before"),
        "eval_success_after": summary.get("eval/success_after"),
    }
    if mode == "async":
        out["rollout_wait_s_mean"] = statistics.mean(r["time/rollout_wait_s"] for r in steady)
        out["staleness_mean"] = statistics.mean(r["async/staleness_mean"] for r in rows)
        out["is_weight_mean"] = statistics.mean(r["async/is_weight_mean"] for r in rows)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--delay", type=float, default=0.25, help="seconds added to every environment step")
    ap.add_argument("--demos", type=int, default=500)
    ap.add_argument("--eval-episodes", type=int, default=50)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="steppo-async-"))
    sft_policy = warm_start(args, root)
    sync = run("sync", args, sft_policy, root)
    asyn = run("async", args, sft_policy, root)
    print(json.dumps({
        "benchmark": "async",
        "workload": {"env": "compass", "model": "tiny", "step_delay_s": args.delay, "iterations": args.iterations,
                     "trajectories_per_iteration": 32, "staleness": 1},
        "sync": sync,
        "async": asyn,
        "speedup": sync["seconds_per_iteration"] / asyn["seconds_per_iteration"],
        "meets_target": sync["seconds_per_iteration"] / asyn["seconds_per_iteration"] >= 1.5,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
