"""The gateway's cost: the same search-QA episodes played by the built-in rollout engine, and by
an OpenAI-SDK agent loop through the gateway (HTTP on loopback, sessions, exact-token
continuation, the data pool), at 1, 8 and 32 concurrent sessions.

Workload: synthetic search-QA tasks (`searchqa`, source synthetic: the agent's tools run in the
agent's own process, as an external agent's would), the `tiny` model (or `--model
smollm2-135m`), responses of up to `--max-tokens` tokens, at most 4 steps per episode, greedy
decoding on both paths, so both generate the same tokens for the same prompts (checked:
``same_tokens``) and the difference is the gateway's own cost. Direct:
`RolloutEngine` with `num_envs` = concurrency and one generation call per ready batch. Gateway:
the trainer's ``env=agent`` runner (`steppo.gateway.runner.AgentRunner`) with `concurrency`
agent threads, each an `openai`-client loop against its own session URL, the search-QA
example's loop with the built-in environment's prompts (plain-text actions) so that the tokens
match.

    python bench/gateway.py [--model tiny|smollm2-135m] [--episodes 32] [--concurrency 1 8 32]

Prints one JSON object: per concurrency, env steps, wall time, time per step and requests/s for
both paths, ``added_per_step_frac`` = gateway time per step / direct time per step - 1, and the
gateway's counters (``prefix_extended_frac``, ``retokenized_turns``, rows per generate call).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from steppo.config import EnvConfig, ModelConfig
from steppo.envs.base import EnvSettings
from steppo.envs.registry import env_factory
from steppo.envs.searchqa import SearchQAEnv
from steppo.models.build import build_models
from steppo.models.builtin import build_tiny, env_corpus, smollm2_135m
from steppo.rollout.engine import RolloutEngine, RolloutSettings
from steppo.rollout.local import LocalBackend

PARAMS = {"source": "synthetic", "num_tasks": {"train": 200, "dev": 10, "test": 10}}
MAX_STEPS = 4


def _backend(models) -> LocalBackend:
    """The local backend both paths generate with (KV cache on)."""
    chat = models.chat
    return LocalBackend(models.policy.model, {chat.end_of_turn_id} | chat.stop_ids, 1.0,
                        models.tokenizer.pad_token_id, kv_cache=True)


def direct(models, tasks, concurrency: int, max_tokens: int, seed: int) -> dict:
    env = SearchQAEnv(EnvSettings(max_steps=MAX_STEPS), **PARAMS)
    chat = models.chat
    backend = _backend(models)
    engine = RolloutEngine(env_factory(EnvConfig(name="searchqa", max_steps=MAX_STEPS, params=PARAMS)), chat, backend,
                           RolloutSettings(num_envs=concurrency, max_batch=concurrency, max_new_tokens=max_tokens),
                           env.instructions(), env.settings)
    t0 = time.perf_counter()
    result = engine.run(tasks, [t.id for t in tasks], seed=seed, greedy=True)
    wall = time.perf_counter() - t0
    engine.close()
    steps = sum(len(t.steps) for t in result.trajectories)
    return {"env_steps": steps, "wall_s": round(wall, 3), "ms_per_step": round(1000 * wall / steps, 2),
            "requests_per_s": round(steps / wall, 1), "generated_tokens": result.generated_tokens}


def through_gateway(models, tasks, concurrency: int, max_tokens: int, seed: int, pool: Path) -> dict:
    """The same episodes played by an `openai`-SDK agent through the trainer's own agent runner
    (``env=agent``: loopback HTTP server, sessions, data pool, generation on this thread)."""
    import openai

    from steppo.envs.base import Task
    from steppo.gateway.runner import AgentRunner

    by_id = {t.id: t for t in tasks}
    shared = openai.OpenAI(base_url="http://127.0.0.1", api_key="x", max_retries=0)  # one connection pool

    def agent(task: dict, base_url: str) -> float:
        env = SearchQAEnv(EnvSettings(max_steps=MAX_STEPS), **PARAMS)
        client = shared.with_options(base_url=base_url)
        question, _ = env.reset(by_id[task["task_id"]])
        messages = [{"role": "system", "content": env.instructions()}, {"role": "user", "content": question}]
        reward = 0.0
        for _ in range(MAX_STEPS):
            r = client.chat.completions.create(model="policy", messages=messages, max_tokens=max_tokens,
                                               temperature=0)
            result = env.step(r.choices[0].message.content or "")
            reward += result.reward
            if result.terminated or result.truncated:
                break
            messages += [r.choices[0].message.model_dump(exclude_none=True),
                         {"role": "user", "content": result.observation}]
        return reward

    backend = _backend(models)
    runner = AgentRunner(agent, models, backend, pool, concurrency, 1.0, max_tokens, 4096)
    wrapped = [Task(id=t.id, split=t.split, seed=t.seed, payload={"task_id": t.id}) for t in tasks]
    t0 = time.perf_counter()
    result = runner.run(wrapped, [t.id for t in tasks], seed=seed, greedy=True)
    wall = time.perf_counter() - t0
    runner.close()
    if result.extra.get("gateway/agent_errors"):
        raise RuntimeError(f"agent errors: {[e.error for e in result.episodes if e.error][:3]}")
    m = result.extra
    steps = sum(len(t.steps) for t in result.trajectories)
    return {"env_steps": steps, "wall_s": round(wall, 3), "ms_per_step": round(1000 * wall / steps, 2),
            "requests_per_s": round(steps / wall, 1), "generated_tokens": result.generated_tokens,
            "prefix_extended_frac": m["gateway/prefix_extended_frac"],
            "retokenized_turns": m.get("gateway/retokenized_turns", 0.0),
            "rows_per_generate": round(m["gateway/rows_per_generate"], 2),
            "pool_trajectories": runner.gateway.pool.appended}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--episodes", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = SearchQAEnv(EnvSettings(max_steps=MAX_STEPS), **PARAMS)
        tasks = env.tasks("train")[: args.episodes]
        if args.model == "tiny":
            path = build_tiny(env_corpus(env, env.tasks("train")), Path(tmp) / "tiny", seed=args.seed)
        else:
            path = smollm2_135m()
        torch.manual_seed(args.seed)
        models = build_models(ModelConfig(device="auto"), base_path=path, with_critic=False, shared_critic=False,
                              with_reference=False, temperature=1.0)
        models.policy.eval()
        direct(models, tasks[:4], 4, args.max_tokens, args.seed)  # warm-up
        rows = {}
        for c in args.concurrency:
            d = direct(models, tasks, c, args.max_tokens, args.seed)
            g = through_gateway(models, tasks, c, args.max_tokens, args.seed, Path(tmp) / f"pool{c}")
            rows[str(c)] = {"direct": d, "gateway": g, "same_tokens": d["generated_tokens"] == g["generated_tokens"],
                            "added_per_step_frac": round(g["ms_per_step"] / d["ms_per_step"] - 1, 3)}
    print(json.dumps({"benchmark": "gateway", "model": args.model, "episodes": args.episodes,
                      "max_tokens": args.max_tokens, "threads": torch.get_num_threads(), "concurrency": rows},
                     indent=2))


if __name__ == "__main__":
    main()
