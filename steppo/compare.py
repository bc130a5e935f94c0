"""Comparisons under one protocol: presets x seeds, equal budgets, one table and one set of plots.

A protocol is a YAML file (see ``configs/compare/``)::

    name: my-protocol
    presets: [steppo, ppo, grpo]          # algorithm presets (or ablations)
    seeds: [0, 1, 2]
    base: {...}                           # a run config every run shares (env, model, trainer, ...)
    preset_overrides: {gspo: {algo: {clip_high: 4.0e-4}}}   # optional, per preset
    zero_shot: true                       # also report the starting policy (its before-RL row)
    contrast: {protocol: compass, a: steppo, b: ppo}   # optional: does a - b here differ from compass's?
    added_seeds: {presets: [steppo, ppo], seeds: [5, 6]}  # optional: more seeds for some presets
                                          # (a precision rule); "best baseline" stays on `seeds`
    precision: {preset: steppo, half_width: 0.05, block: 5, max_seed: 29}   # optional: after the
                                          # runs, add blocks of seeds of `preset` and the best
                                          # baseline until their paired interval is that narrow

Equal budgets: every run plays ``trainer.trajectories_per_iteration`` episodes per update (group
presets play that many / ``group_size`` tasks, ``group_size`` times each, as in the paper) and
stops at the same ``trainer.max_env_steps``. When the base config warm-starts with SFT, the
warm start runs once per seed and every preset of that seed starts from the same weights.
Held-out success is measured every ``trainer.eval_interval`` iterations.

    steppo compare configs/compare/compass.yaml --jobs 2

Each finished run's records (``RECORD_FILES``: metrics, held-out outcomes, configs, commits; not
its checkpoints) are kept in ``results/<name>/runs/<preset>/seed<k>/`` the moment it finishes,
with each seed's starting row and a fingerprint of its warm start: a directory meant to be
committed, so a comparison that outlives its machine resumes from the repository alone. A run is
done when its kept records are; ``runs/compare/<name>/`` (checkpoints, samples) is scratch. The
starting policy's row is the before-RL evaluation every run makes (`starting_rows`, which also
checks that a seed's runs started from one policy), so a seed whose runs are all kept needs no
warm start again. A warm start rebuilt on another machine must match the kept fingerprint once a
kept run started from it, or the comparison stops: runs of that seed would no longer be paired
(behaviour cloning is not bitwise reproducible across CPUs; `tidy_kept`).

Writes ``results/<name>/``: ``results.json`` (per preset and seed: held-out success curve vs
environment steps, final success, critic loss curve, mean advantage by step index),
``table.md`` (mean +- std over seeds, best in bold; the paired statistics of ``steppo.report``;
the commits the runs ran at and their run time, `steppo.report.run_time`) and PNG plots.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from steppo.config import ConfigError, load_config
from steppo.core.algorithms import PRESETS
from steppo.paths import read_jsonl, write_text_atomic
from steppo.report import collect, statistics_of, write_results

RECORD_FILES = ("run.json", "config.yaml", "protocol.yaml", "metrics.jsonl", "evals.jsonl", "done.json")


def keep_records(run_dir: Path, kept: Path) -> None:
    """Copy a finished run's records to `kept`; ``done.json`` last, so a kept directory with it
    is whole (a copy cut short is made again)."""
    kept.mkdir(parents=True, exist_ok=True)
    (kept / "done.json").unlink(missing_ok=True)
    for name in RECORD_FILES:
        if (run_dir / name).exists():
            write_text_atomic(kept / name, (run_dir / name).read_text())


def _read_json(path: Path) -> Any | None:
    """The JSON in `path`, None when it is missing or torn."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


def fingerprint(model_dir: Path) -> str:
    """sha256 over a model directory's weight files (name and bytes, in name order)."""
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


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
    rule = proto.get("precision")
    if rule is not None:
        rule = {"preset": "steppo", "block": 5, **rule} if isinstance(rule, dict) else rule
        ok = (isinstance(rule, dict) and set(rule) == {"preset", "half_width", "block", "max_seed"}
              and rule["preset"] in proto["presets"] and isinstance(rule["half_width"], (int, float))
              and rule["half_width"] > 0 and isinstance(rule["block"], int) and rule["block"] > 0
              and isinstance(rule["max_seed"], int))
        if not ok:
            raise ConfigError(f"{path}: precision must be {{preset: <one of the presets>, half_width: <points as a "
                              f"fraction, > 0>, block: <seeds per block>, max_seed: <last seed>}}, not {proto['precision']!r}")
        proto["precision"] = rule
    return proto


def seeds_of(proto: dict, preset: str) -> list[int]:
    """The seeds `preset` runs: the protocol's, then its added seeds."""
    added = proto["added_seeds"]
    return list(proto["seeds"]) + (list(added["seeds"]) if preset in added["presets"] else [])


