"""`retrain simulate` replays history through the real policy: the runs the worker planned, a pause
and the forced request it refused, and a run still in flight when the record ends."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from shared.messages import ImageUploaded, ModelControl, RetrainRequested
from tests.fakes.harness import make_harness
from worker.simulate import Arrival, DurationModel, History, RecordedRun, Request, history_lines, ledger_history, read_history, simulate

pytestmark = pytest.mark.unit

TICK = 5  # seconds between the worker's ticks, in the recorded history and in the replay


def produce_history(tmp_path):
    """The worker itself, ticking every TICK seconds through uploads in bursts, a forced request, a
    failed run, a pause with a forced request refused during it, and a last run still in flight
    when the record ends: quiet periods, max waits and cooldowns all decide something along the way."""
    h = make_harness(tmp_path, quiet_period=20, max_wait=120, cooldown=60, max_attempts=1, min_new_images=8, min_per_class=2)
    start = h.clock.now()
    uploads: dict[int, list[str]] = {}
    n = 0
    for burst_at, count in [(0, 10), (40, 3), (300, 12), (330, 2), (700, 4), (1030, 8), (1200, 9), (1500, 1), (2250, 10)]:
        for i in range(count):
            uploads.setdefault(burst_at + 2 * i, []).append(f"{'chicken' if (n + i) % 2 else 'turkey'}/{n + i:04d}.jpg")
        n += count
    forced_at, durations, fail_index = 900, [150, 200, 90, 240, 120, 100], 2
    finishing: dict[str, int] = {}
    for second in range(0, 2400):
        now = start + dt.timedelta(seconds=second)
        h.clock.current = now
        for path in uploads.get(second, []):
            h.worker.handle(ImageUploaded.of("birds", path, "e1", 100))
        if second == forced_at:
            h.worker.handle(RetrainRequested(message_id="force-1", model="birds", force=True, requested_by="ops"))
        if second == 1000:
            h.worker.handle(ModelControl(message_id="pause-1", model="birds", action="pause", requested_by="ops", reason="labels audit"))
        if second == 1060:  # refused: the model is paused
            h.worker.handle(RetrainRequested(message_id="force-2", model="birds", force=True, requested_by="ops"))
        if second == 1100:
            h.worker.handle(ModelControl(message_id="resume-1", model="birds", action="resume", requested_by="ops"))
        for run in h.runs():
            if run.in_flight and run.run_id not in finishing:
                index = len(finishing)
                # the run planned after the last burst outlives the record
                finishing[run.run_id] = second + (10_000 if second > 2250 else durations[index % len(durations)])
            if run.in_flight and finishing.get(run.run_id) == second:
                if list(finishing).index(run.run_id) == fail_index:
                    h.status(run.backend_run_id, "failed", detail="out of memory")
                else:
                    h.succeed(run)
        if second % TICK == 0:
            h.worker.tick()
    return h


def test_replaying_the_live_configuration_reproduces_the_runs_the_worker_planned(tmp_path):
    h = produce_history(tmp_path)
    real = sorted(h.runs(), key=lambda r: r.seq)
    assert len(real) >= 5
    assert any(r.outcome == "failed" for r in real)
    assert any(r.request_ids == ["force-1"] for r in real)
    assert not any("force-2" in r.request_ids for r in real)  # refused during the pause
    assert real[-1].in_flight  # the record ends with a run going
    history = ledger_history(h.store, "birds")
    assert [c.action for c in history.controls] == ["pause", "resume"]
    assert history.observed_until is not None
    cfg = h.worker.config.model("birds")
    result = simulate(history, cfg, tick_seconds=TICK, durations=DurationModel("recorded", history.runs), gpus_per_run=2, keep_paths=True)
    assert len(result.runs) == len(real)
    for simulated, run in zip(result.runs, real, strict=True):
        assert abs((simulated.planned_at - run.created_at).total_seconds()) <= TICK, (simulated.reason, run.reason)
        assert simulated.paths == sorted(i["path"] for i in h.manifest(run))
        assert simulated.new_images == run.new_image_count
    assert result.runs[[r.request_ids for r in result.runs].index(["force-1"])] is not None
    assert not any("force-2" in r.request_ids for r in result.runs)
    assert [r.outcome for r in result.runs][-1] == "in flight"
    summary = result.summary()
    assert summary["in_flight_at_end"] == 1
    assert summary["images_never_trained"] >= 10  # the last burst: its run had not finished


def test_the_replay_stops_where_the_record_ends_not_at_the_last_arrival(tmp_path):
    """The worker waits out a quiet period after the last image and then trains: a replay that
    stopped at the last arrival planned one run too few (the demo: 2 real runs, 1 replayed)."""
    h = make_harness(tmp_path, quiet_period=60, max_wait=3600, cooldown=0, min_new_images=8, min_per_class=1)
    for _ in range(2):
        h.uploads(6)
        for _ in range(14):
            h.clock.advance(5)
            h.worker.tick()
        h.succeed(next(r for r in h.runs() if r.in_flight))
    assert len(h.runs()) == 2
    history = ledger_history(h.store, "birds")
    result = simulate(history, h.worker.config.model("birds"), tick_seconds=5, durations=DurationModel("recorded", history.runs))
    assert len(result.runs) == 2
    assert result.summary()["warnings"] == []


def test_a_higher_threshold_makes_fewer_bigger_runs_and_reports_staleness(tmp_path):
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    arrivals = [Arrival(start + dt.timedelta(minutes=10 * i), f"{'chicken' if i % 2 else 'turkey'}/{i:05d}.jpg") for i in range(600)]
    history = History(arrivals=arrivals)
    from worker.config import ModelConfig

    base = ModelConfig(quiet_period=0, max_wait=None, cooldown=0, min_per_class=1)
    results = [simulate(history, base.model_copy(update={"min_new_images": n}), durations=DurationModel("fixed", minutes=30), label=f"min_new_images={n}")
               for n in (10, 50)]  # fmt: skip
    small, big = (r.summary() for r in results)
    assert small["runs"] > big["runs"] > 0
    assert small["gpu_hours"] == pytest.approx(small["runs"] * 0.5)
    assert small["staleness_hours"]["median"] < big["staleness_hours"]["median"]
    assert 0 < small["staleness_hours"]["median"] <= small["staleness_hours"]["p95"] <= small["staleness_hours"]["max"]


def test_the_history_file_round_trips_and_bad_lines_say_where(tmp_path):
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    history = History(
        arrivals=[Arrival(start, "chicken/a.jpg", "e1")],
        requests=[Request(start + dt.timedelta(hours=1), "r1", "ops", True)],
        runs=[RecordedRun(start, start + dt.timedelta(minutes=20), 1, "failed")],
    )
    again = read_history(list(history_lines(history)))
    assert again == history
    with pytest.raises(ValueError, match="line 2: unknown type 'deletion'"):
        read_history([json.dumps({"type": "arrival", "at": "2026-01-01T00:00:00Z", "path": "a/b.jpg"}), '{"type": "deletion"}'])


@pytest.mark.parametrize("seed", range(6))
def test_skipping_arrivals_the_policy_can_only_wait_on_changes_nothing(seed):
    import random

    from worker.config import ModelConfig

    rng = random.Random(seed)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    seconds = sorted(rng.uniform(0, 5 * 86400) ** 1.0 for _ in range(400))
    arrivals = [Arrival(start + dt.timedelta(seconds=s), f"{rng.choice(['a', 'b', 'c'])}/{i:04d}.jpg") for i, s in enumerate(seconds)]
    requests = [Request(start + dt.timedelta(seconds=rng.uniform(0, 5 * 86400)), f"r{i}") for i in range(3)]
    history = History(arrivals=arrivals, requests=sorted(requests, key=lambda r: r.at))
    cfg = ModelConfig(min_new_images=rng.choice([5, 20, 60]), quiet_period=rng.choice([0, 600, 3600]), max_wait=rng.choice([None, 1800, 7200]),
                      cooldown=rng.choice([0, 900]), min_per_class=2, in_flight=rng.choice(["coalesce", "queue", "drop"]))  # fmt: skip
    durations = DurationModel("fixed", minutes=rng.choice([10, 90]))
    fast = simulate(history, cfg, tick_seconds=60, durations=durations)
    exact = simulate(history, cfg, tick_seconds=60, durations=durations, every_arrival=True)
    assert [(r.planned_at, r.images, r.reason) for r in fast.runs] == [(r.planned_at, r.images, r.reason) for r in exact.runs]


def _history_file(tmp_path, n=300):
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    history = History(
        arrivals=[Arrival(start + dt.timedelta(minutes=7 * i), f"{'chicken' if i % 2 else 'turkey'}/{i:05d}.jpg") for i in range(n)]
    )
    path = tmp_path / "history.jsonl"
    path.write_text("\n".join(history_lines(history)) + "\n")
    return path


def test_the_command_compares_a_grid_side_by_side_and_gives_the_same_numbers_as_json(tmp_path):
    from typer.testing import CliRunner

    from worker.app.cli import app

    env = {"RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"), "RETRAIN_CONFIG": ""}
    path = _history_file(tmp_path)
    args = ["simulate", "birds", "--events", str(path), "--grid", "min_new_images=10,50", "--set", "quiet_period=0", "--set", "max_wait=none",
            "--run-minutes", "20"]  # fmt: skip
    text = CliRunner().invoke(app, args, env=env)
    assert text.exit_code == 0, text.output
    assert "min_new_images=10" in text.output
    assert "min_new_images=50" in text.output
    assert "staleness median (h)" in text.output
    assert "GPU-hours" in text.output
    report = json.loads(CliRunner().invoke(app, [*args, "--json"], env=env).output)
    ten, fifty = report["results"]
    assert (ten["config"], fifty["config"]) == (
        "quiet_period=0, max_wait=none, min_new_images=10",
        "quiet_period=0, max_wait=none, min_new_images=50",
    )
    assert ten["runs"] > fifty["runs"] > 0
    assert ten["gpu_hours"] == pytest.approx(ten["runs"] * 20 / 60 * 2, abs=0.01)  # 2 processes per local run
    assert len(ten["simulated_runs"]) == ten["runs"]
    assert str(ten["runs"]) in text.output


def test_bad_settings_are_refused_with_what_is_wrong(tmp_path):
    from typer.testing import CliRunner

    from worker.app.cli import app

    env = {"RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"), "RETRAIN_CONFIG": ""}
    path = _history_file(tmp_path, 10)
    for args, words in [(["--set", "min_new_images=-1"], "min_new_images"), (["--set", "colour=blue"], "unknown setting 'colour'"),
                        (["--grid", "min_new_images"], "expected KEY=VALUE")]:  # fmt: skip
        result = CliRunner().invoke(app, ["simulate", "birds", "--events", str(path), *args], env=env)
        assert result.exit_code == 2
        assert words in result.output


def test_export_writes_the_ledgers_history_in_the_documented_format(tmp_path):
    h = produce_history(tmp_path)
    from typer.testing import CliRunner

    from worker.adapters.local.sqlite_store import SqliteStore
    from worker.app.cli import app

    history = ledger_history(h.store, "birds")
    path = tmp_path / "export.jsonl"
    path.write_text("\n".join(history_lines(history)) + "\n")
    assert read_history(path.read_text().splitlines()) == history
    assert {json.loads(line)["type"] for line in path.read_text().splitlines()} == {"arrival", "request", "run", "pause", "resume", "end"}
    # The command reads the ledger the configuration names.
    env = {"RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state2"), "RETRAIN_CONFIG": ""}
    SqliteStore(tmp_path / "state2" / "ledger.db").close()
    out = CliRunner().invoke(app, ["simulate", "birds", "--export", "-"], env=env)
    assert (out.exit_code, out.output) == (0, "")


HOSTILE_LINES = [
    ('{"type": "arrival", "at": NaN, "path": "chicken/a.jpg"}', "NaN"),
    ('{"type": "arrival", "at": null, "path": "chicken/a.jpg"}', "a time is an ISO 8601 string"),
    ('{"type": "arrival", "at": 1700000000, "path": "chicken/a.jpg"}', "a time is an ISO 8601 string"),
    ('{"type": "arrival", "at": "9999-12-31T23:59:59+00:00", "path": "chicken/a.jpg"}', "outside 1970-2199"),
    ('{"type": "run", "planned_at": "2026-01-01T00:00:00+00:00", "images": 1e400}', ""),
    ('{"type": "run", "planned_at": "2026-01-01T00:00:00+00:00", "images": 10000000000}', "images is a whole number"),
    ('{"type": "arrival", "at": "2026-01-01T00:00:00+00:00", "path": "' + "[" * 0 + '\\ud800"}', ""),
    ('{"type": "request", "at": "2026-01-01T00:00:00+00:00", "x": ' + "[" * 5000 + "]" * 5000 + "}", ""),
    ('{"type": "arrival", "at": "2026-01-01T00:00:00+00:00", "path": ["not", "a", "string"]}', "path is a string"),
    ("[1, 2]", ""),
]


@pytest.mark.parametrize(("line", "words"), HOSTILE_LINES, ids=[f"line{i}" for i in range(len(HOSTILE_LINES))])
def test_a_hostile_history_line_is_refused_with_its_line_number_never_a_traceback(tmp_path, line, words):
    from worker.simulate import load_history

    path = tmp_path / "history.jsonl"
    path.write_text('{"type": "arrival", "at": "2026-01-01T00:00:00+00:00", "path": "chicken/ok.jpg"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"^line 2: ") as caught:
        load_history(path)
    assert words in str(caught.value)


@pytest.mark.parametrize("source", ["/dev/zero", "fifo"])
def test_a_history_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path, source):
    import os

    from worker.simulate import load_history

    if source == "fifo":
        source = str(tmp_path / "fifo")
        os.mkfifo(source)
    with pytest.raises(ValueError, match="not a regular file"):
        load_history(Path(source))


def test_a_history_line_without_an_end_is_refused_after_its_limit(tmp_path):
    from worker.simulate import MAX_LINE_BYTES, load_history

    path = tmp_path / "history.jsonl"
    path.write_text("x" * (MAX_LINE_BYTES * 3))
    with pytest.raises(ValueError, match=f"line 1: longer than {MAX_LINE_BYTES} bytes"):
        load_history(path)


@pytest.mark.parametrize(("args", "words"), [
    (["--tick", "0"], "--tick is the seconds between ticks"), (["--tick", "nan"], "--tick"), (["--tick", "inf"], "--tick"),
    (["--grid", "min_new_images=,,"], "needs at least one value"), (["--run-minutes", "-5"], "--run-minutes"),
])  # fmt: skip
def test_absurd_simulate_options_are_one_line_errors(tmp_path, args, words):
    from typer.testing import CliRunner

    from worker.app.cli import app

    history = tmp_path / "history.jsonl"
    history.write_text('{"type": "arrival", "at": "2026-01-01T00:00:00+00:00", "path": "chicken/ok.jpg"}\n')
    env = {
        "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"),
        "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"),
        "RETRAIN_CONFIG": "",
    }
    result = CliRunner().invoke(app, ["simulate", "birds", "--events", str(history), *args], env=env)
    assert result.exit_code == 2, result.output
    assert words in result.output
    assert "Traceback" not in result.output
