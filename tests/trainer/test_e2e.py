"""End to end with the tiny model: a few iterations, metrics, checkpoints, resume."""

import json

import pytest
import torch

from steppo.cli import main
from steppo.config import load_config
from steppo.trainer import checkpoint as ckpt
from steppo.trainer import rundir
from steppo.trainer.trainer import Trainer

REQUIRED = [
    "iteration", "env_steps", "train/reward_mean", "train/success", "critic/loss", "critic/explained_var",
    "policy/loss", "policy/clip_frac", "policy/approx_kl", "policy/entropy", "rollout/logprob_parity_max_abs",
    "rollout/truncated_frac", "rollout/invalid_action_frac", "time/rollout_s", "time/update_s",
    "throughput/tokens_per_s",
]
SMALL = [
    "trainer.trajectories_per_iteration=8", "trainer.eval_episodes=6", "rollout.max_new_tokens=6",
    "rollout.num_envs=4", "rollout.schedule=rounds", "sft.enabled=false", "model.device=cpu",
    "run.progress=false", "trainer.micro_batch_tokens=2048", "critic.warmup_iterations=0",
]


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_two_iterations_write_metrics_checkpoint_and_samples(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *SMALL, "algo=steppo", "trainer.iterations=2", f"run.output_dir={out}"]) == 0
    records = _metrics(out)
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert "eval/success" in records[0] and "eval/success" in records[-1]
    for r in records[1:]:
        missing = [k for k in REQUIRED if k not in r]
        assert not missing, missing
        assert all(r[k] is None or r[k] != r[k] or abs(r[k]) < 1e6 for k in REQUIRED)  # NaN is logged as NaN
        assert r["rollout/logprob_parity_max_abs"] < 1e-4
    assert (out / "config.yaml").exists() and list((out / "tensorboard").glob("events.*"))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt_ids", "response_ids", "reward", "value", "advantage"} <= set(samples[0]["steps"][0])
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "iter_000002"


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_baseline_presets_run(tmp_path, algo):
    out = tmp_path / algo
    assert main(["train", *SMALL, f"algo={algo}", "trainer.iterations=2", f"run.output_dir={out}"]) == 0
    last = _metrics(out)[-1]
    assert last["iteration"] == 2 and "policy/loss" in last
    assert ("critic/loss" in last) == (algo == "ppo")


@pytest.mark.parametrize("lora", [0, 4])
def test_checkpoint_round_trip_restores_weights_and_optimisers(tmp_path, lora):
    cfg = load_config(overrides=[*SMALL, "trainer.iterations=1", f"run.output_dir={tmp_path}", "run.trackers=[]",
                                 f"model.lora_rank={lora}", "trainer.policy_lr=1e-2", "trainer.critic_lr=1e-2"])
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train()
    trainer.close()
    restored = Trainer(cfg, resume=True, log=lambda *_: None)
    for a, b in zip(trainer.models.policy.parameters(), restored.models.policy.parameters()):
        assert torch.equal(a, b)
    critic_state = dict(trainer.models.critic.named_parameters())
    for name, b in restored.models.critic.named_parameters():
        assert torch.equal(critic_state[name], b), name
    if lora:  # the critic's file holds its adapters and head, not a second copy of the frozen decoder
        from safetensors import safe_open

        path = ckpt.latest_checkpoint(tmp_path / "checkpoints") / "critic.safetensors"
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        trainable = {n for n, p in trainer.models.critic.named_parameters() if p.requires_grad}
        assert keys == trainable and any("lora_" in k for k in keys)
    sa, sb = trainer.policy_opt.opt.state_dict(), restored.policy_opt.opt.state_dict()
    for k in sa["state"]:
        assert torch.equal(sa["state"][k]["exp_avg"], sb["state"][k]["exp_avg"])
    assert sa["state"] and restored.policy_opt.sched.last_epoch == trainer.policy_opt.sched.last_epoch
    assert restored.iteration == 1 and restored.policy_version == trainer.policy_version
    restored.close()


