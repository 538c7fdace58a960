"""Completion: gate, ONNX parity, registry, champion alias, events; idempotent under redelivery and crashes;
and what it writes, word for word (the events' data, the run's detail, the decisions, the card, what is
planned after the run, the re-checks on the rejection path). On every ledger, Table Storage too."""

import hashlib
import json
import threading
import time

import pytest

from shared import events as ev
from tests.fakes.commit_faults import CommitFaults, RetryClock, conflicts
from tests.fakes.harness import make_harness
from worker import completion as completion_module
from worker.ports import ExportError

pytestmark = [pytest.mark.unit, pytest.mark.on_table_storage]  # also on Azure Table Storage (Azurite)


@pytest.fixture
def h(new_store, tmp_path):
    return make_harness(tmp_path, store=new_store(), cooldown=0)


def first_run(h):
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    return h.runs()[0]


def second_run(h):
    h.uploads(4)
    h.clock.advance(11)
    h.worker.tick()
    return h.runs()[0]


def test_a_first_good_model_is_registered_as_champion_with_its_lineage(h):
    run = first_run(h)
    h.succeed(run, best=0.82)
    final = h.runs()[0]
    assert (final.state, final.outcome) == ("finalized", "registered")
    [version] = h.versions()
    assert (version.version, version.run_id) == (1, run.run_id)
    assert h.head().champion_version == 1
    assert h.registry.champion_alias("birds") == 1
    card = h.registry.card("birds", 1)
    assert card["manifest"]["sha256"] == run.manifest_sha256
    assert card["manifest"]["images"] == 12
    assert card["parent_version"] is None
    assert card["artifacts"]["model.pt"]["sha256"] == h.head().champion_sha256
    assert card["config"]["training"]["epochs"] == 8
    assert card["code_version"]["training_snapshot"]
    assert card["gate"]["passed"] is True
    registered = [e for e in h.events() if e.type == ev.MODEL_REGISTERED]
    assert len(registered) == 1
    data = registered[0].payload["data"]
    assert (data["version"], data["run_id"], data["champion"]) == (1, run.run_id, True)
    assert data["onnx"]["max_abs_diff"] == pytest.approx(3e-7)
    for name in ("model.pt", "model.onnx", "card.json", "metrics.json", "onnx_report.json"):
        assert (h.root / "registry" / "birds" / "champion" / name).exists()


def test_the_next_run_warm_starts_from_the_champion_and_replaces_it_when_better(h):
    h.succeed(first_run(h), best=0.8)
    run = second_run(h)
    spec = h.backend.specs[run.backend_run_id]
    assert spec.init_checkpoint == str(h.root / "registry" / "birds" / "1" / "model.pt")
    h.succeed(run, best=0.9, baseline=0.8)
    assert h.head().champion_version == 2
    assert h.registry.card("birds", 2)["parent_version"] == 1
    assert "beats champion v1 at 0.8000" in h.registry.card("birds", 2)["gate"]["reason"]


@pytest.mark.parametrize(("best", "baseline"), [(0.79, 0.8), (0.8, 0.8)], ids=["worse", "tie"])
def test_a_challenger_that_is_not_better_is_rejected_and_the_champion_stays(h, best, baseline):
    h.succeed(first_run(h), best=0.8)
    run = second_run(h)
    h.succeed(run, best=best, baseline=baseline)
    final = h.runs()[0]
    assert (final.state, final.outcome) == ("finalized", "rejected")
    assert "does not beat champion v1" in final.detail
    assert h.head().champion_version == 1
    assert len(h.versions()) == 1
    rejected = [e for e in h.events() if e.type == ev.MODEL_REJECTED]
    assert rejected[0].payload["data"]["champion_version"] == 1


def test_a_model_below_the_minimum_is_rejected_even_as_the_first(h):
    h.succeed(first_run(h), best=0.5)
    assert h.runs()[0].outcome == "rejected"
    assert h.head().champion_version is None
    assert h.registry.champion_alias("birds") is None


def test_failed_onnx_parity_blocks_registration_with_the_reason(h):
    h.exporter.max_abs_diff = 5e-3
    h.succeed(first_run(h), best=0.9)
    final = h.runs()[0]
    assert final.outcome == "rejected"
    assert "ONNX parity failed" in final.detail
    assert "5.00e-03" in final.detail
    assert h.versions() == []


