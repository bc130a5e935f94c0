"""The comparison harness on a 1-iteration micro-protocol: equal budgets, results, table, plots."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steppo.compare import (
    RECORD_FILES,
    _steppo,
    fingerprint,
    keep_warm_starts,
    load_protocol,
    restore_warm_starts,
    run_config,
    run_protocol,
    seeds_of,
    starting_rows,
    tidy_kept,
    warm_starts,
    work,
)
from steppo.config import ConfigError
from steppo.report import (
    _legend,
    contrast,
    paired_difference,
    per_seed_table,
    run_time,
    statistics_of,
    steps_to_threshold,
    table,
    write_results,
)

BASE = {
    "env": {"name": "compass"},
    "model": {"name": "tiny", "tiny_size": "small", "device": "cpu"},
    "sft": {"enabled": True, "demos": 16, "epochs": 1},
    "critic": {"warmup_iterations": 0},
    "rollout": {"max_new_tokens": 6, "num_envs": 4, "schedule": "rounds"},
    "trainer": {"trajectories_per_iteration": 8, "iterations": 50, "max_env_steps": 20,
                "eval_interval": 1, "eval_episodes": 4, "eval_sampled": False, "micro_batch_tokens": 2048},
    "run": {"trackers": []},
}


def _protocol(tmp_path, **extra):
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump({"name": "micro", "presets": ["steppo", "grpo"], "seeds": [0],
                                    "base": BASE, **extra}))
    return path


def test_run_config_sets_preset_seed_and_start(tmp_path):
    proto = load_protocol(_protocol(tmp_path, preset_overrides={"grpo": {"algo": {"group_size": 4}}}))
    tree = run_config(proto, "grpo", 3, tmp_path / "r", "/some/policy")
    assert tree["algo"] == {"name": "grpo", "group_size": 4}
    assert tree["run"]["seed"] == 3 and tree["model"]["name"] == "/some/policy"
    assert tree["sft"]["enabled"] is False
    # one W&B group and one MLflow experiment per protocol
    assert tree["run"]["wandb_group"] == tree["run"]["mlflow_experiment"] == "micro"
    # every run shares the per-update trajectory count and the env-step budget
    assert tree["trainer"]["trajectories_per_iteration"] == 8 and tree["trainer"]["max_env_steps"] == 20


def test_micro_protocol_writes_results_table_and_plots(tmp_path):
    _micro_protocol_checked(tmp_path)


def _micro_protocol_checked(tmp_path):
    """Runs the micro-protocol and checks its results; (results dir, runs dir, results.json)."""
    out, runs = tmp_path / "results", tmp_path / "runs"
    results = run_protocol(_protocol(tmp_path, zero_shot=True), out_dir=out, runs_dir=runs, jobs=2)

    # one warm start per seed, shared by every preset of that seed
    assert (runs / "sft" / "seed0" / "sft_model" / "config.json").exists()
    for preset in ("steppo", "grpo"):
        cfg = yaml.safe_load((runs / preset / "seed0" / "protocol.yaml").read_text())
        assert cfg["model"]["name"].endswith("sft/seed0/sft_model")
        records = [json.loads(line) for line in (runs / preset / "seed0" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if "rollout/episodes" in r]
        # equal budget: 8 trajectories per update for both (grpo: 8 / group_size tasks x group_size),
        # and each run stops at the first update that reaches the 20-env-step budget
        assert train and all(r["rollout/episodes"] == 8 for r in train)
        assert train[-1]["env_steps"] >= 20 and all(r["env_steps"] < 20 for r in train[:-1])
        run = results["runs"][preset]["0"]
        assert run["final_success"] is not None and len(run["curve"]) == len(train) + 1
        assert run["curve"][0]["env_steps"] == 0

    assert results["runs"]["steppo"]["0"]["critic_loss"] and not results["runs"]["grpo"]["0"]["critic_loss"]
    assert results["runs"]["steppo"]["0"]["advantage_by_step"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["presets"] == ["steppo", "grpo"] and saved["zero_shot"]["0"]["success"] is not None
    text = (out / "table.md").read_text()
    assert "| steppo |" in text and "| grpo |" in text and "starting policy" in text and "**" in text
    assert "**Per seed**" in text and "| preset | seed 0 |" in text
    for png in ("success.png", "gain.png", "critic_loss.png", "advantage_by_step.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    # each run records the commit it ran at (this checkout's HEAD), and the table says so
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    commits = results["runs"]["steppo"]["0"]["commits"]
    if head.returncode == 0:  # the suite runs in a git checkout
        assert len(commits) == 1 and commits[0].split("+")[0] == head.stdout.strip()
        assert f"code: {head.stdout.strip()[:12]}" in text and "(2 runs)" in text
    else:
        assert commits == ["unknown"]
    # the run time from the records: within the last attempt's wall clock (which adds start-up)
    for preset in ("steppo", "grpo"):
        run = results["runs"][preset]["0"]
        assert 0 < run["time_s"] < run["wall_s"]
    attempts = json.loads((runs / "steppo" / "seed0" / "run.json").read_text())["attempts"]
    assert [a["from_iteration"] for a in attempts] == [0] and attempts[0]["steppo"]

    # resume: finished runs are not rerun
    mtime = (runs / "steppo" / "seed0" / "metrics.jsonl").stat().st_mtime
    run_protocol(_protocol(tmp_path, zero_shot=True), out_dir=out, runs_dir=runs, jobs=1, threads=1)
    assert (runs / "steppo" / "seed0" / "metrics.jsonl").stat().st_mtime == mtime

    # every finished run's records are kept beside the results (to be committed), checkpoints not
    kept = out / "runs"
    for preset in ("steppo", "grpo"):
        names = sorted(f.name for f in (kept / preset / "seed0").iterdir())
        assert names == sorted(RECORD_FILES)
        for name in ("metrics.jsonl", "evals.jsonl", "run.json"):
            assert (kept / preset / "seed0" / name).read_bytes() == (runs / preset / "seed0" / name).read_bytes()
    assert json.loads((kept / "zero_shot" / "seed0.json").read_text()) == saved["zero_shot"]["0"]
    digest = json.loads((kept / "sft" / "seed0.json").read_text())["sha256"]
    assert digest == fingerprint(runs / "sft" / "seed0" / "sft_model")
    return out, runs, saved


def test_kept_records_resume_a_comparison_whose_scratch_is_lost(tmp_path):
    """A new machine: only the repository (results/<name>/, with runs/) survived. Nothing is
    trained again and the same results come back; a copy cut short is made again; a warm start
    rebuilt differently stops the comparison before it trains on an unpaired start."""
    out, runs, saved = _micro_protocol_checked(tmp_path)
    kept = out / "runs"
    shutil.rmtree(runs)
    again = run_protocol(_protocol(tmp_path, zero_shot=True), out_dir=out, runs_dir=runs, jobs=1, threads=1)
    assert not runs.exists() or not any(runs.iterdir())  # no warm start, no run, no evaluation
    for preset in ("steppo", "grpo"):
        for key in ("final_success", "final_outcomes", "curve", "commits", "time_s", "critic_loss"):
            assert again["runs"][preset]["0"][key] == saved["runs"][preset]["0"][key]
    assert json.loads(json.dumps(again["zero_shot"])) == saved["zero_shot"]

    # a run kept without its done.json (the copy was cut short) and a torn zero-shot row: the
    # run is trained again (its scratch is gone), from the rebuilt warm start, which must be
    # the kept one (the cloning is deterministic on one machine)
    (kept / "grpo" / "seed0" / "done.json").unlink()
    (kept / "grpo" / "seed0" / "metrics.jsonl").write_text('{"iteration": 0, "eval/succ')
    (kept / "zero_shot" / "seed0.json").write_text('{"succ')
    again = run_protocol(_protocol(tmp_path, zero_shot=True), out_dir=out, runs_dir=runs, jobs=1, threads=1)
    assert fingerprint(runs / "sft" / "seed0" / "sft_model") == json.loads((kept / "sft" / "seed0.json").read_text())["sha256"]
    assert not (runs / "steppo").exists() and (runs / "grpo" / "seed0" / "done.json").exists()
    assert (kept / "grpo" / "seed0" / "done.json").exists()
    assert again["runs"]["grpo"]["0"]["final_outcomes"] == saved["runs"]["grpo"]["0"]["final_outcomes"]
    # the torn starting row is made again from the runs' before-RL evaluations (no evaluation of its own)
    assert again["zero_shot"][0] == json.loads((kept / "zero_shot" / "seed0.json").read_text())
    for key in ("success", "success_sampled", "episodes", "runs"):
        assert again["zero_shot"][0][key] == saved["zero_shot"]["0"][key]

    # a warm start that is not the kept one while a kept run started from it: a clear stop,
    # nothing trained or kept
    record = kept / "sft" / "seed0.json"
    record.write_text(json.dumps({"sha256": "0" * 64}))
    shutil.rmtree(kept / "grpo" / "seed0")
    shutil.rmtree(runs / "grpo")
    with pytest.raises(RuntimeError, match="would not be paired"):
        run_protocol(_protocol(tmp_path, zero_shot=True), out_dir=out, runs_dir=runs, jobs=1, threads=1)
    assert not (runs / "grpo").exists() and not (kept / "grpo" / "seed0").exists()

    # ... but once no kept run started from it (a new machine, before any run of the seed was
    # kept), the fingerprint binds nothing: the seed's new warm start is recorded and trained from
    shutil.rmtree(kept / "steppo" / "seed0")  # (its scratch went with the first machine above)
    (kept / "zero_shot" / "seed0.json").unlink()
    again = run_protocol(_protocol(tmp_path, zero_shot=True), out_dir=out, runs_dir=runs, jobs=1, threads=1)
    assert json.loads(record.read_text())["sha256"] == fingerprint(runs / "sft" / "seed0" / "sft_model")
    assert (kept / "steppo" / "seed0" / "done.json").exists() and (kept / "grpo" / "seed0" / "done.json").exists()
    assert again["zero_shot"][0]["runs"] == ["grpo", "steppo"]


def _kept_run(kept: Path, preset: str, seed: int, greedy: str, sampled: str | None = "10") -> None:
    """A finished run's kept records, by hand: its before-RL evaluation and one after (sampled
    None: greedy evaluations only)."""
    run = kept / preset / f"seed{seed}"
    run.mkdir(parents=True)
    evals = [{"iteration": it, "mode": mode, "outcomes": o} for it, (g, s) in ((0, (greedy, sampled)), (5, ("11", "11")))
             for mode, o in (("greedy", g), ("sampled", s)) if o is not None]
    (run / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    first = {"iteration": 0, "env_steps": 0, "eval/success": greedy.count("1") / len(greedy), "eval/episodes": len(greedy)}
    if sampled is not None:
        first["eval_sampled/success"] = sampled.count("1") / len(sampled)
    metrics = [first, {"iteration": 5, "env_steps": 40, "eval/success": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "done.json").write_text('{"wall_s": 1}')


def test_starting_rows_come_from_the_runs_and_check_they_started_from_one_policy(tmp_path):
    kept = tmp_path / "runs"
    for preset in ("steppo", "grpo", "ppo"):
        _kept_run(kept, preset, 0, "1000")
    _kept_run(kept, "steppo", 1, "1100", "00")
    (kept / "grpo" / "seed1").mkdir(parents=True)  # unfinished (no done.json): not read
    (kept / "grpo" / "seed1" / "evals.jsonl").write_text(json.dumps({"iteration": 0, "mode": "greedy", "outcomes": "0000"}))
    rows = starting_rows(kept)
    assert sorted(rows) == [0, 1]  # seed 2 has no kept run
    assert (rows[0]["success"], rows[0]["success_sampled"], rows[0]["episodes"]) == (0.25, 0.5, 4)
    assert rows[0]["runs"] == ["grpo", "ppo", "steppo"] and rows[1]["runs"] == ["steppo"]
    assert (rows[1]["success"], rows[1]["success_sampled"]) == (0.5, 0.0)

    # one task's before-RL outcome differs (greedy, or only sampled): not one starting policy
    shutil.rmtree(kept / "grpo" / "seed1")
    _kept_run(kept, "grpo", 1, "1101", "00")
    with pytest.raises(RuntimeError, match="seed 1 .*did not start from the same policy.*grpo; steppo"):
        starting_rows(kept)
    shutil.rmtree(kept / "grpo" / "seed1")
    _kept_run(kept, "grpo", 1, "1100", "01")
    with pytest.raises(RuntimeError, match=r"seed 1 .*did not start from the same policy.*\(sampled\)"):
        starting_rows(kept)
    # a run that evaluated greedy only is checked on what it shares
    shutil.rmtree(kept / "grpo" / "seed1")
    _kept_run(kept, "grpo", 1, "1100", None)
    assert starting_rows(kept)[1]["runs"] == ["grpo", "steppo"] and starting_rows(kept)[1]["success_sampled"] == 0.0


def test_tidy_keeps_starting_rows_and_drops_only_fingerprints_no_kept_run_depends_on(tmp_path):
    kept = tmp_path / "runs"
    _kept_run(kept, "steppo", 0, "10")
    (kept / "steppo" / "seed7").mkdir(parents=True)  # a seed a precision block added, unfinished
    for seed in (0, 1, 7):
        (kept / "sft").mkdir(exist_ok=True)
        (kept / "sft" / f"seed{seed}.json").write_text(json.dumps({"sha256": str(seed) * 64}))
    (kept / "zero_shot").mkdir()
    (kept / "zero_shot" / "seed0.json").write_text('{"succ')  # torn
    rows = tidy_kept(kept, drop_unused_fingerprints=False)  # while runs are under way
    assert json.loads((kept / "zero_shot" / "seed0.json").read_text()) == rows[0] and rows[0]["success"] == 0.5
    assert sorted(f.name for f in (kept / "sft").iterdir()) == ["seed0.json", "seed1.json", "seed7.json"]
    tidy_kept(kept)
    assert sorted(f.name for f in (kept / "sft").iterdir()) == ["seed0.json"]
    assert json.loads((kept / "sft" / "seed0.json").read_text())["sha256"] == "0" * 64


def test_table_marks_best_mean_and_reports_std():
    def run(s):
        return {"final_success": s, "final_success_sampled": None, "env_steps": 10, "time_s": 1.0}
    results = {"presets": ["a", "b"], "seeds": [0, 1], "zero_shot": None,
               "runs": {"a": {"0": run(0.5), "1": run(0.7)}, "b": {"0": run(0.2), "1": run(0.2)}}}
    text = table(results)
    assert "| a | **0.600 ± 0.141** | - | 10 | 1 | 2 |" in text and "| b | 0.200 ± 0.000 | - | 10 | 1 | 2 |" in text


def _results(a_runs, b_runs):
    return {"presets": ["steppo", "ppo"], "seeds": list(range(len(a_runs))), "zero_shot": None,
            "runs": {"steppo": {str(i): r for i, r in enumerate(a_runs)}, "ppo": {str(i): r for i, r in enumerate(b_runs)}}}


def _run(outcomes=None, success=None):
    success = outcomes.count("1") / len(outcomes) if success is None else success
    return {"final_success": success, "final_success_sampled": None, "env_steps": 10, "time_s": 1.0,
            "final_outcomes": {"greedy": outcomes} if outcomes else {}, "curve": [], "final_critic_loss": None,
            "critic_loss": [], "advantage_by_step": []}


def test_paired_difference_by_seed_and_task_by_hand():
    # seed 0: tasks differ by (0, +1, 0, 0); seed 1: (+1, 0, 0, 0) -> mean difference 2/8
    res = _results([_run("1100"), _run("1010")], [_run("1000"), _run("0010")])
    p = paired_difference(res, "steppo", "ppo", resamples=2000)
    assert p["level"] == "seeds x tasks" and p["seeds"] == 2
    assert p["difference"] == 0.25
    lo, hi = p["ci95"]
    assert 0 <= lo <= 0.25 <= hi <= 1  # never below 0: no task favours ppo
    # identical outcomes: a point interval at 0, which does not exclude 0
    same = paired_difference(_results([_run("1010")] * 2, [_run("1010")] * 2), "steppo", "ppo", resamples=500)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0] and not same["excludes_zero"]
    # a task the environment failed in either run counts 0
    assert paired_difference(_results([_run("1x")], [_run("11")]), "steppo", "ppo", resamples=10)["difference"] == 0


def test_paired_difference_falls_back_to_seeds_without_outcomes():
    res = _results([_run(success=0.6), _run(success=0.8)], [_run(success=0.5), _run(success=0.5)])
    p = paired_difference(res, "steppo", "ppo", resamples=4000)
    assert p["level"] == "seeds" and abs(p["difference"] - 0.2) < 1e-12
    assert abs(p["ci95"][0] - 0.1) < 1e-12 and abs(p["ci95"][1] - 0.3) < 1e-12 and p["excludes_zero"]


def test_steps_to_threshold_and_statistics_tables():
    curve = [{"env_steps": 0, "success": 0.5}, {"env_steps": 100, "success": 0.55}, {"env_steps": 200, "success": 0.6}]
    assert steps_to_threshold({"curve": curve}) == 200.0
    assert steps_to_threshold({"curve": curve[:2]}) is None
    res = _results([_run("1100"), _run("1010")], [_run("1000"), _run("0010")])
    stats = statistics_of(res)
    assert stats["best_baseline"] == "ppo" and stats["paired"]["ppo"]["greedy"]["difference"] == 0.25


def test_contrast_of_two_protocols_by_hand(tmp_path):
    # here steppo - ppo = +1 on every task of every seed; on the other protocol 0: contrast +1, a point
    here = {**_results([_run("11")] * 2, [_run("00")] * 2), "protocol": "long"}
    there = {**_results([_run("10")] * 2, [_run("10")] * 2), "protocol": "short"}
    c = contrast(here, there, resamples=500)
    assert (c["here"], c["there"], c["difference"]) == (1.0, 0.0, 1.0) and c["ci95"] == [1.0, 1.0]
    assert c["excludes_zero"] and c["other"] == "short"
    # a protocol against itself: no difference, and an interval around 0 (the two bootstraps are independent)
    mixed = {**_results([_run("1100"), _run("1010")], [_run("1000"), _run("0010")]), "protocol": "p"}
    c = contrast(mixed, mixed, resamples=2000)
    assert c["difference"] == 0 and c["ci95"][0] < 0 < c["ci95"][1] and not c["excludes_zero"]
    assert contrast(here, {**_results([], []), "protocol": "empty"}) is None

    # write_results reads the other protocol's results.json beside its own directory
    short_dir, long_dir = tmp_path / "short", tmp_path / "long"
    write_results({**there, "contrast": None}, short_dir)
    long_results = {**here, "contrast": {"protocol": "short", "a": "steppo", "b": "ppo"}}
    write_results(long_results, long_dir)
    assert long_results["statistics"]["contrast"]["greedy"]["difference"] == 1.0
    text = (long_dir / "table.md").read_text()
    assert "here minus (steppo − ppo) on short" in text and "| greedy | +1.000 | +0.000 | **+1.000 [+1.000, +1.000]** |" in text
    assert "code: not recorded (4 runs)" in text
    write_results({**here, "contrast": {"protocol": "missing"}}, tmp_path / "x")
    assert "missing/results.json not found" in (tmp_path / "x" / "table.md").read_text()


@pytest.mark.parametrize("bad", [{"protocol": 3}, "compass", {"protocol": "compass", "a": "nope"}])
def test_protocol_rejects_a_malformed_contrast(tmp_path, bad):
    with pytest.raises(ConfigError, match="contrast must be"):
        load_protocol(_protocol(tmp_path, contrast=bad))


def test_added_seeds_run_only_their_presets_and_do_not_pick_the_best_baseline(tmp_path):
    proto = load_protocol(_protocol(tmp_path, presets=["steppo", "ppo", "grpo"], seeds=[0, 1],
                                    added_seeds={"presets": ["steppo", "ppo"], "seeds": [2]}))
    assert seeds_of(proto, "ppo") == [0, 1, 2] and seeds_of(proto, "grpo") == [0, 1]
    assert work(proto) == [("steppo", 0), ("ppo", 0), ("grpo", 0), ("steppo", 1), ("ppo", 1), ("grpo", 1),
                           ("steppo", 2), ("ppo", 2)]
    assert load_protocol(_protocol(tmp_path))["added_seeds"] == {"presets": [], "seeds": []}
    # on seeds 0-1 grpo is the best baseline (0.5 vs 0.4); ppo's added seed 2 (0.9) lifts its mean
    # over all its seeds above grpo's, but the best baseline is chosen on the protocol's seeds
    res = _results([_run("11"), _run("11"), _run("11")], [_run(success=0.4), _run(success=0.4), _run(success=0.9)])
    res["presets"].append("grpo")
    res["seeds"] = [0, 1]
    res["runs"]["grpo"] = {"0": _run(success=0.5), "1": _run(success=0.5)}
    stats = statistics_of(res)
    assert stats["best_baseline"] == "grpo"
    # the paired difference against ppo uses every seed both ran (3), against grpo the 2 common ones
    assert stats["paired"]["ppo"]["greedy"]["seeds"] == 3 and stats["paired"]["grpo"]["greedy"]["seeds"] == 2
    assert abs(stats["paired"]["ppo"]["greedy"]["difference"] - (0.6 + 0.6 + 0.1) / 3) < 1e-12
    # the summary compares like with like: every row on the protocol's seeds, then ppo's and steppo's
    # rows over all their seeds (not bold: not comparable with the others)
    res["zero_shot"] = {0: {"success": 0.3}, 1: {"success": 0.5}, 2: {"success": 0.7}}
    text = table(res)
    assert "mean ± std over the protocol's seeds" in text
    assert "| ppo | 0.400 ± 0.000 | - | 10 | 1 | 2 |" in text and "| grpo | 0.500 ± 0.000 | - | 10 | 1 | 2 |" in text
    assert "| steppo | **1.000 ± 0.000** |" in text
    assert "| starting policy (no RL) | 0.400 ± 0.141 | - | 0 | - | 2 |" in text
    assert "| starting policy, all 3 seeds | 0.500 ± 0.200 | - | 0 | - | 3 |" in text
    assert "| ppo, all 3 seeds (with the added ones) | 0.567 ± 0.289 | - | 10 | 1 | 3 |" in text
    assert "| steppo, all 3 seeds (with the added ones) | 1.000 ± 0.000 |" in text and "grpo, all" not in text
    assert stats["per_preset"]["ppo"]["greedy"] == (0.4, 0.0)
    # plot legends say which curves average over more seeds than the others
    assert [_legend(res, p) for p in res["presets"]] == ["steppo (3 seeds)", "ppo (3 seeds)", "grpo"]
    # without added seeds there is one row per preset, over all its seeds
    assert "all 2 seeds" not in table(_results([_run("11")] * 2, [_run("10")] * 2))


def test_per_seed_table_shows_every_seed_and_a_dash_where_a_preset_did_not_run():
    res = _results([_run(success=0.7), _run(success=0.38), _run(success=0.9)], [_run(success=0.6), _run(success=0.72)])
    res["zero_shot"] = {0: {"success": 0.61}, 1: {"success": 0.375}}  # int keys, as before JSON
    text = per_seed_table(res)
    assert "| preset | seed 0 | seed 1 | seed 2 |" in text
    assert "| starting policy (no RL) | 0.610 | 0.375 | - |" in text
    assert "| steppo | 0.700 | 0.380 | 0.900 |" in text and "| ppo | 0.600 | 0.720 | - |" in text


@pytest.mark.parametrize("bad", [{"presets": ["gspo"], "seeds": [5]}, {"presets": ["steppo"], "seeds": [0]},
                                 {"presets": ["steppo"], "seeds": ["5"]}, [5], {"presets": ["steppo"], "extra": 1}])
def test_protocol_rejects_malformed_added_seeds(tmp_path, bad):
    with pytest.raises(ConfigError, match="added_seeds must be"):
        load_protocol(_protocol(tmp_path, added_seeds=bad))


def test_a_rerun_appends_to_the_run_log(tmp_path):
    log = tmp_path / "log.txt"
    for _ in range(2):  # a failing attempt, then its retry: both stay in the log
        with pytest.raises(RuntimeError, match="see"):
            _steppo(["no-such-command"], log, threads=1)
    text = log.read_text()
    assert text.count("[compare] ") == 2 and text.count("invalid choice") == 2


def test_run_time_counts_updates_and_evaluations_by_hand():
    records = [
        {"iteration": 0, "eval/time_s": 3.0, "eval_sampled/generated_tokens": 100, "eval_sampled/generation_tokens_per_s": 50.0},
        {"iteration": 1, "time/iteration_s": 2.0},
        {"iteration": 2, "time/iteration_s": 4.0, "eval/time_s": 1.5},
    ]
    # 3 + 100/50 (a record from before eval/time_s: generated tokens / tokens per s) + 2 + 4 + 1.5
    assert run_time(records) == 12.5
    assert run_time([]) == 0.0


def _keep_fabricated(kept, preset, seed, outcomes):
    """Kept records of a finished run whose final greedy outcomes are `outcomes` (no training:
    `steppo compare` treats kept records as a finished run)."""
    d = kept / preset / f"seed{seed}"
    d.mkdir(parents=True)
    success = outcomes.count("1") / len(outcomes)
    (d / "metrics.jsonl").write_text(json.dumps({"iteration": 0, "env_steps": 0, "eval/success": 0.0}) + "\n"
                                     + json.dumps({"iteration": 1, "env_steps": 10, "eval/success": success}) + "\n")
    (d / "evals.jsonl").write_text(json.dumps({"iteration": 1, "mode": "greedy", "outcomes": outcomes}) + "\n")
    (d / "done.json").write_text(json.dumps({"wall_s": 1.0}))


@pytest.mark.parametrize("half_width, checks, met", [(0.035, 2, True), (0.01, 3, False)])
def test_precision_rule_adds_blocks_of_the_reference_and_best_baseline(tmp_path, half_width, checks, met):
    # 400 tasks; steppo succeeds on the first 300, grpo on the first 100 (d = +1 on 200 tasks, 0
    # on 200: sd of the mean 0.025 / sqrt(seeds), half-width ~0.049, 0.028, 0.022 at 1, 3, 5 seeds)
    out = tmp_path / "results"
    kept = out / "runs"
    for seed in range(5):
        _keep_fabricated(kept, "steppo", seed, "1" * 300 + "0" * 100)
        _keep_fabricated(kept, "grpo", seed, "1" * 100 + "0" * 300)
    _keep_fabricated(kept, "rloo", 0, "1" * 50 + "0" * 350)  # worse than grpo on seed 0
    path = _protocol(tmp_path, presets=["steppo", "grpo", "rloo"],
                     precision={"half_width": half_width, "block": 2, "max_seed": 4})
    results = run_protocol(path, out_dir=out, runs_dir=tmp_path / "runs", jobs=1, threads=1)
    rule = results["precision"]
    assert [c["seeds"] for c in rule["checks"]] == [1, 3, 5][:checks] and rule["met"] is met
    assert all(c["best_baseline"] == "grpo" for c in rule["checks"])
    assert [c["half_width"] > half_width for c in rule["checks"]] == [True] * (checks - 1) + [not met]
    assert results["added_seeds"] == {"presets": ["steppo", "grpo"], "seeds": [1, 2, 3, 4][:2 * (checks - 1)]}
    assert sorted(results["runs"]["steppo"]) == [str(s) for s in range(2 * checks - 1)] and list(results["runs"]["rloo"]) == ["0"]
    assert not (tmp_path / "runs").exists()  # nothing trained: every run was kept
    line = next(x for x in (out / "table.md").read_text().splitlines() if x.startswith("Precision rule"))
    assert ("; met." in line) is met and ("NOT met: the seed cap (4)" in line) is (not met) and "(grpo)" in line


@pytest.mark.parametrize("bad", [{"half_width": 0}, {"half_width": 0.05, "max_seed": 9, "preset": "ppo"},
                                 {"half_width": 0.05, "max_seed": 9, "blocks": 5}, [0.05]])
def test_protocol_rejects_a_malformed_precision_rule(tmp_path, bad):
    with pytest.raises(ConfigError, match="precision must be"):
        load_protocol(_protocol(tmp_path, precision=bad))


@pytest.mark.parametrize("record", [*(f"steppo/seed0/{name}" for name in RECORD_FILES),
                                    "zero_shot/seed0.json", "sft/seed0.json"])
def test_kept_records_are_not_ignored_by_git(record):
    """The kept runs are the evidence a later machine resumes from: git must commit them (a
    ``runs/`` ignore rule once swallowed them), while scratch run directories stay ignored."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(rel: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", rel], cwd=root).returncode == 0

    assert not ignored(f"results/compass/runs/{record}")
    assert ignored("runs/compare/compass/steppo/seed0/run.json")


