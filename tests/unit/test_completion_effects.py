"""Completion's effects read exactly: the events' data, the run's detail, the decisions, the card,
what is planned after the run, and the re-checks on the rejection path (written against the
survivors of `make mutate` on worker/completion.py, docs/mutation.md)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from shared import events as ev
from tests.fakes.commit_faults import CommitFaults, RetryClock, conflicts
from tests.fakes.harness import make_harness
from worker import completion as completion_module
from worker.ports import ExportError

from .test_completion import first_run, second_run

pytestmark = pytest.mark.unit


@pytest.fixture
def h(store, tmp_path):
    return make_harness(tmp_path, store=store, cooldown=0)


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


def test_unreadable_or_unverifiable_outputs_are_rejected_with_reasons_that_say_which(h):

    run = first_run(h)
    detail = _outputs_then_report(h, run, lambda out: (out / "metrics.json").write_text("{not json"))
    assert detail.startswith("metrics.json is unreadable: Expecting property name enclosed in double quotes")


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