def test_resume_continues_with_identical_results(tmp_path):
    base = [*SMALL, "trainer.checkpoint_interval=1", "trainer.eval_interval=0", "run.trackers=[]"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", *base, "trainer.iterations=3", f"run.output_dir={straight}"]) == 0
    assert main(["train", *base, "trainer.iterations=2", f"run.output_dir={split}"]) == 0
    assert main(["train", *base, "trainer.iterations=3", f"run.output_dir={split}", "--resume"]) == 0
    a, b = _metrics(straight), _metrics(split)
    assert [r["iteration"] for r in b] == [0, 1, 2, 3]
    # run.json keeps the run's id and records each attempt and the code it ran
    info = json.loads((split / "run.json").read_text())
    assert info["run_id"] and [x["from_iteration"] for x in info["attempts"]] == [0, 2]
    assert {x["commit"] for x in info["attempts"]} == {rundir.code_version()["commit"]}
    for ra, rb in zip(a, b):
        for k in ra:
            if not k.startswith(("time/", "throughput/")) and not k.endswith(("tokens_per_s", "/time_s")):
                same = ra[k] == rb[k] or (isinstance(ra[k], float) and ra[k] != ra[k] and rb[k] != rb[k])  # NaN
                assert same, (ra["iteration"], k)
    wa = ckpt.latest_checkpoint(straight / "checkpoints") / "policy" / "model.safetensors"
    wb = ckpt.latest_checkpoint(split / "checkpoints") / "policy" / "model.safetensors"
    assert wa.read_bytes() == wb.read_bytes()


def test_async_training_overlaps_one_iteration_and_corrects_staleness(tmp_path):
    out = tmp_path / "async"
    assert main(["train", *SMALL, "trainer.iterations=3", "trainer.async_rollout=true", "algo.entropy_coef=0.05",
                 "trainer.lr_warmup_steps=0", "trainer.policy_lr=1e-2", f"run.output_dir={out}"]) == 0
    records = _metrics(out)[1:]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    # iteration 1 was played by version 0 and trained on at once; later ones lag one update behind
    assert records[0]["async/staleness_max"] == 0 and records[0]["async/is_weight_mean"] == 1.0
    for r in records[1:]:
        assert r["async/staleness_mean"] == 1.0 and r["async/staleness_max"] == 1.0
        assert r["async/behaviour_logprob_drift_max_abs"] > 0  # the weights did move between versions
        assert 0 < r["async/is_weight_mean"] and r["async/is_weight_truncated_frac"] <= 1
        assert r["time/rollout_wait_s"] <= r["time/rollout_s"] + 1e-3
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[-1]["iteration"] == 3


def test_lora_warm_start_saves_a_plain_model_and_keeps_it_as_the_kl_reference(tmp_path):
    from transformers import AutoModelForCausalLM

    from steppo.core.batch import build_layout

    cfg = load_config(overrides=[*SMALL, "sft.enabled=true", "sft.demos=16", "sft.epochs=1", "sft.lr=1e-2",
                                 "model.lora_rank=4", "algo.kl_coef=0.1", f"run.output_dir={tmp_path}",
                                 "run.trackers=[]"])
    trainer = Trainer(cfg, log=lambda *_: None)
    try:
        trainer.warm_start()
        models = trainer.models
        saved = AutoModelForCausalLM.from_pretrained(trainer.sft_dir).eval()
        assert not any("lora" in k for k in saved.state_dict())
        ids = torch.tensor([list(range(3, 40))])
        with torch.no_grad():
            want = models.policy.model(input_ids=ids).logits
            torch.testing.assert_close(saved(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
            with models.policy.reference():  # adapters off: the model before SFT, not the reference
                assert (models.policy.model(input_ids=ids).logits - want).abs().max() > 1e-3
        assert models.reference is not None  # the KL reference is the warm-started policy
        tasks, groups = trainer.sample_tasks(1)
        demos = trainer.rollout(tasks[:2], groups[:2], 1).trajectories
        lay = build_layout(demos, "per_step", trainer.pad_id)
        with torch.no_grad():
            torch.testing.assert_close(models.reference(lay)[0], models.policy(lay)[0], rtol=1e-4, atol=1e-4)
    finally:
        trainer.close()
