"""The `retrain` command line: serve, inject, status, explain, demo."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from worker.app import render

if TYPE_CHECKING:  # the command line imports what a command needs when it runs
    from shared.messages import RetrainRequested
    from worker.adapters.azure.servicebus import ServiceBusInjector
    from worker.config import RetrainConfig
    from worker.ports import BlobStore
    from worker.store import Store

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Event-driven retraining worker for PyTorch image classifiers.")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (default: $RETRAIN_CONFIG, else built-in defaults)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable output")]
MAX_LIMIT = 10_000  # rows a listing may ask for: more is a typo, and SQLite refuses integers past 2**63


def _actor(claimed: str | None) -> str:
    """requested_by for a command run here: the operating-system user is the actor; a name given
    with --by / --requested-by is kept as a note ("on behalf of"), never as the actor."""
    try:  # the account the process runs as (not $USER, which anyone can set)
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
    except ImportError:  # Windows: no uid; the logon name is what there is
        import getpass

        user = getpass.getuser()
    except KeyError:  # no name for this uid (a bare container)
        user = f"uid {os.getuid()}"
    if not claimed or claimed == user:
        return user[:200]
    from shared.redact import printable

    return f"{user} (on behalf of {printable(claimed, limit=80)})"[:200]


def _is_version(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' and other digits int() refuses."""
    import re

    return re.fullmatch(r"[0-9]{1,9}", text) is not None


_LOADED: list[RetrainConfig] = []  # the configuration the command loaded: an error met later names its settings


def _config(path: Path | None) -> RetrainConfig:
    from shared.errors import ConfigError
    from worker.config import load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(2) from exc
    _LOADED[:] = [config]
    return config


def _store(config: RetrainConfig) -> Store:
    """The ledger for a read-only command: never created here (a missing one is an error, exit 1)."""
    from worker.app.bootstrap import NoLedgerError, open_ledger

    try:
        return open_ledger(config, existing_only=True)
    except NoLedgerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _manifests(config: RetrainConfig) -> BlobStore:
    from worker.app.bootstrap import manifests_store

    return manifests_store(config, os.environ)


def _version(value: bool) -> None:
    if value:
        from worker import __version__

        typer.echo(f"retrain {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error (also RETRAIN_DEBUG=1)")] = False,
) -> None:
    """Event-driven retraining worker for PyTorch image classifiers."""
    if debug:
        os.environ["RETRAIN_DEBUG"] = "1"
    else:  # the Azure SDKs log a page per failed credential; the one-line error says what to do
        logging.getLogger("azure").setLevel(logging.ERROR)


@app.command()
def serve(
    config: ConfigOption = None,
    cycles: Annotated[int | None, typer.Option(help="stop after this many cycles (default: run until Ctrl-C)")] = None,
    max_seconds: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    settle_seconds: Annotated[float, typer.Option(help="ignore files modified more recently than this (still being written)")] = 1.0,
    create_folders: Annotated[bool, typer.Option(help="create a model's images folder that does not exist (else: an error)")] = False,
) -> None:
    """Run the local worker: scan image folders, consume the inbox, tick, publish events."""
    from worker.app.bootstrap import build_worker
    from worker.app.serve import LocalService

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    from shared.redact import install_log_redaction

    install_log_redaction()  # as the Functions app does: secrets masked, text from outside on one printable line
    cfg = _config(config)
    _refuse_missing_dependencies(cfg)
    from worker import telemetry

    telemetry.configure()
    worker = build_worker(cfg)  # the backend's and the ledger's settings are checked here
    _images_folders(cfg, create_folders)
    service = LocalService(worker, settle_seconds=settle_seconds)

    def stop(signum: int, _frame: object) -> None:
        logging.getLogger("retrain.serve").info("stopping after the current step (signal %d)", signum)
        service.stop.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for name in sorted(cfg.models):
        logging.getLogger("retrain.serve").info("model %s: watching %s", name, cfg.images_dir(name))
    service.run(max_seconds=max_seconds, cycles=cycles)


