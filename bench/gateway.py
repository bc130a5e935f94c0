"""The gateway's cost: the same search-QA episodes played by the built-in rollout engine, and by
an OpenAI-SDK agent loop through the gateway (HTTP on loopback, sessions, exact-token
continuation, the data pool), at 1, 8 and 32 concurrent sessions.

Workload: synthetic search-QA tasks (`searchqa`, source synthetic: the agent's tools run in the
agent's own process, as an external agent's would), the `tiny` model (or `--model
smollm2-135m`), responses of up to `--max-tokens` tokens, at most 4 steps per episode, greedy
decoding on both paths, so both generate the same tokens for the same prompts (checked:
``same_tokens``) and the difference is the gateway's own cost. Direct:
`RolloutEngine` with `num_envs` = concurrency and one generation call per ready batch. Gateway:
`concurrency` threads, each an agent on the `openai` client against its own session URL.

    python bench/gateway.py [--model tiny|smollm2-135m] [--episodes 32] [--concurrency 1 8 32]

Prints one JSON object: per concurrency, env steps, wall time, time per step and requests/s for
both paths, ``added_per_step_frac`` = gateway time per step / direct time per step - 1, and the
gateway's counters (``prefix_extended_frac``, ``retokenized_turns``, rows per generate call).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from steppo.config import EnvConfig, ModelConfig
from steppo.envs.base import EnvSettings
from steppo.envs.registry import env_factory
from steppo.envs.searchqa import SearchQAEnv
from steppo.gateway.server import BackgroundServer, create_app
from steppo.gateway.service import Limits, gateway_for
from steppo.models.build import build_models
from steppo.models.builtin import build_tiny, env_corpus, smollm2_135m
from steppo.rollout.engine import RolloutEngine, RolloutSettings
from steppo.rollout.local import LocalBackend

PARAMS = {"source": "synthetic", "num_tasks": {"train": 200, "dev": 10, "test": 10}}
MAX_STEPS = 4


def direct(models, tasks, concurrency: int, max_tokens: int, seed: int) -> dict:
    env = SearchQAEnv(EnvSettings(max_steps=MAX_STEPS), **PARAMS)
    chat = models.chat
    backend = LocalBackend(models.policy.model, {chat.end_of_turn_id} | chat.stop_ids, 1.0,
                           models.tokenizer.pad_token_id, kv_cache=True)
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
    import openai

    gw = gateway_for(models, pool, limits=Limits(max_tokens=max_tokens, context_limit=4096))
    queue = list(enumerate(tasks))
    lock = threading.Lock()
    steps, tokens, errors = [0], [0], []

    def agent(url: str) -> None:
        env = SearchQAEnv(EnvSettings(max_steps=MAX_STEPS), **PARAMS)
        http = httpx.Client()
        while True:
            with lock:
                if not queue:
                    return
                i, task = queue.pop()
            session = f"ep-{i}"
            client = openai.OpenAI(base_url=f"{url}/sessions/{session}/v1", api_key="x", max_retries=0)
            question, _ = env.reset(task)
            messages = [{"role": "system", "content": env.instructions()}, {"role": "user", "content": question}]
            reward = 0.0
            for _ in range(MAX_STEPS):
                r = client.chat.completions.create(model="policy", messages=messages, max_tokens=max_tokens,
                                                   temperature=0)
                text = r.choices[0].message.content or ""
                result = env.step(text)
                with lock:
                    steps[0] += 1
                    tokens[0] += r.usage.completion_tokens
                reward += result.reward
                if result.terminated or result.truncated:
                    break
                messages += [r.choices[0].message.model_dump(exclude_none=True),
                             {"role": "user", "content": result.observation}]
            http.post(f"{url}/sessions/{session}/reward", json={"reward": reward})
            http.post(f"{url}/sessions/{session}/end", json={"status": "terminated"})

    with BackgroundServer(create_app(gw, max_concurrent=4 * concurrency)) as url:
        threads = [threading.Thread(target=lambda: _guard(agent, url, errors)) for _ in range(concurrency)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    gw.batcher.close()
    if errors:
        raise errors[0]
    m = gw.metrics()
    return {"env_steps": steps[0], "wall_s": round(wall, 3), "ms_per_step": round(1000 * wall / steps[0], 2),
            "requests_per_s": round(steps[0] / wall, 1), "generated_tokens": tokens[0],
            "prefix_extended_frac": m["gateway/prefix_extended_frac"],
            "retokenized_turns": m.get("gateway/retokenized_turns", 0.0),
            "rows_per_generate": round(m["gateway/rows_per_generate"], 2), "pool_trajectories": gw.pool.appended}


def _guard(fn, url, errors):
    try:
        fn(url)
    except Exception as exc:  # noqa: BLE001 - re-raised by the caller
        errors.append(exc)


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
