"""Property tests: random interleavings of uploads, duplicates, overwrites, ticks, completions,
failures and requests never lose an image, never train one twice, never fly two runs."""

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shared.manifest_hash import manifest_sha256
from shared.messages import ImageUploaded
from tests.fakes.harness import make_harness
from tests.fakes.memory_store import MemoryStore
from worker.adapters.local.sqlite_store import SqliteStore
from worker.store import IN_FLIGHT_STATES

pytestmark = pytest.mark.unit

PATHS = [f"{label}/{i}.jpg" for label in ("chicken", "turkey") for i in range(12)]


class WorkerMachine(RuleBasedStateMachine):
    store_factory = staticmethod(lambda root: MemoryStore())

    def __init__(self):
        super().__init__()
        root = Path(tempfile.mkdtemp())
        self.h = make_harness(
            root,
            store=self.store_factory(root),
            min_new_images=4,
            min_per_class=1,
            quiet_period=5,
            cooldown=3,
            max_attempts=2,
            retry_backoff=2,
        )
        self.delivered: list[ImageUploaded] = []
        self.versions: dict[str, int] = {}

    def _in_flight(self):
        return self.h.runs(IN_FLIGHT_STATES)

    @rule(path=st.sampled_from(PATHS))
    def upload(self, path):
        version = self.versions.get(path, 0) + 1
        self.versions[path] = version
        message = ImageUploaded.of("birds", path, f"v{version}", 10)
        self.delivered.append(message)
        self.h.worker.handle(message)

    @rule(index=st.integers(min_value=0, max_value=10_000))
    def redeliver(self, index):
        if self.delivered:
            self.h.worker.handle(self.delivered[index % len(self.delivered)])

    @rule(seconds=st.sampled_from([1, 4, 6, 30]))
    def tick(self, seconds):
        self.h.clock.advance(seconds)
        self.h.worker.tick()

    @rule(
        outcome=st.sampled_from(["succeeded", "failed", "canceled", "running"]),
        twice=st.booleans(),
        accuracy=st.sampled_from([0.5, 0.8, 0.95]),
    )
    def backend_reports(self, outcome, twice, accuracy):
        for run in self._in_flight():
            if run.state in ("submitted", "running"):
                if outcome == "succeeded":
                    self.h.succeed(run, best=accuracy, baseline=0.8)  # gate: registered or rejected
                else:
                    self.h.backend.finish(run.backend_run_id, outcome)
                    self.h.status(run.backend_run_id, outcome, message_id=f"s-{run.backend_run_id}-{outcome}")
                if twice:
                    self.h.status(run.backend_run_id, outcome, message_id=f"s2-{run.backend_run_id}-{outcome}")

    @rule()
    def force(self):
        self.h.request(force=True)

    @invariant()
    def never_two_runs_in_flight(self):
        assert len(self._in_flight()) <= 1

    @invariant()
    def one_champion_and_one_version_per_registered_run(self):
        versions = self.h.versions()
        registered = [r for r in self.h.runs() if r.outcome == "registered"]
        assert sorted(v.run_id for v in versions) == sorted(r.run_id for r in registered)
        assert len({v.version for v in versions}) == len(versions)
        head = self.h.head()
        assert head.champion_version == (max(v.version for v in versions) if versions else None)
        assert len([e for e in self.h.events() if e.type == "retrain.model.registered"]) == len(versions)

    @invariant()
    def every_manifest_hash_matches_its_content(self):
        for run in self.h.runs():
            entries = self.h.manifest(run)  # load() verifies the blob hashes to its name
            assert manifest_sha256(run.classes, entries) == run.manifest_sha256
            assert sorted({e["label"] for e in entries}) == run.classes
            assert run.image_count == len(entries)

    @invariant()
    def no_image_is_lost_or_trained_twice(self):
        """Checked against the manifests themselves, not the watermarks that produced them."""
        runs = sorted(self.h.runs(), key=lambda r: r.seq)
        trained: dict[tuple[str, str], str] = {}  # (path, etag) -> the successful run that first had it
        for run in runs:
            keys = {(e["path"], e["etag"]) for e in self.h.manifest(run)}
            new = keys - set(trained)
            # What the ledger says is new to the run is exactly what no earlier successful run had.
            assert run.new_image_count == len(new), f"{run.run_id}: {run.new_image_count} new, manifests say {len(new)}"
            if run.outcome in ("succeeded", "registered", "rejected") or run.state == "succeeded":
                trained.update(dict.fromkeys(new, run.run_id))
        flying = {(e["path"], e["etag"]) for r in runs if r.in_flight for e in self.h.manifest(r)}
        latest = self.h.images()
        for path, version in self.versions.items():
            image = latest.get(path)
            assert image is not None, f"{path} was lost"
            assert image.etag == f"v{version}", f"{path} is not at its newest version"
            key = (image.path, image.etag)
            if image.state == "trained":
                assert key in trained, f"{path} is trained but no successful run had it"
            else:
                assert key not in trained, f"{path} is {image.state} but a successful run trained it"
                assert (image.state == "in_run") == (key in flying), f"{path} is {image.state}; in the flying run: {key in flying}"


class SqliteWorkerMachine(WorkerMachine):
    store_factory = staticmethod(lambda root: SqliteStore(root / "ledger.db"))


TestWorkerMachine = WorkerMachine.TestCase
TestWorkerMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestSqliteWorkerMachine = SqliteWorkerMachine.TestCase
TestSqliteWorkerMachine.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
