"""Comparisons under one protocol: presets x seeds, equal budgets, one table and one set of plots.

A protocol is a YAML file (see ``configs/compare/``)::

    name: my-protocol
    presets: [steppo, ppo, grpo]          # algorithm presets (or ablations)
    seeds: [0, 1, 2]
    base: {...}                           # a run config every run shares (env, model, trainer, ...)
    preset_overrides: {gspo: {algo: {clip_high: 4.0e-4}}}   # optional, per preset
    zero_shot: true                       # also evaluate the starting policy (a zero-shot row)
    contrast: {protocol: compass, a: steppo, b: ppo}   # optional: does a - b here differ from compass's?
    added_seeds: {presets: [steppo, ppo], seeds: [5, 6]}  # optional: more seeds for some presets
                                          # (a precision rule); "best baseline" stays on `seeds`

Equal budgets: every run plays ``trainer.trajectories_per_iteration`` episodes per update (group
presets play that many / ``group_size`` tasks, ``group_size`` times each, as in the paper) and
stops at the same ``trainer.max_env_steps``. When the base config warm-starts with SFT, the
warm start runs once per seed and every preset of that seed starts from the same weights.
Held-out success is measured every ``trainer.eval_interval`` iterations.

    steppo compare configs/compare/compass.yaml --jobs 2

Writes ``results/<name>/``: ``results.json`` (per preset and seed: held-out success curve vs
environment steps, final success, critic loss curve, mean advantage by step index),
``table.md`` (mean +- std over seeds, best in bold; the paired statistics of ``steppo.report``;
the commits the runs ran at and their run time, `steppo.report.run_time`) and PNG plots.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from steppo.config import ConfigError, load_config
from steppo.core.algorithms import PRESETS
from steppo.report import collect, write_results


def load_protocol(path: str | Path) -> dict[str, Any]:
    proto = yaml.safe_load(Path(path).read_text())
    if not isinstance(proto, dict) or "name" not in proto or "presets" not in proto:
        raise ConfigError(f"{path}: a protocol needs at least 'name' and 'presets'")
    unknown = [p for p in proto["presets"] if p not in PRESETS]
    if unknown:
        raise ConfigError(f"{path}: unknown presets {unknown}; choose from {sorted(PRESETS)}")
    c = proto.get("contrast")
    if c is not None and not (isinstance(c, dict) and isinstance(c.get("protocol"), str)
                              and all(c.get(k, "steppo") in PRESETS for k in ("a", "b"))):
        raise ConfigError(f"{path}: contrast must be {{protocol: <another protocol's name>, a: <preset>, "
                          f"b: <preset>}}, not {c!r}")
    proto.setdefault("seeds", [0])
    proto.setdefault("base", {})
    proto.setdefault("preset_overrides", {})
    added = proto.setdefault("added_seeds", {"presets": [], "seeds": []})
    if not (isinstance(added, dict) and set(added) <= {"presets", "seeds"}
            and all(p in proto["presets"] for p in added.get("presets", []))
            and all(isinstance(s, int) and s not in proto["seeds"] for s in added.get("seeds", []))):
        raise ConfigError(f"{path}: added_seeds must be {{presets: [some of {proto['presets']}], seeds: [seeds "
                          f"not among {proto['seeds']}]}}, not {added!r}")
    added.setdefault("presets", [])
    added.setdefault("seeds", [])
    return proto


def seeds_of(proto: dict, preset: str) -> list[int]:
    """The seeds `preset` runs: the protocol's, then its added seeds."""
    added = proto["added_seeds"]
    return list(proto["seeds"]) + (list(added["seeds"]) if preset in added["presets"] else [])


def all_seeds(proto: dict) -> list[int]:
    """Every seed some preset runs (each gets a warm start and a zero-shot row)."""
    added = proto["added_seeds"]
    return list(proto["seeds"]) + (list(added["seeds"]) if added["presets"] else [])