def _refuse_missing_dependencies(cfg: RetrainConfig) -> None:
    """A backend whose packages are not here would fail every run, retried, with the cause buried in
    the runs' details: refuse to start instead, with what to install."""
    from worker.app.diagnose import missing_dependencies

    missing = missing_dependencies(cfg, os.environ)
    if missing:
        what = f"worker.backend = {cfg.worker.backend!r}" + (", worker.store = 'table'" if cfg.worker.store == "table" else "")
        typer.echo(f"error: {what} needs {'; '.join(missing)} in this Python ({sys.executable})", err=True)
        raise typer.Exit(2)


def _images_folders(cfg: RetrainConfig, create: bool) -> None:
    """Each model's images folder must exist: a mistyped one was silently created and then watched forever."""
    for name in sorted(cfg.models):
        folder = cfg.images_dir(name)
        if folder.is_dir():
            continue
        setting = f"models.{name}.images_dir" if cfg.model(name).images_dir else f"worker.images_root = {cfg.worker.images_root}"
        if not create:
            typer.echo(f"error: model {name}: the images folder {folder} does not exist ({setting}); "
                       f"create it (mkdir -p {folder}/<label>), fix the setting, or pass --create-folders", err=True)  # fmt: skip
            raise typer.Exit(2)
        folder.mkdir(parents=True)
        logging.getLogger("retrain.serve").info("model %s: created %s (put images in %s/<label>/)", name, folder, folder)


@app.command()
def inject(
    model_arg: Annotated[str | None, typer.Argument(metavar="MODEL", help="the model to retrain")] = None,
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option(help="start a run now, whatever the thresholds say (never while one is in flight)")] = False,
    prefix: Annotated[str | None, typer.Option(help="backfill: register every image under this prefix (<label>/...)")] = None,
    images_file: Annotated[Path | None, typer.Option(help="backfill: a file listing image paths, one per line")] = None,
    epochs: Annotated[int | None, typer.Option(help="override epochs for the run")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="override the learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="override the batch size")] = None,
    image_size: Annotated[int | None, typer.Option(help="override the image size")] = None,
    request_id: Annotated[str | None, typer.Option(help="idempotency key (default: a new id)")] = None,
    by: Annotated[str, typer.Option("--by", help="on whose behalf (the operating-system user is recorded as who asked)")] = "",
    reason: Annotated[str, typer.Option(help="why (recorded in the ledger and shown by runs and the dashboard)")] = "",
    to: Annotated[
        str,
        typer.Option(
            help="local: the worker handles it now and says what it will do; inbox: a file for a running `serve`; "
            "servicebus: RETRAIN_REQUESTS_QUEUE"
        ),
    ] = "local",
    wait: Annotated[
        bool, typer.Option(help="with --force, locally: tick the worker until the request's run ends (exit 0: registered)")
    ] = False,
    timeout: Annotated[float, typer.Option(min=1, max=366 * 86400, help="seconds --wait waits")] = 86400.0,
    json_out: JsonOption = False,
    model_opt: Annotated[str | None, typer.Option("--model", hidden=True)] = None,  # the older spelling
    requested_by: Annotated[str, typer.Option("--requested-by", hidden=True)] = "",  # the older spelling of --by
) -> None:
    """Ask for a forced run and/or a backfill. Locally the answer says what the worker does with it:
    a run planned, queued behind the one in flight, waiting (and why) or refused (exit 1)."""
    from shared.errors import InvalidMessage
    from shared.messages import RetrainRequested, parse_as

    model = model_arg or model_opt
    if model is None or (model_arg and model_opt and model_arg != model_opt):
        typer.echo("error: name one model: retrain inject MODEL [--force] [--prefix P | --images-file F]", err=True)
        raise typer.Exit(2)
    if to not in ("local", "inbox", "servicebus"):
        typer.echo(f"error: --to must be 'local', 'inbox' or 'servicebus', not {to!r}", err=True)
        raise typer.Exit(2)
    if wait and (to != "local" or not force):
        typer.echo("error: --wait follows a forced run handled here: use it with --force and --to local", err=True)
        raise typer.Exit(2)
    cfg = _config(config)
    body: dict[str, Any] = {
        "message_id": request_id or f"req-{uuid.uuid4().hex}",
        "model": model,
        "force": force,
        "requested_by": _actor(by or requested_by),
        "reason": reason,
    }
    if prefix is not None:
        body["prefix"] = prefix
    if images_file is not None:
        try:
            lines = images_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            typer.echo(f"error: cannot read {images_file}: {exc.strerror}", err=True)
            raise typer.Exit(2) from exc
        body["images"] = [{"path": line.strip()} for line in lines if line.strip()]
    overrides = {
        k: v
        for k, v in {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size, "image_size": image_size}.items()
        if v is not None
    }
    if overrides:
        body["overrides"] = overrides
    try:
        message = parse_as(RetrainRequested, body, known_models=cfg.models)
    except InvalidMessage as exc:
        typer.echo(f"error: invalid request ({exc.reason}): {exc.description}", err=True)
        raise typer.Exit(2) from exc
    if to == "local":
        _inject_here(cfg, message, wait, timeout, json_out)
        return
    injector = _servicebus_injector() if to == "servicebus" else None
    try:
        if injector is not None:
            where = f"Service Bus queue {injector.queue} (message id {injector.send(message)})"
        else:
            from worker.adapters.local.inbox import LocalInbox

            where = str(LocalInbox(cfg.worker.state_dir / "inbox").put(message.message_id, message.model_dump(mode="json")))
    except InvalidMessage as exc:
        typer.echo(f"error: invalid request ({exc.reason}): {exc.description}", err=True)
        raise typer.Exit(2) from exc
    except Exception as exc:  # a Service Bus failure: its message is already redacted
        typer.echo(f"error: could not send the request: {exc}", err=True)
        raise typer.Exit(1) from exc
    if json_out:
        typer.echo(json.dumps({"request_id": message.message_id, "queued": where}))
    else:
        typer.echo(
            f"queued request {message.message_id} for {model} in {where} (the worker that reads it decides; `retrain explain` says what)"
        )


