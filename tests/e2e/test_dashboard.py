"""The dashboard in a real headless browser (Debian's chromium): it renders the plots and the
decision timeline, logs no console error, produces a screenshot, and hostile strings from outside
(a blob name, a requester id, a pause reason) stay text (issue 15)."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from shared.messages import ImageRef, ModelControl, RetrainRequested
from tests.unit.worker_harness import make_harness
from worker.adapters.local.sqlite_store import SqliteStore
from worker.app.dashboard_server import make_server

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE_BLOB = 'chicken/<img src=x onerror="document.title=1">.jpg'
HOSTILE_WHO = "<script>document.title='owned'</script>"
HOSTILE_WHY = '"><svg onload=alert(1)>'


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    assert CHROMIUM, "chromium is not installed (make test installs it: apt-get install chromium)"
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
             "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def served(tmp_path):
    """A ledger with two registered versions (curves in their metrics), a rollback, a pause and a rejected backfill."""
    h = make_harness(tmp_path, store=SqliteStore(tmp_path / "state" / "ledger.db"), cooldown=0)
    for round_, best in enumerate((0.71, 0.83)):
        h.uploads(6)
        h.clock.advance(40)
        h.worker.tick()
        run = next(r for r in h.runs() if r.in_flight)
        history = [{"epoch": i, "val_acc": best - 0.1 + 0.05 * i, "train_loss": 1.0 / i} for i in (1, 2, 3)]
        h.succeed(run, best=best, baseline=None if round_ == 0 else 0.71, history=history)
    h.worker.handle(RetrainRequested(message_id="bf-1", model="birds", images=[ImageRef(path=HOSTILE_BLOB)], requested_by=HOSTILE_WHO))
    h.worker.handle(ModelControl(message_id="rb-1", model="birds", action="rollback", requested_by=HOSTILE_WHO, reason="v2 is worse"))
    h.worker.handle(ModelControl(message_id="p-1", model="birds", action="pause", requested_by="ops", reason=HOSTILE_WHY))
    server = make_server(h.store, h.worker.config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_the_dashboard_renders_in_a_browser_without_errors_and_hostile_strings_stay_text(served, tmp_path):
    dom = chromium("--dump-dom", served)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert 'data-plot="accuracy"' in page
    assert 'data-champion="v1"' in page  # rolled back: v1 is the champion, marked on the plot
    assert page.count('data-plot="curve"') == 2
    assert 'data-timeline="decisions"' in page
    assert "rolled back from v2" in page
    # Hostile strings are shown as text: no element came out of them, and the page's title is its own.
    assert "<title>retrain</title>" in page
    assert "<img" not in page
    assert "<script" not in page
    assert "onload=alert" not in page.replace("&lt;svg onload=alert(1)&gt;", "")
    assert "&lt;img src=x onerror=" in page
    assert "&lt;script&gt;document.title=" in page
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = tmp_path / "dashboard.png"
    taken = chromium(f"--screenshot={shot}", "--window-size=1280,2200", served)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    artifacts = Path(__file__).resolve().parents[2] / "build" / "screenshots"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, artifacts / "dashboard.png")  # for a person to look at after `make test`


def test_the_dashboard_answers_only_to_its_own_address_not_to_a_rebound_name(served):
    """DNS rebinding: a hostile page points its own name at 127.0.0.1; its requests carry that name in Host."""
    import http.client
    from urllib.parse import urlparse

    port = urlparse(served).port
    for host, expected in ((f"evil.example:{port}", 421), (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), ("127.0.0.1:1", 421)):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.putrequest("GET", "/dashboard.json", skip_host=True)
        connection.putheader("Host", host)
        connection.endheaders()
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status == expected, host
