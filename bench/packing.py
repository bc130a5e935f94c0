"""Shared-prefix training: what each token layout costs for the same update.

For one batch of trajectories it measures, per layout (`per_step`, the reference: one row per
step; `prefix_shared`; `packed`; `tree`), the model-input tokens (real and with padding), the
wall time of a full update (policy and critic forward + backward over every micro-batch;
median of repeats) and the peak memory of that update (each layout in a fresh process; peak
resident memory above a process that only loads the models). `token_ratio_limit` is
tokens(per_step) / distinct tokens: the most a layout that reads each distinct token once
can save.

Workloads:
* ``synthetic``: 64 trajectories x 8 steps, cumulative context (64-token task prompt shared by
  groups of 8, 16-token responses, 24-token observations), the `tiny` model.
* ``compass``: 64 real episodes of the built-in environment played by an untrained `tiny`
  model (cumulative context, groups of 8).

    python bench/packing.py [--workload synthetic|compass|both] [--repeats 3]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from steppo.core.batch import LAYOUTS, build_layout
from steppo.core.records import Step, Trajectory
from steppo.models.builtin import tiny_config
from steppo.models.policy import Critic, Policy, make_critic

MICRO_BATCH_TOKENS = 8192
ROW_TOKENS = 2048


def synthetic_workload(seed: int = 0, trajectories: int = 64, steps: int = 8, group: int = 8) -> list[Trajectory]:
    rng = random.Random(seed)
    out = []
    for g in range(trajectories // group):
        task = [rng.randrange(3, 1000) for _ in range(64)]
        for m in range(group):
            prompt, seq = list(task), []
            for t in range(steps):
                response = [rng.randrange(3, 1000) for _ in range(16)]
                seq.append(Step(prompt_ids=list(prompt), response_ids=response, logprobs=[-1.0] * 16,
                                reward=float(t == steps - 1), terminated=t == steps - 1))
                prompt = prompt + response + [rng.randrange(3, 1000) for _ in range(24)]
            out.append(Trajectory(steps=seq, id=f"g{g}m{m}", group_id=f"g{g}"))
    return out


def compass_workload(seed: int = 0) -> list[Trajectory]:
    from steppo.config import EnvConfig, ModelConfig
    from steppo.envs.compass import CompassEnv
    from steppo.envs.registry import env_factory
    from steppo.models.build import build_models
    from steppo.models.builtin import build_tiny, env_corpus
    from steppo.rollout.engine import RolloutEngine, RolloutSettings
    from steppo.rollout.local import LocalBackend

    env = CompassEnv()
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(env_corpus(env, env.tasks("train")), Path(tmp), seed=seed)
        models = build_models(ModelConfig(device="cpu"), base_path=path, with_critic=False, shared_critic=False,
                              with_reference=False, temperature=1.0)
        factory = env_factory(EnvConfig(name="compass"))
        engine = RolloutEngine(factory, models.chat, LocalBackend(models.policy.model, {models.chat.end_of_turn_id}, 1.0,
                               models.tokenizer.pad_token_id), RolloutSettings(schedule="rounds", num_envs=16),
                               env.instructions(), env.settings)
        tasks = [t for t in env.tasks("train")[:8] for _ in range(8)]
        result = engine.run(tasks, [t.id for t in tasks], seed=seed)
        engine.close()
    return result.trajectories


def build_models(vocab: int, seed: int = 0) -> tuple[Policy, Critic]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    policy = Policy(LlamaForCausalLM(tiny_config(vocab)))
    critic = make_critic(policy, shared=False)
    nn_init = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a non-zero value head, so the critic's backward does real work
        critic.value_head.weight.copy_(torch.randn(critic.value_head.weight.shape, generator=nn_init) * 0.02)
    return policy, critic


def micro_batches(trajs: list[Trajectory], layout: str) -> list[list[Trajectory]]:
    from steppo.trainer.update import blocks, chunk_by_tokens

    return [[trajs[i] for i in chunk] for chunk in chunk_by_tokens(trajs, blocks(trajs, layout), MICRO_BATCH_TOKENS, layout)]


def one_update(policy: Policy, critic: Critic, chunks, layout: str) -> float:
    t0 = time.perf_counter()
    for chunk in chunks:
        lay = build_layout(chunk, layout, row_tokens=ROW_TOKENS)
        lp, _, _ = policy(lay)
        values = critic(lay)
        loss = lp.sum() * 1e-3 + lay.gather_values(values).sum()
        loss.backward()
    policy.zero_grad(set_to_none=True)
    critic.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def measure_memory(batch_file: str, layout: str | None, vocab: int) -> int:
    """Peak resident KiB of a fresh process that loads the models and runs one update with
    `layout` (None = load only)."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec.
    code = (
        "import pickle,re,sys; sys.path.insert(0, %r); import torch; torch.manual_seed(0)\n"  # noqa: UP031
        "from packing import build_models, micro_batches, one_update\n"
        "trajs = pickle.load(open(%r, 'rb')); p, c = build_models(%d)\n"
        "layout = %r\n"
        "if layout: one_update(p, c, micro_batches(trajs, layout), layout)\n"
        "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
    ) % (str(Path(__file__).parent), batch_file, vocab, layout)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def measure(trajs: list[Trajectory], repeats: int) -> dict:
    vocab = max(max(s.context_ids) for t in trajs for s in t.steps) + 1
    policy, critic = build_models(vocab)
    rows = {}
    for layout in LAYOUTS:
        chunks = micro_batches(trajs, layout)
        lays = [build_layout(c, layout, row_tokens=ROW_TOKENS) for c in chunks]
        one_update(policy, critic, chunks, layout)  # warm-up
        times = [one_update(policy, critic, chunks, layout) for _ in range(repeats)]
        rows[layout] = {
            "input_tokens": sum(x.num_input_tokens for x in lays),
            "padded_tokens": sum(x.padded_tokens for x in lays),
            "rows": sum(x.num_rows for x in lays),
            "micro_batches": len(chunks),
            "update_s": statistics.median(times),
        }
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump(trajs, f)
    try:
        base = measure_memory(f.name, None, vocab)
        for layout in LAYOUTS:
            rows[layout]["peak_mem_above_models_mib"] = round((measure_memory(f.name, layout, vocab) - base) / 1024, 1)
    finally:
        os.unlink(f.name)
    ref = rows["per_step"]
    distinct = rows["prefix_shared"]["input_tokens"]
    summary = {
        "trajectories": len(trajs),
        "steps": sum(len(t.steps) for t in trajs),
        "distinct_tokens": distinct,
        "token_ratio_limit": round(ref["input_tokens"] / distinct, 3),
        "tree_token_ratio": round(ref["input_tokens"] / rows["tree"]["input_tokens"], 3),
        "layouts": rows,
    }
    for layout in ("prefix_shared", "packed", "tree"):
        summary[f"time_speedup_{layout}"] = round(ref["update_s"] / rows[layout]["update_s"], 3)
        summary[f"peak_mem_ratio_{layout}"] = round(
            ref["peak_mem_above_models_mib"] / max(rows[layout]["peak_mem_above_models_mib"], 1e-3), 3)
    best = max(("prefix_shared", "packed", "tree"), key=lambda k: summary[f"time_speedup_{k}"])
    summary["time_speedup"] = summary[f"time_speedup_{best}"]
    summary["peak_mem_ratio"] = summary[f"peak_mem_ratio_{best}"]
    summary["best_layout"] = best
    summary["meets_target"] = summary["time_speedup"] >= 0.8 * summary["token_ratio_limit"]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=["synthetic", "compass", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = {"benchmark": "packing", "micro_batch_tokens": MICRO_BATCH_TOKENS, "row_tokens": ROW_TOKENS,
           "torch_threads": torch.get_num_threads()}
    if args.workload in ("synthetic", "both"):
        out["synthetic"] = measure(synthetic_workload(), args.repeats)
    if args.workload in ("compass", "both"):
        out["compass"] = measure(compass_workload(), args.repeats)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
