"""Run directories through the real entry point (`steppo.cli.main`): faithful and robust resume,
one run per directory, no code execution from checkpoint files, and config errors that name
the key or file (exit code 2) before any work starts. Issue 13, items 4-7 and 9."""

import json
import shutil

import pytest
import torch
import yaml

from steppo.cli import _parse, main
from steppo.trainer import checkpoint as ckpt

TINY = [
    "trainer.trajectories_per_iteration=4", "trainer.eval_episodes=1", "rollout.max_new_tokens=6",
    "rollout.num_envs=4", "rollout.schedule=rounds", "sft.enabled=false", "model.device=cpu",
    "run.progress=false", "trainer.micro_batch_tokens=2048", "critic.warmup_iterations=0",
    "trainer.eval_sampled=false", "trainer.eval_interval=0", "trainer.checkpoint_interval=1",
    "trainer.keep_checkpoints=3", "run.trackers=[]", "run.seed=3", "env.max_steps=4",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-iteration run with checkpoints iter_000001 and iter_000002 (copied per test)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *TINY, "trainer.iterations=2", f"run.output_dir={out}"]) == 0
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def _iterations(path):
    return [json.loads(line)["iteration"] for line in path.read_text().splitlines()]


def _saved(run):
    """The saved config, less run.output_dir (the copied run moved from the fixture's directory)."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["run"].pop("output_dir")
    return cfg


# ----------------------------------------------------------------------------- 4. faithful resume


def test_resume_uses_the_runs_saved_config_and_prints_what_changes(run, capsys, tmp_path):
    before = _saved(run)
    # exactly as the README shows: no other keys -> the run's own config, nothing changes
    assert main(["train", f"run.output_dir={run}", "--resume"]) == 0
    assert _saved(run) == before and before["run"]["seed"] == 3 and before["trainer"]["trajectories_per_iteration"] == 4
    changes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("resume:")]
    assert len(changes) == 1 and changes[0].startswith("resume: run.output_dir:")  # the copy moved; nothing else
    assert main(["train", f"run.output_dir={run}", "--resume"]) == 0
    assert "resume:" not in capsys.readouterr().err  # and once saved there, nothing at all
    # an allowed explicit change is applied and printed; --config keys count as explicit too
    f = tmp_path / "more.yaml"
    f.write_text("trainer:\n  eval_episodes: 3\n")
    assert main(["train", f"run.output_dir={run}", "--resume", "--config", str(f), "trainer.iterations=2"]) == 0
    err = capsys.readouterr().err
    assert "resume: trainer.eval_episodes: 1 -> 3" in err and "resume: trainer.iterations" not in err
    assert _saved(run)["trainer"]["eval_episodes"] == 3 and _saved(run)["run"]["seed"] == 3


@pytest.mark.parametrize("override", ["run.seed=4", "model.tiny_vocab=512", "env=twx", "algo=grpo",
                                      "model.lora_rank=4"])
def test_resume_refuses_run_defining_changes_unless_forced(run, capsys, override):
    before = _saved(run)
    assert main(["train", f"run.output_dir={run}", "--resume", override]) == 2
    err = capsys.readouterr().err
    assert "would change" in err and override.split("=")[0] in err and "--force" in err
    assert _saved(run) == before


def test_forced_seed_change_on_resume_is_applied_and_flagged(run, capsys):
    assert main(["train", f"run.output_dir={run}", "--resume", "--force", "run.seed=4"]) == 0
    assert "resume: run.seed: 3 -> 4 (forced)" in capsys.readouterr().err
    assert _saved(run)["run"]["seed"] == 4


def test_resume_of_a_directory_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["train", f"run.output_dir={tmp_path / 'nothing'}", "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 5. robust resume


def test_resume_falls_back_from_a_truncated_checkpoint_and_repairs_the_logs(run, capsys):
    weights = run / "checkpoints" / "iter_000002" / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # killed / disk full mid-write
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 3, "train/rew')  # torn last line
    (run / "checkpoints" / ".tmp-abc123").mkdir()  # an interrupted save
    assert main(["train", f"run.output_dir={run}", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "iter_000002 is unusable" in err and "truncated" in err
    assert "falling back to the newest intact checkpoint" in err and "iter_000001" in err
    assert "torn line" in err
    assert _iterations(run / "metrics.jsonl") == [0, 1, 2]  # iteration 2 replayed once, nothing repeats
    assert {r["iteration"] for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())} == {1, 2}
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert ckpt.verify(run / "checkpoints" / "iter_000002") is None  # rewritten intact
    assert (run / "checkpoints" / "latest").read_text() == "iter_000002"


def test_resume_without_an_intact_checkpoint_starts_again_without_repeating_iterations(run, capsys):
    for p in (run / "checkpoints").glob("iter_*"):
        (p / "trainer_state.pt").unlink()  # checkpoints without their state file
    assert main(["train", f"run.output_dir={run}", "--resume", "trainer.iterations=1"]) == 0
    err = capsys.readouterr().err
    assert "starting this run again from iteration 0" in err
    assert _iterations(run / "metrics.jsonl") == [0, 1]
    assert sorted(p.name for p in (run / "checkpoints").glob("iter_*")) == ["iter_000001"]
    assert ckpt.verify(run / "checkpoints" / "iter_000001") is None


# ----------------------------------------------------------------------------- 6. one run per directory


def test_a_new_run_into_a_run_directory_is_refused_unless_overwrite(run, capsys):
    before = (run / "metrics.jsonl").read_text()
    assert main(["train", *TINY, "trainer.iterations=1", f"run.output_dir={run}"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert (run / "metrics.jsonl").read_text() == before
    (run / "notes.txt").write_text("mine")  # not a run file: kept by --overwrite
    assert main(["train", *TINY, "trainer.iterations=0", f"run.output_dir={run}", "--overwrite"]) == 0
    assert "deleting the previous run" in capsys.readouterr().err
    assert _iterations(run / "metrics.jsonl") == [0] and (run / "notes.txt").exists()
    assert not (run / "checkpoints").exists()  # the old run's checkpoints are gone, none mixed in


def test_pruning_keeps_other_runs_checkpoints_and_orders_by_recorded_iteration(tmp_path):
    root = tmp_path / "checkpoints"

    def fake(name, iteration, run_id):
        (root / name).mkdir(parents=True)
        (root / name / ckpt.MANIFEST).write_text(json.dumps({"iteration": iteration, "run_id": run_id, "files": {}}))

    fake("iter_000060", 60, "other")
    fake("iter_000001", 1, "me")
    fake("iter_000002", 2, "me")
    ckpt.prune(root, 1, "me", root / "iter_000002")
    assert sorted(p.name for p in root.iterdir()) == ["iter_000002", "iter_000060"]


# ----------------------------------------------------------------------------- 7. no code from files


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (str(self.marker), "w"))


def test_a_malicious_trainer_state_is_refused_without_running_it(run, tmp_path, capsys):
    marker = tmp_path / "pwned"
    target = run / "checkpoints" / "iter_000002"
    torch.save({"iteration": 2, "x": _Payload(marker)}, target / "trainer_state.pt")
    manifest = json.loads((target / ckpt.MANIFEST).read_text())  # a forged manifest that matches
    manifest["files"]["trainer_state.pt"] = {"size": (target / "trainer_state.pt").stat().st_size,
                                             "sha256": ckpt._sha256(target / "trainer_state.pt")}
    (target / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load_trainer_state(target)
    assert main(["train", f"run.output_dir={run}", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "iter_000002 is unusable" in err and "refused" in err and "iter_000001" in err
    assert not marker.exists()
    assert _iterations(run / "metrics.jsonl") == [0, 1, 2]


# ----------------------------------------------------------------------------- 9. validation


@pytest.mark.parametrize("overrides, message", [
    (["env.max_steps=0"], "env.max_steps must be >= 1"),
    (["trainer.max_grad_norm=-1"], "trainer.max_grad_norm must be >= 0"),
    (["rollout.window=-1"], "rollout.window must be >= 0"),
    (["sft.batch_trajectories=0"], "sft.batch_trajectories must be >= 1"),
    (["env=nowhere"], "unknown environment env.name='nowhere'"),
    (["model.name=./no/such/model"], "model.name='./no/such/model' is neither a built-in model"),
    (["model.name=not a model"], "is neither a built-in model"),
])
def test_bad_values_name_the_key_before_any_work(tmp_path, capsys, overrides, message):
    out = tmp_path / "r"
    assert main(["train", *overrides, f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_hub_model_offline_names_model_name(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["train", "model.name=nobody-steppo/no-such-model", f"run.output_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err
    assert "model.name='nobody-steppo/no-such-model'" in err and "HF_HUB_OFFLINE" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_names_model_device(tmp_path, capsys):
    assert main(["train", "model.device=cuda", f"run.output_dir={tmp_path / 'r'}"]) == 2
    assert "model.device=cuda but CUDA is not available" in capsys.readouterr().err


def test_missing_and_malformed_config_files_name_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    assert f"config file {missing} does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  iterations: 3\n   epochs: [1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid YAML" in err and "line" in err and "<unicode string>" not in err


def test_overrides_on_both_sides_of_config_apply_after_the_file(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("trainer:\n  iterations: 7\n")
    args = _parse(["train", "algo=grpo", "--config", str(f), "trainer.iterations=3"])
    assert args.overrides == ["algo=grpo", "trainer.iterations=3"] and args.config == str(f)
    # both sides really apply: grpo's group size 8 from before, the batch size from after
    assert main(["train", "algo=grpo", "--config", str(f), "trainer.trajectories_per_iteration=12"]) == 2
    assert "multiple of algo.group_size (8)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["train", "--config", str(f), "--bogus"])


def test_a_context_limit_below_the_first_prompt_is_refused_at_start(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY, "trainer.iterations=1", "rollout.context_limit=20",
                 f"run.output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "rollout.context_limit=20 is too small: the first prompt of training task" in err
    assert "set rollout.context_limit >=" in err
    assert not out.exists()  # nothing left behind: the fixed command runs in the same directory


def test_each_validation_records_every_held_out_tasks_outcome(tmp_path):
    """evals.jsonl: one line per validation (before, interval, after) and mode, one outcome per
    held-out task in order, agreeing with the success rate in metrics.jsonl."""
    out = tmp_path / "run"
    args = [*TINY, "trainer.iterations=2", "trainer.eval_episodes=5", "trainer.eval_sampled=true",
            "trainer.eval_interval=1"]
    assert main(["train", *args, f"run.output_dir={out}"]) == 0
    lines = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert [(r["iteration"], r["mode"]) for r in lines] == [
        (i, m) for i in (0, 1, 2) for m in ("greedy", "sampled")]
    metrics = {r["iteration"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    for r in lines:
        assert len(r["outcomes"]) == 5 and set(r["outcomes"]) <= {"0", "1"}
        assert r["first_task"] == "compass/dev/1000000"
        key = "eval/success" if r["mode"] == "greedy" else "eval_sampled/success"
        assert metrics[r["iteration"]][key] == pytest.approx(r["outcomes"].count("1") / 5)
