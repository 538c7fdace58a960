"""train.py's command line: the reference script's arguments, ours, and the older DDP ones."""

import pytest

from train import parse_args

pytestmark = pytest.mark.unit


def test_reference_arguments_and_defaults_match_the_azure_ml_sample():
    args = parse_args(["--num_epochs", "30", "--output_dir", "./outputs"])
    assert args.num_epochs == 30
    assert args.output_dir == "./outputs"
    assert args.learning_rate == pytest.approx(0.001)
    assert args.momentum == pytest.approx(0.9)
    assert (args.step_size, args.gamma) == (7, pytest.approx(0.1))


def test_output_dir_has_a_default_so_omitting_it_does_not_crash():
    assert parse_args([]).output_dir == "./outputs"


def test_retrain_arguments_are_parsed():
    args = parse_args(
        ["--data_dir", "d", "--manifest", "m.json", "--init_checkpoint", "c.pt", "--weights", "none", "--batch_size", "8",
         "--image_size", "96", "--workers", "0", "--seed", "7", "--distributed", "horovod"]
    )  # fmt: skip
    assert (args.data_dir, args.manifest, args.init_checkpoint) == ("d", "m.json", "c.pt")
    assert (args.weights, args.batch_size, args.image_size, args.workers, args.seed) == ("none", 8, 96, 0, 7)
    assert args.distributed == "horovod"


@pytest.mark.parametrize("spelling", ["dashes", "underscores"])
def test_older_ddp_arguments_are_accepted_in_both_spellings(spelling):
    sep = "-" if spelling == "dashes" else "_"
    args = parse_args([f"--dist{sep}backend", "gloo", f"--dist{sep}url", "tcp://10.0.0.4:6105", "--rank", "1", f"--world{sep}size", "2"])
    assert (args.dist_backend, args.dist_url, args.rank, args.world_size) == ("gloo", "tcp://10.0.0.4:6105", 1, 2)


@pytest.mark.parametrize(
    "argv",
    [
        ["--num_epochs", "0"],
        ["--batch_size", "0"],
        ["--image_size", "8"],
        ["--val_fraction", "1.5"],
        ["--learning_rate", "-1"],
        ["--distributed", "mpi"],
        ["--worker_start_method", "fork"],  # unsafe once the process has threads: not offered
        ["--collective_timeout", "0"],
        ["--collective_timeout", "nan"],
        ["--stall_timeout", "-1"],
        ["--stall_timeout", "inf"],
    ],
)
def test_bad_values_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_loader_workers_start_from_a_fork_server_and_every_wait_is_bounded_by_default():
    args = parse_args([])
    assert args.worker_start_method == "forkserver"
    assert args.collective_timeout == 600.0  # DDP/Horovod: a collective fails after 10 minutes of waiting
    assert args.stall_timeout == 900.0  # the watchdog: 15 minutes without progress ends the process
    assert parse_args(["--worker_start_method", "spawn", "--stall_timeout", "0"]).stall_timeout == 0.0  # 0 turns the watchdog off
