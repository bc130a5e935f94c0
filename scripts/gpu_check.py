"""GPU check: StepPO with the real SmolLM2-135M-Instruct on one CUDA device, DDP vs FSDP.

    python scripts/gpu_check.py [--iterations 3] [--env compass] [--output runs/gpu_check]

Runs the same 3-iteration job twice on one GPU rank, once with ``trainer.parallel=ddp`` and once
with ``trainer.parallel=fsdp`` (each in its own process, so peak-memory counters are separate),
and prints one JSON object: per strategy, rollout and update tokens/s per iteration and peak GPU
memory. Needs a CUDA build of torch and `pip install -e ".[models]"` (gguf, to convert the model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch


def one(strategy: str, args) -> dict:
    from steppo.config import load_config
    from steppo.trainer.trainer import Trainer

    cfg = load_config(overrides=[
        "model.name=smollm2-135m", "model.device=cuda", "model.dtype=bfloat16", f"env={args.env}",
        "sft.enabled=false", f"trainer.iterations={args.iterations}", "trainer.eval_interval=0",
        "trainer.eval_episodes=16", "trainer.trajectories_per_iteration=32", "rollout.max_new_tokens=48",
        f"trainer.parallel={strategy}", f"run.output_dir={args.output}/{strategy}", "run.trackers=[]",
        "run.progress=false", *args.overrides,
    ])
    trainer = Trainer(cfg, overwrite=True)
    torch.cuda.reset_peak_memory_stats()
    rows = []
    try:
        for _ in range(args.iterations):
            m = trainer.train_iteration()
            rows.append({
                "iteration": m["iteration"],
                "rollout_tokens_per_s": m["throughput/rollout_tokens_per_s"],
                "update_tokens_per_s": m.get("throughput/update_tokens_per_s"),
                "rollout_s": m["time/rollout_s"],
                "update_s": m["time/update_s"],
                "logprob_parity_max_abs": m.get("rollout/logprob_parity_max_abs"),
            })
    finally:
        trainer.close()
    return {"iterations": rows, "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--env", default="compass")
    ap.add_argument("--output", default="runs/gpu_check")
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], help="run one strategy in this process")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device visible to torch"}))
        return 1
    if args.strategy:
        print(json.dumps(one(args.strategy, args)))
        return 0
    out = {"device": torch.cuda.get_device_name(0), "model": "smollm2-135m"}
    for strategy in ("ddp", "fsdp"):
        cmd = [sys.executable, __file__, "--strategy", strategy, "--iterations", str(args.iterations),
               "--env", args.env, "--output", args.output, *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        out[strategy] = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr[-2000:]}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