def all_seeds(proto: dict) -> list[int]:
    """Every seed some preset runs (each gets a warm start and a starting row)."""
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


def warm_starts(proto: dict, root: Path, kept: Path, jobs: int, threads: int,
                need: list[int] | None = None) -> dict[int, str | None]:
    """SFT once per seed when the base config warm-starts; the policies presets start from.

    Only the seeds in `need` (default: all) are built. Each warm start's fingerprint is kept
    in ``kept/sft/seed<k>.json``; one rebuilt later (another machine, a lost scratch directory)
    must match it, else `RuntimeError` (the seed's runs would not share one start) and no other
    warm start is begun. `tidy_kept` drops a fingerprint no kept run depends on before a start."""
    base = load_config(overrides=[])
    sft = proto["base"].get("sft", {})
    model = proto["base"].get("model", {}).get("name", base.model.name)
    enabled = sft.get("enabled", model == "tiny")
    if not enabled:
        return {s: None for s in all_seeds(proto)}
    out: dict[int, str | None] = {s: str(root / "sft" / f"seed{s}" / "sft_model") for s in all_seeds(proto)}

    def one(seed: int) -> None:
        run_dir = root / "sft" / f"seed{seed}"
        policy = run_dir / "sft_model"  # a plain model directory (LoRA adapters merged)
        if not (policy / "config.json").exists():
            tree = _merge(proto["base"], {"run": {"seed": seed, "output_dir": str(run_dir), "progress": False}})
            cfg = _write_config(tree, run_dir / "protocol.yaml")
            # no sft_model yet: any run files there are an interrupted attempt's, start it again
            _steppo(["sft", "--config", str(cfg), "--overwrite"], run_dir / "log.txt", threads)
        digest = fingerprint(policy)
        record = kept / "sft" / f"seed{seed}.json"
        earlier = _kept_fingerprint(kept, f"seed{seed}")
        if earlier is None:
            _write_json(record, {"sha256": digest})
        elif earlier != digest:
            raise RuntimeError(
                f"the warm start of seed {seed} ({policy}) is not the one this protocol's kept runs started "
                f"from (weights sha256 {digest[:12]}, kept {earlier[:12]} in {record}): its runs would not be "
                f"paired. Rebuild it where the kept runs ran (same code, torch and thread count, and the same "
                f"machine: behaviour cloning is not bitwise reproducible across CPUs), or start the seed over "
                f"by removing {kept}/*/seed{seed} and {record}")

    with cf.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(one, s) for s in (all_seeds(proto) if need is None else need)]
        try:
            for fut in cf.as_completed(futures):
                fut.result()
        except BaseException:
            for fut in futures:  # a mismatch stops here: no further warm start is built for nothing
                fut.cancel()
            raise
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
    kept = out / "runs"
    threads = threads or max(1, (os.cpu_count() or 1) // max(jobs, 1))
    starts: dict[int, str | None] = {}
    walls: dict[tuple[str, int], float] = {}

    def one(item: tuple[str, int]) -> tuple[str, int, float]:
        preset, seed = item
        run_dir, kept_dir = root / preset / f"seed{seed}", kept / preset / f"seed{seed}"
        done = _read_json(kept_dir / "done.json")
        if done is not None:
            return preset, seed, done["wall_s"]
        if _read_json(run_dir / "done.json") is None:
            cfg = _write_config(run_config(proto, preset, seed, run_dir, starts[seed]), run_dir / "protocol.yaml")
            args = ["train", "--config", str(cfg)]
            # an interrupted run continues (from its newest intact checkpoint, or from iteration 0
            # when it had none); --overwrite only clears a directory without a run's config
            args.append("--resume" if (run_dir / "config.yaml").exists() else "--overwrite")
            wall = _steppo(args, run_dir / "log.txt", threads)
            _write_json(run_dir / "done.json", {"wall_s": wall})
        keep_records(run_dir, kept_dir)
        return preset, seed, _read_json(kept_dir / "done.json")["wall_s"]

    def play() -> None:
        """Every run of `work(proto)` not kept yet (and the warm starts they need)."""
        runs = work(proto)
        left = [(p, s) for p, s in runs if _read_json(kept / p / f"seed{s}" / "done.json") is None]
        # a warm start only for seeds with runs left (the starting rows come from the runs)
        starts.update(warm_starts(proto, root, kept, jobs, threads, need=sorted({s for _, s in left})))
        status = _Status(len(runs), jobs)
        with cf.ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(status.running, one, item) for item in runs]
            for fut in cf.as_completed(futures):
                preset, seed, wall = fut.result()
                walls[(preset, seed)] = wall

    tidy_kept(kept)
    play()
    rule = proto.get("precision")
    if rule is not None and (presets or seeds):
        print("[compare] --presets / --seeds given: the precision rule is not applied", flush=True)
    elif rule is not None:
        # the pre-registered precision rule: blocks of seeds of the reference and the best
        # baseline (fixed on the protocol's seeds) until the interval is narrow enough; it looks
        # only at the interval's width, and a resumed comparison takes the same steps
        checks = []
        while True:
            stats = statistics_of(collect(proto, kept, walls, None), rule["preset"])
            best = stats["best_baseline"]
            diff = (stats["paired"].get(best) or {}).get("greedy") if best else None
            width = diff["half_width"] if diff else math.inf
            checks.append({"best_baseline": best, "seeds": diff["seeds"] if diff else 0, "half_width": width})
            first = max(all_seeds(proto)) + 1
            block = list(range(first, first + rule["block"]))
            if width <= rule["half_width"] or best is None or block[-1] > rule["max_seed"]:
                break
            print(f"[compare] precision rule: {rule['preset']} - {best} half-width {width:.3f} > "
                  f"{rule['half_width']}; adding seeds {block[0]}-{block[-1]} of both", flush=True)
            added["presets"] = [p for p in proto["presets"] if p in {rule["preset"], best} | set(added["presets"])]
            added["seeds"] = added["seeds"] + block
            play()
        proto["precision_checks"] = {**rule, "checks": checks, "met": checks[-1]["half_width"] <= rule["half_width"]}
    rows = tidy_kept(kept, drop_unused_fingerprints=False)
    zero = {s: rows[s] for s in all_seeds(proto) if s in rows} if proto.get("zero_shot") else None
    results = collect(proto, kept, walls, zero)
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