def _inject_here(cfg: RetrainConfig, message: RetrainRequested, wait: bool, timeout: float, json_out: bool) -> None:
    """The worker handles the request in this process and says what it does with it."""
    from worker.app.bootstrap import build_worker
    from worker.app.inject import answer, wait_for_run

    def show(lines: list[str]) -> None:
        for line in [] if json_out else render.plain(lines, markup=False):
            typer.echo(line)

    _refuse_missing_dependencies(cfg)  # the request may start a run here
    worker = build_worker(cfg)
    reply = answer(message, worker.handle(message))
    show(reply.lines)
    code = reply.exit_code
    if wait and code == 0:
        followed = wait_for_run(worker, message.model, message.message_id, timeout, echo=lambda line: show([line]))
        show(followed.lines)
        reply.data["run"], code = followed.data, followed.exit_code
    if json_out:
        typer.echo(json.dumps(reply.data))
    raise typer.Exit(code)


def _servicebus_injector() -> ServiceBusInjector:
    """From the same settings as the Functions app: RETRAIN_SERVICEBUS (or __fullyQualifiedNamespace) and RETRAIN_REQUESTS_QUEUE."""
    import os

    from worker.adapters.azure import servicebus

    # Azure's identity-based connection setting is spelled this way (and env vars are case-sensitive).
    connection, namespace = os.environ.get("RETRAIN_SERVICEBUS"), os.environ.get("RETRAIN_SERVICEBUS__fullyQualifiedNamespace")  # noqa: SIM112
    queue = os.environ.get("RETRAIN_REQUESTS_QUEUE")
    if not queue or not (connection or namespace):
        typer.echo(
            "error: --to servicebus needs RETRAIN_REQUESTS_QUEUE and RETRAIN_SERVICEBUS (or RETRAIN_SERVICEBUS__fullyQualifiedNamespace)",
            err=True,
        )
        raise typer.Exit(2)
    from worker.app.bootstrap import from_connection_setting

    factory = from_connection_setting(
        "RETRAIN_SERVICEBUS", lambda: servicebus.client_factory(connection=connection or None, namespace=None if connection else namespace)
    )
    return servicebus.ServiceBusInjector(factory, queue)


