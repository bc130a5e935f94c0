"""Comparisons under one protocol: presets x seeds, equal budgets, one table and one set of plots.

A protocol is a YAML file (see ``configs/compare/``)::

    name: tiny-textworld
    presets: [steppo, ppo, grpo]          # algorithm presets (or ablations)
    seeds: [0, 1, 2]
    base: {...}                           # a run config every run shares (env, model, trainer, ...)
    preset_overrides: {gspo: {algo: {clip_high: 4.0e-4}}}   # optional, per preset
    zero_shot: true                       # also evaluate the starting policy (a zero-shot row)

Equal budgets: every run plays ``trainer.trajectories_per_iteration`` episodes per update (group
presets play that many / ``group_size`` tasks, ``group_size`` times each, as in the paper) and
stops at the same ``trainer.max_env_steps``. When the base config warm-starts with SFT, the
warm start runs once per seed and every preset of that seed starts from the same weights.
Held-out success is measured every ``trainer.eval_interval`` iterations.

    steppo compare configs/compare/tiny-textworld.yaml --jobs 2

Writes ``results/<name>/``: ``results.json`` (per preset and seed: held-out success curve vs
environment steps, final success, critic loss curve, mean advantage by step index),
``table.md`` (mean +- std over seeds, best in bold) and PNG plots.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from steppo.config import ConfigError, load_config
from steppo.core.algorithms import PRESETS


# Presets whose MDP is step-level (spec §5): their per-step advantages are plotted by step index.
STEP_LEVEL = ("steppo", "steppo_no_step_gae", "steppo_no_step_is", "gigpo", "lightningrl")


def load_protocol(path: str | Path) -> dict[str, Any]:
    proto = yaml.safe_load(Path(path).read_text())
    if not isinstance(proto, dict) or "name" not in proto or "presets" not in proto:
        raise ConfigError(f"{path}: a protocol needs at least 'name' and 'presets'")
    unknown = [p for p in proto["presets"] if p not in PRESETS]
    if unknown:
        raise ConfigError(f"{path}: unknown presets {unknown}; choose from {sorted(PRESETS)}")
    proto.setdefault("seeds", [0])
    proto.setdefault("base", {})
    proto.setdefault("preset_overrides", {})
    return proto


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def run_config(proto: dict, preset: str, seed: int, run_dir: Path, start_model: str | None) -> dict:
    """The config tree of one run (validated by loading it)."""
    tree = _merge(proto["base"], proto["preset_overrides"].get(preset, {}))
    algo = dict(tree.get("algo", {}))
    algo["name"] = preset
    tree["algo"] = algo
    tree = _merge(tree, {"run": {"seed": seed, "output_dir": str(run_dir), "progress": False}})
    if start_model is not None:
        tree = _merge(tree, {"model": {"name": start_model}, "sft": {"enabled": False}})
    return tree


def _write_config(tree: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    load_config(path)  # fail here, not in a subprocess
    return path


def _steppo(args: list[str], log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "steppo.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"steppo {' '.join(args[:1])} failed; see {log}")
    return time.perf_counter() - t0


def warm_starts(proto: dict, root: Path, jobs: int, threads: int) -> dict[int, str | None]:
    """SFT once per seed when the base config warm-starts; the policies presets start from."""
    base = load_config(overrides=[])
    sft = proto["base"].get("sft", {})
    model = proto["base"].get("model", {}).get("name", base.model.name)
    enabled = sft.get("enabled", model == "tiny")
    if not enabled:
        return {s: None for s in proto["seeds"]}
    out: dict[int, str | None] = {}

    def one(seed: int) -> tuple[int, str]:
        run_dir = root / "sft" / f"seed{seed}"
        policy = run_dir / "sft_model"  # a plain model directory (LoRA adapters merged)
        if not (policy / "config.json").exists():
            tree = _merge(proto["base"], {"run": {"seed": seed, "output_dir": str(run_dir), "progress": False}})
            cfg = _write_config(tree, run_dir / "protocol.yaml")
            # no sft_model yet: any run files there are an interrupted attempt's, start it again
            _steppo(["sft", "--config", str(cfg), "--overwrite"], run_dir / "log.txt", threads)
        return seed, str(policy)

    with cf.ThreadPoolExecutor(jobs) as pool:
        for seed, policy in pool.map(one, proto["seeds"]):
            out[seed] = policy
    return out


def run_protocol(path: str | Path, out_dir: str | Path | None = None, jobs: int = 2,
                 presets: list[str] | None = None, seeds: list[int] | None = None,
                 runs_dir: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) every preset x seed of a protocol, then write the results.

    `threads`: torch threads per run (default: the machine's cores shared among `jobs`)."""
    proto = load_protocol(path)
    if presets:
        proto["presets"] = presets
    if seeds:
        proto["seeds"] = seeds
    out = Path(out_dir or Path("results") / proto["name"])
    root = Path(runs_dir or Path("runs") / "compare" / proto["name"])
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    starts = warm_starts(proto, root, jobs, threads)
    work = [(p, s) for s in proto["seeds"] for p in proto["presets"]]

    def one(item: tuple[str, int]) -> tuple[str, int, float]:
        preset, seed = item
        run_dir = root / preset / f"seed{seed}"
        if (run_dir / "done.json").exists():
            return preset, seed, json.loads((run_dir / "done.json").read_text())["wall_s"]
        cfg = _write_config(run_config(proto, preset, seed, run_dir, starts[seed]), run_dir / "protocol.yaml")
        args = ["train", "--config", str(cfg)]
        # an interrupted run continues (from its newest intact checkpoint, or from iteration 0
        # when it had none); --overwrite only clears a directory without a run's config
        args.append("--resume" if (run_dir / "config.yaml").exists() else "--overwrite")
        wall = _steppo(args, run_dir / "log.txt", threads)
        (run_dir / "done.json").write_text(json.dumps({"wall_s": wall}))
        return preset, seed, wall

    walls: dict[tuple[str, int], float] = {}
    with cf.ThreadPoolExecutor(jobs) as pool:
        for preset, seed, wall in pool.map(one, work):
            walls[(preset, seed)] = wall
    zero = _zero_shot(proto, root, starts, threads) if proto.get("zero_shot") else None
    results = collect(proto, root, walls, zero)
    write_results(results, out)
    return results


