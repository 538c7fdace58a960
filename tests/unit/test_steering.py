"""Operators steer a model: promote, roll back, pause, resume."""

from __future__ import annotations

import json

import pytest

from shared import events as ev
from shared.messages import ModelControl, RetrainRequested
from tests.fakes.harness import make_harness
from worker.views import explain_view, runs_view, status_view

pytestmark = pytest.mark.unit


def control(h, action: str, message_id: str | None = None, **fields):
    h.n += 1
    return h.worker.handle(ModelControl(message_id=message_id or f"ctl-{h.n}", model="birds", action=action, **fields))


def register_two(h):
    """Two runs, both registered: v1, then v2 (champion)."""
    for best in (0.8, 0.9):
        h.uploads(6)
        h.clock.advance(40)
        h.worker.tick()
        run = next(r for r in h.runs() if r.in_flight)
        h.succeed(run, best=best, baseline=None if best == 0.8 else 0.8)
    assert h.head().champion_version == 2


def test_rollback_puts_the_previous_champion_back_once_and_the_next_gate_compares_against_it(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    register_two(h)
    effects = control(h, "rollback", message_id="rb-1", requested_by="alice", reason="v2 misclassifies turkeys in prod")
    assert (effects.outcome, effects.detail) == ("rollback", "v1 is the champion of birds")
    assert h.head().champion_version == 1
    assert h.registry.champion_alias("birds") == 1  # the registry's marker follows the ledger
    replay = control(h, "rollback", message_id="rb-1", requested_by="alice")
    assert replay.outcome == "duplicate"
    assert h.head().champion_version == 1  # one effect: not rolled back further
    [event] = [e.payload["data"] for e in h.events() if e.type == ev.MODEL_PROMOTED]
    assert event == {"model": "birds", "requested_by": "alice", "reason": "v2 misclassifies turkeys in prod", "request_id": "rb-1",
                     "action": "rollback", "version": 1, "previous_version": 2}  # fmt: skip
    decision = h.decisions()[0]
    assert (decision.outcome, decision.message_id) == ("rollback", "rb-1")
    assert decision.reason == "v1 is champion (rolled back from v2 by alice (v2 misclassifies turkeys in prod))"
    # The next run warm-starts from v1 and is gated against v1.
    h.uploads(6)
    h.clock.advance(40)
    h.worker.tick()
    third = next(r for r in h.runs() if r.in_flight)
    assert h.backend.specs[third.backend_run_id].init_checkpoint.endswith("/birds/1/model.pt")
    h.succeed(third, best=0.85, baseline=0.8)  # better than v1's 0.8 (not than v2's 0.9)
    assert h.head().champion_version == 3
    registered = [e.payload["data"] for e in h.events() if e.type == ev.MODEL_REGISTERED][-1]
    assert registered["parent_version"] == 1


def test_with_no_earlier_champion_a_rollback_is_refused_and_changes_nothing(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    refused = control(h, "rollback", requested_by="bob")
    assert (refused.outcome, refused.detail) == ("rejected", "birds has no earlier champion to roll back to")
    assert h.decisions()[0].reason == "rollback by bob refused: birds has no earlier champion to roll back to"
    assert not [e for e in h.events() if e.type == ev.MODEL_PROMOTED]


def test_promote_takes_registered_versions_only_and_rollback_then_returns_to_the_one_it_replaced(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    register_two(h)
    assert control(h, "promote", version=7).detail == "v7 is not a registered version of birds"
    assert control(h, "promote", version=2).outcome == "unchanged"
    assert control(h, "promote", version=1, requested_by="carol").outcome == "promote"
    assert (h.head().champion_version, h.registry.champion_alias("birds")) == (1, 1)
    assert control(h, "rollback").outcome == "rollback"
    assert h.head().champion_version == 2


def test_a_paused_model_counts_images_submits_nothing_and_says_why(tmp_path):
    h = make_harness(tmp_path)
    assert control(h, "pause", requested_by="dave", reason="relabelling turkeys").outcome == "paused"
    h.uploads(10)
    h.clock.advance(60)
    h.worker.tick()
    assert h.runs() == []
    assert h.backend.calls_to("submit") == []
    why = explain_view(h.store, h.worker.config, "birds")["birds"][0]["reason"]
    assert why.startswith("paused by dave at ")
    assert why.endswith(": relabelling turkeys; 20 new images are counted, no run starts until resumed")
    status = status_view(h.store, h.worker.config, "birds", now=h.clock.now())["birds"]
    assert status["pending"]["total"] == 20
    assert status["paused"]["by"] == "dave"
    h.worker.handle(RetrainRequested(message_id="force-1", model="birds", force=True, requested_by="eve"))
    [rejected] = [e.payload["data"] for e in h.events() if e.type == ev.REQUEST_REJECTED]
    assert rejected["request_id"] == "force-1"
    assert "forced requests are refused while paused" in rejected["reason"]
    assert control(h, "pause").outcome == "unchanged"
    resumed = control(h, "resume", requested_by="dave")
    assert resumed.outcome == "resumed"
    [run] = h.runs()
    assert resumed.planned_runs == [run.run_id]
    assert [e.type for e in h.events()].count(ev.MODEL_PAUSED) == 1
    assert [e.type for e in h.events()].count(ev.MODEL_RESUMED) == 1


def test_pause_with_cancel_stops_the_run_in_flight_and_without_it_lets_the_run_finish(tmp_path):
    h = make_harness(tmp_path, quiet_period=0)
    h.uploads(10)
    [run] = h.runs()
    assert run.in_flight
    effects = control(h, "pause", cancel=True, requested_by="ops")
    assert effects.cancel_runs == [run.run_id]
    assert h.backend.calls_to("cancel") == [run.backend_run_id]
    [event] = [e.payload["data"] for e in h.events() if e.type == ev.MODEL_PAUSED]
    assert event["canceled_runs"] == [run.run_id]

    other = make_harness(tmp_path / "other", quiet_period=0)
    other.uploads(10)
    [flying] = other.runs()
    control(other, "pause")
    assert other.backend.calls_to("cancel") == []
    other.succeed(flying)
    assert other.head().champion_version == 1  # a run in flight continues and completes


def test_control_messages_are_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="promote needs a version"):
        ModelControl(message_id="m", model="birds", action="promote")
    with pytest.raises(ValidationError, match="cancel goes with pause only"):
        ModelControl(message_id="m", model="birds", action="resume", cancel=True)


def test_runs_view_lists_history_with_durations_and_metrics(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    register_two(h)
    rows = runs_view(h.store, h.worker.config, "birds")["birds"]
    assert [r["outcome"] for r in rows] == ["registered", "registered"]
    assert [r["best_val_acc"] for r in rows] == [0.9, 0.8]
    assert all(r["duration_s"] is not None and r["duration_s"] >= 0 for r in rows)
    json.dumps(rows)  # machine-readable as it is


def test_each_control_is_its_own_event_and_decision_and_the_unchanged_ones_say_so(tmp_path):
    h = make_harness(tmp_path)
    assert (control(h, "resume").outcome, control(h, "resume").detail) == ("unchanged", "birds is not paused")
    control(h, "pause", message_id="p1", requested_by="ops", reason="incident")
    assert control(h, "pause").detail == "birds is already paused"
    assert h.head().paused == {"by": "ops", "reason": "incident", "at": h.clock.now().isoformat()}
    control(h, "resume", message_id="r1", requested_by="ops")
    control(h, "pause", message_id="p2", requested_by="ops")
    paused = [e for e in h.events() if e.type == ev.MODEL_PAUSED]
    assert len(paused) == 2  # the same fact twice would share an id; two pauses are two facts
    assert paused[0].payload["data"] == {
        "model": "birds",
        "requested_by": "ops",
        "reason": "incident",
        "request_id": "p1",
        "canceled_runs": [],
    }
    decisions = [(d.outcome, d.reason, d.message_id) for d in h.decisions()[:3]]
    assert decisions[0] == ("paused", "paused by ops", "p2")
    assert ("resumed", "resumed by ops", "r1") in decisions  # then the evaluation that follows, under the same id


def test_promote_records_the_version_s_weights_digest_and_refuses_a_version_that_failed_onnx_parity(tmp_path):
    from worker.store import ModelVersionRow

    h = make_harness(tmp_path, cooldown=0)
    register_two(h)
    with h.store.read() as tx:
        v1 = next(v for v in tx.model_versions("birds") if v.version == 1)
    control(h, "promote", version=1)
    assert h.head().champion_sha256 == v1.card["artifacts"]["model.pt"]["sha256"]
    with h.store.transaction() as tx:
        tx.add_model_version(ModelVersionRow(model="birds", version=3, run_id="birds-0099-deadbeef", created_at=h.clock.now(), location="x",
                                             metrics={}, card={"onnx": {"passed": False}, "artifacts": {}}))  # fmt: skip
        tx.commit()
    refused = control(h, "promote", version=3)
    assert (refused.outcome, refused.detail) == ("rejected", "v3 failed its ONNX parity check")
    assert h.decisions()[0].outcome == "reject"


def test_rollbacks_walk_back_one_champion_at_a_time(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    register_two(h)  # v1 then v2 (champion); history [1]
    h.uploads(6)
    h.clock.advance(40)
    h.worker.tick()
    h.succeed(next(r for r in h.runs() if r.in_flight), best=0.95, baseline=0.9)
    assert (h.head().champion_version, h.head().previous_champions) == (3, [1, 2])
    control(h, "rollback")
    assert (h.head().champion_version, h.head().previous_champions) == (2, [1])
    control(h, "rollback")
    assert (h.head().champion_version, h.head().previous_champions) == (1, [])
    control(h, "promote", version=3)
    assert h.head().previous_champions == [1]


def test_pause_with_cancel_and_nothing_in_flight_cancels_nothing_even_with_finished_runs_and_other_models(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    register_two(h)
    effects = control(h, "pause", cancel=True)
    assert effects.cancel_runs == []
    assert h.backend.calls_to("cancel") == []


def test_pause_with_cancel_cancels_only_its_own_models_run(tmp_path):
    h = make_harness(tmp_path, quiet_period=0)
    h.worker.config.models["cats"] = h.worker.config.models["birds"]
    h.worker.blobs["cats"] = h.blobs
    for i in range(20):
        h.upload(("chicken", "turkey")[i % 2], name=f"cat{i}", model="cats")
    with h.store.read() as tx:
        [cats_run] = [r for r in tx.runs("cats") if r.in_flight]
    effects = control(h, "pause", cancel=True)
    assert (effects.cancel_runs, h.backend.calls_to("cancel")) == ([], []), f"{cats_run.run_id} is another model's"
    assert h.decisions()[0].reason == "paused by unknown"


def test_promoting_a_version_when_there_is_no_champion_makes_it_the_first(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    register_two(h)
    with h.store.transaction() as tx:  # versions, but no champion (a ledger repaired by hand)
        head = tx.model_head("birds")
        head.champion_version, head.champion_sha256, head.previous_champions = None, None, []
        tx.save_model_head(head)
        tx.commit()
    effects = control(h, "promote", version=1, requested_by="ops")
    assert (effects.outcome, effects.detail) == ("promote", "v1 is the champion of birds")
    assert (h.head().champion_version, h.head().previous_champions) == (1, [])
    assert h.decisions()[0].reason == "v1 is champion (promoted from vNone by ops)"


def test_promotions_are_separate_facts_each_with_its_event_and_the_history_keeps_twenty(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    register_two(h)  # v2 champion, history [1]
    for n in range(22):
        control(h, "promote", message_id=f"pr-{n}", version=1 if n % 2 == 0 else 2, requested_by="ops")
    promoted = [e.payload["data"] for e in h.events() if e.type == ev.MODEL_PROMOTED]
    assert [d["request_id"] for d in promoted] == [f"pr-{n}" for n in range(22)], "the same promotion twice is two facts"
    assert len(h.head().previous_champions) == 20
    assert (h.head().champion_version, h.head().previous_champions[-2:]) == (2, [2, 1])
    assert h.decisions()[0].reason == "v2 is champion (promoted from v1 by ops)"
    again = control(h, "promote", version=2)
    assert (again.outcome, again.detail) == ("unchanged", "v2 is already the champion of birds")


def test_resumes_are_separate_facts_and_the_evaluation_after_one_names_it(tmp_path):
    h = make_harness(tmp_path)
    for n in (1, 2):
        control(h, "pause", message_id=f"p{n}", requested_by="ops")
        control(h, "resume", message_id=f"r{n}", requested_by="ops")
    resumed = [e.payload["data"]["request_id"] for e in h.events() if e.type == ev.MODEL_RESUMED]
    assert resumed == ["r1", "r2"]
    latest = h.decisions()[:2]
    assert [(d.outcome, d.message_id) for d in latest] == [("wait", "r2"), ("resumed", "r2")]


def test_a_rollback_restores_the_latest_earlier_champion_that_is_still_registered_and_not_the_current(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    register_two(h)  # v2 champion, history [1]
    with h.store.transaction() as tx:
        head = tx.model_head("birds")
        head.previous_champions = [1, 7, 2]  # 7 was never registered; 2 is the champion itself
        tx.save_model_head(head)
        tx.commit()
    effects = control(h, "rollback")
    assert (effects.outcome, h.head().champion_version, h.head().previous_champions) == ("rollback", 1, [])


def test_a_run_in_flight_during_a_rollback_cannot_undo_it(tmp_path):
    """The run warm-started from v2; v2 is rolled back to v1 while it trains. Its baseline is v2's,
    not v1's: it used to pass on the minimum alone and replace v1 (0.61 over 0.80)."""
    h = make_harness(tmp_path, cooldown=0)
    register_two(h)
    h.uploads(6)
    h.clock.advance(40)
    h.worker.tick()
    third = next(r for r in h.runs() if r.in_flight)
    assert h.backend.specs[third.backend_run_id].init_checkpoint.endswith("/birds/2/model.pt")  # trained from v2
    control(h, "rollback", requested_by="alice", reason="v2 misclassifies turkeys")
    assert h.head().champion_version == 1

    h.succeed(third, best=0.61, baseline=0.55)  # 'beats' v2's score on its set: but v1 is the champion now

    assert h.head().champion_version == 1  # the rollback holds
    [rejected] = [e.payload["data"] for e in h.events() if e.type == ev.MODEL_REJECTED]
    assert rejected["run_id"] == third.run_id
    assert "the champion changed while it ran" in rejected["reason"]
    assert [v.version for v in h.versions()] == [2, 1]  # nothing registered
    # The next run trains from v1 and is compared with v1.
    h.uploads(6)
    h.clock.advance(40)
    h.worker.tick()
    fourth = next(r for r in h.runs() if r.in_flight)
    assert h.backend.specs[fourth.backend_run_id].init_checkpoint.endswith("/birds/1/model.pt")
    h.succeed(fourth, best=0.85, baseline=0.8)
    assert h.head().champion_version == 3
    card = h.registry.card("birds", 3)
    assert card["parent_version"] == 1  # the version it was trained from
    assert card["trained_from_sha256"] == h.versions()[-1].card["artifacts"]["model.pt"]["sha256"]


def test_runs_say_why_a_run_started_who_asked_why_and_why_it_was_rejected(tmp_path):
    from typer.testing import CliRunner

    from worker.adapters.local.sqlite_store import SqliteStore
    from worker.app.cli import app

    h = make_harness(tmp_path, store=SqliteStore(tmp_path / "state" / "ledger.db"), cooldown=0)
    h.uploads(6)
    h.worker.handle(RetrainRequested(message_id="req-why", model="birds", force=True, reason="new camera in barn 2"))
    [run] = h.runs()
    h.succeed(run, best=0.5)  # below the minimum: rejected
    [row] = runs_view(h.store, h.worker.config, "birds")["birds"]
    assert row["request_reasons"] == ["new camera in barn 2"]
    assert row["outcome"] == "rejected"
    assert "below the minimum" in row["detail"]
    env = {"RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"), "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"), "RETRAIN_CONFIG": "",
           "COLUMNS": "400"}  # fmt: skip
    text = CliRunner().invoke(app, ["runs", "birds"], env=env).output
    assert "asked: new camera in barn 2" in text
    assert "below the minimum" in text


def test_a_runs_manifest_lists_what_it_trained_on_and_what_was_added_since_its_parent(tmp_path):
    from typer.testing import CliRunner

    from worker.adapters.local.sqlite_store import SqliteStore
    from worker.app.cli import app

    h = make_harness(tmp_path, store=SqliteStore(tmp_path / "state" / "ledger.db"), cooldown=0)
    register_two(h)
    first, second = sorted((r for r in h.runs()), key=lambda r: r.seq)
    env = {
        "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"),
        "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"),
        "RETRAIN_CONFIG": "",
    }
    whole = json.loads(CliRunner().invoke(app, ["manifest", first.run_id, "--json"], env=env).output)
    assert whole["images"] == first.image_count == len(whole["paths"])
    assert sum(sum(c.values()) for c in whole["per_split"].values()) == first.image_count
    diff = json.loads(CliRunner().invoke(app, ["manifest", second.run_id, "--diff-parent", "--json"], env=env).output)
    assert diff["parent_run_id"] == first.run_id
    assert len(diff["added"]) == second.new_image_count == 12
    assert diff["removed"] == []
    text = CliRunner().invoke(app, ["manifest", second.run_id, "--diff-parent"], env=env).output
    assert f"since {first.run_id}: 12 added, 0 removed" in text
    assert CliRunner().invoke(app, ["manifest", "birds-9999-00000000"], env=env).exit_code == 1


def test_the_commands_read_manifests_where_the_worker_froze_them(tmp_path, monkeypatch):
    """A local worker freezes manifests in its state folder whatever RETRAIN_ARTIFACTS says (only Azure
    ML reads them from the artifacts container); `retrain manifest` looked in the container."""
    from typer.testing import CliRunner

    from worker.adapters.local.sqlite_store import SqliteStore
    from worker.app import bootstrap
    from worker.app.cli import app
    from worker.config import load_config

    h = make_harness(tmp_path, store=SqliteStore(tmp_path / "state" / "ledger.db"), cooldown=0)
    register_two(h)
    run = h.runs()[0]
    unreachable = (
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/devstoreaccount1"
    )
    env = {"RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"), "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"),
           "RETRAIN_CONFIG": "", "RETRAIN_ARTIFACTS": unreachable}  # fmt: skip
    shown = CliRunner().invoke(app, ["manifest", run.run_id, "--json"], env=env)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["images"] == run.image_count
    container = object()
    monkeypatch.setattr(bootstrap, "artifacts_store", lambda env: container)  # (no Azure here)
    on_azure = load_config(None, env={**env, "RETRAIN__WORKER__BACKEND": "azureml"})
    assert bootstrap.manifests_store(on_azure, env) is container  # there the container is where they are