@app.command()
def status(
    model: Annotated[str | None, typer.Argument(help="one model (default: all)")] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Per model: pending images per class, runs in flight, recent runs, the last decision and the policy's verdict now."""
    from worker.views import status_view

    cfg = _config(config)
    _known(cfg, model)
    view = status_view(_store(cfg), cfg, model)
    if json_out:
        typer.echo(json.dumps(view, indent=2))
        return
    render.status(view)


@app.command()
def explain(
    model: Annotated[str | None, typer.Argument(help="one model (default: all)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="how many decisions")] = 10,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """The last decisions of the policy, newest first, with their reasons."""
    from worker.views import explain_view

    cfg = _config(config)
    _known(cfg, model)
    view = explain_view(_store(cfg), cfg, model, limit)
    if json_out:
        typer.echo(json.dumps(view, indent=2))
        return
    render.explain(view)


@app.command()
def models(
    args: Annotated[list[str] | None, typer.Argument(help="[MODEL] to list versions, or: show MODEL[:VERSION]")] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Registered versions with their metrics and the champion; `models show MODEL[:VERSION]` for lineage."""
    from worker.views import models_view, version_view

    cfg = _config(config)
    args = args or []
    if args[:1] == ["show"]:
        if len(args) != 2:
            typer.echo("error: usage: retrain models show MODEL[:VERSION]", err=True)
            raise typer.Exit(2)
        name, _, version = args[1].partition(":")
        _known(cfg, name)
        if version and not _is_version(version):
            typer.echo(f"error: version must be a number, got {version!r}", err=True)
            raise typer.Exit(2)
        card = version_view(_store(cfg), name, int(version) if version else None)
        if card is None:
            typer.echo(f"error: {name} has no version {version or '(no champion yet)'}", err=True)
            raise typer.Exit(1)
        typer.echo(json.dumps(card, indent=2, sort_keys=True))
        return
    if len(args) > 1:
        typer.echo("error: usage: retrain models [MODEL] | retrain models show MODEL[:VERSION]", err=True)
        raise typer.Exit(2)
    model = args[0] if args else None
    _known(cfg, model)
    view = models_view(_store(cfg), cfg, model)
    if json_out:
        typer.echo(json.dumps(view, indent=2))
        return
    render.models(view)


@app.command()
def cancel(run_id: Annotated[str, typer.Argument(help="the run to stop")], config: ConfigOption = None) -> None:
    """Stop a run in flight; its new images go back to pending (a canceled run is not retried)."""
    from worker.app.bootstrap import build_worker

    cfg = _config(config)
    try:
        typer.echo(build_worker(cfg).cancel(run_id))
    except KeyError as exc:
        typer.echo(f"error: {exc.args[0]}", err=True)
        raise typer.Exit(2) from exc


ReasonOption = Annotated[str, typer.Option(help="why (recorded in the ledger and the event)")]
ByOption = Annotated[str, typer.Option("--by", help="on whose behalf (the operating-system user is recorded as who asked)")]


def _control(config: Path | None, model: str, action: str, json_out: bool, **fields: Any) -> None:
    """Apply an operator's control message through the worker (recorded, announced, idempotent by id)."""

    from shared.errors import InvalidMessage
    from shared.messages import ModelControl, parse_as
    from worker.app.bootstrap import build_worker

    cfg = _config(config)
    _known(cfg, model)
    fields["requested_by"] = _actor(fields.get("requested_by"))
    body = {"message_id": fields.pop("request_id", None) or f"ctl-{uuid.uuid4().hex}", "model": model, "action": action, **fields}
    try:
        message = parse_as(ModelControl, body, known_models=cfg.models)
    except InvalidMessage as exc:
        typer.echo(f"error: {exc.reason}: {exc.description}", err=True)
        raise typer.Exit(2) from exc
    effects = build_worker(cfg).handle(message)
    if json_out:
        typer.echo(json.dumps({"request_id": message.message_id, "outcome": effects.outcome, "detail": effects.detail}))
    else:
        typer.echo(f"{effects.outcome}: {effects.detail}")
    if effects.outcome == "rejected":
        raise typer.Exit(1)


@app.command()
def promote(
    target: Annotated[str, typer.Argument(help="MODEL:VERSION, a registered version")],
    reason: ReasonOption = "",
    by: ByOption = "",
    request_id: Annotated[str | None, typer.Option(help="idempotency key (default: a new id)")] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Make a registered version the champion (the registry's champion marker follows)."""
    model, _, version = target.partition(":")
    if not _is_version(version):
        typer.echo("error: give MODEL:VERSION, e.g. birds:3", err=True)
        raise typer.Exit(2)
    _control(config, model, "promote", json_out, version=int(version), reason=reason, requested_by=by, request_id=request_id)


@app.command()
def rollback(
    model: Annotated[str, typer.Argument(help="the model")],
    reason: ReasonOption = "",
    by: ByOption = "",
    request_id: Annotated[str | None, typer.Option(help="idempotency key (default: a new id)")] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Put the previous champion back."""
    _control(config, model, "rollback", json_out, reason=reason, requested_by=by, request_id=request_id)


@app.command()
def pause(
    model: Annotated[str, typer.Argument(help="the model")],
    reason: ReasonOption = "",
    by: ByOption = "",
    cancel_run: Annotated[bool, typer.Option("--cancel", help="also cancel the run in flight")] = False,
    request_id: Annotated[str | None, typer.Option(help="idempotency key (default: a new id)")] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Stop new runs (images keep being counted; forced requests are refused until resumed)."""
    _control(config, model, "pause", json_out, reason=reason, requested_by=by, cancel=cancel_run, request_id=request_id)


@app.command()
def resume(
    model: Annotated[str, typer.Argument(help="the model")],
    reason: ReasonOption = "",
    by: ByOption = "",
    request_id: Annotated[str | None, typer.Option(help="idempotency key (default: a new id)")] = None,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Let the policy start runs again."""
    _control(config, model, "resume", json_out, reason=reason, requested_by=by, request_id=request_id)


@app.command()
def runs(
    model: Annotated[str | None, typer.Argument(help="one model (default: all)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="how many runs per model")] = 20,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Run history: state, outcome, images, duration, metrics."""
    from worker.views import runs_view

    cfg = _config(config)
    _known(cfg, model)
    view = runs_view(_store(cfg), cfg, model, limit)
    if json_out:
        typer.echo(json.dumps(view, indent=2))
        return
    render.runs(view)


@app.command()
def manifest(
    run_id: Annotated[str, typer.Argument(help="the run whose frozen manifest to show")],
    diff_parent: Annotated[
        bool, typer.Option("--diff-parent", help="only the images added and removed since the last registered run")
    ] = False,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """What a run trained on: images per split and class, and the paths (or what changed since its parent)."""
    from worker.views import manifest_view

    cfg = _config(config)
    try:
        view = manifest_view(_store(cfg), _manifests(cfg), run_id, diff_parent)
    except KeyError as exc:
        typer.echo(f"error: {exc.args[0]}", err=True)
        raise typer.Exit(1) from exc
    if json_out:
        typer.echo(json.dumps(view, indent=2))
        return
    render.manifest(view, diff_parent)


@app.command()
def audit(
    model: Annotated[str | None, typer.Argument(help="one model (default: all)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="how many entries per model")] = 50,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Who did what, when, through which door (HTTP with Entra ID or a function key, queue, local), verified or claimed."""
    from worker.views import audit_view

    cfg = _config(config)
    _known(cfg, model)
    view = audit_view(_store(cfg), cfg, model, limit)
    if json_out:
        typer.echo(json.dumps(view, indent=2))
        return
    render.audit(view)


@app.command()
def logs(
    run_id: Annotated[str, typer.Argument(help="a run id (its latest attempt) or a backend run id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the run ends")] = False,
    config: ConfigOption = None,
) -> None:
    """A run's training log (local runs: runs/<id>/train.log; Azure ML: `az ml job stream -n <id>`)."""
    from worker.app.follow import LogNotFoundError, follow_log

    cfg = _config(config)
    try:
        for chunk in follow_log(cfg, _store(cfg), run_id, follow=follow):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except LogNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def dashboard(
    host: Annotated[str, typer.Option(help="the address to listen on (keep it local: the page has no login)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the port (0: any free one)")] = 8765,
    config: ConfigOption = None,
) -> None:
    """Serve the read-only console: models, runs (curves, per-class accuracy, confusion matrix, manifest, cost), decisions, events."""
    from worker.app.dashboard_server import serve_dashboard

    cfg = _config(config)
    store = _store(cfg)
    serve_dashboard(
        store, cfg, host, port, manifests=_manifests(cfg), announce=lambda url: typer.echo(f"dashboard on {url} (Ctrl-C stops it)")
    )


@app.command()
def simulate(
    model: Annotated[str, typer.Argument(help="the model whose history is replayed")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE: a policy setting for the replay (repeatable)")] = None,
    grid: Annotated[
        list[str] | None, typer.Option(help="KEY=V1,V2,...: one configuration per value (repeatable: every combination)")
    ] = None,
    events: Annotated[Path | None, typer.Option(help="replay this JSON-lines history instead of the ledger's")] = None,
    export: Annotated[
        Path | None, typer.Option(help="write the ledger's history as JSON lines to this file ('-': stdout) and stop")
    ] = None,
    run_minutes: Annotated[float | None, typer.Option(help="every run takes this long (default: recorded runs, or a fit to them)")] = None,
    tick: Annotated[float, typer.Option(help="seconds between the worker's ticks")] = 60.0,
    show_runs: Annotated[int, typer.Option("--runs", help="list this many simulated runs per configuration")] = 20,
    config: ConfigOption = None,
    json_out: JsonOption = False,
) -> None:
    """Replay the model's recorded history through the policy, as it is or with other settings."""
    from worker.app.simulate_cli import SimulateError, run_simulation

    cfg = _config(config)
    _known(cfg, model)
    try:
        report = run_simulation(cfg, model, _store if events is None else None, set_ or [], grid or [], events, export, run_minutes, tick)
    except SimulateError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if report is None:  # exported
        return
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    render.simulation(report, model, show_runs)


def _known(cfg: RetrainConfig, model: str | None) -> None:
    if model is not None and model not in cfg.models:
        typer.echo(f"error: unknown model {model!r} (configured: {', '.join(sorted(cfg.models))})", err=True)
        raise typer.Exit(2)


@app.command()
def demo(
    workspace: Annotated[Path, typer.Option(help="where data, the ledger, runs and the registry go (emptied each time)")] = Path(
        "retrain-demo"
    ),
    per_class: Annotated[int, typer.Option(min=8, help="synthetic images per class (half arrive in each round)")] = 120,
    epochs: Annotated[int, typer.Option(min=1, help="training epochs per run")] = 4,
    image_size: Annotated[int, typer.Option(min=16, help="training image size in pixels")] = 64,
    nproc: Annotated[int, typer.Option(min=1, help="DDP processes per run (torchrun --nproc_per_node)")] = 2,
    min_value: Annotated[float, typer.Option(help="the gate's minimum best_val_acc")] = 0.6,
) -> None:
    """The whole loop on this machine: images arrive, the policy waits, DDP runs, gate, registry, ONNX, events."""

    from rich.console import Console

    from worker.app.diagnose import TRAINING_MODULES, missing_modules

    missing = missing_modules(TRAINING_MODULES)
    if missing:
        typer.echo(f"error: the demo trains and exports a model and needs {', '.join(missing)}: pip install 'retrain[train]'", err=True)
        raise typer.Exit(2)

    from worker.app.demo import DemoConfig, DemoError, run_demo
    from worker.app.demo_report import render_summary

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)
    cfg = DemoConfig(workspace=workspace, per_class=per_class, epochs=epochs, image_size=image_size, nproc=nproc, min_value=min_value)
    try:
        result = run_demo(cfg, echo=lambda line: console.print(line, markup=False))
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    render_summary(result, console)
    if not result.ok:
        console.print("[red]the demo did not end with two finalized runs and a champion[/red]")
        raise typer.Exit(1)


def main() -> None:
    from shared.errors import ConfigError

    try:
        app()
    except ConfigError as exc:  # raised while wiring (a backend or ledger without its settings): a line per problem, no traceback
        for line in str(exc).splitlines():
            typer.echo(f"error: {line}", err=True)
        sys.exit(2)
    except Exception as exc:  # a misconfiguration met at run time: one line, not a page of traceback
        if os.environ.get("RETRAIN_DEBUG"):
            raise
        from worker.app.diagnose import explain

        typer.echo(f"error: {explain(exc, _LOADED[0] if _LOADED else None)} (--debug shows the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