def test_a_model_file_that_does_not_match_training_is_rejected(h):
    run = first_run(h)
    h.succeed(run, best=0.9, model_sha256="0" * 64)
    assert "model.pt has sha256" in h.runs()[0].detail
    assert h.exporter.calls == []


def test_outputs_from_another_manifest_are_rejected(h):
    run = first_run(h)
    h.succeed(run, best=0.9, manifest_sha256="f" * 64)
    assert "not its own" in h.runs()[0].detail


def test_a_crash_between_register_and_publish_is_repaired_without_a_second_version_or_event(h, monkeypatch):
    run = first_run(h)

    def crash(name):
        if name == "after_register":
            raise RuntimeError("power cut")

    monkeypatch.setattr(completion_module, "crashpoint", crash)
    h.succeed(run, best=0.9)
    assert h.runs()[0].state == "succeeded"  # registered in the registry, not yet in the ledger
    assert h.registry.find("birds", run.run_id).version == 1
    assert h.versions() == []
    monkeypatch.undo()
    h.worker.tick()
    h.worker.tick()
    assert h.runs()[0].outcome == "registered"
    assert [v.version for v in h.versions()] == [1]
    assert len([e for e in h.events() if e.type == ev.MODEL_REGISTERED]) == 1
    assert len(h.exporter.calls) == 2  # the export ran again; the registration did not


def test_a_crash_after_the_ledger_commit_is_repaired_by_the_alias_sync(h, monkeypatch):
    run = first_run(h)

    def crash(name):
        if name == "after_finalize":
            raise RuntimeError("power cut")

    monkeypatch.setattr(completion_module, "crashpoint", crash)
    h.succeed(run, best=0.9)
    assert h.head().champion_version == 1
    assert h.registry.champion_alias("birds") is None
    monkeypatch.undo()
    h.worker.tick()
    assert h.registry.champion_alias("birds") == 1


