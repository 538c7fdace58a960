"""The cost guard: max_gpu_hours_per_day, live and in the simulator."""

from __future__ import annotations

import datetime as dt

import pytest

from shared.messages import RetrainRequested
from tests.fakes.harness import make_harness
from worker.config import ModelConfig
from worker.policy import gpu_usage
from worker.simulate import Arrival, DurationModel, History, simulate
from worker.views import explain_view

pytestmark = pytest.mark.unit
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def test_usage_counts_the_last_24_hours_and_says_when_it_frees_up():
    hour = dt.timedelta(hours=1)
    runs = [(T0, T0 + hour), (T0 + 2 * hour, T0 + 3 * hour)]
    hours, frees = gpu_usage(runs, T0 + 4 * hour, 2, budget=3.0)
    assert hours == pytest.approx(4.0)
    assert frees == pytest.approx(T0 + 24 * hour + 0.5 * hour, abs=dt.timedelta(seconds=1))  # half of the first run has left the window
    assert gpu_usage(runs, T0 + 4 * hour, 2, budget=5.0) == (pytest.approx(4.0), None)  # under budget
    assert gpu_usage([(T0, None)], T0 + hour, 2, budget=1.0) == (pytest.approx(2.0), None)  # a run in flight: no known time


def test_the_live_policy_waits_over_budget_names_it_and_only_an_explicit_override_runs(tmp_path):
    h = make_harness(tmp_path, quiet_period=0, cooldown=0, max_gpu_hours_per_day=1.5)  # 2 processes per run
    h.uploads(10)
    [first] = h.runs()
    h.clock.advance(3600)  # an hour of 2 GPUs: 2 GPU-hours
    h.succeed(first)
    h.uploads(10)
    assert len(h.runs()) == 1
    reason = explain_view(h.store, h.worker.config, "birds")["birds"][0]["reason"]
    assert reason.startswith("GPU budget: 2.0 of 1.5 GPU-hours used in the last 24 h; it frees up at ")
    h.worker.handle(RetrainRequested(message_id="f1", model="birds", force=True))
    assert len(h.runs()) == 1
    assert "override_budget runs it now" in h.decisions()[0].reason
    h.worker.handle(RetrainRequested(message_id="f2", model="birds", force=True, override_budget=True))
    assert len(h.runs()) == 2


def test_the_budget_frees_up_a_day_later_and_the_run_starts_then(tmp_path):
    h = make_harness(tmp_path, quiet_period=0, cooldown=0, max_gpu_hours_per_day=1.5)
    h.uploads(10)
    [first] = h.runs()
    h.clock.advance(3600)
    h.succeed(first)
    h.uploads(10)
    h.clock.advance(23 * 3600)
    h.worker.tick()
    assert len(h.runs()) == 1  # 23 h later the whole run (2 GPU-hours) is still in the 24 h window
    h.clock.advance(3600)
    h.worker.tick()
    assert len(h.runs()) == 2


def test_the_simulator_honours_the_budget():
    arrivals = [Arrival(T0 + dt.timedelta(minutes=5 * i), f"{'a' if i % 2 else 'b'}/{i:05d}.jpg") for i in range(2000)]
    base = ModelConfig(min_new_images=20, quiet_period=0, max_wait=None, cooldown=0, min_per_class=1)
    free = simulate(History(arrivals=arrivals), base, durations=DurationModel("fixed", minutes=60), gpus_per_run=4)
    capped = simulate(History(arrivals=arrivals), base.model_copy(update={"max_gpu_hours_per_day": 24.0}), durations=DurationModel("fixed", minutes=60),
                      gpus_per_run=4)  # fmt: skip
    days = 2000 * 5 / 60 / 24
    assert free.gpu_hours > 24 * days
    assert capped.gpu_hours <= 24 * (days + 2)
    assert len(capped.runs) < len(free.runs)


def test_exactly_the_budget_is_over_it_and_runs_older_than_a_day_count_nothing():
    hour = dt.timedelta(hours=1)
    old = (T0 - 30 * hour, T0 - 26 * hour)  # ended more than 24 h before `now`
    runs = [old, (T0, T0 + hour), (T0 + 2 * hour, T0 + 3 * hour)]
    hours, frees = gpu_usage(runs, T0 + 4 * hour, 2, budget=4.0)
    assert hours == pytest.approx(4.0, abs=1e-9), "the old run adds nothing, not even a second"
    assert frees == pytest.approx(T0 + 24 * hour, abs=dt.timedelta(seconds=1)), "at the budget: wait until the first run starts leaving"


