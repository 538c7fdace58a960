"""The `retrain` command line, in-process: inject validation, status/explain/models output."""

import json

import pytest
from typer.testing import CliRunner

from worker.app.cli import app

pytestmark = pytest.mark.unit


@pytest.fixture
def env(tmp_path):
    return {
        "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"),
        "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"),
        "RETRAIN_CONFIG": "",
    }


def invoke(env, *args):
    return CliRunner().invoke(app, list(args), env=env)


def test_inject_queues_a_valid_request_in_the_local_inbox(env, tmp_path):
    result = invoke(env, "inject", "birds", "--to", "inbox", "--force", "--epochs", "3", "--request-id", "req-1", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads((tmp_path / "state" / "inbox" / "req-1.json").read_text())
    import os
    import pwd

    assert (body["force"], body["overrides"]["epochs"], body["requested_by"]) == (True, 3, pwd.getpwuid(os.getuid()).pw_name)  # the OS user
    again = ("inject", "--model", "birds", "--to", "inbox", "--force", "--request-id", "req-1")  # the older --model spelling works
    assert invoke(env, *again, "--epochs", "3").exit_code == 0  # same again: fine
    conflict = invoke(env, *again, "--epochs", "4")
    assert conflict.exit_code == 2
    assert "different message" in conflict.output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "cats", "--force"], "unknown_model"),
        (["--model", "birds"], "asks for nothing"),
        (["--model", "birds", "--prefix", "../etc"], "'..'"),
        (["--model", "birds", "--force", "--epochs", "0"], "overrides.epochs"),
        (["--model", "birds", "--force", "--to", "carrier-pigeon"], "must be 'local', 'inbox' or 'servicebus'"),
        (["--model", "birds", "--force", "--to", "servicebus"], "needs RETRAIN_REQUESTS_QUEUE"),
        (["--force"], "name one model"),
        (["birds", "--model", "cats", "--force"], "name one model"),
        (["birds", "--prefix", "chicken/", "--wait"], "--wait follows a forced run"),
        (["birds", "--force", "--wait", "--to", "inbox"], "--wait follows a forced run"),
    ],
)
def test_inject_refuses_bad_input_and_writes_nothing(env, tmp_path, args, words):
    result = invoke(env, "inject", *args)
    assert result.exit_code == 2
    assert words in result.output
    assert not (tmp_path / "state" / "inbox").exists() or not list((tmp_path / "state" / "inbox").glob("*.json"))


