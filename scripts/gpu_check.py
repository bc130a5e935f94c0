"""GPU check: 3 StepPO iterations with the real SmolLM2-135M-Instruct on one CUDA device.

    python scripts/gpu_check.py [--iterations 3] [--env compass] [--output runs/gpu_check]

Prints one JSON object: rollout and update tokens/s per iteration and peak GPU memory.
Needs a CUDA build of torch and `pip install -e ".[models]"` (gguf, to convert the model).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from steppo.config import load_config
from steppo.trainer.trainer import Trainer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--env", default="compass")
    ap.add_argument("--output", default="runs/gpu_check")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible to torch"}))
        return 1
    cfg = load_config(overrides=[
        "model.name=smollm2-135m", "model.device=cuda", "model.dtype=bfloat16", f"env={args.env}",
        "sft.enabled=false", f"trainer.iterations={args.iterations}", "trainer.eval_interval=0",
        "trainer.eval_episodes=16", "trainer.trajectories_per_iteration=32", "rollout.max_new_tokens=48",
        f"run.output_dir={args.output}", "run.trackers=[]", "run.progress=false", *args.overrides,
    ])
    trainer = Trainer(cfg)
    torch.cuda.reset_peak_memory_stats()
    rows = []
    try:
        for _ in range(args.iterations):
            m = trainer.train_iteration()
            rows.append({
                "iteration": m["iteration"],
                "rollout_tokens_per_s": m["throughput/rollout_tokens_per_s"],
                "update_s": m["time/update_s"],
                "rollout_s": m["time/rollout_s"],
                "update_tokens_per_s": m.get("throughput/update_tokens_per_s"),
                "logprob_parity_max_abs": m.get("rollout/logprob_parity_max_abs"),
            })
    finally:
        trainer.close()
    print(json.dumps({
        "device": torch.cuda.get_device_name(0),
        "model": "smollm2-135m",
        "iterations": rows,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