def _evidence_commit(tmp_path: Path, runs: dict[str, str]) -> subprocess.CompletedProcess:
    """`scripts/evidence.sh commit` in a throwaway repository holding these kept run.json texts."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "scripts" / "evidence.sh", repo / "scripts")
    for rel, text in runs.items():
        (repo / "results" / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / "results" / rel).write_text(text)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git[:3], "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    return subprocess.run(["bash", str(repo / "scripts" / "evidence.sh"), "commit"], capture_output=True, text=True)


def _attempts(*commits: str) -> str:
    return json.dumps({"attempts": [{"commit": c} for c in commits]})


def test_evidence_runs_at_the_kept_runs_commit_and_refuses_a_mix(tmp_path):
    head = _evidence_commit(tmp_path / "a", {})
    assert head.returncode == 0 and len(head.stdout.strip()) == 40  # nothing kept: HEAD
    one = _evidence_commit(tmp_path / "b", {"p/runs/steppo/seed0/run.json": _attempts("c1", "c1"),
                                            "q/runs/ppo/seed3/run.json": _attempts("c1")})
    assert (one.returncode, one.stdout.strip()) == (0, "c1")
    mixed = _evidence_commit(tmp_path / "c", {"p/runs/steppo/seed0/run.json": _attempts("c1"),
                                              "p/runs/ppo/seed0/run.json": _attempts("c2")})
    assert mixed.returncode != 0 and "several commits" in mixed.stderr and not mixed.stdout.strip()
    torn = _evidence_commit(tmp_path / "d", {"p/runs/steppo/seed0/run.json": '{"attempts": [{"comm'})
    assert torn.returncode != 0 and "is torn" in torn.stderr and not torn.stdout.strip()


def test_evidence_tidies_the_kept_records_with_this_checkouts_code(tmp_path):
    """`scripts/evidence.sh tidy` (what start does before the driver runs): the starting rows of
    each protocol's seeds are written from the kept runs and a fingerprint no kept run depends on
    is dropped, with this checkout's steppo even where the evidence clone's own (an older commit)
    comes first on the path, as in the driver's working directory."""
    root = Path(__file__).resolve().parents[1]
    repo, work = tmp_path / "repo", tmp_path / "evidence"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(root / "scripts" / "evidence.sh", repo / "scripts")
    (repo / "steppo").symlink_to(root / "steppo")
    kept = repo / "results" / "compass" / "runs"
    _kept_run(kept, "grpo", 3, "0110")
    (kept / "sft").mkdir()
    for seed in (3, 4):
        (kept / "sft" / f"seed{seed}.json").write_text(json.dumps({"sha256": str(seed) * 64}))
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (work / "steppo").mkdir()  # the clone's older steppo, without tidy_kept
    (work / "steppo" / "__init__.py").write_text("")
    (work / "steppo" / "compare.py").write_text("raise ImportError('the clone is not this checkout')\n")
    done = subprocess.run(["bash", str(repo / "scripts" / "evidence.sh"), "tidy"], capture_output=True, text=True,
                          cwd=work, env={**os.environ, "EVIDENCE_DIR": str(work)})
    assert done.returncode == 0, done.stderr
    assert "compass: starting rows of seeds [3]" in done.stdout
    assert json.loads((kept / "zero_shot" / "seed3.json").read_text())["success"] == 0.5
    assert sorted(f.name for f in (kept / "sft").iterdir()) == ["seed3.json"]