def test_inject_reads_a_backfill_list(env, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("chicken/a.jpg\n\nturkey/b.png\n")
    assert invoke(env, "inject", "birds", "--to", "inbox", "--images-file", str(listing), "--request-id", "bf").exit_code == 0
    body = json.loads((tmp_path / "state" / "inbox" / "bf.json").read_text())
    assert [i["path"] for i in body["images"]] == ["chicken/a.jpg", "turkey/b.png"]


def test_inject_says_what_the_worker_does_with_the_request_and_fails_when_it_does_nothing(env, tmp_path):
    """`inject` printed "queued ... exit 0" for a paused model and for a prefix matching no image."""
    import os
    import pwd

    chicken = tmp_path / "images" / "birds" / "chicken"
    chicken.mkdir(parents=True)
    (chicken / "a.jpg").write_bytes(b"x")
    found = invoke(env, "inject", "birds", "--prefix", "chicken/", "--by", "ana", "--request-id", "bf-1")
    assert found.exit_code == 0, found.output
    assert found.output.splitlines() == [
        "request bf-1 for birds: registered 1 images",
        "the worker waits: waiting: 1/50 new images; waiting for data: 1/2 classes have images (chicken)",
    ]
    again = invoke(env, "inject", "birds", "--prefix", "chicken/", "--request-id", "bf-1")
    assert (again.exit_code, again.output.strip()) == (0, "request bf-1 was already handled: nothing done again")
    nothing = invoke(env, "inject", "birds", "--prefix", "turkey/2025/")
    assert nothing.exit_code == 1
    assert "the prefix 'turkey/2025/' matches no image" in nothing.output
    assert "nothing to backfill" in nothing.output
    forced = invoke(env, "inject", "birds", "--force", "--reason", "new camera", "--json")
    assert forced.exit_code == 0
    assert json.loads(forced.output)["decision"]["outcome"] == "wait"  # one class has no image yet: it waits, and says so
    assert invoke(env, "pause", "birds", "--reason", "audit").exit_code == 0
    refused = invoke(env, "inject", "birds", "--force", "--requested-by", "bob")  # the older spelling of --by
    assert refused.exit_code == 1
    assert refused.output.startswith("refused: paused by ")
    assert "forced requests are refused while paused (resume first)" in refused.output
    audit = json.loads(invoke(env, "audit", "birds", "--json").output)["birds"]
    user = pwd.getpwuid(os.getuid()).pw_name
    assert f"{user} (on behalf of bob)" in [row["actor"] for row in audit]


def test_inject_wait_follows_the_requests_run_to_its_end(tmp_path):
    from tests.fakes.harness import make_harness
    from worker.app.inject import wait_for_run

    h = make_harness(tmp_path, cooldown=0)
    h.uploads(6)
    h.request(message_id="force-1", force=True, reason="now")
    seen: list[str] = []
    registered = wait_for_run(
        h.worker, "birds", "force-1", 60, seen.append, sleep=lambda _: h.succeed(next(r for r in h.runs() if r.in_flight))
    )
    assert registered.exit_code == 0
    assert registered.data["outcome"] == "registered"
    assert any(line.endswith(": planned") or line.endswith(": submitted") for line in seen)
    h.uploads(1)
    h.request(message_id="force-2", force=True)
    rejected = wait_for_run(h.worker, "birds", "force-2", 60, seen.append,
                            sleep=lambda _: h.succeed(next(r for r in h.runs() if r.in_flight), best=0.1, baseline=0.9))  # fmt: skip
    assert (rejected.exit_code, rejected.data["outcome"]) == (1, "rejected")
    h.uploads(1)
    h.request(message_id="force-3", force=True)
    import time

    slow = wait_for_run(h.worker, "birds", "force-3", 1, seen.append, sleep=lambda _: time.sleep(1.1))  # the run never ends
    assert slow.exit_code == 124
    assert "still waiting after 1 s" in slow.lines[0]


def test_status_explain_and_models_work_on_an_empty_ledger(env, tmp_path):
    from worker.adapters.local.sqlite_store import SqliteStore

    SqliteStore(tmp_path / "state" / "ledger.db").close()  # as `retrain serve` leaves it before anything arrives
    status = invoke(env, "status", "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["birds"]["pending"]["total"] == 0
    assert json.loads(invoke(env, "explain", "--json").output) == {"birds": []}
    assert json.loads(invoke(env, "models", "--json").output)["birds"]["champion"] is None
    assert invoke(env, "models", "show", "birds").exit_code == 1
    assert invoke(env, "status", "cats").exit_code == 2
    assert invoke(env, "status").exit_code == 0  # the table form renders too


def test_a_bad_config_file_is_reported_and_exits_2(env, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[models.birds]\nmin_new_images = -3\n")
    result = invoke(env, "status", "-c", str(bad))
    assert result.exit_code == 2
    assert "models.birds.min_new_images" in result.output


def test_serve_refuses_an_images_folder_that_does_not_exist_and_creates_it_only_when_asked(env, tmp_path, caplog):
    """A mistyped images folder was silently created and then watched forever."""
    import logging

    refused = invoke(env, "serve", "--cycles", "1")
    assert refused.exit_code == 2
    assert refused.output.strip() == (
        f"error: model birds: the images folder {tmp_path / 'images' / 'birds'} does not exist (worker.images_root = "
        f"{tmp_path / 'images'}); create it (mkdir -p {tmp_path / 'images' / 'birds'}/<label>), fix the setting, or pass --create-folders"
    )
    assert not (tmp_path / "images").exists()
    with caplog.at_level(logging.INFO, logger="retrain.serve"):
        result = invoke(env, "serve", "--cycles", "1", "--create-folders")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "images" / "birds").is_dir()
    assert f"created {tmp_path / 'images' / 'birds'}" in caplog.text


def test_pause_resume_and_their_refusals_from_the_command_line(env, tmp_path):
    paused = invoke(env, "pause", "birds", "--reason", "incident 42", "--by", "ops")
    assert (paused.exit_code, paused.output.strip()) == (0, "paused: birds paused")
    status = json.loads(invoke(env, "status", "birds", "--json").output)
    assert status["birds"]["paused"]["reason"] == "incident 42"
    assert invoke(env, "resume", "birds").output.strip() == "resumed: birds resumed"
    refused = invoke(env, "rollback", "birds")
    assert (refused.exit_code, refused.output.strip()) == (1, "rejected: birds has no earlier champion to roll back to")
    assert invoke(env, "promote", "birds").exit_code == 2  # MODEL:VERSION
    assert invoke(env, "pause", "cats").exit_code == 2


def test_logs_print_a_local_runs_log_and_follow_it_until_the_run_ends(env, tmp_path):
    import datetime as dt
    import threading
    import time

    from worker.adapters.local.sqlite_store import SqliteStore
    from worker.store import RunRow

    store = SqliteStore(tmp_path / "state" / "ledger.db")
    with store.transaction() as tx:
        tx.insert_run(RunRow(run_id="birds-0001-abcdef12", model="birds", seq=1, state="running", manifest_sha256="0" * 64, image_count=2,
                             new_image_count=2, classes=["chicken"], created_at=dt.datetime.now(dt.UTC)))  # fmt: skip
        tx.commit()
    run_dir = tmp_path / "state" / "runs" / "birds-0001-abcdef12-a1"
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text("epoch 1/3 train_loss=0.9\n")

    def training() -> None:
        for epoch in (2, 3):
            time.sleep(0.3)
            with open(run_dir / "train.log", "a") as log:
                log.write(f"epoch {epoch}/3 train_loss=0.{9 - epoch}\n")
        (run_dir / "exit_code").write_text("0\n")

    thread = threading.Thread(target=training)
    thread.start()
    followed = invoke(env, "logs", "birds-0001-abcdef12", "-f")
    thread.join()
    assert followed.exit_code == 0
    assert [line.split()[1] for line in followed.output.splitlines()] == ["1/3", "2/3", "3/3"]
    assert invoke(env, "logs", "birds-0001-abcdef12-a1").output.count("epoch") == 3
    missing = invoke(env, "logs", "birds-0009-abcdef12")
    assert missing.exit_code == 1
    assert "no run 'birds-0009-abcdef12' in the ledger" in missing.output
    history = json.loads(invoke(env, "runs", "birds", "--json").output)
    assert [r["run_id"] for r in history["birds"]] == ["birds-0001-abcdef12"]


def test_serve_logs_text_from_outside_on_one_line_and_masks_secrets(env, tmp_path):
    """An inbox file name with a newline used to print a second, forged log line; serve now installs
    the same redaction as the Functions app."""
    import os
    import subprocess
    import sys

    inbox = tmp_path / "state" / "inbox"
    inbox.mkdir(parents=True)
    (tmp_path / "images" / "birds").mkdir(parents=True)
    forged = "x\n12:00:00 retrain.serve ERROR the ledger is corrupt, delete it"
    (inbox / f"{forged}.json").write_text("{not json AccountKey=c2VjcmV0c2VjcmV0c2VjcmV0==")
    done = subprocess.run([sys.executable, "-m", "worker", "serve", "--cycles", "1"], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert any("rejected inbox message" in line for line in lines), done.stderr
    assert not any(line.startswith("12:00:00 retrain.serve ERROR") for line in lines), done.stderr
    assert "c2VjcmV0c2VjcmV0c2VjcmV0" not in done.stderr


def test_absurd_limits_and_non_ascii_versions_are_refused_as_usage_errors(env):
    assert invoke(env, "runs", "--limit", "100000000000000000000").exit_code == 2
    assert invoke(env, "explain", "birds", "--limit", "10001").exit_code == 2
    refused = invoke(env, "promote", "birds:²")
    assert refused.exit_code == 2
    assert "give MODEL:VERSION" in refused.output
    assert invoke(env, "models", "show", "birds:³").exit_code == 2


def _running_run_with_a_log(tmp_path, state="running"):
    import datetime as dt

    from worker.adapters.local.sqlite_store import SqliteStore
    from worker.store import RunRow

    store = SqliteStore(tmp_path / "state" / "ledger.db")
    with store.transaction() as tx:
        tx.insert_run(RunRow(run_id="birds-0001-abcdef12", model="birds", seq=1, state=state, manifest_sha256="0" * 64, image_count=2,
                             new_image_count=2, classes=["chicken"], created_at=dt.datetime.now(dt.UTC)))  # fmt: skip
        tx.commit()
    run_dir = tmp_path / "state" / "runs" / "birds-0001-abcdef12-a1"
    run_dir.mkdir(parents=True)
    (run_dir / "train.log").write_text("epoch 1/3 train_loss=0.9\n")
    return store


def test_logs_print_no_file_outside_the_runs_folder(env, tmp_path):
    _running_run_with_a_log(tmp_path)
    (tmp_path / "state" / "secret.txt").write_text("the contents of another file\n")
    (tmp_path / "state" / "train.log").write_text("the contents of another file\n")
    for hostile in ("birds-0001-abcdef12-a1/..", "birds-0001-abcdef12-a1/../..", "birds-0001-abcdef12-a1/../../secret.txt"):
        result = invoke(env, "logs", hostile)
        assert result.exit_code == 1, (hostile, result.output)
        assert "neither a run id nor one of its attempts" in result.output
        assert "another file" not in result.output


def test_following_a_log_ends_when_the_ledger_says_the_run_ended_though_its_runner_vanished(env, tmp_path):
    """A runner killed with the machine never writes exit_code; `logs -f` used to wait forever."""
    _running_run_with_a_log(tmp_path, state="failed")
    followed = invoke(env, "logs", "birds-0001-abcdef12", "-f")  # returns: the ledger says failed
    assert followed.exit_code == 0
    assert "epoch 1/3" in followed.output


HOSTILE_TERMINAL = "\x1b]0;owned\x07\x1b[2J\u202eesrever\u009b31m [red]markup[/red]\nforged line"


def test_text_from_outside_cannot_drive_the_terminal_in_status_explain_and_runs(env, tmp_path):
    """Pause reasons, --by and run reasons were printed raw: an OSC sequence could retitle the
    terminal, CSI clear it, U+202E reverse the line, rich markup restyle it, a newline forge a row."""
    import datetime as dt

    from worker.adapters.local.sqlite_store import SqliteStore
    from worker.store import RunRow

    assert invoke(env, "pause", "birds", "--reason", HOSTILE_TERMINAL, "--by", HOSTILE_TERMINAL).exit_code == 0
    store = SqliteStore(tmp_path / "state" / "ledger.db")
    with store.transaction() as tx:
        tx.insert_run(RunRow(run_id="birds-0001-abcdef12", model="birds", seq=1, state="failed", manifest_sha256="0" * 64, image_count=2,
                             new_image_count=2, classes=["chicken"], created_at=dt.datetime.now(dt.UTC), reason=HOSTILE_TERMINAL))  # fmt: skip
        tx.commit()
    for command in (["status", "birds"], ["explain", "birds"], ["runs", "birds"]):
        result = invoke(env, *command)
        assert result.exit_code == 0, result.output
        for raw in ("\x1b", "\x07", "\u202e", "\u009b"):
            assert raw not in result.output, (command, raw)
        assert "forged line" not in result.output.replace("\\nforged line", ""), command  # never at the start of a line of its own
    assert "\\u001b]0;owned" in invoke(env, "explain", "birds").output  # shown, escaped, not swallowed
    json_out = invoke(env, "explain", "birds", "--json").output
    assert "\x1b" not in json_out  # JSON escapes it itself


def test_the_operating_system_user_is_the_actor_of_a_command_and_by_is_a_note(env, tmp_path):
    import os
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name  # the account, not $USER (anyone can set it)
    assert (
        invoke(
            {**env, "USER": "someone-else", "LOGNAME": "someone-else"}, "pause", "birds", "--reason", "audit", "--by", "ceo@contoso.com"
        ).exit_code
        == 0
    )
    status = json.loads(invoke(env, "status", "birds", "--json").output)
    assert status["birds"]["paused"]["by"] == f"{user} (on behalf of ceo@contoso.com)"
    invoke(env, "resume", "birds")
    assert invoke(env, "pause", "birds").exit_code == 0
    assert json.loads(invoke(env, "status", "birds", "--json").output)["birds"]["paused"]["by"] == user


def test_audit_says_who_did_what_through_which_door_and_whether_it_was_verified(env, tmp_path):
    import os
    import pwd

    from shared.messages import ModelControl, RetrainRequested
    from worker.adapters.local.sqlite_store import SqliteStore
    from worker.app.bootstrap import build_worker
    from worker.config import load_config

    user = pwd.getpwuid(os.getuid()).pw_name
    assert invoke(env, "pause", "birds", "--reason", "label audit", "--by", "ceo@contoso.com").exit_code == 0
    worker = build_worker(load_config(None, env=env), store=SqliteStore(tmp_path / "state" / "ledger.db"))
    worker.handle(ModelControl(message_id="h-1", model="birds", action="resume", requested_by="entra:o-1 (Otto Operator)"))
    worker.handle(
        RetrainRequested(message_id="q-1", model="birds", force=True, requested_by="queue retrain-requests: pipeline (unverified)")
    )
    view = json.loads(invoke(env, "audit", "birds", "--json").output)["birds"]
    assert [(r["action"], r["door"], r["verified"]) for r in view] == [
        ("forced run", "queue", False),
        ("resumed", "http (Entra ID)", True),
        ("paused", "local", False),
    ]
    assert view[2]["actor"] == f"{user} (on behalf of ceo@contoso.com)"
    assert view[2]["reason"] == "label audit"
    text = invoke(env, "audit", "birds").output
    assert f"paused      by {user} (on behalf of ceo@contoso.com) via local (claimed): label audit" in text


def test_a_misconfiguration_met_at_run_time_is_one_line_not_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RETRAIN__WORKER__STORE": "table", "RETRAIN_TABLES": "DefaultEndpointsProtocol=https;AccountName=x;AccountKey=c2VjcmV0c2VjcmV0",
           "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"), "RETRAIN_CONFIG": ""}  # fmt: skip
    env.pop("RETRAIN_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "worker", "status"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")  # (here: the account cannot be resolved)
    assert lines[0].endswith("(--debug shows the traceback)")
    assert "check RETRAIN_TABLES:" in lines[0]  # the setting the unreachable host came from
    assert "c2VjcmV0c2VjcmV0" not in done.stderr


def test_a_missing_package_says_which_extra_to_install(monkeypatch, capsys):
    from worker.app import cli

    def needs_torch():
        raise ModuleNotFoundError("No module named 'torch'", name="torch")

    monkeypatch.setattr(cli, "app", needs_torch)
    monkeypatch.delenv("RETRAIN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    assert (
        capsys.readouterr().err.strip() == "error: torch is not installed here: pip install 'retrain[train]' (--debug shows the traceback)"
    )


def test_explain_and_models_show_the_requests_reason_and_the_gates_rejection(tmp_path):
    """The gate's reason was only in `runs --json`; a request's --reason was stored and never shown."""
    from tests.fakes.harness import make_harness
    from worker.adapters.local.sqlite_store import SqliteStore

    h = make_harness(tmp_path, store=SqliteStore(tmp_path / "state" / "ledger.db"), cooldown=0)
    h.uploads(6)
    h.clock.advance(40)
    h.worker.tick()
    h.succeed(h.runs()[0], best=0.9)
    h.uploads(1)
    h.request(message_id="force-1", force=True, requested_by="ana", reason="the new camera's images")
    h.succeed(next(r for r in h.runs() if r.in_flight), best=0.4, baseline=0.9)
    env = {
        "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"),
        "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"),
        "RETRAIN_CONFIG": "",
    }
    explained = invoke(env, "explain", "birds", "--limit", "50").output
    assert "forced by request force-1 (ana)" in explained
    assert "(asked: the new camera's images)" in explained
    models = invoke(env, "models", "birds")
    assert models.exit_code == 0
    line = next(line for line in models.output.splitlines() if line.startswith("rejected by the gate: "))
    assert "best_val_acc 0.4000" in line
    view = json.loads(invoke(env, "models", "birds", "--json").output)["birds"]
    assert [r["run_id"] for r in view["rejected"]] == [h.runs()[0].run_id]
