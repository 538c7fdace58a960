"""The console in a real headless browser (Debian's chromium): the overview, a run page and a model
page render their charts (with axes and values), tables and the collapsed decision timeline, log no
console error (the inline refresh script is allowed by its CSP hash), refresh in place without
reloading, produce screenshots in which the charts' colours are found, and hostile strings from
outside (a blob name, a requester id, a pause reason) stay text."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

from shared.messages import ImageRef, ModelControl, RetrainRequested
from tests.fakes.harness import make_harness
from worker.adapters.local.sqlite_store import SqliteStore
from worker.app.dashboard_server import make_server

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOSTILE_BLOB = 'chicken/<img src=x onerror="document.title=1">.jpg'
HOSTILE_WHO = "<script>document.title='owned'</script>"
HOSTILE_WHY = '"><svg onload=alert(1)>'
HOSTILE_LABEL_BLOB = "turkey/<b>bold</b>.jpg"
ARTIFACTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"


def chromium(*args: str, timeout: float = 90, budget_ms: int = 5000) -> subprocess.CompletedProcess:
    assert CHROMIUM, "chromium is not installed (make test installs it: apt-get install chromium)"
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions",
             "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}"]  # fmt: skip
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=timeout, check=False)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line or "Content Security Policy" in line]


def screenshot(url: str, name: str, tmp_path: Path, height: int = 2200):
    """A PNG of the page, kept under build/screenshots for a person to look at, opened as an image."""
    from PIL import Image

    shot = tmp_path / name
    taken = chromium(f"--screenshot={shot}", f"--window-size=1280,{height}", url)
    assert taken.returncode == 0, taken.stderr[-2000:]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return Image.open(shot).convert("RGB")


def pixels_of(image, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    import numpy as np

    distance = np.abs(np.asarray(image, dtype=np.int16) - np.array(rgb, dtype=np.int16)).max(axis=2)
    return int((distance <= tolerance).sum())


GREEN, BLUE = (0x1A, 0x9C, 0x4B), (0x34, 0x69, 0xB3)  # val_acc lines; bars and the confusion matrix's strong cells


@pytest.fixture
def ledger(tmp_path):
    """Two registered versions (curves, confusion matrices in their metrics), a rollback, a pause,
    a rejected backfill, and a hostile image name in the second run's manifest."""
    h = make_harness(tmp_path, store=SqliteStore(tmp_path / "state" / "ledger.db"), cooldown=0)
    for round_, best in enumerate((0.71, 0.83)):
        h.uploads(6)
        if round_ == 1:
            h.upload("turkey", name="<b>bold</b>")
        h.clock.advance(40)
        h.worker.tick()
        run = next(r for r in h.runs() if r.in_flight)
        h.clock.advance(1800)  # half an hour on 2 local processes: 1 process-hour
        history = [{"epoch": i, "val_acc": best - 0.1 + 0.05 * i, "train_acc": 0.5 + 0.1 * i, "val_loss": 1.2 / i, "train_loss": 1.0 / i}
                   for i in (1, 2, 3)]  # fmt: skip
        h.succeed(run, best=best, baseline=None if round_ == 0 else 0.71, history=history, class_names=["chicken", "turkey"],
                  confusion_matrix=[[5, 1], [1, 5]], best_epoch=3)  # fmt: skip
    h.worker.handle(RetrainRequested(message_id="bf-1", model="birds", images=[ImageRef(path=HOSTILE_BLOB)], requested_by=HOSTILE_WHO))
    h.worker.handle(ModelControl(message_id="rb-1", model="birds", action="rollback", requested_by=HOSTILE_WHO, reason="v2 is worse"))
    h.worker.handle(ModelControl(message_id="p-1", model="birds", action="pause", requested_by="ops", reason=HOSTILE_WHY))
    return h


@pytest.fixture
def served(ledger):
    server = make_server(ledger.store, ledger.worker.config, manifests=ledger.worker.manifests)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def dump(url: str, budget_ms: int = 5000) -> str:
    dom = chromium("--dump-dom", url, budget_ms=budget_ms)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert console_errors(dom.stderr) == []  # no script error, and the refresh script was not blocked by the CSP
    return dom.stdout


def test_the_overview_renders_in_a_browser_without_errors_and_hostile_strings_stay_text(served, tmp_path):
    page = dump(served)
    assert 'data-plot="accuracy"' in page
    assert 'data-champion="v1"' in page  # rolled back: v1 is the champion, marked on the plot
    assert re.search(r'data-axis="y"[^>]*>best_val_acc<', page)
    assert 'data-tick="x"' in page
    assert 'data-plot="pending"' in page
    assert 'data-timeline="decisions"' in page
    assert 'data-count="' in page  # the waits of a burst are one row with a count
    assert "rolled back from v2" in page
    assert page.count('data-list="runs"') == 1
    assert 'href="?run=birds-0002-' in page
    # Hostile strings are shown as text: no element came out of them, and the page's title is its own.
    assert "<title>retrain</title>" in page
    assert "<img" not in page
    assert "<script>document" not in page
    assert "onload=alert" not in page.replace("&lt;svg onload=alert(1)&gt;", "")
    assert "&lt;img src=x onerror=" in page
    assert "&lt;script&gt;document.title=" in page
    image = screenshot(served, "dashboard.png", tmp_path)
    assert pixels_of(image, GREEN) > 100  # the accuracy-per-version line and its points were drawn


