"""Config in one place: a light `steppo.config`, Literal choices checked at load, `steppo config`."""

import dataclasses
import subprocess
import sys

import pytest
import yaml

from steppo.cli import main
from steppo.config import Config, ConfigError, describe, load_config, yaml_value

HEAVY = ("torch", "transformers", "numpy")


def _imported(*args: str) -> set[str]:
    """Modules a fresh interpreter imports running ``python -X importtime ARGS``."""
    out = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.rpartition("|")[2].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [("-c", "import steppo.config"), ("-m", "steppo.cli", "--help"),
                                  ("-m", "steppo.cli", "config")], ids=["config", "help", "steppo-config"])
def test_the_config_and_the_cli_help_load_without_torch(args):
    modules = _imported(*args)
    assert "steppo.config" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, heavy[:10]


@pytest.mark.parametrize("override, allowed, close", [
    ("trainer.layout=pakced", "auto, per_step, prefix_shared, packed, tree", "packed"),
    ("rollout.env_workers=proces", "thread, process, ray", "process"),
    ("algo.estimator=stepgae", "step_gae, token_gae", "step_gae"),
    ("algo.whiten=tokn", "step, token, null", "token"),
    ("model.dtype=bf16", "float32, bfloat16, float16", "bfloat16"),
    ("run.trackers=[tensorboard,wandbb]", "tensorboard, wandb, mlflow", "wandb"),
])
def test_a_bad_choice_names_the_key_the_value_the_choices_and_the_closest(override, allowed, close):
    key, _, value = override.partition("=")
    bad = value.strip("[]").split(",")[-1]
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert message.startswith(f"{key}: ") and repr(bad) in message and allowed in message
    assert f"did you mean {close}?" in message


def test_choices_set_in_code_are_checked_too():
    from steppo.core.algorithms import preset

    cfg = Config()
    cfg.rollout.schedule = "round"
    with pytest.raises(ConfigError, match=r"rollout.schedule: unknown schedule 'round'.*did you mean rounds"):
        cfg.validate()
    with pytest.raises(ConfigError, match="algo.ratio_level: unknown ratio_level 'steps'"):
        preset("steppo", ratio_level="steps")


def test_every_default_is_written_once():
    from steppo.core import batch, choices, credit, losses
    from steppo.envs.base import EnvOptions, EnvSettings
    from steppo.rollout import engine, workers

    assert Config().trainer.row_tokens == batch.DEFAULT_ROW_TOKENS == choices.DEFAULT_ROW_TOKENS
    assert Config().rollout.ray_cpus_per_env is None  # fitted to the cluster (workers.fit_ray_cpus)
    assert workers.fit_ray_cpus(None, 4, 64.0) == choices.RAY_CPUS_PER_ENV
    assert engine.RolloutSettings is type(Config().rollout)
    assert issubclass(type(Config().env), EnvOptions) and issubclass(EnvSettings, EnvOptions)
    # the names stay importable where they were
    assert credit.ESTIMATORS is choices.ESTIMATORS and losses.AGGREGATIONS is choices.AGGREGATIONS
    assert batch.LAYOUTS is choices.LAYOUTS and engine.CONTEXTS is choices.CONTEXTS
    assert workers.WORKER_KINDS is choices.WORKER_KINDS
    import steppo.core

    for name in steppo.core.__all__:
        assert getattr(steppo.core, name) is not None


def test_sft_grad_clip_is_a_key():
    assert Config().sft.max_grad_norm == 1.0
    assert load_config(overrides=["sft.max_grad_norm=0.5"]).sft.max_grad_norm == 0.5
    with pytest.raises(ConfigError, match="sft.max_grad_norm must be >= 0"):
        load_config(overrides=["sft.max_grad_norm=-1"])


def test_steppo_config_lists_every_key_with_its_default_and_help(capsys):
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_key = {line.split()[0]: line for line in lines[1:]}
    config = Config()
    expected = [(s.name, f.name) for s in dataclasses.fields(config) for f in dataclasses.fields(getattr(config, s.name))]
    assert len(by_key) == len(expected) == len(describe())
    for section, name in expected:
        line = by_key[f"{section}.{name}"]
        default = yaml_value(getattr(getattr(config, section), name))
        assert line.split()[1:len(default.split()) + 1] == default.split(), line
    for key, _, text in describe():
        assert text, f"{key} has no help in its dataclass's Attributes section"
    assert "algo.kl_coef" in by_key and " 0.05 " in by_key["algo.kl_coef"]  # the default job's value
    assert "the preset it came from" in by_key["algo.name"]


def test_steppo_config_yaml_is_the_defaults_as_a_loadable_file(capsys, tmp_path):
    assert main(["config", "--yaml"]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == Config().to_dict()
    path = tmp_path / "defaults.yaml"
    path.write_text(text)
    assert load_config(path).to_dict() == load_config().to_dict()
