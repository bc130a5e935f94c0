"""Reporting of a comparison (`steppo compare`): results, statistics, tables and plots.

`collect` reads every run directory of a protocol (``metrics.jsonl`` and ``evals.jsonl``);
`write_results` writes ``results.json``, ``table.md`` and the PNG plots. The statistics are
the ones the protocols pre-register (``configs/compare/compass.yaml``):

- per preset: mean +- std over seeds of the final held-out success (greedy and sampled); where a
  precision rule added seeds for some presets, over the protocol's seeds (like with like), with a
  second row over all of a preset's seeds;
- StepPO against each baseline: the paired difference (same seed = same warm start, same
  held-out tasks) with a 95% percentile interval from a two-level bootstrap (seeds with
  replacement, then tasks with replacement within each seed, the same tasks for both presets;
  seeds only when per-task outcomes are missing);
- env steps to reach the seed's starting success + 0.10; the final critic loss (mean of the
  last 5 updates); the ablation table (full / w/o step GAE / w/o step IS / w/o both = PPO).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from steppo.paths import read_jsonl

# Presets whose MDP is step-level: their per-step advantages are plotted by step index.
STEP_LEVEL = ("steppo", "steppo_no_step_gae", "steppo_no_step_is", "gigpo", "lightningrl")
# One colour per preset in every figure.
COLOURS = {
    "steppo": "#d62728", "ppo": "#1f77b4", "reinforce_pp": "#ff7f0e", "reinforce_pp_baseline": "#bcbd22",
    "grpo": "#2ca02c", "rloo": "#9467bd", "gspo": "#8c564b", "gigpo": "#e377c2", "lightningrl": "#17becf",
    "steppo_no_step_gae": "#7f7f7f", "steppo_no_step_is": "#393b79",
}
ABLATIONS = (("steppo", "full StepPO"), ("steppo_no_step_gae", "w/o step-level GAE"),
             ("steppo_no_step_is", "w/o step-level IS"), ("ppo", "w/o both (PPO)"))
RESAMPLES = 10_000
THRESHOLD_GAIN = 0.10


def _final_outcomes(run_dir: Path, iteration: int | None) -> dict[str, str]:
    """Per-task outcome strings of the evaluation at `iteration`, by mode (greedy / sampled)."""
    found: dict[str, str] = {}
    for r in read_jsonl(run_dir / "evals.jsonl"):
        if r.get("iteration") == iteration:
            found[r["mode"]] = r["outcomes"]  # the last record wins (a resumed run re-evaluates)
    return found


def run_time(records: list[dict]) -> float:
    """A run's time from its records (seconds): every update's (``time/iteration_s``: rollout +
    update) and every held-out evaluation's (``eval/time_s``, greedy and sampled; records from
    before StepPO kept it: generated tokens / generation tokens per s). Unlike the wall clock
    of the last attempt, it counts every attempt of a resumed run, once each update it kept,
    and no idle time between updates."""
    total = 0.0
    for r in records:
        total += r.get("time/iteration_s") or 0.0
        for mode in ("eval", "eval_sampled"):
            if r.get(f"{mode}/time_s") is not None:
                total += r[f"{mode}/time_s"]
            elif r.get(f"{mode}/generation_tokens_per_s"):
                total += r.get(f"{mode}/generated_tokens", 0) / r[f"{mode}/generation_tokens_per_s"]
    return total


def run_commits(run_dir: Path) -> list[str]:
    """The commits the attempts of a run ran at (``run.json``, written by `steppo train`), in
    order without repeats, "+dirty" when the checkout had uncommitted changes, "unknown" outside
    a git checkout; [] when the run recorded none (runs from before StepPO recorded them)."""
    try:
        attempts = json.loads((run_dir / "run.json").read_text()).get("attempts", [])
    except (OSError, ValueError, AttributeError):
        return []
    seen: list[str] = []
    for a in attempts if isinstance(attempts, list) else []:
        c = a.get("commit") if isinstance(a, dict) else None
        label = "unknown" if not c else c + ("+dirty" if a.get("dirty") else "")
        if label not in seen:
            seen.append(label)
    return seen


def collect(proto: dict, root: Path, walls: dict, zero: dict | None) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    from steppo.compare import seeds_of

    for preset in proto["presets"]:
        runs[preset] = {}
        for seed in seeds_of(proto, preset):
            run_dir = root / preset / f"seed{seed}"
            records = read_jsonl(run_dir / "metrics.jsonl")
            evals = [r for r in records if r.get("eval/success") is not None]
            adv_keys = sorted({k for r in records for k in r if k.startswith("credit/advantage_step")},
                              key=lambda k: int(k.rsplit("step", 1)[1]))
            critic = [{"env_steps": r["env_steps"], "loss": r["critic/loss"]}
                      for r in records if r.get("critic/loss") is not None]
            final_it = evals[-1]["iteration"] if evals else None
            runs[preset][str(seed)] = {
                "curve": [{"iteration": r["iteration"], "env_steps": r.get("env_steps", 0),
                           "success": r["eval/success"], "success_sampled": r.get("eval_sampled/success")}
                          for r in evals],
                "final_success": evals[-1]["eval/success"] if evals else None,
                "final_success_sampled": evals[-1].get("eval_sampled/success") if evals else None,
                "final_outcomes": _final_outcomes(run_dir, final_it),
                "env_steps": records[-1].get("env_steps") if records else 0,
                "iterations": records[-1].get("iteration") if records else 0,
                "critic_loss": critic,
                "final_critic_loss": _mean([c["loss"] for c in critic[-5:]]),
                "advantage_by_step": [_mean([r[k] for r in records if r.get(k) is not None]) for k in adv_keys],
                "wall_s": walls.get((preset, seed)),  # the last attempt's wall clock
                "time_s": run_time(records) if records else None,
                "commits": run_commits(run_dir),
            }
    return {"protocol": proto["name"], "presets": proto["presets"], "seeds": proto["seeds"],
            "added_seeds": proto.get("added_seeds"), "base": proto["base"], "runs": runs, "zero_shot": zero,
            "contrast": proto.get("contrast"), "precision": proto.get("precision_checks")}


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def _mean_std(xs: list[float | None]) -> tuple[float, float]:
    """Mean and (Bessel) std over the values that are numbers (None and NaN are not scores)."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------- statistics


