"""One image, followed: its upload, the decision, the submission, the completion and the published
events are one trace, and the events carry its traceparent."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import events as ev
from tests.fakes.harness import make_harness
from worker import telemetry

pytestmark = pytest.mark.unit


@pytest.fixture
def exported():
    spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry.use_providers(tracer_provider, MeterProvider(metric_readers=[reader]))
    yield spans, reader
    telemetry.use_providers()


def _metrics(reader) -> dict[str, list]:
    found: dict[str, list] = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


def _units(reader) -> dict[str, str]:
    return {
        metric.name: metric.unit
        for resource in reader.get_metrics_data().resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    }


def test_one_image_is_one_trace_from_upload_to_the_registered_event(tmp_path, exported):
    spans, reader = exported
    h = make_harness(tmp_path, quiet_period=0)
    h.uploads(10)
    [run] = h.runs()
    assert run.traceparent is not None
    trace_id = run.traceparent.split("-")[1]
    assert h.backend.specs[run.backend_run_id].tags["traceparent"] == run.traceparent  # the run's tags carry it too
    h.succeed(run)
    h.worker.relay()
    finished = spans.get_finished_spans()
    in_trace = {s.name for s in finished if f"{s.context.trace_id:032x}" == trace_id}
    assert {"retrain.receive image.uploaded", "retrain.decide", "retrain.submit", "retrain.complete", "retrain.publish"} <= in_trace
    decides = [dict(s.attributes) for s in finished if s.name == "retrain.decide"]
    assert {"model": "birds", "retrain.outcome": "submit"} in decides
    assert {d["retrain.outcome"] for d in decides} >= {"wait", "submit"}
    complete = next(s for s in finished if s.name == "retrain.complete")
    assert (complete.attributes["model"], complete.attributes["run_id"]) == ("birds", run.run_id)
    status_receive = next(s for s in finished if s.name == "retrain.receive run.status_changed")
    assert [link.context.span_id for link in complete.links] == [status_receive.context.span_id]  # what reported the end
    registered = next(e for e in h.events() if e.type == ev.MODEL_REGISTERED)
    assert registered.payload["traceparent"].split("-")[1] == trace_id
    published = [s for s in finished if s.name == "retrain.publish" and s.attributes["event_type"] == ev.MODEL_REGISTERED]
    assert [f"{s.context.trace_id:032x}" for s in published] == [trace_id]
    points = _metrics(reader)
    assert [(p.attributes["outcome"], p.value) for p in points["retrain.runs"]] == [("registered", 1)]
    assert [(p.count, p.attributes["model"]) for p in points["retrain.image_to_champion.seconds"]] == [(1, "birds")]
    assert _units(reader)["retrain.image_to_champion.seconds"] == "s"
    assert any(p.attributes["model"] == "birds" for p in points["retrain.pending.images"])


@pytest.mark.parametrize("permanent", [False, True])
def test_submit_errors_are_counted_by_model_and_kind(tmp_path, exported, permanent):
    from worker.ports import PermanentBackendError

    _, reader = exported
    h = make_harness(tmp_path, quiet_period=0)
    h.backend.fail_next_submit(PermanentBackendError("403: no access") if permanent else ConnectionError("backend down"))
    h.uploads(10)
    assert [(p.attributes, p.value) for p in _metrics(reader)["retrain.submit.errors"]] == [({"model": "birds", "permanent": permanent}, 1)]


def test_a_retried_attempt_is_submitted_in_its_runs_trace_with_the_attempt(tmp_path, exported):
    """The retry is submitted by a later tick, outside the span that planned the run: its submit
    span joins the run's trace through the recorded traceparent."""
    spans, _ = exported
    h = make_harness(tmp_path, quiet_period=0, max_attempts=2, retry_backoff=5)
    h.uploads(10)
    [run] = h.runs()
    h.status(run.backend_run_id, "failed")
    h.clock.advance(5)
    h.worker.tick()
    submits = [s for s in spans.get_finished_spans() if s.name == "retrain.submit"]
    assert [dict(s.attributes) for s in submits] == [{"model": "birds", "run_id": run.run_id, "attempt": a} for a in (1, 2)]
    assert {f"{s.context.trace_id:032x}" for s in submits} == {run.traceparent.split("-")[1]}


