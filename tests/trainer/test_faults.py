"""Faults injected through the real entry points (``steppo train`` / `Trainer`): non-finite
rewards and losses, environments that fail episodes, environments that fail while the
tokenizer corpus is built (issue 13, items 1-3)."""

from __future__ import annotations

import itertools
import json
import math
import threading

import torch

from steppo.cli import main
from steppo.envs.compass import CompassEnv
from steppo.envs.registry import ENVIRONMENTS
from steppo.trainer import checkpoint as ckpt

FAST = [
    "trainer.trajectories_per_iteration=8", "trainer.eval_episodes=4", "rollout.max_new_tokens=6",
    "rollout.num_envs=4", "rollout.schedule=rounds", "sft.enabled=false", "model.device=cpu",
    "run.progress=false", "trainer.micro_batch_tokens=2048", "critic.warmup_iterations=0",
    "env.max_steps=3", "run.trackers=[]", "trainer.eval_sampled=false", "trainer.lr_warmup_steps=1",
]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _register(monkeypatch, name: str, cls: type) -> None:
    monkeypatch.setitem(ENVIRONMENTS, name, f"{__name__}:{cls.__name__}")


class NaNRewardEnv(CompassEnv):
    """NaN reward for inadmissible moves in tasks with an even seed (an untrained policy makes
    many; the expert actions of the tokenizer corpus never do)."""

    name = "nan-compass"

    def _act(self, action):
        result = super()._act(action)
        if result.info.get("invalid_action") and self.task.seed % 2 == 0:
            return result._replace(reward=float("nan"))
        return result


class FlakyEnv(CompassEnv):
    """Raises on every third step of training episodes, and on the first step of every
    held-out episode (an evaluation that is mostly environment failures)."""

    name = "flaky-compass"
    calls = itertools.count()
    lock = threading.Lock()

    def step(self, response):
        if self.task.split != "train":
            raise RuntimeError("simulator crashed (held-out)")
        with FlakyEnv.lock:
            n = next(FlakyEnv.calls)
        if n % 3 == 2:
            raise RuntimeError("simulator crashed")
        return super().step(response)


class CorpusFailEnv(CompassEnv):
    name = "corpus-fail"

    def _act(self, action):
        if self.task.seed % 7 == 3:
            raise KeyError("missing room")
        return super()._act(action)


def _weights_finite(path) -> bool:
    from safetensors.torch import load_file

    files = list(path.rglob("*.safetensors")) + list(path.rglob("*.bin")) + list(path.rglob("*.pt"))
    tensors = []
    for f in files:
        if f.suffix == ".safetensors":
            tensors += list(load_file(str(f)).values())
        else:
            obj = torch.load(f, map_location="cpu", weights_only=False)
            tensors += [v for v in (obj.values() if isinstance(obj, dict) else []) if torch.is_tensor(v)]
    assert tensors, f"no weights found under {path}"
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def test_nan_rewards_fail_their_episodes_and_no_weight_becomes_nan(tmp_path, monkeypatch, tiny_dir):
    _register(monkeypatch, "nan-compass", NaNRewardEnv)
    out = tmp_path / "run"
    assert main(["train", *FAST, "env.name=nan-compass", "algo=steppo", "trainer.iterations=1",
                 f"model.name={tiny_dir}", f"run.output_dir={out}"]) == 0
    last = _metrics(out)[-1]
    assert last["rollout/env_failures"] > 0  # the NaN steps ended their episodes
    assert math.isfinite(last["train/reward_mean"]) and last["update/skipped_nonfinite"] == 0
    for line in (out / "samples.jsonl").read_text().splitlines():
        assert all(math.isfinite(s["reward"]) for s in json.loads(line)["steps"])
    assert _weights_finite(ckpt.latest_checkpoint(out / "checkpoints"))


def _nan_loss(monkeypatch, calls: int | None):
    """The policy loss of the first `calls` micro-batches (all if None) is NaN, with NaN grads."""
    import steppo.trainer.update as update

    orig, seen = update.policy_loss, itertools.count()

    def poisoned(*args, **kw):
        pg, stats = orig(*args, **kw)
        if calls is None or next(seen) < calls:
            pg = pg * float("nan")
        return pg, stats

    monkeypatch.setattr(update, "policy_loss", poisoned)


def test_a_non_finite_loss_skips_the_step_and_is_logged_as_nan(tmp_path, monkeypatch, tiny_dir):
    _nan_loss(monkeypatch, calls=1)
    out = tmp_path / "run"
    assert main(["train", *FAST, "algo=steppo", "trainer.iterations=1", f"model.name={tiny_dir}",
                 f"run.output_dir={out}"]) == 0
    text = (out / "metrics.jsonl").read_text()
    last = _metrics(out)[-1]
    assert last["update/skipped_nonfinite"] == 1 and last["update/optimiser_steps"] >= 1
    assert "NaN" in text and "null" not in text.split("\n")[1]  # NaN, not null
    assert math.isnan(last["policy/grad_norm"])  # the skipped step's norm averages in as NaN
    assert _weights_finite(ckpt.latest_checkpoint(out / "checkpoints"))


def test_non_finite_updates_in_a_row_stop_the_run_before_saving(tmp_path, monkeypatch, tiny_dir, capsys):
    _nan_loss(monkeypatch, calls=None)
    out = tmp_path / "run"
    rc = main(["train", *FAST, "algo=steppo", "trainer.iterations=3", "trainer.checkpoint_interval=1",
               "trainer.max_nonfinite_updates=2", f"model.name={tiny_dir}", f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "training stopped: iteration 1: 2 optimiser steps in a row had a non-finite policy loss" in err
    assert ckpt.latest_checkpoint(out / "checkpoints") is None  # nothing saved with bad weights


def test_failed_episodes_are_not_trained_on_and_a_failed_evaluation_is_not_a_score(tmp_path, monkeypatch,
                                                                                    tiny_dir, capsys):
    _register(monkeypatch, "flaky-compass", FlakyEnv)
    out = tmp_path / "run"
    assert main(["train", *FAST, "env.name=flaky-compass", "algo=grpo", "env.invalid_action_penalty=-0.5",
                 "trainer.iterations=1", f"model.name={tiny_dir}", f"run.output_dir={out}"]) == 0
    captured = capsys.readouterr()
    records = _metrics(out)
    before, last = records[0], records[-1]
    assert before["eval/valid"] is False and math.isnan(before["eval/success"])
    assert before["eval/env_failures"] == before["eval/episodes"] == 4
    assert "n/a (4 of 4 episodes failed in the environment)" in captured.err  # summary table + warning
    assert "warning: evaluation before (greedy) is not valid" in captured.err
    assert last["rollout/env_failures"] > 0 and last["rollout/groups_dropped"] > 0
    assert last["rollout/episodes_dropped"] >= last["rollout/groups_dropped"] * 2  # whole groups
    for line in (out / "samples.jsonl").read_text().splitlines() if (out / "samples.jsonl").exists() else []:
        assert json.loads(line)["end_reason"] not in ("env_error", "env_timeout")


def test_an_environment_failing_in_the_tokenizer_corpus_is_a_clear_error(tmp_path, monkeypatch, capsys):
    _register(monkeypatch, "corpus-fail", CorpusFailEnv)
    out = tmp_path / "run"
    rc = main(["train", *FAST, "env.name=corpus-fail", "trainer.iterations=1", f"run.output_dir={out}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "environment 'corpus-fail' failed on training task" in err and "tokenizer corpus" in err
    assert "KeyError: 'missing room'" in err
    assert not (out / "run.json").exists()  # a refused start leaves nothing behind
