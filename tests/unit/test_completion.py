"""Completion: gate, ONNX parity, registry, champion alias, events; idempotent under redelivery and crashes."""

import threading

import pytest

from shared import events as ev
from tests.fakes.harness import make_harness
from worker import completion as completion_module

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