def _seed_dirs(kept: Path) -> dict[int, list[Path]]:
    """Kept, finished runs (``done.json``) by seed, whatever their preset and seed: every kept run
    counts (a comparison restricted with --presets or --seeds, or the blocks a precision rule
    added, included)."""
    by_seed: dict[int, list[Path]] = {}
    presets = sorted(d for d in kept.iterdir() if d.is_dir() and d.name not in ("sft", "zero_shot")) if kept.is_dir() else []
    for preset in presets:
        for run in sorted(preset.glob("seed*")):
            if run.name[4:].isdigit() and _read_json(run / "done.json") is not None:
                by_seed.setdefault(int(run.name[4:]), []).append(run)
    return dict(sorted(by_seed.items()))


def starting_rows(kept: Path) -> dict[int, dict[str, Any]]:
    """Held-out success of the starting policy (the seed's warm start, or the base model), per
    seed, from the before-RL evaluation (iteration 0) every run makes of the policy it starts
    from: no evaluation of its own, so no warm start is needed once a seed's runs are kept.

    It is also the pairing check: every kept run of a seed must have the same before-RL outcomes,
    task for task, in each decoding (greedy, sampled) the runs share, else `RuntimeError` (those
    runs did not start from one policy, so their paired differences would be meaningless)."""
    rows: dict[int, dict[str, Any]] = {}
    for seed, runs in _seed_dirs(kept).items():
        before: dict[str, dict[str, Any]] = {}  # preset -> its before-RL outcomes (by mode) and metrics
        for run in runs:
            outcomes = {r["mode"]: r["outcomes"] for r in read_jsonl(run / "evals.jsonl") if r.get("iteration") == 0}
            metrics = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("iteration") == 0 and "eval/success" in r]
            if outcomes and metrics:  # (the last wins: a run restarted from iteration 0 evaluated again)
                before[run.parent.name] = {"outcomes": outcomes, "metrics": metrics[-1]}
        for mode in sorted({m for b in before.values() for m in b["outcomes"]}):
            groups: dict[str, list[str]] = {}
            for name, b in before.items():
                if mode in b["outcomes"]:
                    groups.setdefault(b["outcomes"][mode], []).append(name)
            if len(groups) > 1:
                raise RuntimeError(
                    f"the kept runs of seed {seed} in {kept} did not start from the same policy: their before-RL "
                    f"held-out outcomes ({mode}) differ between these groups of presets: "
                    f"{'; '.join(', '.join(g) for g in groups.values())}. They cannot be paired; remove the seed's "
                    f"runs that did not start from its kept warm start (see {kept}/sft/seed{seed}.json)")
        if before:
            metrics = [b["metrics"] for b in before.values()]
            rows[seed] = {"success": metrics[0]["eval/success"],
                          "success_sampled": next((m["eval_sampled/success"] for m in metrics
                                                   if m.get("eval_sampled/success") is not None), None),
                          "episodes": metrics[0].get("eval/episodes"), "runs": list(before),
                          "from": "the before-RL (iteration 0) held-out evaluation of the seed's kept runs, "
                                  "identical task for task in all of them"}
    return rows