def _zero_shot(proto: dict, root: Path, starts: dict, threads: int) -> dict[str, Any]:
    """Held-out success of the starting policy (the warm start, or the base model), per seed."""
    rows = {}
    for seed in proto["seeds"]:
        target = root / "zero_shot" / f"seed{seed}.json"
        if not target.exists():
            tree = _merge(proto["base"], {"run": {"seed": seed, "output_dir": str(root / "zero_shot"), "progress": False}})
            if starts[seed] is not None:
                tree = _merge(tree, {"model": {"name": starts[seed]}, "sft": {"enabled": False}})
            cfg = _write_config(tree, root / "zero_shot" / f"seed{seed}.yaml")
            _steppo(["eval", "--config", str(cfg), "--json", str(target)], root / "zero_shot" / f"seed{seed}.log", threads)
        rows[seed] = json.loads(target.read_text())
    return rows


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def collect(proto: dict, root: Path, walls: dict, zero: dict | None) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    for preset in proto["presets"]:
        runs[preset] = {}
        for seed in proto["seeds"]:
            records = _metrics(root / preset / f"seed{seed}")
            evals = [r for r in records if r.get("eval/success") is not None]
            adv_keys = sorted({k for r in records for k in r if k.startswith("credit/advantage_step")},
                              key=lambda k: int(k.rsplit("step", 1)[1]))
            runs[preset][str(seed)] = {
                "curve": [{"iteration": r["iteration"], "env_steps": r.get("env_steps", 0),
                           "success": r["eval/success"], "success_sampled": r.get("eval_sampled/success")}
                          for r in evals],
                "final_success": evals[-1]["eval/success"] if evals else None,
                "final_success_sampled": evals[-1].get("eval_sampled/success") if evals else None,
                "env_steps": records[-1].get("env_steps") if records else 0,
                "iterations": records[-1].get("iteration") if records else 0,
                "critic_loss": [{"env_steps": r["env_steps"], "loss": r["critic/loss"]}
                                for r in records if r.get("critic/loss") is not None],
                "advantage_by_step": [
                    _mean([r[k] for r in records if r.get(k) is not None]) for k in adv_keys
                ],
                "wall_s": walls.get((preset, seed)),
            }
    return {"protocol": proto["name"], "presets": proto["presets"], "seeds": proto["seeds"],
            "base": proto["base"], "runs": runs, "zero_shot": zero}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(results: dict[str, Any]) -> str:
    rows = []
    for preset in results["presets"]:
        per = results["runs"][preset].values()
        g = _mean_std([r["final_success"] for r in per])
        smp = _mean_std([r["final_success_sampled"] for r in per])
        steps = _mean_std([r["env_steps"] for r in per])
        wall = _mean_std([r["wall_s"] for r in per])
        rows.append((preset, g, smp, steps, wall))
    best_g = max((r[1][0] for r in rows if not math.isnan(r[1][0])), default=None)
    best_s = max((r[2][0] for r in rows if not math.isnan(r[2][0])), default=None)

    def cell(ms: tuple[float, float], best: float | None) -> str:
        if math.isnan(ms[0]):
            return "-"
        text = f"{ms[0]:.3f} ± {ms[1]:.3f}"
        return f"**{text}**" if best is not None and abs(ms[0] - best) < 1e-12 else text

    n = len(results["seeds"])
    lines = [
        f"| preset | held-out success, greedy (mean ± std, {n} seeds) | sampled | env steps | wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    if results.get("zero_shot"):
        zs = list(results["zero_shot"].values())
        lines.append(f"| starting policy (no RL) | {_fmt_ms(_mean_std([z['success'] for z in zs]))} | - | 0 | - |")
    for preset, g, smp, steps, wall in rows:
        lines.append(f"| {preset} | {cell(g, best_g)} | {cell(smp, best_s)} | {steps[0]:.0f} | {wall[0]:.0f} |")
    return "\n".join(lines) + "\n"


def _fmt_ms(ms: tuple[float, float]) -> str:
    return "-" if math.isnan(ms[0]) else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset in results["presets"]:
        curves = [r["curve"] for r in results["runs"][preset].values() if r["curve"]]
        if not curves:
            continue
        xs, ys = _mean_curve(curves, "success")
        ax.plot(xs, ys, marker="o", ms=3, label=preset, lw=2.2 if preset == "steppo" else 1.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("held-out success (greedy, mean over seeds)")
    ax.set_title(results["protocol"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    written.append(_save(fig, out / "success.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset in results["presets"]:
        runs = [r["critic_loss"] for r in results["runs"][preset].values() if r["critic_loss"]]
        if not runs:
            continue
        ax.plot(*_mean_curve(runs, "loss"), label=preset)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("critic loss (mean over seeds)")
    ax.set_title(f"{results['protocol']}: critic loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "critic_loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset in results["presets"]:
        if preset not in STEP_LEVEL:
            continue
        adv = [r["advantage_by_step"] for r in results["runs"][preset].values() if r["advantage_by_step"]]
        if not adv:
            continue
        n = min(len(a) for a in adv)
        ys = [statistics.mean(a[i] for a in adv if a[i] is not None) for i in range(n)]
        ax.plot(range(n), ys, marker="o", ms=3, label=preset)
    ax.set_xlabel("step index within the episode")
    ax.set_ylabel("mean advantage (over iterations and seeds)")
    ax.set_title(f"{results['protocol']}: advantage by step")
    ax.axhline(0, color="k", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    written.append(_save(fig, out / "advantage_by_step.png"))
    return written


def _mean_curve(series: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    """Mean over seeds of `key` against environment steps, over the points every seed has."""
    n = min(len(points) for points in series)
    xs = [statistics.mean(points[i]["env_steps"] for points in series) for i in range(n)]
    ys = [statistics.mean(points[i][key] for points in series) for i in range(n)]
    return xs, ys


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results))
    plots(results, out)
