"""The console's pages without a browser: routing, escaping, the collapsed timeline, what a run page
reads from a run's metrics.json (and refuses), its cost, and the charts' axes."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.messages import ModelControl
from tests.fakes.harness import make_harness
from worker.app.charts import Series, line_chart, nice_ticks
from worker.app.dashboard import CSP, REFRESH_SCRIPT, SCRIPT_HASH, e, link, respond
from worker.app.dashboard_data import CURVE_POINTS, METRICS_BYTES, collapse_decisions, run_page

pytestmark = pytest.mark.unit


@pytest.fixture
def h(tmp_path):
    """One registered run that took two hours on two local processes, and one rejected run."""
    h = make_harness(tmp_path, cooldown=0)
    h.uploads(6)
    h.clock.advance(40)
    h.worker.tick()
    h.clock.advance(7200)
    h.succeed(h.runs()[0], best=0.8, history=[{"epoch": 1, "val_acc": 0.8, "train_loss": 0.5}], class_names=["chicken", "turkey"],
              confusion_matrix=[[3, 1], [0, 4]], best_epoch=1)  # fmt: skip
    return h


def page(h, **query):
    return respond({k: str(v) for k, v in query.items()}, h.store, h.worker.config, h.worker.manifests)


def test_every_page_answers_and_bad_addresses_get_a_status_not_a_traceback(h):
    run_id = h.runs()[0].run_id
    assert page(h)[0] == 200
    assert page(h, model="birds")[0] == 200
    assert page(h, run=run_id)[0] == 200
    for which in ("all", "added", "removed"):
        assert page(h, run=run_id, images=which)[0] == 200
    assert page(h, run="birds-9999-00000000")[0] == 404
    assert page(h, model="cats")[0] == 404
    assert page(h, run=run_id, images="everything")[0] == 400
    assert page(h, images="all")[0] == 400  # images of which run?
    assert page(h, sort="name")[0] == 400
    status, kind, body = page(h, run="nope", format="json")
    assert (status, kind, json.loads(body)) == (404, "application/json", {"error": "no run 'nope' in the ledger"})
    status, kind, body = page(h, run=run_id, format="json")
    data = json.loads(body)
    assert (status, data["page"], data["run"]["run_id"], data["verdict"]["verdict"]) == (200, "run", run_id, "registered")


def test_a_hostile_id_in_the_address_comes_back_as_text_and_links_are_quoted():
    assert link('"><script>x', run='"><script>x&model=y') == (
        '<a href="?run=%22%3E%3Cscript%3Ex%26model%3Dy">&quot;&gt;&lt;script&gt;x</a>'
    )
    assert e("\u202e<b>") == "\\u202e&lt;b&gt;"


def test_a_hostile_id_in_the_address_of_a_404_stays_text(h):
    _, _, body = page(h, run="<img src=x onerror=alert(1)>\u202e")
    assert "<img" not in body
    assert "&lt;img src=x onerror=alert(1)&gt;\\u202e" in body


def test_the_refresh_script_is_the_only_script_and_its_hash_is_in_the_policy(h):
    import base64
    import hashlib

    _, _, body = page(h)
    assert body.count("<script>") == 1
    assert f"<script>{REFRESH_SCRIPT}</script>" in body
    assert base64.b64encode(hashlib.sha256(REFRESH_SCRIPT.encode()).digest()).decode() == SCRIPT_HASH
    assert f"script-src 'sha256-{SCRIPT_HASH}'" in CSP
    assert "connect-src 'self'" in CSP
    assert "default-src 'none'" in CSP
    assert "innerHTML" not in REFRESH_SCRIPT
    assert "eval" not in REFRESH_SCRIPT


def _d(outcome, reason, at, run_id=None):
    return {"outcome": outcome, "reason": reason, "at": at, "run_id": run_id, "message_id": None}


def test_consecutive_decisions_of_one_kind_are_one_row_with_a_count_and_the_span():
    newest_first = [
        _d("wait", "waiting: 5/6 new images", "t9"),
        _d("wait", "waiting: 4/6 new images", "t8"),
        _d("wait", "waiting: 3/6 new images", "t7"),
        _d("submit", "6/6 new images", "t6", run_id="birds-0002-aa"),
        _d("wait", "run birds-0001-bb in flight", "t5", run_id=None),
        _d("wait", "cooldown after the last run until 12:00:00", "t4"),
        _d("wait", "cooldown after the last run until 12:01:00", "t3"),
        _d("rejected", "birds-0001 not registered", "t2", run_id="birds-0001-bb"),
        _d("rejected", "birds-0000 not registered", "t1", run_id="birds-0000-cc"),
    ]
    rows = collapse_decisions(newest_first)
    assert [(r["outcome"], r["count"], r["at"], r["first_at"]) for r in rows] == [
        ("wait", 3, "t9", "t7"),
        ("submit", 1, "t6", "t6"),
        ("wait", 1, "t5", "t5"),  # waiting on a run is another kind of wait than a cooldown
        ("wait", 2, "t4", "t3"),
        ("rejected", 1, "t2", "t2"),  # two runs' verdicts are never merged
        ("rejected", 1, "t1", "t1"),
    ]
    assert rows[0]["reason"] == "waiting: 5/6 new images"  # the newest reason is kept
    assert len(collapse_decisions([_d("wait", f"kind {chr(65 + i % 26)}{i}", f"t{i}") for i in range(100)], most=40)) == 40


def test_the_overview_timeline_collapses_a_burst_of_waits(tmp_path):
    h = make_harness(tmp_path, min_new_images=100)
    for _ in range(30):
        h.upload("chicken")  # each arrival is a decision of its own: "waiting: n/100 new images; waiting for data ..."
    assert len(h.decisions()) >= 30
    _, _, body = page(h, format="json")
    decisions = json.loads(body)["models"]["birds"]["decisions"]
    assert len(decisions) < 5
    assert decisions[0]["count"] >= 25


def test_a_run_page_reports_what_the_run_held_in_device_hours(h):
    data = run_page(h.store, h.worker.config, h.worker.manifests, h.runs()[0].run_id)
    assert data["cost"] == {"hours": 4.0, "devices": 2, "kind": "local process", "so_far": False}  # 2 h x 2 processes


def test_a_run_page_draws_only_what_a_well_formed_metrics_file_holds(h, tmp_path):
    run = h.runs()[0]
    metrics_file = tmp_path / "registry" / "birds" / str(h.versions()[0].version) / "metrics.json"
    assert metrics_file.exists()
    good = run_page(h.store, h.worker.config, h.worker.manifests, run.run_id)["evaluation"]
    assert good["confusion"] == [[3, 1], [0, 4]]
    assert good["per_class_accuracy"] == {"chicken": 0.75, "turkey": 1.0}
    for confusion in ([[3, 1]], [[3, -1], [0, 4]], [[3, 1.5], [0, 4]], [[3, True], [0, 4]], "x", [[3, 1], [0]]):
        metrics_file.write_text(json.dumps({"class_names": ["chicken", "turkey"], "confusion_matrix": confusion}))
        assert run_page(h.store, h.worker.config, h.worker.manifests, run.run_id)["evaluation"] is None, confusion
    metrics_file.write_text(json.dumps({"history": [{"epoch": i, "val_acc": 0.5} for i in range(10_000)]}))
    data = run_page(h.store, h.worker.config, h.worker.manifests, run.run_id)
    assert (len(data["curves"]), data["epochs"]) == (CURVE_POINTS, 10_000)
    metrics_file.write_text(json.dumps({"history": [{"epoch": 1, "val_acc": 0.5}], "pad": "x" * METRICS_BYTES}))
    assert run_page(h.store, h.worker.config, h.worker.manifests, run.run_id)["curves"] == []  # too large: not read
    metrics_file.unlink()
    assert page(h, run=run.run_id)[0] == 200  # no metrics: the page says so


def test_a_run_page_says_why_a_run_was_rejected_and_what_a_request_asked(tmp_path):
    h = make_harness(tmp_path, cooldown=0)
    h.uploads(6)
    h.clock.advance(40)
    h.worker.tick()
    h.succeed(h.runs()[0], best=0.9)
    h.uploads(1)
    h.request(force=True, requested_by="ana", reason="backfill of the spring images")
    rejected = next(r for r in h.runs() if r.in_flight)
    h.succeed(rejected, best=0.5, baseline=0.9)
    data = run_page(h.store, h.worker.config, h.worker.manifests, rejected.run_id)
    assert data["verdict"]["verdict"] == "rejected by the gate"
    assert "0.5" in data["verdict"]["reason"]
    assert [(r["by"], r["reason"]) for r in data["requests"]] == [("ana", "backfill of the spring images")]
    _, _, body = page(h, run=rejected.run_id)
    assert "rejected by the gate" in body
    assert "backfill of the spring images" in body


def test_a_model_page_shows_a_rollback_in_the_champion_history(h):
    h.uploads(6)
    h.clock.advance(40)
    h.worker.tick()
    h.succeed(next(r for r in h.runs() if r.in_flight), best=0.9, baseline=0.8)
    h.worker.handle(ModelControl(message_id="rb", model="birds", action="rollback", requested_by="ops", reason="v2 misclassifies turkeys"))
    history = json.loads(page(h, model="birds", format="json")[2])["champion_history"]
    assert [(r["action"], r["version"]) for r in history] == [("rollback", 1), ("registered", 2), ("registered", 1)]
    assert history[0]["reason"] == "v2 misclassifies turkeys"
    assert history[0]["previous_version"] == 2


@given(st.floats(-1e6, 1e6), st.floats(1e-3, 1e6))
def test_ticks_are_round_in_range_and_evenly_spaced(lo, span):
    ticks = nice_ticks(lo, lo + span, 6)
    assert 1 <= len(ticks) <= 7
    assert all(lo - 1e-6 * span <= t <= lo + span * (1 + 1e-6) for t in ticks)
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) <= 1 or max(steps) - min(steps) <= 1e-6 * span
    if steps:
        step = steps.pop()
        mantissa = step / 10 ** math.floor(math.log10(step))
        assert any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 5, 10))


def test_a_line_chart_has_both_axes_tick_values_and_skips_values_that_are_not_finite():
    svg = line_chart([Series("val_acc", [(1, 0.5), (2, float("nan")), (3, 0.9)])], plot="curve", title="t", x_label="epoch",
                     y_label="accuracy", y_range=(0, 1))  # fmt: skip
    assert 'data-axis="x">epoch<' in svg
    assert 'data-axis="y">accuracy<' in svg
    assert 'data-tick="y">0<' in svg
    assert 'data-tick="y">1<' in svg
    assert 'data-tick="x">2<' in svg
    assert "nan" not in svg.lower()
    assert svg.count("<circle") == 2
    assert 'data-value="val_acc">0.9<' in svg


def test_the_server_refuses_an_address_longer_than_it_reads(h):
    """A query string of any length was parsed and looked up; past MAX_URL the answer is 414."""
    import http.client
    import threading

    from worker.app.dashboard_server import MAX_URL, make_server

    server = make_server(h.store, h.worker.config, manifests=h.worker.manifests)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        for path, expected in (("/?run=" + "x" * MAX_URL, 414), ("/?run=" + "x" * 100, 404)):
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            connection.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
            response = connection.getresponse()
            response.read()
            connection.close()
            assert response.status == expected, expected
    finally:
        server.shutdown()
        server.server_close()