def _paired_draws(results: dict[str, Any], a: str, b: str, mode: str, resamples: int,
                  rng: np.random.Generator) -> tuple[float, np.ndarray, str, int] | None:
    """The paired difference a - b at the final evaluation and `resamples` bootstrap draws of
    it: (point, draws (resamples,), level, seeds); None without a common finished seed."""
    key = "final_success" if mode == "greedy" else "final_success_sampled"
    ra, rb = results["runs"].get(a, {}), results["runs"].get(b, {})
    seeds = [s for s in ra if s in rb and ra[s].get(key) is not None and rb[s].get(key) is not None
             and not math.isnan(ra[s][key]) and not math.isnan(rb[s][key])]
    if not seeds:
        return None
    outs = [(ra[s].get("final_outcomes", {}).get(mode), rb[s].get("final_outcomes", {}).get(mode)) for s in seeds]
    tasks_level = all(x and y and len(x) == len(y) for x, y in outs) and len({len(x) for x, _ in outs}) == 1
    if tasks_level:
        # per seed and task: +1, 0, -1; a task the environment failed in either run counts 0
        d = np.array([[(ca == "1") - (cb == "1") if "x" not in (ca, cb) else 0 for ca, cb in zip(x, y)]
                      for x, y in outs], dtype=np.float64)  # (S, T)
        n_seeds, n_tasks = d.shape
        draws = np.empty(resamples)
        for lo in range(0, resamples, 500):  # chunks keep memory at 500 x S x T
            hi = min(lo + 500, resamples)
            si = rng.integers(0, n_seeds, size=(hi - lo, n_seeds))
            ti = rng.integers(0, n_tasks, size=(hi - lo, n_seeds, n_tasks))
            draws[lo:hi] = d[si[..., None], ti].mean(axis=(1, 2))
    else:
        d = np.array([ra[s][key] - rb[s][key] for s in seeds], dtype=np.float64)
        draws = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return float(d.mean()), draws, "seeds x tasks" if tasks_level else "seeds", len(seeds)


