"""Configuration: TOML, environment overrides, durations, and errors that list every problem."""

from pathlib import Path

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


EXAMPLE_FILE = Path(__file__).resolve().parents[2] / "examples" / "retrain.toml"


def example_keys() -> dict[str, set[str]]:
    """Section -> the keys the example lists, set or commented out (`# key = ...`)."""
    import re

    keys: dict[str, set[str]] = {}
    section = ""
    for line in EXAMPLE_FILE.read_text().splitlines():
        header = re.match(r"^\[([\w.-]+)\]", line)
        if header:
            section = header.group(1)
            keys[section] = set()
            continue
        key = re.match(r"^#?\s*([a-z_]+) = ", line)
        if key and section:
            keys[section].add(key.group(1))
    return keys


def test_the_example_config_lists_every_section_and_key_with_its_default():
    from worker.config import AzureMLConfig, GateConfig, ModelConfig, RetrainConfig, TrainingConfig, WorkerConfig

    expected = {
        "worker": set(WorkerConfig.model_fields),
        "models.birds": set(ModelConfig.model_fields) - {"training", "gate"},
        "models.birds.training": set(TrainingConfig.model_fields),
        "models.birds.gate": set(GateConfig.model_fields),
        "azureml": set(AzureMLConfig.model_fields),
    }
    assert set(RetrainConfig.model_fields) == {"worker", "azureml", "models"}
    assert example_keys() == expected
    config = load_config(EXAMPLE_FILE, env={})
    defaults = RetrainConfig()
    assert config.model("birds") == defaults.model("birds")  # the values shown are the defaults
    assert config.azureml == defaults.azureml
    paths = {"state_dir", "images_root"}
    assert config.worker.model_dump(exclude=paths) == defaults.worker.model_dump(exclude=paths)


def test_the_example_config_works_where_it_is_copied(tmp_path):
    """It pointed at ../images and ../.retrain: copied next to a project, it read and wrote outside it."""
    import os
    import shutil
    import subprocess
    import sys

    project = tmp_path / "project"
    (project / "images" / "birds" / "chicken").mkdir(parents=True)
    shutil.copy(EXAMPLE_FILE, project / "retrain.toml")
    config = load_config(project / "retrain.toml", env={})
    assert (config.worker.state_dir, config.images_dir("birds")) == (project / ".retrain", project / "images" / "birds")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN")}
    env["PYTHONPATH"] = str(EXAMPLE_FILE.parents[1])
    done = subprocess.run([sys.executable, "-m", "worker", "serve", "-c", str(project / "retrain.toml"), "--cycles", "1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (project / ".retrain" / "ledger.db").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]  # nothing written beside the project


def test_an_environment_override_for_a_model_that_is_not_configured_is_an_error_unless_declared(tmp_path):
    """RETRAIN__MODELS__BRDS__... silently added a model `brds` beside `birds`."""
    with pytest.raises(ConfigError, match=r"RETRAIN__MODELS__BRDS__MIN_NEW_IMAGES: no model 'brds' is configured \(configured: birds\)"):
        load_config(None, env={"RETRAIN__MODELS__BRDS__MIN_NEW_IMAGES": "5"})
    path = tmp_path / "retrain.toml"
    path.write_text("[models.cats]\nmin_new_images = 5\n")
    with pytest.raises(ConfigError, match="RETRAIN_MODELS=birds,cats"):
        load_config(path, env={"RETRAIN__MODELS__BIRDS__MIN_NEW_IMAGES": "5"})  # the file has cats only
    declared = load_config(None, env={"RETRAIN_MODELS": "cats, bird-cam", "RETRAIN__MODELS__BIRD_CAM__MIN_NEW_IMAGES": "7"})
    assert sorted(declared.models) == ["bird-cam", "cats"]  # declaring replaces the built-in birds
    assert declared.models["bird-cam"].min_new_images == 7
    both = load_config(path, env={"RETRAIN_MODELS": "birds", "RETRAIN__MODELS__BIRDS__MIN_NEW_IMAGES": "9"})
    assert (sorted(both.models), both.models["cats"].min_new_images, both.models["birds"].min_new_images) == (["birds", "cats"], 5, 9)
    with pytest.raises(ConfigError, match=r"models\.BAD"):
        load_config(None, env={"RETRAIN_MODELS": "BAD"})  # declared names are checked like the file's