def test_events_outside_any_span_carry_no_traceparent():
    event = ev.new_event(ev.RUN_FAILED, "runs/x", {}, time=__import__("datetime").datetime(2026, 1, 1, tzinfo=__import__("datetime").UTC))
    assert "traceparent" not in event.to_json_dict()


def test_failed_runs_are_counted_by_their_outcome(tmp_path, exported):
    _, reader = exported
    h = make_harness(tmp_path, quiet_period=0, max_attempts=1)
    h.uploads(10)
    [run] = h.runs()
    h.status(run.backend_run_id, "failed")
    assert [(p.attributes["model"], p.attributes["outcome"], p.value) for p in _metrics(reader)["retrain.runs"]] == [("birds", "failed", 1)]


def test_rejected_runs_are_counted_by_model_and_outcome(tmp_path, exported):
    _, reader = exported
    h = make_harness(tmp_path, quiet_period=0)
    h.uploads(10)
    h.succeed(h.runs()[0], best=0.1)  # below the gate's minimum
    assert [(p.attributes["model"], p.attributes["outcome"], p.value) for p in _metrics(reader)["retrain.runs"]] == [
        ("birds", "rejected", 1)
    ]


def test_registered_runs_are_counted_by_model(tmp_path, exported):
    _, reader = exported
    h = make_harness(tmp_path, quiet_period=0)
    h.uploads(10)
    h.succeed(h.runs()[0], best=0.9)
    assert [(p.attributes["model"], p.attributes["outcome"], p.value) for p in _metrics(reader)["retrain.runs"]] == [
        ("birds", "registered", 1)
    ]


def test_a_relay_is_one_batch_span_and_each_event_a_mark_with_its_id(tmp_path, exported):
    spans, _ = exported
    h = make_harness(tmp_path, quiet_period=0)
    for i in range(3):
        h.worker.reject(f"m-{i}", "birds", "invalid", "x", "test")
    h.worker.relay()
    finished = spans.get_finished_spans()
    assert [s.attributes["events"] for s in finished if s.name == "retrain.publish.batch"] == [3]
    marks = [s for s in finished if s.name == "retrain.publish"]
    assert sorted(s.attributes["event_id"] for s in marks) == sorted(e.event_id for e in h.events())
    assert {s.attributes["event_type"] for s in marks} == {ev.REQUEST_REJECTED}


def test_each_received_message_is_a_span_with_its_model_id_and_outcome(tmp_path, exported):
    spans, _ = exported
    h = make_harness(tmp_path, quiet_period=0)
    h.worker.reject("bad-1", "birds", "invalid", "x", "test")
    h.upload("chicken", name="chicken/1.jpg")
    h.worker.tick()
    finished = spans.get_finished_spans()
    upload = next(s for s in finished if s.name == "retrain.receive image.uploaded")
    assert upload.attributes["model"] == "birds"
    assert upload.attributes["message_id"].startswith("img-")
    assert upload.attributes["retrain.outcome"] == "ok"
    every_model = [s for s in finished if s.name == "retrain.receive tick" and s.attributes["model"] == ""]
    assert len(every_model) == 1, "a tick for every model names none"
    one_model = [s for s in finished if s.name == "retrain.receive tick" and s.attributes["model"] == "birds"]
    assert one_model[0].attributes["message_id"] == every_model[0].attributes["message_id"] + ".birds"


@pytest.mark.parametrize("flags", ["01", "00"])
def test_a_span_continuing_a_recorded_trace_keeps_its_trace_id_and_its_sampling_flag(exported, flags):
    """A traceparent is version-trace-span-flags: the run's spans and events continue the trace the
    run recorded, sampled or not as it was (an unsampled trace must not come back sampled)."""
    trace_id, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with telemetry.span("retrain.submit", parent=f"00-{trace_id}-{parent_span}-{flags}"):
        current = telemetry.current_traceparent()
    assert current is not None
    version, trace, span_id, got_flags = current.split("-")
    assert (version, trace, got_flags) == ("00", trace_id, flags)
    assert span_id != parent_span  # a child span of its own
    assert len(span_id) == 16
