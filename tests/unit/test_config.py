"""Configuration: TOML, environment overrides, durations, and errors that list every problem."""

import pytest

from shared.errors import ConfigError
from worker.config import load_config, parse_duration

pytestmark = pytest.mark.unit

EXAMPLE = """
[worker]
state_dir = "state"
[models.birds]
min_new_images = 20
quiet_period = "90s"
cooldown = "5m"
max_wait = "1h"
[models.birds.training]
epochs = 3
[models.cats]
in_flight = "queue"
"""


def test_a_toml_file_configures_each_model_and_relative_paths_follow_the_file(tmp_path):
    path = tmp_path / "retrain.toml"
    path.write_text(EXAMPLE)
    config = load_config(path, env={})
    birds = config.model("birds")
    assert (birds.min_new_images, birds.quiet_period, birds.cooldown, birds.max_wait) == (20, 90, 300, 3600)
    assert birds.training.epochs == 3
    assert config.model("cats").in_flight == "queue"
    assert config.worker.state_dir == tmp_path / "state"
    assert config.images_dir("cats") == tmp_path / "images" / "cats"
    assert config.events_file == tmp_path / "state" / "events.jsonl"


def test_environment_variables_override_the_file(tmp_path):
    path = tmp_path / "retrain.toml"
    path.write_text(EXAMPLE)
    config = load_config(
        path, env={"RETRAIN__MODELS__BIRDS__MIN_NEW_IMAGES": "7", "RETRAIN__MODELS__BIRDS__TRAINING__EXTRA": '["--bn", "frozen"]'}
    )
    assert config.model("birds").min_new_images == 7
    assert config.model("birds").training.extra == ("--bn", "frozen")


def test_without_a_file_the_embedded_defaults_have_one_model(tmp_path):
    config = load_config(None, env={}, base_dir=tmp_path)
    assert list(config.models) == ["birds"]
    assert config.worker.state_dir == tmp_path / ".retrain"


def test_every_bad_value_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[models.birds]\nmin_new_images = 0\nquiet_period = "soon"\nin_flight = "later"\nunknown_knob = 1\n')
    with pytest.raises(ConfigError) as exc:
        load_config(path, env={})
    text = str(exc.value)
    for words in ("models.birds.min_new_images", "models.birds.quiet_period", "models.birds.in_flight", "models.birds.unknown_knob"):
        assert words in text


@pytest.mark.parametrize(
    ("bad", "words"), [("[models]\n", "at least one model"), ('[models."Bad Name"]\n', "pattern"), ("not toml = = 1", "not valid TOML")]
)
def test_unusable_files_are_config_errors(tmp_path, bad, words):
    path = tmp_path / "c.toml"
    path.write_text(bad)
    with pytest.raises(ConfigError, match=words):
        load_config(path, env={})


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(("text", "seconds"), [(30, 30), ("45", 45), ("90s", 90), ("5m", 300), ("1.5h", 5400), ("2d", 172800)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["-1", "5 minutes", True, None])
def test_bad_durations(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize("absurd", [1e300, "99999999999999d", 366 * 86400 + 1, "367d"])
def test_finite_but_absurd_durations_are_refused_at_start_not_in_serve(absurd):
    """They validated, then crashed `retrain serve` with OverflowError adding them to a datetime."""
    with pytest.raises(ValueError, match="longest duration allowed, 366 days"):
        parse_duration(absurd)


def test_an_absurd_duration_in_a_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "retrain.toml"
    path.write_text('[models.birds]\nquiet_period = 1e300\ncooldown = "99999999999999d"\n')
    with pytest.raises(ConfigError, match="366 days") as caught:
        load_config(path, env={})
    assert "quiet_period" in str(caught.value)
    assert "cooldown" in str(caught.value)
    assert parse_duration("366d") == 366 * 86400  # the maximum itself is allowed


def test_the_example_config_in_the_readme_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parents[2] / "examples" / "retrain.toml", env={})
    assert config.model("birds").max_wait == 3600
