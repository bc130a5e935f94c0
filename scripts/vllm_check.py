"""A 2-iteration StepPO run (tiny model, compass) with vLLM rollouts; prints one JSON object.

    python scripts/vllm_check.py [overrides...]      # in the vLLM venv (scripts/vllm_venv.sh)
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """A 2-iteration StepPO run (tiny model, compass) with vLLM rollouts; prints one JSON object."""
    import json
    import tempfile
    import time

    from steppo.config import load_config
    from steppo.trainer.trainer import Trainer

    out = tempfile.mkdtemp(prefix="steppo-vllm-")
    cfg = load_config(overrides=[
        "rollout.backend=vllm", "trainer.iterations=2", "trainer.trajectories_per_iteration=16",
        "trainer.eval_episodes=16", "trainer.eval_sampled=false", "sft.demos=200", "sft.epochs=1",
        "critic.warmup_iterations=0", f"run.output_dir={out}", "run.trackers=[]", "run.progress=false", *argv,
    ])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        summary = trainer.train()
        backend = trainer.engine.backend
        last = summary["last"]
        print(json.dumps({
            "backend": type(backend).__name__,
            "iterations": trainer.iteration,
            "env_steps": trainer.env_steps,
            "logprob_parity_max_abs": last.get("rollout/logprob_parity_max_abs"),
            "rollout_tokens_per_s": last.get("throughput/rollout_tokens_per_s"),
            "prompt_tokens": getattr(backend, "prompt_tokens", None),
            "prefill_tokens": backend.prefill_tokens,
            "generated_tokens": backend.generated_tokens,
            "weight_pushes": getattr(backend, "weight_pushes", None),
            "eval_success_before": summary.get("eval/success_before"),
            "eval_success_after": summary.get("eval/success_after"),
            "wall_s": round(time.perf_counter() - t0, 1),
            "output_dir": out,
        }, indent=2))
    finally:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
