"""Does an agent trained through the gateway learn like the built-in environment? The search-QA
example (`examples/searchqa_agent.py`: the `openai` SDK with tool calling, ``env=agent``) and
the built-in ``searchqa`` environment, trained by StepPO on the same questions, seed, warm start
and budget; their held-out success curves side by side.

Setup (as ``configs/compare/smollm2-searchqa.yaml``): SmolLM2-135M-Instruct with LoRA rank 16,
warm-started once by LoRA SFT on 96 gold trajectories of the built-in environment (both runs
start from that policy), synthetic 1-hop KB, 16 trajectories per update, 320 environment steps,
greedy success on the same 40 dev questions every 3 updates, at most 4 steps per episode.
What differs is the harness: the example's prompt describes the tools through the gateway
(``tools=``, rendered into the system turn for a template without tools) where the built-in
environment words them itself, and its tool results are ``tool`` messages (a user turn for this
template, as the built-in environment sends them).

    python bench/gateway_learning.py [--out runs/gateway_learning] [--jobs 2]

Resumable: a finished stage is kept; rerun the command to continue. Prints one JSON object
(per run: the eval curve as [env steps, success], wall time, the gateway's exact-token
counters) and writes it with a plot to ``results/gateway/``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
KB = {"source": "synthetic", "hops": 1, "num_tasks": {"train": 1000, "dev": 40, "test": 100}}
MODEL = {"name": "smollm2-135m", "lora_rank": 16, "gradient_checkpointing": True}
ROLLOUT = {"context": "cumulative", "schedule": "rounds", "num_envs": 16, "max_new_tokens": 48}
TRAINER = {"iterations": 1000, "max_env_steps": 320, "trajectories_per_iteration": 16, "epochs": 1,
           "minibatch_steps": 32, "micro_batch_tokens": 1024, "policy_lr": 2.0e-4, "critic_lr": 5.0e-4,
           "lr_warmup_steps": 2, "eval_interval": 3, "eval_episodes": 40, "eval_sampled": False}


def configs(out: Path) -> dict[str, dict]:
    sft = {"algo": {"kl_coef": 0.02}, "model": MODEL, "env": {"name": "searchqa", "params": KB},
           "sft": {"enabled": True, "demos": 96, "epochs": 1, "batch_trajectories": 4, "lr": 1.0e-3},
           "rollout": ROLLOUT, "run": {"output_dir": str(out / "sft"), "seed": 0}}
    rl = {"algo": {"name": "steppo", "kl_coef": 0.02}, "model": {**MODEL, "name": str(out / "sft" / "sft_model")},
          "sft": {"enabled": False}, "critic": {"warmup_iterations": 1}, "rollout": ROLLOUT, "trainer": TRAINER}
    builtin = {**rl, "env": {"name": "searchqa", "max_steps": 4, "params": KB},
               "run": {"trackers": ["tensorboard"], "seed": 0, "progress": False, "output_dir": str(out / "builtin")}}
    agent = {**rl, "env": {"name": "agent", "params": {"entrypoint": "examples.searchqa_agent:run",
                                                        "tasks": str(out / "tasks.jsonl"), "concurrency": 16}},
             "run": {"trackers": ["tensorboard"], "seed": 0, "progress": False, "output_dir": str(out / "agent")}}
    return {"sft": sft, "builtin": builtin, "agent": agent}


def steppo(args: list[str], log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with log.open("a") as f:
        rc = subprocess.run([sys.executable, "-m", "steppo.cli", *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc != 0:
        raise SystemExit(f"steppo {' '.join(args)} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def train(name: str, cfg_path: Path, out: Path, threads: int) -> None:
    run, done = out / name, out / f"{name}.done.json"
    if done.exists():
        return
    resume = (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("iter_*"))
    args = ["train", "--config", str(cfg_path)] + (["--resume"] if resume else ["--overwrite"])
    commit = _commit()  # the code this attempt runs
    wall = steppo(args, out / f"{name}.log", threads)
    done.write_text(json.dumps({"wall_s_last_attempt": round(wall, 1), "commit": commit}))


def _commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def curve(run: Path) -> dict:
    """The run's eval curve and counters; the commit it ran at (its done marker)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    done = run.parent / f"{run.name}.done.json"
    evals = [(r["env_steps"], r["eval/success"]) for r in rows if "eval/success" in r]
    trained = [r for r in rows if "policy/loss" in r]
    out = {"eval_success": evals, "updates": len(trained), "env_steps": trained[-1]["env_steps"] if trained else 0,
           "train_wall_s": round(sum(r["time/iteration_s"] for r in trained), 1),
           "commit": json.loads(done.read_text()).get("commit") if done.exists() else None}
    if trained and "gateway/retokenized_turns" in trained[-1]:
        last = trained[-1]
        out.update({k.split("/")[1]: last[k] for k in ("gateway/retokenized_turns", "gateway/prefix_extended_frac",
                                                        "gateway/malformed_tool_calls", "gateway/tool_calls",
                                                        "gateway/agent_errors") if k in last})
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, label in (("builtin", "built-in searchqa env"), ("agent", "openai-SDK agent via the gateway")):
        xs, ys = zip(*result[name]["eval_success"], strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("held-out success (40 dev, greedy)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.set_title("SmolLM2-135M, StepPO, seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/gateway_learning")
    ap.add_argument("--jobs", type=int, default=2, help="the two RL runs in parallel (threads split)")
    ap.add_argument("--results", default=str(ROOT / "results" / "gateway"))
    ap.add_argument("--runs", nargs="*", default=["builtin", "agent"], help="train only these (then report)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, tree in configs(out).items():
        paths[name] = out / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(tree, sort_keys=False))
    sys.path.insert(0, str(ROOT))
    from examples.searchqa_agent import write_tasks

    write_tasks(str(out / "tasks.jsonl"), train=KB["num_tasks"]["train"], dev=KB["num_tasks"]["dev"], kb=KB)
    cores = os.cpu_count() or 1
    if not (out / "sft" / "sft_model" / "config.json").exists():
        steppo(["sft", "--config", str(paths["sft"]), "--overwrite"], out / "sft.log", cores)
    threads = max(1, cores // args.jobs)
    with ThreadPoolExecutor(args.jobs) as ex:
        list(ex.map(lambda n: train(n, paths[n], out, threads), args.runs))
    result = {"benchmark": "gateway_learning", "jobs": args.jobs, "threads_per_run": threads,
              "builtin": curve(out / "builtin"), "agent": curve(out / "agent")}
    print(json.dumps(result, indent=2))
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    (res / "learning.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, res / "learning.png")


if __name__ == "__main__":
    main()