def tidy_kept(kept: Path, drop_unused_fingerprints: bool = True) -> dict[int, dict[str, Any]]:
    """Bring a comparison's kept records up to date before its runs (re)start; the starting rows.

    Each seed's starting row (`starting_rows`) is kept in ``kept/zero_shot/seed<k>.json`` (made
    again where it is missing, torn or out of date: a run kept since adds to its ``runs``).
    With `drop_unused_fingerprints` (only while no run of the protocol is under way), a warm
    start's fingerprint that no kept run depends on yet is dropped: a warm start rebuilt on
    another machine (behaviour cloning is not bitwise reproducible across CPUs) is then taken
    as the seed's start instead of stopping the comparison, since no kept run started from the
    old one."""
    rows = starting_rows(kept)
    for seed, row in rows.items():
        target = kept / "zero_shot" / f"seed{seed}.json"
        if _read_json(target) != row:
            _write_json(target, row)
    if drop_unused_fingerprints:
        started = set(_seed_dirs(kept))  # seeds some kept run started from
        for record in sorted((kept / "sft").glob("seed*.json")):
            seed = record.stem[4:]
            if seed.isdigit() and int(seed) not in started:
                print(f"[compare] {record}: no kept run started from this warm start; its fingerprint is dropped "
                      f"(the seed's next warm start is recorded instead)", flush=True)
                record.unlink()
    return rows


def _kept_fingerprint(kept: Path, seed_name: str) -> str | None:
    """The warm-start fingerprint a seed's kept runs started from (``kept/sft/<seed_name>.json``)."""
    return (_read_json(kept / "sft" / f"{seed_name}.json") or {}).get("sha256")


def _under_way(scratch: Path, seed: int) -> bool:
    """Whether a run of `seed` started in the scratch directory and has not finished there."""
    return any(run.is_dir() and not (run / "done.json").exists()
               for run in scratch.glob(f"*/seed{seed}") if run.parent.name != "sft")


def keep_warm_starts(kept: Path, scratch: Path, store: Path) -> list[int]:
    """Copy the warm starts a later machine could not rebuild into `store` (to be committed).

    Behaviour cloning is not bitwise reproducible across CPUs, so a seed whose runs are part kept,
    part under way when its machine goes would lose its kept runs on the next machine (their start
    cannot be rebuilt there: `warm_starts` stops on the fingerprint). For each such seed (a kept run
    started from its warm start, ``kept/sft/seed<k>.json``, and a run of it is under way in
    `scratch`), the warm start ``scratch/sft/seed<k>/sft_model`` is copied to ``store/seed<k>/``
    when its weights match the kept fingerprint; `restore_warm_starts` puts it back. A stored warm
    start whose fingerprint record is gone or differs (its seed started over) is removed.
    Returns the seeds stored by this call."""
    for target in sorted(store.glob("seed*")) if store.is_dir() else []:  # stale copies (torn ones too) go first
        want = _kept_fingerprint(kept, target.name)
        if want is None or fingerprint(target) != want:
            shutil.rmtree(target)
    stored = []
    started = _seed_dirs(kept)
    for record in sorted((kept / "sft").glob("seed*.json")) if (kept / "sft").is_dir() else []:
        seed = record.stem[4:]
        if not seed.isdigit() or int(seed) not in started or not _under_way(scratch, int(seed)):
            continue
        source, target = scratch / "sft" / f"seed{seed}" / "sft_model", store / f"seed{seed}"
        if target.exists() or not (source / "config.json").exists():
            continue  # stored already (a stored copy left here matches), or not built on this machine
        if fingerprint(source) == _kept_fingerprint(kept, f"seed{seed}"):
            _copy_dir(source, target)
            stored.append(int(seed))
    return stored


def restore_warm_starts(kept: Path, store: Path, scratch: Path) -> list[int]:
    """Put the stored warm starts (`keep_warm_starts`) back into a new machine's scratch directory,
    where `warm_starts` finds them instead of building them again. Only a stored copy that matches
    its seed's kept fingerprint is restored, and never over a warm start built there (that one is
    checked against the fingerprint as it is). Returns the seeds restored."""
    restored = []
    for source in sorted(store.glob("seed*")) if store.is_dir() else []:
        if not source.name[4:].isdigit():
            continue  # (a torn copy)
        want = _kept_fingerprint(kept, source.name)
        target = scratch / "sft" / source.name / "sft_model"
        if want is None or (target / "config.json").exists():
            continue
        if fingerprint(source) != want:
            print(f"[compare] {source}: not the warm start its seed's kept runs started from; not restored", flush=True)
            continue
        _copy_dir(source, target)
        restored.append(int(source.name[4:]))
    return restored


def _copy_dir(source: Path, target: Path) -> None:
    """Copy a directory so that `target` appears whole or not at all (a copy torn by a kill is
    left under a ``.tmp`` name, cleared by the next copy)."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
