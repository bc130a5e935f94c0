import pytest

from steppo.core.algorithms import PRESETS, ConfigError, preset

PAPER_PRESETS = [
    "steppo", "ppo", "reinforce_pp", "grpo", "rloo", "gspo", "gigpo", "lightningrl",
    "steppo_no_step_gae", "steppo_no_step_is",
]


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_every_paper_preset_exists_and_validates(name):
    assert PRESETS[name].validate().name == name


def test_presets_encode_the_paper_taxonomy():
    assert (PRESETS["steppo"].estimator, PRESETS["steppo"].ratio_level, PRESETS["steppo"].critic_level) == ("step_gae", "step", "step")
    assert (PRESETS["ppo"].estimator, PRESETS["ppo"].ratio_level, PRESETS["ppo"].critic_level) == ("token_gae", "token", "token")
    assert PRESETS["steppo_no_step_gae"].ratio_level == "step" and PRESETS["steppo_no_step_gae"].estimator == "token_gae"
    assert PRESETS["steppo_no_step_is"].ratio_level == "token" and PRESETS["steppo_no_step_is"].estimator == "step_gae"
    assert PRESETS["gspo"].ratio_level == "trajectory" and PRESETS["gspo"].clip_high < 1e-3
    for name in ("grpo", "rloo", "gspo", "gigpo"):
        assert PRESETS[name].group_size == 8 and PRESETS[name].critic_level is None
    # Token-ratio presets never inherit a sequence-ratio clip range.
    for cfg in PRESETS.values():
        if cfg.ratio_level in ("token", "step"):
            assert cfg.clip_low >= 0.1


def test_impossible_combinations_are_clear_errors():
    with pytest.raises(ConfigError, match="reads critic values but critic is off"):
        preset("grpo", estimator="step_gae")
    with pytest.raises(ConfigError, match="never reads values"):
        preset("steppo", estimator="grpo", group_size=4)
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        preset("grpo", group_size=1)
    with pytest.raises(ConfigError, match="unknown algo keys"):
        preset("steppo", gama=0.9)
    with pytest.raises(ConfigError, match="unknown algorithm"):
        preset("ppo2")
    with pytest.raises(ConfigError, match="gamma"):
        preset("steppo", gamma=1.5)


def test_overrides_do_not_mutate_the_registry():
    cfg = preset("steppo", gamma=0.99)
    assert cfg.gamma == 0.99 and PRESETS["steppo"].gamma == 1.0