def test_evidence_starts_a_seed_over_when_its_warm_start_cannot_be_rebuilt(tmp_path):
    """`scripts/evidence.sh restart-seed P K` (what its driver runs when a protocol stops twice on
    seed K's warm start): every kept record is committed first, then seed K's kept runs,
    fingerprint and starting row go in a commit that says why; other seeds and protocols stay."""
    repo = tmp_path / "a"
    runs = {f"compass/runs/{p}/seed{s}/run.json": _attempts("c1") for p in ("steppo", "ppo") for s in (2, 3)}
    runs.update({"compass/runs/sft/seed3.json": "{}", "compass/runs/sft/seed2.json": "{}",
                 "compass/runs/sft/seed5.json": "{}", "compass/runs/zero_shot/seed3.json": "{}",
                 "compass-long/runs/steppo/seed3/run.json": _attempts("c1")})
    _evidence_commit(tmp_path / "a", runs)  # (records not committed yet: restart-seed commits them first)
    git = ["git", "-C", str(repo / "repo")]
    script = repo / "repo" / "scripts" / "evidence.sh"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "EVIDENCE_DIR": str(tmp_path / "evidence")}
    done = subprocess.run(["bash", str(script), "restart-seed", "compass", "3"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "compass seed 3 starts over: 2 kept runs removed" in done.stdout
    left = sorted(str(f.relative_to(repo / "repo" / "results")) for f in (repo / "repo" / "results").rglob("*.json"))
    assert left == ["compass-long/runs/steppo/seed3/run.json", "compass/runs/ppo/seed2/run.json",
                    "compass/runs/sft/seed2.json", "compass/runs/sft/seed5.json", "compass/runs/steppo/seed2/run.json"]
    log = subprocess.run([*git, "log", "--format=%s"], capture_output=True, text=True).stdout.splitlines()
    assert log[0].startswith("evidence: compass seed 3 starts over (2 kept runs removed, in the history)")
    assert log[1] == "evidence: kept run records (before compass seed 3 starts over)"
    shown = subprocess.run([*git, "show", "HEAD~1:results/compass/runs/steppo/seed3/run.json"], capture_output=True, text=True)
    assert shown.returncode == 0 and json.loads(shown.stdout)["attempts"][0]["commit"] == "c1"
    assert not subprocess.run([*git, "status", "--porcelain", "results"], capture_output=True, text=True).stdout
    # a seed with a fingerprint and no kept run: nothing to remove but the fingerprint
    done = subprocess.run(["bash", str(script), "restart-seed", "compass", "5"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "0 kept runs removed" in done.stdout, done.stderr
    assert not (repo / "repo" / "results" / "compass" / "runs" / "sft" / "seed5.json").exists()
    bad = subprocess.run(["bash", str(script), "restart-seed", "compass", "x"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "no kept records" in bad.stderr


def test_evidence_driver_finds_the_seed_in_the_warm_start_error(tmp_path):
    """`scripts/evidence.sh mismatched-seed LOG BYTES` (how the driver reads which seed stopped a
    protocol) on the error `warm_starts` raises, and only in what the last attempt wrote."""
    proto = load_protocol(_protocol(tmp_path, seeds=[12]))
    policy = tmp_path / "runs" / "sft" / "seed12" / "sft_model"
    policy.mkdir(parents=True)
    (policy / "config.json").write_text("{}")  # built already: no SFT runs
    (policy / "model.safetensors").write_bytes(b"weights rebuilt on another CPU")
    kept = tmp_path / "kept"
    (kept / "sft").mkdir(parents=True)
    (kept / "sft" / "seed12.json").write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(RuntimeError) as raised:
        warm_starts(proto, tmp_path / "runs", kept, jobs=1, threads=1)
    log = tmp_path / "compass.log"
    log.write_text(f"Traceback (most recent call last):\n  ...\nRuntimeError: {raised.value}\n")
    before = log.stat().st_size
    script = Path(__file__).resolve().parents[1] / "scripts" / "evidence.sh"

    def seed(*args: str) -> str:
        return subprocess.run(["bash", str(script), "mismatched-seed", str(log), *args], capture_output=True,
                              text=True, check=True).stdout.strip()

    assert seed() == "12"
    with log.open("a") as f:  # the next attempt died without a word about a warm start
        f.write("[compare] steppo seed 12 done\nKilled\n")
    assert seed(str(before)) == "" and seed() == "12"


def test_evidence_driver_builds_a_mismatched_warm_start_again_then_starts_the_seed_over(tmp_path):
    """`scripts/evidence.sh drive` with a stand-in for `steppo compare` that stops on seed 3's warm
    start twice, then finishes: the first time the scratch warm start is removed (built again: a
    torn copy), the second time seed 3 starts over (kept runs removed, committed), the third
    attempt runs; the other protocols run once each."""
    repo = tmp_path / "a" / "repo"
    runs = {"compass/runs/steppo/seed3/run.json": _attempts("c1"), "compass/runs/steppo/seed2/run.json": _attempts("c1"),
            "compass/runs/sft/seed3.json": "{}"}
    _evidence_commit(tmp_path / "a", runs)
    (repo / "steppo").symlink_to(Path(__file__).resolve().parents[1] / "steppo")
    work = tmp_path / "evidence"
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / "runs" / "compare" / "compass" / "sft" / "seed3" / "sft_model").mkdir(parents=True)
    calls = work / "calls.txt"
    error = ("RuntimeError: the warm start of seed 3 (runs/compare/compass/sft/seed3/sft_model) is not the one this "
             "protocol's kept runs started from (weights sha256 aa, kept bb in x): its runs would not be paired.")
    stand_in = work / ".venv" / "bin" / "python"
    stand_in.write_text(f"""#!/usr/bin/env bash
if [ "$1" != "-m" ]; then exec {sys.executable} "$@"; fi
echo "$4" >> {calls}
n=$(grep -c compass.yaml {calls})
if [ "$4" = configs/compare/compass.yaml ] && [ "$n" -le 2 ]; then
  echo "[compare] attempt $n"; echo "Traceback (most recent call last):"; echo "{error}"; exit 1
fi
echo "[compare] $4 done"
""")
    stand_in.chmod(0o755)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "EVIDENCE_DIR": str(work)}
    done = subprocess.run(["bash", str(repo / "scripts" / "evidence.sh"), "drive"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert calls.read_text().split() == ["configs/compare/compass.yaml"] * 3 + [
        "configs/compare/smollm2-searchqa.yaml", "configs/compare/compass-long.yaml"]
    assert done.stdout.count("compass failed (1) on the warm start of seed 3") == 2
    assert "compass seed 3 starts over: 1 kept runs removed" in done.stdout
    assert not (work / "runs" / "compare" / "compass" / "sft" / "seed3").exists()
    kept = repo / "results" / "compass" / "runs"
    assert not (kept / "steppo" / "seed3").exists() and not (kept / "sft" / "seed3.json").exists()
    assert (kept / "steppo" / "seed2" / "run.json").exists()
    log = subprocess.run(["git", "-C", str(repo), "log", "--format=%s"], capture_output=True, text=True).stdout
    assert "evidence: compass seed 3 starts over (1 kept runs removed, in the history)" in log
    # each protocol that finished is marked (at its runs' commit, committed), and not compared again
    # (that would rewrite its report, regenerated at HEAD, with the old commit's report writer)
    for p in ("compass", "smollm2-searchqa", "compass-long"):
        assert (repo / "results" / p / "FINISHED").read_text().startswith("every run kept at c1, ")
    assert not subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "results"], capture_output=True,
                              text=True).stdout
    again = subprocess.run(["bash", str(repo / "scripts" / "evidence.sh"), "drive"], capture_output=True, text=True,
                           env=env, timeout=120)
    assert again.returncode == 0, again.stderr
    assert len(calls.read_text().split()) == 5



def _built_warm_start(policy: Path, weights: bytes) -> str:
    """A warm start as `warm_starts` leaves it (a model directory); its fingerprint."""
    policy.mkdir(parents=True)
    (policy / "config.json").write_text("{}")
    (policy / "model.safetensors").write_bytes(weights)
    return fingerprint(policy)


def _seeds_part_kept_part_under_way(tmp_path: Path) -> tuple[Path, Path]:
    """Kept records and an old machine's scratch runs: seed 0 finished; seed 1 part kept, part
    under way; seed 2 under way with nothing kept; seed 3 part kept, part under way, but its
    scratch warm start is not the one its kept run started from."""
    kept, scratch = tmp_path / "kept", tmp_path / "old"
    (kept / "sft").mkdir(parents=True)
    for seed in (0, 1, 2, 3):
        digest = _built_warm_start(scratch / "sft" / f"seed{seed}" / "sft_model", f"weights {seed}".encode())
        (kept / "sft" / f"seed{seed}.json").write_text(json.dumps({"sha256": digest}))
        if seed != 2:
            _kept_run(kept, "steppo", seed, "10")
    for seed in (1, 2, 3):
        (scratch / "ppo" / f"seed{seed}").mkdir(parents=True)  # started, not done
    (scratch / "steppo" / "seed0").mkdir(parents=True)
    (scratch / "steppo" / "seed0" / "done.json").write_text("{}")
    (scratch / "sft" / "seed3" / "sft_model" / "model.safetensors").write_bytes(b"rebuilt on another CPU")
    return kept, scratch


def test_warm_starts_of_seeds_under_way_are_stored_and_restored_on_a_new_machine(tmp_path):
    """A seed part kept, part under way when its machine goes: its warm start is stored (only
    that seed's, only a copy matching the kept fingerprint), restored on a new machine, and taken
    there by `warm_starts` as built (no behaviour cloning, no mismatch), so its kept runs stand."""
    kept, scratch = _seeds_part_kept_part_under_way(tmp_path)
    store = tmp_path / "store"
    (store / "seed7").mkdir(parents=True)  # a seed that started over since: no fingerprint record
    (store / "seed7" / "model.safetensors").write_bytes(b"old")
    assert keep_warm_starts(kept, scratch, store) == [1]
    assert sorted(d.name for d in store.iterdir()) == ["seed1"]
    assert keep_warm_starts(kept, scratch, store) == []  # stored already
    new = tmp_path / "new"
    assert restore_warm_starts(kept, store, new) == [1]
    want = json.loads((kept / "sft" / "seed1.json").read_text())["sha256"]
    assert fingerprint(new / "sft" / "seed1" / "sft_model") == want
    proto = load_protocol(_protocol(tmp_path, seeds=[1]))
    starts = warm_starts(proto, new, kept, jobs=1, threads=1, need=[1])
    assert starts[1] == str(new / "sft" / "seed1" / "sft_model")
    assert not (new / "sft" / "seed1" / "log.txt").exists()  # nothing was built
    assert restore_warm_starts(kept, store, new) == []  # never over a warm start that is there


def test_a_stored_warm_start_that_does_not_match_is_not_restored_and_is_dropped(tmp_path):
    kept, scratch = _seeds_part_kept_part_under_way(tmp_path)
    store = tmp_path / "store"
    keep_warm_starts(kept, scratch, store)
    (store / "seed1" / "model.safetensors").write_bytes(b"torn")
    new = tmp_path / "new"
    assert restore_warm_starts(kept, store, new) == [] and not (new / "sft" / "seed1").exists()
    assert keep_warm_starts(kept, scratch, store) == [1]  # the scratch copy is stored again
    assert fingerprint(store / "seed1") == json.loads((kept / "sft" / "seed1.json").read_text())["sha256"]
    (kept / "sft" / "seed1.json").unlink()  # the seed started over
    assert keep_warm_starts(kept, scratch, store) == [] and not (store / "seed1").exists()


def test_evidence_commits_the_warm_starts_of_seeds_under_way_and_restores_them(tmp_path):
    """`scripts/evidence.sh keep-warm-starts` commits results/<p>/warm_starts/ (with this
    checkout's steppo); `restore-warm-starts` (what start does on a new machine) puts them back."""
    repo = tmp_path / "a" / "repo"
    _evidence_commit(tmp_path / "a", {})
    (repo / "steppo").symlink_to(Path(__file__).resolve().parents[1] / "steppo")
    kept, scratch = _seeds_part_kept_part_under_way(tmp_path)
    shutil.copytree(kept, repo / "results" / "compass-long" / "runs")
    old, new = tmp_path / "old-machine", tmp_path / "new-machine"
    for machine in (old, new):
        (machine / ".venv" / "bin").mkdir(parents=True)
        (machine / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (old / "runs" / "compare").mkdir(parents=True)
    shutil.copytree(scratch, old / "runs" / "compare" / "compass-long")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    script = repo / "scripts" / "evidence.sh"
    done = subprocess.run(["bash", str(script), "keep-warm-starts"], capture_output=True, text=True,
                          env={**env, "EVIDENCE_DIR": str(old)})
    assert done.returncode == 0, done.stderr
    assert "compass-long: warm starts of seeds [1] stored" in done.stdout
    files = subprocess.run(["git", "-C", str(repo), "show", "--name-only", "--format=%s", "HEAD"],
                           capture_output=True, text=True).stdout.split()
    assert "results/compass-long/warm_starts/seed1/model.safetensors" in files
    done = subprocess.run(["bash", str(script), "restore-warm-starts"], capture_output=True, text=True,
                          env={**env, "EVIDENCE_DIR": str(new)})
    assert done.returncode == 0, done.stderr
    assert "compass-long: warm starts of seeds [1] restored" in done.stdout
    restored = new / "runs" / "compare" / "compass-long" / "sft" / "seed1" / "sft_model"
    assert fingerprint(restored) == fingerprint(old / "runs" / "compare" / "compass-long" / "sft" / "seed1" / "sft_model")

def test_gain_curve_is_success_minus_the_runs_start():
    from steppo.report import _relative

    curve = [{"env_steps": 0, "success": 0.25, "success_sampled": None},
             {"env_steps": 40, "success": 0.5, "success_sampled": 0.125},
             {"env_steps": 80, "success": None, "success_sampled": 0.5}]
    assert [p["success"] for p in _relative(curve, "success")] == [0.0, 0.25, None]
    assert [p["env_steps"] for p in _relative(curve, "success")] == [0, 40, 80]
    # no start to subtract: every point is unknown, not the raw value
    assert [p["success_sampled"] for p in _relative(curve, "success_sampled")] == [None, None, None]
    assert curve[1]["success"] == 0.5  # the input is not changed
