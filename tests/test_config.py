import pytest

from steppo.cli import main
from steppo.config import ConfigError, load_config


def test_defaults_validate_and_overrides_apply():
    cfg = load_config(overrides=["algo=grpo", "algo.gamma=0.9", "trainer.iterations=5", "env=compass",
                                 "env.params={max_distance: 3}", "sft.lr=2e-3", "run.trackers=[]"])
    assert cfg.algo.name == "grpo" and cfg.algo.group_size == 8 and cfg.algo.gamma == 0.9
    assert cfg.trainer.iterations == 5 and cfg.env.params == {"max_distance": 3} and cfg.sft.lr == 2e-3
    assert cfg.layout == "prefix_shared"


def test_yaml_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algo:\n  name: ppo\n  lam: 0.95\ntrainer:\n  iterations: 7\n")
    cfg = load_config(f, ["trainer.iterations=9"])
    assert cfg.algo.name == "ppo" and cfg.algo.lam == 0.95 and cfg.trainer.iterations == 9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.iteratons=3"], "did you mean trainer.iterations"),
        (["trainr.iterations=3"], "did you mean trainer"),
        (["trainer.iterations=many"], "expects an integer"),
        (["rollout.temperature=hot"], "expects a number"),
        (["algo=grpo", "algo.estimator=step_gae"], "reads critic values but critic is off"),
        (["algo=dqn"], "unknown algorithm"),
        (["algo=grpo", "trainer.trajectories_per_iteration=12"], "multiple of algo.group_size"),
        (["rollout.context=summary"], "rollout.context"),
        (["rollout.max_new_tokens=64", "rollout.context_limit=32"], "must exceed"),
        (["run.trackers=[neptune]"], "unknown trackers"),
        (["trainer.iterations"], "not key=value"),
        (["trainer=3"], "must be a mapping"),
    ],
)
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["train", "trainer.iteratons=3"]) == 2
    assert "did you mean trainer.iterations" in capsys.readouterr().err


def test_every_shipped_config_and_protocol_loads(tmp_path):
    from pathlib import Path

    from steppo.compare import _write_config, load_protocol, run_config

    root = Path(__file__).resolve().parents[1] / "configs"
    configs = [p for p in root.rglob("*.yaml") if "compare" not in p.parts]
    assert len(configs) >= 3
    for path in configs:
        load_config(path)
    for path in (root / "compare").glob("*.yaml"):
        proto = load_protocol(path)
        for name in proto["presets"]:
            _write_config(run_config(proto, name, 0, tmp_path, None), tmp_path / f"{name}.yaml")  # validates


def test_react_prompting_gets_a_response_budget_for_the_thought():
    from steppo.envs.registry import REACT_MIN_NEW_TOKENS, env_factory

    plain = env_factory(load_config(overrides=["env=compass"]).env).settings
    react = env_factory(load_config(overrides=["env=compass", "env.react=true"]).env).settings
    assert plain.max_new_tokens == 8 and react.max_new_tokens == REACT_MIN_NEW_TOKENS


def test_algorithm_name_resolves_first_so_yaml_algo_keys_survive_a_cli_preset():
    # A preset named on the command line must not drop the YAML's algo keys (it dropped
    # kl_coef 0.05 -> 0.0 before): the name is resolved first, then every algo.* key applies.
    from pathlib import Path

    compass = Path(__file__).resolve().parents[1] / "configs" / "compass.yaml"
    cfg = load_config(compass, ["algo=grpo"])
    assert cfg.algo.name == "grpo" and cfg.algo.estimator == "grpo" and cfg.algo.group_size == 8
    assert cfg.algo.kl_coef == 0.05


def test_algo_keys_apply_in_order_yaml_then_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("algo:\n  kl_coef: 0.2\n  lam: 0.9\n")
    cfg = load_config(f, ["algo.lam=0.5", "algo=ppo"])  # the name may come after the keys
    assert (cfg.algo.name, cfg.algo.estimator, cfg.algo.kl_coef, cfg.algo.lam) == ("ppo", "token_gae", 0.2, 0.5)
    # a YAML name is overridden by a command-line name; the YAML's other algo keys still apply
    f.write_text("algo:\n  name: rloo\n  gamma: 0.95\n")
    cfg = load_config(f, ["algo=grpo"])
    assert (cfg.algo.name, cfg.algo.gamma) == ("grpo", 0.95)
    with pytest.raises(ConfigError, match="unknown algorithm 'dqn'"):
        load_config(f, ["algo=dqn"])


def test_naming_the_default_algorithm_is_the_default_job():
    import dataclasses

    from steppo.config import Config

    default = load_config()
    assert load_config(overrides=["algo=steppo"]).to_dict() == default.to_dict()
    assert dataclasses.asdict(Config().algo) == dataclasses.asdict(default.algo)
    assert default.algo.kl_coef == 0.05
    # and every other preset starts from the same default-job keys
    assert load_config(overrides=["algo=grpo"]).algo.kl_coef == 0.05
    assert load_config(overrides=["algo=grpo", "algo.kl_coef=0"]).algo.kl_coef == 0.0
