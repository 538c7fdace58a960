"""A real Azurite (the Azure Storage emulator) for integration tests, started and stopped by its own PID.

Azure adapters are tested against the emulator rather than mocks, so the tests see the service's
real conditional-write, listing and encoding behaviour. `Azurite` runs the pinned
`node_modules/.bin/azurite` (package.json; `npm ci` installs it) on free loopback ports, waits
until all three services accept connections, and stops exactly the process it started: the bin
script is node itself, so its PID is the server's (killing an `npx` parent would orphan it).
"""

from __future__ import annotations

import atexit
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AZURITE_BIN = ROOT / "node_modules" / ".bin" / "azurite"

# The emulator's fixed development account; the key is public (documented by Microsoft), not a secret.
ACCOUNT_NAME = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class AzuriteError(RuntimeError):
    """Azurite is not installed, or did not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Azurite:
    """One Azurite process with blob, queue and table services; use as a context manager or start()/stop()."""

    def __init__(self, location: str | Path | None = None, *, start_timeout: float = 30.0, binary: Path = AZURITE_BIN):
        self.binary = Path(binary)
        self.start_timeout = start_timeout
        self._own_location = location is None  # a temp dir we made is removed at stop; a given one is kept
        self.location = Path(location) if location is not None else None
        self.process: subprocess.Popen | None = None
        self.blob_port = self.queue_port = self.table_port = 0
        self.started_in: float | None = None  # seconds from spawn to all ports accepting
        self._spawned_at = 0.0

    # -- endpoints -----------------------------------------------------------------------------
    def _endpoint(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/{ACCOUNT_NAME}"

    @property
    def blob_endpoint(self) -> str:
        return self._endpoint(self.blob_port)

    @property
    def queue_endpoint(self) -> str:
        return self._endpoint(self.queue_port)

    @property
    def table_endpoint(self) -> str:
        return self._endpoint(self.table_port)

    @property
    def connection_string(self) -> str:
        """The explicit devstoreaccount1 connection string (not UseDevelopmentStorage, whose ports are fixed)."""
        if self.process is None:
            raise AzuriteError("Azurite is not running")
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={self.blob_endpoint};QueueEndpoint={self.queue_endpoint};TableEndpoint={self.table_endpoint};"
        )

    @property
    def log_path(self) -> Path | None:
        return self.location / "azurite.out" if self.location is not None else None

    def output(self) -> str:
        """What Azurite printed so far (stdout and stderr), for error messages."""
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> Azurite:
        if self.process is not None:
            return self
        if not self.binary.exists():
            raise AzuriteError(
                f"{self.binary} is missing: run `npm ci` in {ROOT} (or `make azurite`) to install the pinned Azurite from package-lock.json"
            )
        if shutil.which("node") is None:
            raise AzuriteError("`node` is not on PATH; Azurite needs Node.js (20 or later)")
        if self.location is None:
            self.location = Path(tempfile.mkdtemp(prefix="azurite-"))
        self.location.mkdir(parents=True, exist_ok=True)
        output = ""
        for _attempt in range(3):  # a free port can be taken between our probe and Azurite's bind
            self._spawn()
            try:
                self._wait_ready()
                atexit.register(self.stop)  # a test run that dies without teardown still stops it
                return self
            except AzuriteError:
                output = self.output()
                self._stop_process()
                if "EADDRINUSE" not in output:
                    self._remove_location()
                    raise
        self._remove_location()
        raise AzuriteError(f"Azurite could not bind free ports in 3 attempts; last output:\n{output}")

    def _spawn(self) -> None:
        self.blob_port, self.queue_port, self.table_port = _free_port(), _free_port(), _free_port()
        cmd = [
            str(self.binary),
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--loose",
            "--location", str(self.location),
            "--blobHost", "127.0.0.1", "--blobPort", str(self.blob_port),
            "--queueHost", "127.0.0.1", "--queuePort", str(self.queue_port),
            "--tableHost", "127.0.0.1", "--tablePort", str(self.table_port),
        ]  # fmt: skip
        # Output goes to a file, not a pipe nobody drains; the child keeps its own descriptor.
        assert self.log_path is not None
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.location)
        self._spawned_at = time.monotonic()

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = self._spawned_at + self.start_timeout
        pending = [self.blob_port, self.queue_port, self.table_port]
        while pending:
            if self.process.poll() is not None:
                raise AzuriteError(f"Azurite exited with code {self.process.returncode} while starting; output:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AzuriteError(
                    f"Azurite did not accept connections on {pending} within {self.start_timeout:.0f} s; output:\n{self.output()}"
                )
            if _accepts(pending[0]):
                pending.pop(0)
            else:
                time.sleep(0.05)
        self.started_in = time.monotonic() - self._spawned_at

    def _stop_process(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            if process is not None:
                process.wait()
            return
        process.terminate()  # SIGTERM: Azurite closes its services and exits 0
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _remove_location(self) -> None:
        if self._own_location and self.location is not None:
            shutil.rmtree(self.location, ignore_errors=True)
            self.location = None

    def stop(self) -> None:
        """Stop the process this object started (by its PID, never by name) and remove a temp location."""
        atexit.unregister(self.stop)
        self._stop_process()
        self._remove_location()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # a manual emulator for poking at: python -m tests.azurite
    with Azurite() as emulator:
        print(f"Azurite pid {emulator.pid} ready in {emulator.started_in:.2f} s\n{emulator.connection_string}", flush=True)
        try:
            while emulator.process is not None and emulator.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