def work(proto: dict) -> list[tuple[str, int]]:
    """The (preset, seed) runs of a protocol, seed by seed (every preset of a seed, then the next)."""
    return [(p, s) for s in all_seeds(proto) for p in proto["presets"] if s in seeds_of(proto, p)]


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
    # the trackers group a protocol's runs: one W&B group and one MLflow experiment per protocol
    run = tree["run"]
    run.setdefault("wandb_group", proto["name"])
    run.setdefault("mlflow_experiment", proto["name"])
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
    with log.open("a") as f:  # a resumed run's earlier attempts stay in its log
        f.write(f"[compare] {time.strftime('%Y-%m-%d %H:%M:%S')} steppo {' '.join(args)}\n")
        f.flush()
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
        return {s: None for s in all_seeds(proto)}
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
        for seed, policy in pool.map(one, all_seeds(proto)):
            out[seed] = policy
    return out


def run_protocol(path: str | Path, out_dir: str | Path | None = None, jobs: int = 2,
                 presets: list[str] | None = None, seeds: list[int] | None = None,
                 runs_dir: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Run (or resume) every preset x seed of a protocol, then write the results.

    `threads`: torch threads per run (default: the machine's cores shared among `jobs`)."""
    proto = load_protocol(path)
    added = proto["added_seeds"]
    if presets:  # only these presets
        proto["presets"] = presets
        added["presets"] = [p for p in added["presets"] if p in presets]
    if seeds:  # only these seeds (an added seed still runs only its presets)
        proto["seeds"] = [s for s in seeds if s not in added["seeds"]]
        added["seeds"] = [s for s in added["seeds"] if s in seeds]
    out = Path(out_dir or Path("results") / proto["name"])
    root = Path(runs_dir or Path("runs") / "compare" / proto["name"])
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    starts = warm_starts(proto, root, jobs, threads)

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
    runs = work(proto)
    status = _Status(len(runs), jobs)
    with cf.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(status.running, one, item) for item in runs]
        for fut in cf.as_completed(futures):
            preset, seed, wall = fut.result()
            walls[(preset, seed)] = wall
    zero = _zero_shot(proto, root, starts, threads) if proto.get("zero_shot") else None
    results = collect(proto, root, walls, zero)
    write_results(results, out)
    return results


class _Status:
    """One line per run started or finished: runs done / running / left, elapsed, an estimate
    of the time left (from the runs finished in this invocation)."""

    def __init__(self, total: int, jobs: int):
        import threading

        self.total, self.jobs, self.done, self.active, self.fresh = total, jobs, 0, 0, 0
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()

    def running(self, fn, item):
        with self.lock:
            self.active += 1
        t = time.perf_counter()
        try:
            out = fn(item)
        finally:
            with self.lock:
                self.active -= 1
        with self.lock:
            self.done += 1
            self.fresh += time.perf_counter() - t > 1.0  # not a finished run found on disk
            self._line(f"{item[0]} seed {item[1]} done")
        return out

    def _line(self, event: str) -> None:
        from steppo.progress import clock

        elapsed = time.perf_counter() - self.t0
        left = self.total - self.done
        eta = f"~{clock(elapsed / self.fresh * left)}" if self.fresh else "?"  # runs finish at the rate seen so far
        print(f"[compare] {event} | runs done {self.done}/{self.total}, running {self.active}, left "
              f"{left - self.active} | elapsed {clock(elapsed)} | left {eta}", flush=True)


def _zero_shot(proto: dict, root: Path, starts: dict, threads: int) -> dict[str, Any]:
    """Held-out success of the starting policy (the warm start, or the base model), per seed."""
    rows = {}
    for seed in all_seeds(proto):
        target = root / "zero_shot" / f"seed{seed}.json"
        if not target.exists():
            tree = _merge(proto["base"], {"run": {"seed": seed, "output_dir": str(root / "zero_shot"), "progress": False}})
            if starts[seed] is not None:
                tree = _merge(tree, {"model": {"name": starts[seed]}, "sft": {"enabled": False}})
            cfg = _write_config(tree, root / "zero_shot" / f"seed{seed}.yaml")
            _steppo(["eval", "--config", str(cfg), "--json", str(target)], root / "zero_shot" / f"seed{seed}.log", threads)
        rows[seed] = json.loads(target.read_text())
    return rows
