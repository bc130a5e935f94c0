"""Cached rollout: prompt tokens prefilled per environment step, with and without per-episode
KV caches, on the same workload.

Workload: 64 episodes of the built-in compass environment (cumulative context, up to 12 steps)
played by the `tiny` model (or `--model smollm2-135m`), sampled with a fixed seed. Both runs
sample the same tokens (the caches change how the context is computed, not what it says); the
benchmark checks it.

    python bench/rollout.py [--episodes 64] [--model tiny|smollm2-135m]

Prints one JSON object; ``prefill_reduction`` = prefill tokens re-prefilling / cached.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from steppo.config import EnvConfig, ModelConfig
from steppo.envs.compass import CompassEnv
from steppo.envs.registry import env_factory
from steppo.models.build import build_models
from steppo.models.builtin import build_tiny, env_corpus, smollm2_135m
from steppo.rollout.engine import RolloutEngine, RolloutSettings
from steppo.rollout.local import LocalBackend


def play(models, episodes: int, kv_cache: bool, seed: int) -> dict:
    env = CompassEnv()
    backend = LocalBackend(models.policy.model, {models.chat.end_of_turn_id}, 1.0, models.tokenizer.pad_token_id,
                           kv_cache=kv_cache)
    engine = RolloutEngine(env_factory(EnvConfig(name="compass")), models.chat, backend,
                           RolloutSettings(schedule="rounds", num_envs=16, max_batch=64), env.instructions(),
                           env.settings)
    tasks = env.tasks("train")[:episodes]
    t0 = time.perf_counter()
    result = engine.run(tasks, [t.id for t in tasks], seed=seed)
    wall = time.perf_counter() - t0
    engine.close()
    env_steps = sum(len(t.steps) for t in result.trajectories)
    return {
        "env_steps": env_steps,
        "prefill_tokens": backend.prefill_tokens,
        "prefill_tokens_per_step": round(backend.prefill_tokens / env_steps, 1),
        "generated_tokens": backend.generated_tokens,
        "generation_s": round(result.generation_s, 3),
        "generation_tokens_per_s": round(backend.generated_tokens / result.generation_s, 1),
        "wall_s": round(wall, 3),
        "responses": [[s.response_ids for s in t.steps] for t in result.trajectories],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "tiny":
            env = CompassEnv()
            path = build_tiny(env_corpus(env, env.tasks("train")), Path(tmp), seed=args.seed)
        else:
            path = smollm2_135m()
        torch.manual_seed(args.seed)
        models = build_models(ModelConfig(device="auto"), base_path=path, with_critic=False, shared_critic=False,
                              with_reference=False, temperature=1.0)
        play(models, 8, True, args.seed)  # warm-up
        plain = play(models, args.episodes, False, args.seed)
        cached = play(models, args.episodes, True, args.seed)
    same = plain.pop("responses") == cached.pop("responses")
    print(json.dumps({
        "benchmark": "rollout",
        "model": args.model,
        "episodes": args.episodes,
        "same_samples": same,
        "re_prefill": plain,
        "cached": cached,
        "prefill_reduction": round(plain["prefill_tokens"] / cached["prefill_tokens"], 2),
        "generation_speedup": round(plain["generation_s"] / cached["generation_s"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