def test_an_azure_ml_run_counts_every_gpu_of_every_node_against_the_budget(tmp_path):
    """A 2-node x 4-GPU job for half an hour is 4 GPU-hours, whatever the model's local nproc."""
    from tests.fakes.adapters import FakeBlobStore, FakeClock, FakeOnnxExporter, RecordingPublisher
    from tests.fakes.backend import FakeTrainingBackend
    from tests.fakes.harness import Harness, small_config
    from tests.fakes.memory_store import MemoryStore
    from worker.adapters.local.registry import LocalModelRegistry
    from worker.app.bootstrap import build_worker
    from worker.config import load_config
    from worker.runs import snapshot_of

    local = small_config(tmp_path, training__nproc=3, max_gpu_hours_per_day=100)
    assert local.gpus_per_run("birds") == 3
    cfg = local.model_copy(update={
        "worker": local.worker.model_copy(update={"backend": "azureml"}),
        "azureml": load_config(None, env={"RETRAIN__AZUREML__NODE_COUNT": "2", "RETRAIN__AZUREML__GPUS_PER_NODE": "4"}).azureml,
    })  # fmt: skip
    assert cfg.gpus_per_run("birds") == 8
    store, backend, clock = MemoryStore(), FakeTrainingBackend(), FakeClock()
    blobs, registry = FakeBlobStore(), LocalModelRegistry(tmp_path / "registry")
    worker = build_worker(cfg, store=store, backend=backend, clock=clock, publisher=RecordingPublisher(), blobs={"birds": blobs},
                          registry=registry, exporter=FakeOnnxExporter())  # fmt: skip
    h = Harness(worker=worker, store=store, backend=backend, clock=clock, publisher=worker.publisher, blobs=blobs,
                exporter=FakeOnnxExporter(), registry=registry, root=tmp_path)  # fmt: skip
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    [run] = h.runs()
    h.clock.advance(1800)
    h.succeed(run)
    with store.read() as tx:
        assert snapshot_of(tx, "birds", cfg, clock.now()).gpu_hours_24h == 4.0


def test_the_simulator_runs_a_forced_request_that_overrides_the_budget_at_once_and_makes_one_that_does_not_wait():
    from worker.simulate import Request

    arrivals = [Arrival(T0 + dt.timedelta(seconds=i), f"{'a' if i % 2 else 'b'}/{i:05d}.jpg") for i in range(40)]
    cfg = ModelConfig(min_new_images=20, quiet_period=0, max_wait=None, cooldown=0, min_per_class=1, max_gpu_hours_per_day=1.0)
    at = T0 + dt.timedelta(hours=2)  # the first run (1 h x 4 GPUs) used the day's budget

    def second_run_start(override: bool) -> dt.datetime:
        history = History(arrivals=arrivals, requests=[Request(at, "req-1", "ops", override)])
        result = simulate(history, cfg, durations=DurationModel("fixed", minutes=60), gpus_per_run=4, until=T0 + dt.timedelta(days=2))
        assert len(result.runs) >= 2
        return result.runs[1].planned_at

    assert second_run_start(True) - at < dt.timedelta(minutes=2)
    assert second_run_start(False) - at > dt.timedelta(hours=20)


def test_the_simulator_finds_an_overriding_request_behind_one_that_does_not_override():
    from worker.simulate import Request

    arrivals = [Arrival(T0 + dt.timedelta(seconds=i), f"{'a' if i % 2 else 'b'}/{i:05d}.jpg") for i in range(40)]
    cfg = ModelConfig(min_new_images=20, quiet_period=0, max_wait=None, cooldown=0, min_per_class=1, max_gpu_hours_per_day=1.0)
    waiting, overriding = T0 + dt.timedelta(hours=2), T0 + dt.timedelta(hours=3)
    history = History(arrivals=arrivals, requests=[Request(waiting, "req-wait", "ops", False), Request(overriding, "req-now", "ops", True)])
    result = simulate(history, cfg, durations=DurationModel("fixed", minutes=60), gpus_per_run=4, until=T0 + dt.timedelta(days=2))
    assert result.runs[1].planned_at - overriding < dt.timedelta(minutes=2)