def test_two_completions_of_the_same_run_at_once_make_one_version_and_one_event(new_store, tmp_path):
    h = make_harness(tmp_path, store=new_store(), cooldown=0)
    run = first_run(h)
    h.worker.completer = None  # deliver "succeeded" without completing, then complete twice at once
    h.succeed(run, best=0.9)
    from worker.app.bootstrap import build_worker

    racers = [build_worker(h.worker.config, store=new_store(), backend=h.backend, clock=h.clock, publisher=h.publisher,
                           blobs={"birds": h.blobs}, registry=h.registry, exporter=h.exporter) for _ in range(2)]  # fmt: skip
    barrier, errors = threading.Barrier(2), []

    def race(worker):
        barrier.wait()
        try:
            worker.completer.complete(run.run_id)
        except Exception as error:  # reported below: the losing completion must not fail either
            errors.append(error)

    threads = [threading.Thread(target=race, args=(w,)) for w in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [v.version for v in h.versions()] == [1]
    assert len([e for e in h.events() if e.type == ev.MODEL_REGISTERED]) == 1
    assert h.head().champion_version == 1


def test_an_onnx_export_made_by_the_run_itself_is_used_when_it_matches(h):
    import hashlib
    import json as _json

    h.succeed(first_run(h), best=0.9)  # completed with the worker's own exporter
    assert len(h.exporter.calls) == 1
    run = second_run(h)
    outputs = h.root / "outputs" / run.backend_run_id
    outputs.mkdir(parents=True)
    weights, onnx = b"weights of run 2", b"onnx exported on the cluster"
    (outputs / "model.onnx").write_bytes(onnx)
    report = {"passed": True, "max_abs_diff": 1e-6, "tolerance": 1e-4, "opset": 17, "samples": 32}
    report.update(onnx_sha256=hashlib.sha256(onnx).hexdigest(), model_sha256=hashlib.sha256(weights).hexdigest())
    (outputs / "onnx_report.json").write_text(_json.dumps(report))
    h.succeed(run, best=0.95, baseline=0.9, model_bytes=weights)
    assert h.runs()[0].outcome == "registered"
    assert len(h.exporter.calls) == 1, "the worker did not export again"
    assert h.registry.card("birds", 2)["onnx"]["max_abs_diff"] == 1e-6


@pytest.mark.parametrize(
    ("figures", "why"),
    [
        (
            {"max_abs_diff": 5e-5, "samples": 32},
            "max |PyTorch - onnxruntime| 5e-05 > the configured tolerance 1e-06 (the run checked at 0.0001)",
        ),
        ({"max_abs_diff": float("nan"), "samples": 32}, "max |PyTorch - onnxruntime| nan > the configured tolerance 1e-06"),
        ({"max_abs_diff": 1e-7, "samples": 4}, "ONNX parity checked on 4 images; the gate asks for 20 (onnx_samples 20)"),
    ],
)
def test_a_runs_own_onnx_check_is_held_to_the_configured_gate_whatever_the_run_says(tmp_path, figures, why):
    """On Azure ML the run checks parity itself: its `passed` reflects the tolerance it was given,
    so completion compares the figures with gate.onnx_tolerance and gate.onnx_samples."""
    import hashlib
    import json as _json

    from tests.fakes.harness import make_harness

    h = make_harness(tmp_path, gate__onnx_tolerance=1e-6, gate__onnx_samples=20)
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    [run] = h.runs()
    outputs = h.root / "outputs" / run.backend_run_id
    outputs.mkdir(parents=True)
    weights, onnx = b"weights of run 1", b"onnx exported on the cluster"
    (outputs / "model.onnx").write_bytes(onnx)
    report = {"passed": True, "tolerance": 1e-4, "opset": 17, **figures}
    report.update(onnx_sha256=hashlib.sha256(onnx).hexdigest(), model_sha256=hashlib.sha256(weights).hexdigest())
    (outputs / "onnx_report.json").write_text(_json.dumps(report))
    h.succeed(run, best=0.95, model_bytes=weights, num_val=40)
    [done] = h.runs()
    assert done.outcome == "rejected"
    assert why in done.detail
    assert h.versions() == []


def test_an_onnx_export_for_another_model_file_is_ignored_and_redone(h):
    import json as _json

    run = first_run(h)
    outputs = h.root / "outputs" / run.backend_run_id
    outputs.mkdir(parents=True)
    (outputs / "model.onnx").write_bytes(b"stale")
    (outputs / "onnx_report.json").write_text(_json.dumps({"passed": True, "model_sha256": "0" * 64, "onnx_sha256": "1" * 64}))
    h.succeed(run, best=0.9)
    assert len(h.exporter.calls) == 1


def _during_registration(h, monkeypatch, change):
    """Run `change(tx)` in its own committed transaction while completion is registering files."""
    real = h.registry.register

    def register(*args, **kwargs):
        registered = real(*args, **kwargs)
        with h.store.transaction() as tx:
            change(tx)
            tx.commit()
        return registered

    monkeypatch.setattr(h.registry, "register", register)


def test_a_champion_moved_while_completing_is_not_overwritten_the_run_is_gated_again(h, monkeypatch):
    """The compare-and-swap on the champion: if it moved between the gate and the commit, this
    completion must not make its own model champion over it."""
    first = first_run(h)
    h.succeed(first, best=0.8)
    assert h.head().champion_version == 1
    second = second_run(h)

    def promote_elsewhere(tx):  # e.g. another instance finished completing a run and moved champion
        head = tx.model_head("birds")
        head.champion_version, head.champion_sha256 = 7, "f" * 64
        tx.save_model_head(head)

    _during_registration(h, monkeypatch, promote_elsewhere)
    h.succeed(second, best=0.95, baseline=0.8)
    assert h.head().champion_version == 7, "the concurrent champion stays"
    assert h.runs()[0].state == "succeeded", "left for the next tick to gate against the new champion"
    assert [v.version for v in h.versions()] == [1]


def test_a_run_finalized_by_another_completion_meanwhile_is_not_finalized_again(h, monkeypatch):
    """The state re-check: a completion that lost the race must change nothing."""
    run = first_run(h)

    def finalize_elsewhere(tx):  # another completion rejected it first
        current = tx.get_run(run.run_id)
        current.state, current.outcome, current.detail = "finalized", "rejected", "rejected by the other completion"
        tx.update_run(current)

    _during_registration(h, monkeypatch, finalize_elsewhere)
    h.succeed(run, best=0.9)
    final = h.runs()[0]
    assert (final.state, final.outcome) == ("finalized", "rejected")
    assert h.head().champion_version is None
    assert h.versions() == []
    assert not [e for e in h.events() if e.type == ev.MODEL_REGISTERED]


# -- what completion writes, word for word: events' data, details, decisions, the card, what is planned after --


SUMMARY = dict.fromkeys(completion_module.SUMMARY_KEYS)


def _events(h, kind: str) -> list[dict]:
    return [e.payload["data"] for e in h.events() if e.type == kind]


def test_a_rejection_records_exactly_its_event_detail_and_decision(h):
    h.succeed(first_run(h), best=0.8)
    run = second_run(h)
    h.succeed(run, best=0.7, baseline=0.8, num_train=9)
    final = h.runs()[0]
    reason = final.detail
    assert reason.startswith("best_val_acc 0.7000 does not beat champion v1")
    [data] = _events(h, ev.MODEL_REJECTED)
    gate = data.pop("gate")
    assert data == {
        "model": "birds",
        "run_id": run.run_id,
        "reason": reason,
        "champion_version": 1,
        "metrics": {**SUMMARY, "best_val_acc": 0.7, "baseline_val_acc": 0.8, "num_train": 9},
    }
    assert (gate["passed"], gate["reason"]) == (False, reason)
    [event] = [e for e in h.events() if e.type == ev.MODEL_REJECTED]
    assert event.payload["subject"] == f"runs/{run.run_id}"
    decision = next(d for d in h.decisions() if d.outcome == "rejected")
    assert (decision.reason, decision.run_id) == (f"{run.run_id} not registered: {reason}", run.run_id)


def test_a_reason_longer_than_2000_characters_is_cut_to_2000_in_the_detail_but_whole_in_the_event(h, monkeypatch):
    run = first_run(h)

    def export(*args, **kwargs):
        raise ExportError("x" * 3000)

    monkeypatch.setattr(h.exporter, "export", export)
    h.succeed(run, best=0.9)
    final = h.runs()[0]
    whole = "ONNX export failed: " + "x" * 3000
    assert (final.outcome, final.detail) == ("rejected", whole[:2000])
    assert _events(h, ev.MODEL_REJECTED)[0]["reason"] == whole


def test_a_rejection_that_lost_the_race_to_another_completion_changes_nothing(h, monkeypatch):
    """The state re-check on the rejection path: another completion finalized the run while this
    one was exporting; this one must not finalize it again or publish a second verdict."""
    run = first_run(h)
    real_export = h.exporter.export

    def export_while_another_completion_registers(*args, **kwargs):
        with h.store.transaction() as tx:
            current = tx.get_run(run.run_id)
            current.state, current.outcome, current.detail = "finalized", "registered", "registered by the other completion"
            tx.update_run(current)
            tx.commit()
        h.exporter.max_abs_diff = 5e-3  # this completion's verdict would be a rejection
        return real_export(*args, **kwargs)

    monkeypatch.setattr(h.exporter, "export", export_while_another_completion_registers)
    h.succeed(run, best=0.9)
    final = h.runs()[0]
    assert (final.outcome, final.detail) == ("registered", "registered by the other completion")
    assert _events(h, ev.MODEL_REJECTED) == []
    assert not [d for d in h.decisions() if d.outcome == "rejected"]


def test_images_that_arrived_during_a_rejected_run_are_planned_at_once_with_no_cooldown(h):
    run = first_run(h)
    h.uploads(4)
    h.clock.advance(11)
    h.exporter.max_abs_diff = 5e-3
    h.succeed(run, best=0.9)
    states = [(r.run_id == run.run_id, r.outcome if r.run_id == run.run_id else r.state) for r in h.runs()]
    assert (True, "rejected") in states
    follow_up = [r for r in h.runs() if r.run_id != run.run_id]
    assert len(follow_up) == 1
    assert follow_up[0].state in ("planned", "submitted", "running")
    assert len(h.manifest(follow_up[0])) == 20


@pytest.mark.fake_backend_outputs
def test_the_registered_card_and_event_read_exactly(h):
    run = first_run(h)
    h.succeed(run, best=0.82, num_val=4, torch_version="2.14.1+cpu")
    [version] = h.versions()
    card = h.registry.card("birds", 1)
    outputs = h.root / "outputs" / run.backend_run_id
    artifacts = {
        name: {"sha256": hashlib.sha256((outputs / name).read_bytes()).hexdigest(), "bytes": (outputs / name).stat().st_size}
        for name in ("model.pt", "model.onnx")
    }
    assert set(card) == {
        "run_id", "backend_run_id", "manifest", "parent_version", "trained_from_sha256", "metrics", "gate", "onnx", "artifacts", "config",
        "code_version", "registered_at", "model", "version",
    }  # fmt: skip
    assert card["trained_from_sha256"] is None  # a first model starts from scratch
    assert (card["model"], card["version"]) == ("birds", 1)  # added by the registry
    assert (card["run_id"], card["backend_run_id"], card["parent_version"]) == (run.run_id, run.backend_run_id, None)
    assert card["manifest"] == {"sha256": run.manifest_sha256, "images": 12, "new_images": 12, "classes": ["chicken", "turkey"]}
    assert card["metrics"] == {**SUMMARY, "best_val_acc": 0.82, "num_val": 4}
    assert card["onnx"] == {
        "opset": 17, "max_abs_diff": 3e-7, "tolerance": 1e-4, "argmax_agreement": None, "onnxruntime_version": None, "samples": 32,
    }  # fmt: skip
    assert card["artifacts"] == artifacts
    assert card["code_version"] == {"training_snapshot": completion_module.snapshot_version(), "torch": "2.14.1+cpu"}
    assert card["config"]["gate"] == h.worker.config.model("birds").gate.model_dump()
    assert card["registered_at"] == h.clock.now().isoformat()
    assert version.metrics == card["metrics"]
    assert version.location == str(h.root / "registry" / "birds" / "1")
    assert h.runs()[0].detail == f"registered as v1: {card['gate']['reason']}"
    [event] = [e for e in h.events() if e.type == ev.MODEL_REGISTERED]
    assert event.event_id == ev.event_id(ev.MODEL_REGISTERED, "models/birds/versions/1", run.run_id)  # the version's and the run's
    [data] = _events(h, ev.MODEL_REGISTERED)
    timings = data.pop("timings")
    assert set(timings) == {"export_s", "register_s"}
    assert all(isinstance(v, float) and v >= 0 and v == round(v, 3) for v in timings.values())  # seconds, to the millisecond
    assert data == {
        "model": "birds", "version": 1, "run_id": run.run_id, "champion": True, "parent_version": None, "metrics": card["metrics"],
        "gate": card["gate"], "manifest": card["manifest"], "onnx": card["onnx"], "artifacts": artifacts, "location": version.location,
    }  # fmt: skip
    decision = next(d for d in h.decisions() if d.outcome == "registered")
    assert (decision.reason, decision.run_id) == (f"v1 is champion: {card['gate']['reason']}", run.run_id)


def test_the_champion_history_keeps_the_last_20_champions_for_rollback(h):
    h.succeed(first_run(h), best=0.7)
    for i in range(1, 22):
        h.succeed(second_run(h), best=0.7 + 0.01 * i, baseline=0.7 + 0.01 * (i - 1))
    head = h.head()
    assert head.champion_version == 22
    assert head.previous_champions == list(range(2, 22))


def test_the_training_snapshot_version_is_the_digest_of_the_scripts_names_and_bytes(tmp_path, monkeypatch):
    (tmp_path / "train.py").write_text("print('train')\n")
    (tmp_path / "a.py").write_text("A = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    monkeypatch.setattr(completion_module, "training_dir", lambda: tmp_path)
    expected = hashlib.sha256(b"a.py" + b"A = 1\n" + b"train.py" + b"print('train')\n").hexdigest()[:16]
    assert completion_module.snapshot_version() == expected
    (tmp_path / "notes.txt").write_text("changed")
    assert completion_module.snapshot_version() == expected
    (tmp_path / "a.py").write_text("A = 2\n")
    assert completion_module.snapshot_version() != expected


def test_the_alias_repair_leaves_the_registry_alone_when_the_ledger_has_no_champion(h, monkeypatch):
    moved = []
    monkeypatch.setattr(h.registry, "set_champion", lambda model, version: moved.append((model, version)))
    monkeypatch.setattr(h.registry, "champion_alias", lambda model: 4)  # e.g. set by hand
    h.worker.completer.sync_champion_alias("birds")
    assert moved == []


def _capture_exports(h, monkeypatch) -> list[dict]:
    seen: list[dict] = []
    real = h.exporter.export

    def export(model_pt, out_dir, **kwargs):
        manifest = kwargs["manifest"]
        seen.append({**kwargs, "manifest_path": manifest, "manifest_bytes": manifest.read_bytes() if manifest.is_file() else None})
        return real(model_pt, out_dir, **kwargs)

    monkeypatch.setattr(h.exporter, "export", export)
    return seen


@pytest.mark.fake_backend_outputs
def test_parity_is_checked_on_the_runs_own_manifest_written_beside_the_outputs(h, monkeypatch):
    """A manifest store with no local files (Blob Storage): the manifest is written next to the outputs."""
    from worker.manifests import encode, load

    seen = _capture_exports(h, monkeypatch)
    monkeypatch.setattr(h.worker.completer.manifests, "local_path", lambda path: None)
    run = first_run(h)
    h.succeed(run, best=0.9)
    [call] = seen
    outputs = h.root / "outputs" / run.backend_run_id
    assert call["manifest_path"] == outputs / "manifest.json"
    assert call["manifest_bytes"] == encode(load(h.worker.manifests, run.manifest_sha256))
    assert call["data_dir"] == str(h.worker.config.images_dir("birds"))


def test_parity_reads_the_manifest_stores_own_file_when_it_has_one(h, monkeypatch):
    from worker.manifests import manifest_path

    seen = _capture_exports(h, monkeypatch)
    run = first_run(h)
    h.succeed(run, best=0.9)
    local = h.worker.manifests.local_path(manifest_path(run.manifest_sha256))
    assert seen[0]["manifest_path"] == local
    assert seen[0]["manifest_bytes"] == local.read_bytes()
    assert not (h.root / "outputs" / run.backend_run_id / "manifest.json").exists()


def test_a_runs_own_export_whose_onnx_file_changed_since_is_redone(h):
    run = first_run(h)
    outputs = h.root / "outputs" / run.backend_run_id
    outputs.mkdir(parents=True)
    weights = b"the weights the run trained"
    (outputs / "model.onnx").write_bytes(b"altered after the report was written")
    report = {"passed": True, "model_sha256": hashlib.sha256(weights).hexdigest(), "onnx_sha256": hashlib.sha256(b"original").hexdigest()}
    (outputs / "onnx_report.json").write_text(json.dumps(report))
    h.succeed(run, best=0.9, model_bytes=weights)
    assert len(h.exporter.calls) == 1, "the model matched but the ONNX file did not: exported again"


@pytest.mark.parametrize(
    ("gate", "metrics", "outcome"),
    [
        ({"gate__min_value": 0.95}, {"best": 0.9}, "rejected"),
        ({"gate__metric": "final_val_acc"}, {"best": 0.9, "final_val_acc": 0.5}, "rejected"),
        ({"gate__metric": "final_val_acc"}, {"best": 0.5, "final_val_acc": 0.9}, "registered"),
    ],
    ids=["configured-minimum", "configured-metric-low", "configured-metric-high"],
)
def test_the_gate_uses_the_models_configured_metric_and_minimum(tmp_path, gate, metrics, outcome):
    h = make_harness(tmp_path, cooldown=0, **gate)
    h.succeed(first_run(h), **metrics)
    assert h.runs()[0].outcome == outcome


def test_the_gate_uses_the_models_configured_margin(tmp_path):
    h = make_harness(tmp_path, cooldown=0, gate__min_improvement=0.05)
    h.succeed(first_run(h), best=0.8)
    h.succeed(second_run(h), best=0.84, baseline=0.8)
    assert h.runs()[0].outcome == "rejected"
    h.succeed(second_run(h), best=0.86, baseline=0.8)
    assert h.runs()[0].outcome == "registered"


def _outputs_then_report(h, run, change) -> str:
    """Finish the run with real-looking outputs, let `change(outputs)` spoil them, then report it;
    returns the rejection's detail."""
    h.succeed(run, best=0.9, report=False)
    change(h.root / "outputs" / run.backend_run_id)
    h.status(run.backend_run_id, "succeeded")
    final = h.runs()[0]
    assert final.outcome == "rejected"
    return final.detail


@pytest.mark.fake_backend_outputs
def test_unreadable_or_unverifiable_outputs_are_rejected_with_reasons_that_say_which(h):

    run = first_run(h)
    detail = _outputs_then_report(h, run, lambda out: (out / "metrics.json").write_text("{not json"))
    assert detail.startswith("metrics.json is unreadable: Expecting property name enclosed in double quotes")


@pytest.mark.fake_backend_outputs
@pytest.mark.parametrize(
    ("spoil", "expected"),
    [
        (lambda out, m: "[1, 2]", "metrics.json is not an object"),
        (
            lambda out, m: json.dumps({k: v for k, v in m.items() if k != "model_sha256"}),
            "metrics.json records no model_sha256, so model.pt cannot be verified",
        ),
        (
            lambda out, m: json.dumps({**m, "model_sha256": "ab" * 32}),
            "model.pt has sha256 {actual}..., but training recorded abababababab...",
        ),
        (
            lambda out, m: json.dumps({**m, "manifest_sha256": "cd" * 32}),
            "the run trained on manifest cdcdcdcdcdcd..., not its own {manifest}...",
        ),
    ],
    ids=["not-an-object", "no-digest", "other-digest", "other-manifest"],
)
def test_each_kind_of_bad_metrics_is_rejected_with_its_own_reason(h, spoil, expected):
    run = first_run(h)

    def change(out):
        metrics = json.loads((out / "metrics.json").read_text())
        (out / "metrics.json").write_text(spoil(out, metrics))

    detail = _outputs_then_report(h, run, change)
    actual = hashlib.sha256((h.root / "outputs" / run.backend_run_id / "model.pt").read_bytes()).hexdigest()[:12]
    assert detail == expected.format(actual=actual, manifest=run.manifest_sha256[:12])
    assert _events(h, ev.MODEL_REJECTED)[0]["reason"] == detail


def test_a_completion_commit_that_loses_a_race_is_redone_on_fresh_state(h, monkeypatch):
    waits = RetryClock(monkeypatch).waits
    run = first_run(h)
    h.worker.completer.store = CommitFaults(h.store, conflicts(3))
    h.succeed(run, best=0.9)
    assert (h.runs()[0].outcome, [v.version for v in h.versions()]) == ("registered", [1])
    assert len(_events(h, ev.MODEL_REGISTERED)) == 1
    assert len(waits) == 3
    assert all(0 <= w <= 0.5 for w in waits), "jittered, and never more than half a second"


def test_a_completion_that_loses_every_race_gives_up_after_20_attempts_with_the_conflict(h, monkeypatch):
    waits = RetryClock(monkeypatch).waits
    run = first_run(h)
    conflicting = CommitFaults(h.store, conflicts(10**6))
    h.worker.completer.store = conflicting
    h.succeed(run, best=0.9)  # the bus records the success; the completion then never commits
    assert conflicting.attempts == 20
    assert len(waits) == 19
    assert all(0 <= w <= 0.5 for w in waits), "jittered, never more than half a second"
    assert waits[0] <= 0.02, "a lost race is retried at once: the first wait is at most 20 ms"
    assert sum(waits) > 0, "but it does back off"
    [current] = h.runs()
    assert (current.state, current.completion_failures) == ("succeeded", 1), "left for the next tick to complete"
    assert current.detail.startswith("completion failed: ConcurrencyConflict: another writer committed first")


def test_a_first_model_is_registered_with_the_first_model_reason(h):
    h.succeed(first_run(h), best=0.82)
    assert h.runs()[0].detail == "registered as v1: first model: best_val_acc 0.8200 meets the minimum 0.6000"


def test_failed_parity_is_rejected_against_the_champion_with_the_measured_figures(h):
    h.succeed(first_run(h), best=0.8)
    run = second_run(h)
    h.exporter.max_abs_diff = 5e-3
    h.succeed(run, best=0.9, baseline=0.8)
    reason = "ONNX parity failed: max |PyTorch - onnxruntime| 5.00e-03 > tolerance 0.0001"
    assert h.runs()[0].detail == reason
    [data] = _events(h, ev.MODEL_REJECTED)
    assert (data["reason"], data["champion_version"]) == (reason, 1)
    assert data["gate"]["passed"] is True, "the gate passed; parity did not"


def test_a_parity_report_without_a_figure_says_nan(h, monkeypatch):
    from worker.ports import ExportResult

    def export(model_pt, out_dir, **kwargs):
        (out_dir / "model.onnx").write_bytes(b"onnx")
        return ExportResult(out_dir / "model.onnx", out_dir / "onnx_report.json", {"passed": False, "tolerance": 0.001})

    monkeypatch.setattr(h.exporter, "export", export)
    h.succeed(first_run(h), best=0.9)
    assert h.runs()[0].detail == "ONNX parity failed: max |PyTorch - onnxruntime| nan > tolerance 0.001"


@pytest.mark.parametrize("failure", ["export", "outputs"])
def test_every_rejection_names_the_champion_it_was_measured_against(h, monkeypatch, failure):
    h.succeed(first_run(h), best=0.8)
    run = second_run(h)
    if failure == "export":
        monkeypatch.setattr(h.exporter, "export", lambda *a, **k: (_ for _ in ()).throw(ExportError("opset 99 is unknown")))
        h.succeed(run, best=0.9, baseline=0.8)
        assert h.runs()[0].detail == "ONNX export failed: opset 99 is unknown"
        assert _events(h, ev.MODEL_REJECTED)[0]["gate"]["passed"] is True, "the gate passed; the export did not"
    else:
        h.succeed(run, best=0.9, baseline=0.8, manifest_sha256="e" * 64)
    assert _events(h, ev.MODEL_REJECTED)[0]["champion_version"] == 1


def test_the_export_time_is_measured_not_a_clock_reading(h):
    run = first_run(h)
    started = time.perf_counter()
    h.succeed(run, best=0.9)
    elapsed = time.perf_counter() - started
    [data] = _events(h, ev.MODEL_REGISTERED)
    assert 0 <= data["timings"]["export_s"] <= elapsed + 0.001
    assert 0 <= data["timings"]["register_s"] <= elapsed + 0.001


def test_completing_a_run_that_has_not_succeeded_or_does_not_exist_does_nothing(h):
    run = first_run(h)
    assert h.worker.completer.complete(run.run_id) == []
    assert h.worker.completer.complete("birds-9999-00000000") == []
    assert h.runs()[0].state == run.state
    assert h.versions() == []
    assert h.exporter.calls == []


@pytest.mark.fake_backend_outputs
def test_outputs_missing_their_files_are_rejected_naming_each(h):
    run = first_run(h)

    def remove(out):
        (out / "model.pt").unlink()
        (out / "metrics.json").unlink()

    assert _outputs_then_report(h, run, remove) == "the run's outputs lack model.pt, metrics.json"


def test_only_a_lost_race_is_retried_any_other_commit_error_fails_the_attempt_at_once(h, monkeypatch):
    RetryClock(monkeypatch)
    run = first_run(h)
    failing = CommitFaults(h.store, lambda n: OSError("disk full"))
    h.worker.completer.store = failing
    h.succeed(run, best=0.9)
    assert failing.attempts == 1, "not retried: only ConcurrencyConflict is"
    [current] = h.runs()
    assert (current.state, current.completion_failures) == ("succeeded", 1)
    assert current.detail == "completion failed: OSError: disk full"


@pytest.mark.parametrize("left", ["model.onnx", "onnx_report.json"])
def test_a_runs_own_export_missing_its_onnx_file_or_its_report_is_redone(h, left):
    run = first_run(h)
    outputs = h.root / "outputs" / run.backend_run_id
    outputs.mkdir(parents=True)
    weights = b"the weights the run trained"
    (outputs / left).write_text(json.dumps({"passed": True, "model_sha256": hashlib.sha256(weights).hexdigest()}))
    h.succeed(run, best=0.9, model_bytes=weights)
    assert len(h.exporter.calls) == 1, "half an export is no export: done again"
    assert h.runs()[0].outcome == "registered"