def test_a_run_page_shows_curves_with_axes_per_class_accuracy_confusion_matrix_manifest_verdict_and_cost(served, ledger, tmp_path):
    run = next(r for r in ledger.runs() if r.seq == 2)
    url = f"{served}?run={quote(run.run_id)}"
    page = dump(url)
    assert page.count('data-plot="curve"') == 1
    assert page.count('data-plot="loss"') == 1
    for axis in ("epoch", "accuracy", "cross-entropy loss"):
        assert re.search(rf'data-axis="[xy]"[^>]*>{axis}<', page), axis
    assert len(re.findall(r'data-tick="x"[^>]*>[123]<', page)) >= 6  # epochs 1, 2, 3 on both charts, no 1.5
    assert 'data-value="val_acc">0.88<' in page  # the last value written on the chart
    assert 'data-plot="per-class"' in page
    assert 'data-value="chicken">0.833<' in page
    confusion = re.search(r'<table class="confusion" data-table="confusion">(.*?)</table>', page).group(1)
    assert [int(c) for c in re.findall(r"<td[^>]*>(\d+)</td>", confusion)] == [5, 1, 1, 5]
    assert 'data-verdict="registered"' in page
    assert "beats champion v1" in page
    assert re.search(r'data-cost="gpu-hours">1\.000 local process-hours \(2 × local process\)', page)
    manifest = re.search(r'data-table="manifest">(.*?)</table>', page).group(1)
    assert "<th>chicken</th>" in manifest
    assert "<th>turkey</th>" in manifest
    assert re.search(r'data-diff="parent">since <a href="\?run=birds-0001-[0-9a-f]+">', page)
    assert "13 added" in page  # 12 new images and the hostile one since the parent
    image = screenshot(url, "run.png", tmp_path)
    assert pixels_of(image, GREEN) > 100  # val_acc and val_loss lines
    assert pixels_of(image, BLUE, tolerance=20) > 2000  # per-class bars and the confusion matrix's diagonal
    listing = dump(f"{url}&images=added")
    assert 'data-list="images"' in listing
    assert "&lt;b&gt;bold&lt;/b&gt;" in listing
    assert "<b>bold</b>" not in listing
    assert listing.count("<tr>") == 14  # the header and 13 images


def test_a_model_page_lists_versions_and_the_champion_history_with_who_moved_it(served, tmp_path):
    url = f"{served}?model=birds"
    page = dump(url)
    assert 'data-list="versions"' in page
    assert "v1 champion" in page
    history = re.search(r'data-list="champion-history">(.*?)</table>', page).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", history)[1:]
    assert len(rows) == 3  # v1 registered, v2 registered, rolled back to v1
    assert "rollback" in rows[0]
    assert "(from v2)" in rows[0]
    assert "&lt;script&gt;" in rows[0]
    assert "v2 is worse" in rows[0]
    assert "registered" in rows[1]
    assert "beats champion v1" in rows[1]
    assert 'data-list="runs"' in page
    screenshot(url, "model.png", tmp_path, height=1200)


def test_the_page_refreshes_in_place_without_reloading(ledger, tmp_path):
    """After the page has loaded, the ledger changes; the page's own script fetches the new content
    and swaps it in: the server sees one navigation and then refresh requests."""
    seen: list[str] = []
    server = make_server(ledger.store, ledger.worker.config, manifests=ledger.worker.manifests)
    handler = server.RequestHandlerClass

    class Watching(handler):  # type: ignore[misc, valid-type]
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            seen.append("refresh" if self.headers.get("X-Retrain-Refresh") else "navigation")
            if len(seen) == 1:  # the first load: change the ledger after it is answered
                super().do_GET()
                ledger.worker.handle(
                    ModelControl(message_id="r-1", model="birds", action="resume", requested_by="ops", reason="after-load")
                )
                return
            super().do_GET()

    server.RequestHandlerClass = Watching
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page = dump(f"http://127.0.0.1:{server.server_address[1]}/", budget_ms=25_000)
    finally:
        server.shutdown()
        server.server_close()
    assert seen[0] == "navigation"
    assert seen.count("navigation") == 1
    assert "refresh" in seen
    assert re.search(r'<body[^>]*data-refreshes="[1-9]', page)
    assert 'class="badge paused"' not in page  # the resume made after the load is on the page: it was fetched and swapped in
    assert "after-load" in page


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