def _interval(point: float, draws: np.ndarray) -> dict[str, Any]:
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"difference": point, "ci95": [float(low), float(high)], "half_width": float((high - low) / 2),
            "excludes_zero": bool(low > 0 or high < 0)}


def paired_difference(results: dict[str, Any], a: str, b: str, mode: str = "greedy",
                      resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """success(a) - success(b) at the final evaluation, mean over the seeds both finished, with
    a 95% percentile bootstrap interval. Two levels (seeds, then tasks within each seed, the
    same tasks for a and b) when every seed has per-task outcomes of the same tasks; seeds
    only otherwise (``level`` says which). None without a common finished seed."""
    found = _paired_draws(results, a, b, mode, resamples, np.random.default_rng(seed))
    if found is None:
        return None
    point, draws, level, seeds = found
    return {"a": a, "b": b, "mode": mode, "seeds": seeds, "level": level, **_interval(point, draws)}


def contrast(results: dict[str, Any], other: dict[str, Any], a: str = "steppo", b: str = "ppo",
             mode: str = "greedy", resamples: int = RESAMPLES, seed: int = 0) -> dict[str, Any] | None:
    """Does a - b differ between two protocols? (a - b in `results`) - (a - b in `other`), with a
    95% interval from independent bootstraps of the two paired differences (the protocols' runs
    are independent). None when either protocol lacks a common finished seed of a and b."""
    rng = np.random.default_rng(seed)
    here, there = _paired_draws(results, a, b, mode, resamples, rng), _paired_draws(other, a, b, mode, resamples, rng)
    if here is None or there is None:
        return None
    return {"a": a, "b": b, "mode": mode, "protocol": results["protocol"], "other": other["protocol"],
            "here": here[0], "there": there[0], **_interval(here[0] - there[0], here[1] - there[1])}


def steps_to_threshold(run: dict[str, Any], gain: float = THRESHOLD_GAIN) -> float | None:
    """Env steps at the first evaluation whose greedy success is at least the start's + `gain`
    (None: not reached, or no evaluations)."""
    curve = [p for p in run.get("curve", []) if p["success"] is not None and not math.isnan(p["success"])]
    if not curve:
        return None
    target = curve[0]["success"] + gain
    return next((float(p["env_steps"]) for p in curve[1:] if p["success"] >= target - 1e-12), None)


def statistics_of(results: dict[str, Any], reference: str = "steppo") -> dict[str, Any]:
    """The pre-registered statistics of a comparison (see the module doc)."""
    presets = results["presets"]
    out: dict[str, Any] = {"per_preset": {}, "paired": {}, "best_baseline": None}
    base = _protocol_seeds(results)
    for p in presets:
        runs = results["runs"][p].values()
        reached = [steps_to_threshold(r) for r in runs]
        common = _on(results["runs"][p], base)  # success means compare presets on the same seeds
        out["per_preset"][p] = {
            "greedy": _mean_std([r["final_success"] for r in common]),
            "sampled": _mean_std([r["final_success_sampled"] for r in common]),
            "steps_to_threshold": _mean([x for x in reached if x is not None]),
            "threshold_reached": f"{sum(x is not None for x in reached)}/{len(reached)}",
            "final_critic_loss": _mean_std([r.get("final_critic_loss") for r in runs]),
        }
    if reference in presets:
        baselines = [p for p in presets if p != reference and not p.startswith(reference + "_")]
        for b in [p for p in presets if p != reference]:
            out["paired"][b] = {m: paired_difference(results, reference, b, m) for m in ("greedy", "sampled")}
        # on the protocol's seeds: a preset's added seeds (a precision rule) do not change which is best
        means = {b: out["per_preset"][b]["greedy"][0] for b in baselines}
        scored = [(m, b) for b, m in means.items() if not math.isnan(m)]
        out["best_baseline"] = max(scored)[1] if scored else None
    return out


# ----------------------------------------------------------------------------- tables


def _fmt_ms(ms: tuple[float, float]) -> str:
    return "-" if math.isnan(ms[0]) else f"{ms[0]:.3f} ± {ms[1]:.3f}"


def _protocol_seeds(results: dict[str, Any]) -> set[str] | None:
    """The protocol's own seeds (str) when some preset also ran added seeds (a precision rule), else
    None: then means over every preset's seeds compare like with like, and over all seeds they do not."""
    base = {str(s) for s in results.get("seeds") or []}
    added = any(s not in base for per in results["runs"].values() for s in per)
    return base if base and added else None


def _starts(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each seed's starting-policy row by str seed (the keys are ints before a JSON round trip)."""
    return {str(s): z for s, z in (results.get("zero_shot") or {}).items()}


def _on(per: dict[str, Any], seeds: set[str] | None) -> list[dict[str, Any]]:
    return [r for s, r in per.items() if seeds is None or str(s) in seeds]


def table(results: dict[str, Any]) -> str:
    """Mean ± std over seeds per preset (Markdown; bold: the best mean). Where some presets ran added
    seeds, every row is over the protocol's seeds and those presets get a second row over all theirs."""
    base = _protocol_seeds(results)

    def summary(per: list[dict[str, Any]]) -> tuple:
        return (_mean_std([r["final_success"] for r in per]), _mean_std([r["final_success_sampled"] for r in per]),
                _mean_std([r["env_steps"] for r in per]), _mean_std([r.get("time_s") for r in per]),
                sum(r["final_success"] is not None for r in per))

    rows = [(preset, *summary(_on(results["runs"][preset], base))) for preset in results["presets"]]
    best_g = max((r[1][0] for r in rows if not math.isnan(r[1][0])), default=None)
    best_s = max((r[2][0] for r in rows if not math.isnan(r[2][0])), default=None)

    def cell(ms: tuple[float, float], best: float | None) -> str:
        if math.isnan(ms[0]):
            return "-"
        text = f"{ms[0]:.3f} ± {ms[1]:.3f}"
        return f"**{text}**" if best is not None and abs(ms[0] - best) < 1e-12 else text

    over = "the protocol's seeds" if base else "seeds"
    lines = [
        f"| preset | held-out success, greedy (mean ± std over {over}) | sampled | env steps | time s | seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    zero = _starts(results)

    def start_row(label: str, seeds: set[str] | None) -> None:
        zs = [z for s, z in zero.items() if seeds is None or s in seeds]
        greedy, sampled = (_fmt_ms(_mean_std([z.get(k) for z in zs])) for k in ("success", "success_sampled"))
        lines.append(f"| {label} | {greedy} | {sampled} | 0 | - | {len(zs)} |")

    def preset_row(label: str, g, smp, steps, run_s, seeds, bold: bool) -> None:
        time_text = "-" if math.isnan(run_s[0]) else f"{run_s[0]:.0f}"
        lines.append(f"| {label} | {cell(g, best_g if bold else None)} | {cell(smp, best_s if bold else None)} | "
                     f"{steps[0]:.0f} | {time_text} | {seeds} |")

    if zero:
        start_row("starting policy (no RL)", base)
    for preset, *summ in rows:
        preset_row(preset, *summ, bold=True)
    if base:
        if zero and len(zero) > len(base):
            start_row(f"starting policy, all {len(zero)} seeds", None)
        for preset in results["presets"]:
            per = results["runs"][preset]
            if len(per) > len(_on(per, base)):
                preset_row(f"{preset}, all {len(per)} seeds (with the added ones)", *summary(list(per.values())),
                           bold=False)
    return "\n".join(lines) + "\n"


def per_seed_table(results: dict[str, Any]) -> str:
    """Final greedy held-out success of every preset on every seed (Markdown; "-" where a preset
    did not run that seed). Shows where a row's spread comes from, e.g. one seed whose start is
    weak. Columns: the protocol's seeds, then any added ones."""
    seeds = sorted({int(s) for per in results["runs"].values() for s in per})
    if not seeds:
        return ""
    lines = ["\n**Per seed**: final greedy held-out success (the same seed = the same start).\n",
             "| preset | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---:|" * len(seeds)]
    zero = _starts(results)
    if zero:
        lines.append("| starting policy (no RL) | " + " | ".join(
            f"{zero[str(s)]['success']:.3f}" if str(s) in zero else "-" for s in seeds) + " |")
    for preset in results["presets"]:
        per = results["runs"][preset]
        cells = [f"{per[str(s)]['final_success']:.3f}" if per.get(str(s), {}).get("final_success") is not None
                 else "-" for s in seeds]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _diff_cell(p: dict | None) -> str:
    if p is None:
        return "-"
    lo, hi = p["ci95"]
    text = f"{p['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    return f"**{text}**" if p["excludes_zero"] else text


def statistics_tables(results: dict[str, Any], stats: dict[str, Any], reference: str = "steppo") -> str:
    """The paired-difference, secondary-outcome and ablation tables (Markdown)."""
    if reference not in results["presets"] or not stats["paired"]:
        return ""
    levels = {p["level"] for d in stats["paired"].values() for p in d.values() if p}
    lines = [f"\n**{reference} − baseline**, paired by seed, final evaluation, 95% bootstrap interval "
             f"({', '.join(sorted(levels))}; bold: the interval excludes 0). Best baseline: "
             f"{stats['best_baseline']}.\n",
             "| baseline | greedy difference [95% CI] | sampled difference [95% CI] | seeds |", "|---|---:|---:|---:|"]
    for b, d in stats["paired"].items():
        seeds = (d["greedy"] or d["sampled"] or {}).get("seeds", 0)
        lines.append(f"| {b} | {_diff_cell(d['greedy'])} | {_diff_cell(d['sampled'])} | {seeds} |")
    lines += ["", f"| preset | env steps to start + {THRESHOLD_GAIN:.2f} (greedy; mean over seeds that reached it) | "
              "reached | final critic loss |", "|---|---:|---:|---:|"]
    for p, s in stats["per_preset"].items():
        steps = "-" if s["steps_to_threshold"] is None else f"{s['steps_to_threshold']:.0f}"
        lines.append(f"| {p} | {steps} | {s['threshold_reached']} | {_fmt_ms(s['final_critic_loss'])} |")
    present = [(p, name) for p, name in ABLATIONS if p in results["presets"]]
    if len(present) > 1:
        over = " (protocol's seeds)" if _protocol_seeds(results) else ""
        lines += ["", f"| ablation | greedy success{over} | sampled | full StepPO − it (greedy, paired) [95% CI] |",
                  "|---|---:|---:|---:|"]
        for p, name in present:
            s = stats["per_preset"][p]
            diff = "-" if p == reference else _diff_cell(stats["paired"][p]["greedy"])
            lines.append(f"| {name} (`{p}`) | {_fmt_ms(s['greedy'])} | {_fmt_ms(s['sampled'])} | {diff} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots


def _band(series: list[list[dict]], key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """x (mean env steps), mean, min and max of `key` over seeds at the points every seed has."""
    n = min(len(points) for points in series)
    xs = [statistics.mean(points[i]["env_steps"] for points in series) for i in range(n)]
    cols = [[points[i][key] for points in series if points[i][key] is not None] for i in range(n)]
    return (xs, [statistics.mean(c) if c else math.nan for c in cols],
            [min(c) if c else math.nan for c in cols], [max(c) if c else math.nan for c in cols])


def _relative(curve: list[dict], key: str) -> list[dict]:
    """A run's curve with `key` minus its first point's (the before-RL evaluation); None stays."""
    start = curve[0][key]
    return [{**p, key: None if p[key] is None or start is None else p[key] - start} for p in curve]


def _legend(results: dict[str, Any], preset: str) -> str:
    """A plot's label: the preset, and its number of seeds where a precision rule added seeds to
    some presets (their curves average over more seeds than the others')."""
    base, per = _protocol_seeds(results), results["runs"][preset]
    return f"{preset} ({len(per)} seeds)" if base and len(per) > len(_on(per, base)) else preset


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    n = max((len(per) for per in results["runs"].values()), default=0)
    # success, and (paired by seed) its gain over the seed's start: the before-RL evaluation every
    # run of a seed shares, so a seed whose start is far from the others does not hide the rest
    for key, label, name, gain in (("success", "greedy", "success.png", False),
                                   ("success_sampled", "sampled", "success_sampled.png", False),
                                   ("success", "greedy", "gain.png", True)):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for preset in results["presets"]:
            curves = [r["curve"] for r in results["runs"][preset].values() if r["curve"]]
            if not curves or all(p[key] is None for c in curves for p in c):
                continue
            if gain:
                curves = [_relative(c, key) for c in curves]
            xs, mean, lo, hi = _band(curves, key)
            colour = COLOURS.get(preset)
            ax.plot(xs, mean, marker="o", ms=3, label=_legend(results, preset), color=colour,
                    lw=2.2 if preset == "steppo" else 1.2)
            if n > 1:
                ax.fill_between(xs, lo, hi, color=colour, alpha=0.12, lw=0)
            drawn = True
        if not drawn:
            plt.close(fig)
            continue
        if gain:
            ax.axhline(0, color="k", lw=0.5)
            ax.set_ylabel(f"held-out success - the seed's start\n({label}; mean, band = min-max over seeds)")
        else:
            ax.set_ylim(0, 1)
            ax.set_ylabel(f"held-out success ({label}; mean, band = min-max over seeds)")
        ax.set_xlabel("environment steps")
        ax.set_title(f"{results['protocol']}: gain over each seed's start" if gain else results["protocol"])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, ncol=2)
        written.append(_save(fig, out / name))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset in results["presets"]:
        runs = [r["critic_loss"] for r in results["runs"][preset].values() if r["critic_loss"]]
        if not runs:
            continue
        xs, mean, lo, hi = _band(runs, "loss")
        ax.plot(xs, mean, label=_legend(results, preset), color=COLOURS.get(preset))
        if n > 1:
            ax.fill_between(xs, lo, hi, color=COLOURS.get(preset), alpha=0.12, lw=0)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("critic loss (mean over seeds)")
    ax.set_title(f"{results['protocol']}: critic loss")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    written.append(_save(fig, out / "critic_loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for preset in results["presets"]:
        if preset not in STEP_LEVEL:
            continue
        adv = [r["advantage_by_step"] for r in results["runs"][preset].values() if r["advantage_by_step"]]
        if not adv:
            continue
        k = min(len(a) for a in adv)
        ys = [statistics.mean(a[i] for a in adv if a[i] is not None) for i in range(k)]
        ax.plot(range(k), ys, marker="o", ms=3, label=_legend(results, preset), color=COLOURS.get(preset))
    ax.set_xlabel("step index within the episode")
    ax.set_ylabel("mean advantage (over iterations and seeds)")
    ax.set_title(f"{results['protocol']}: advantage by step")
    ax.axhline(0, color="k", lw=0.5)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, ncol=2)
    written.append(_save(fig, out / "advantage_by_step.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def provenance(results: dict[str, Any]) -> str:
    """Which code the runs ran at, and the protocol's run time (Markdown)."""
    runs = [r for per in results["runs"].values() for r in per.values()]
    by_commit: dict[str, int] = {}
    for r in runs:
        for c in r.get("commits") or ["not recorded"]:
            by_commit[c] = by_commit.get(c, 0) + 1
    times = [r["time_s"] for r in runs if r.get("time_s") is not None]
    code = ", ".join(f"{c[:12]}{'+dirty' if c.endswith('+dirty') else ''} ({n} runs)" for c, n in by_commit.items())
    time_text = f"{sum(times) / 3600:.1f} h summed over {len(times)} runs" if times else "not recorded"
    return (f"\nRuns: {len(runs)}; code: {code}; run time (updates + evaluations, from the records): "
            f"{time_text}.\n")


def precision_line(results: dict[str, Any]) -> str:
    """What the protocol's precision rule did (Markdown; "" without one)."""
    rule = results.get("precision")
    if not rule:
        return ""
    steps = "; ".join(f"{c['seeds']} seeds: ±{100 * c['half_width']:.1f}" for c in rule["checks"])
    last = rule["checks"][-1]
    verdict = ("met" if rule["met"] else f"NOT met: the seed cap ({rule['max_seed']}) was reached"
               if last["best_baseline"] else "not applicable: no baseline finished")
    return (f"\nPrecision rule: blocks of {rule['block']} seeds of {rule['preset']} and the best baseline "
            f"({last['best_baseline']}) until the greedy interval's half-width is at most "
            f"±{100 * rule['half_width']:.1f} points (half-width in points by seeds: {steps}); {verdict}.\n")


def contrast_table(stats: dict[str, Any]) -> str:
    c = stats.get("contrast")
    if not c:
        return ""
    if c.get("missing"):
        return f"\nContrast with {c['other']}: {c['missing']}.\n"
    g = c.get("greedy") or c.get("sampled")
    if g is None:
        return f"\nContrast with {c['other']}: no seed finished in both protocols.\n"
    lines = [f"\n**({g['a']} − {g['b']}) here minus ({g['a']} − {g['b']}) on {g['other']}** (independent "
             "bootstraps of the two paired differences, 95% interval; bold: it excludes 0).\n",
             f"| mode | {g['a']} − {g['b']} here | on {g['other']} | difference [95% CI] |", "|---|---:|---:|---:|"]
    for mode in ("greedy", "sampled"):
        d = c.get(mode)
        if d:
            lines.append(f"| {mode} | {d['here']:+.3f} | {d['there']:+.3f} | {_diff_cell(d)} |")
    return "\n".join(lines) + "\n"


def _contrast_of(results: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """The protocol's `contrast` ({protocol, a, b}) against that protocol's results.json, which
    lies beside `out` (results/<protocol>/)."""
    spec = results.get("contrast")
    if not spec:
        return None
    other_path = out.parent / spec["protocol"] / "results.json"
    if not other_path.exists():
        return {"other": spec["protocol"], "missing": f"{other_path} not found (run that protocol first)"}
    other = json.loads(other_path.read_text())
    a, b = spec.get("a", "steppo"), spec.get("b", "ppo")
    return {"other": spec["protocol"], **{m: contrast(results, other, a, b, m) for m in ("greedy", "sampled")}}


def write_results(results: dict[str, Any], out: Path) -> None:
    """results.json (with the statistics), table.md and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    stats = statistics_of(results)
    stats["contrast"] = _contrast_of(results, out)
    results["statistics"] = stats
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table(results) + statistics_tables(results, stats) + precision_line(results)
                                  + contrast_table(stats)
                                  + per_seed_table(results)
                                  + provenance(results))
    plots(results, out)
