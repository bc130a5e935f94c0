"""The README's main job on several seeds: held-out success before and after RL, and wall time.

    python bench/main_job.py                       # seeds 0 1 2, one after another (~30 min)
    python bench/main_job.py --seeds 0 --out runs/main_job

Each seed is exactly `steppo train run.seed=S` (the default job) in its own run directory, run
alone so its wall time is the one a user sees. Prints one JSON object (per seed and the band
over seeds) and the Markdown rows of the README's main-job table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("eval/success_before", "eval/success_after", "eval_sampled/success_before", "eval_sampled/success_after")


def run_seed(seed: int, out: Path) -> dict:
    run_dir = out / f"seed{seed}"
    cmd = [sys.executable, "-m", "steppo.cli", "train", f"run.seed={seed}", f"run.output_dir={run_dir}",
           "run.progress=false"]
    if run_dir.exists():
        cmd.append("--overwrite")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {k: summary.get(k) for k in KEYS}
    row.update(seed=seed, wall_s=round(wall, 1), sft_s=round(summary.get("time/sft_s", 0.0), 1))
    row["greedy_gain"] = row["eval/success_after"] - row["eval/success_before"]
    return row


def band(rows: list[dict], key: str) -> dict:
    xs = [r[key] for r in rows]
    return {"mean": statistics.mean(xs), "min": min(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/main_job")
    args = ap.parse_args()
    rows = [run_seed(s, Path(args.out)) for s in args.seeds]
    result = {"bench": "main_job", "command": "steppo train run.seed=S", "seeds": rows,
              "band": {k: band(rows, k) for k in (*KEYS, "greedy_gain", "wall_s")}}
    print(json.dumps(result, indent=1))
    print("\n| seed | greedy before | greedy after | sampled before | sampled after | wall |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m, s = divmod(int(round(r["wall_s"])), 60)
        print(f"| {r['seed']} | {r['eval/success_before']:.3f} | **{r['eval/success_after']:.3f}** | "
              f"{r['eval_sampled/success_before']:.3f} | **{r['eval_sampled/success_after']:.3f}** | {m} min {s:02d} s |")


if __name__ == "__main__":
    main()
