"""Scale-out ingest on the Table Storage ledger: P worker processes, image events through
`Worker.handle`, against a real Azurite, with a latency injected at the Azure SDK's transport
(every real HTTP call sleeps first, as if Azure were a round trip away).

    python benchmarks/ledger_ingest.py [--latency-ms 10] [--events 400] [--processes 1 4 8] [--models 1 8]

For each (processes, models) it prints images/s (events handled per second, all processes), Table
calls per image, p50/p99 per event, and how many deliveries still failed after the retry budget;
then how long folding the rest took (the tick's drain) and checks that every image is counted
once. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def latency_client(connection: str, table: str, latency_s: float, counter: list[int]):
    """A TableClient whose transport sleeps before every request and counts them."""
    from azure.core.pipeline.transport import RequestsTransport
    from azure.data.tables import TableClient

    class SlowTransport(RequestsTransport):
        def send(self, request, **kwargs):
            counter[0] += 1
            time.sleep(latency_s)
            return super().send(request, **kwargs)

    return TableClient.from_connection_string(connection, table, transport=SlowTransport())


def config_for(models: int, state: Path):
    import os

    from worker.config import load_config

    env = {"RETRAIN__WORKER__STATE_DIR": str(state)}
    if os.environ.get("RETRAIN__WORKER__EVALUATE_INTERVAL"):  # e.g. a very long one: staging alone
        env["RETRAIN__WORKER__EVALUATE_INTERVAL"] = os.environ["RETRAIN__WORKER__EVALUATE_INTERVAL"]
    for m in range(models):
        env[f"RETRAIN__MODELS__M{m}__MIN_NEW_IMAGES"] = "100000000"  # measure ingest, not training
        env[f"RETRAIN__MODELS__M{m}__MAX_WAIT"] = "100d"
    return load_config(None, env=env)


barrier = None


def _init(shared_barrier) -> None:
    global barrier
    barrier = shared_barrier


def feed(args: tuple) -> dict:
    connection, table, latency_s, index, events, models, state, concurrency = args
    from concurrent.futures import ThreadPoolExecutor

    from shared.messages import ImageUploaded
    from tests.fakes.backend import FakeTrainingBackend
    from worker.adapters.azure.table_store import TableStore
    from worker.app.bootstrap import build_worker

    counter = [0]
    store = TableStore(latency_client(connection, table, latency_s, counter))
    config = config_for(models, Path(state))
    worker = build_worker(config, store=store, backend=FakeTrainingBackend())
    counter[0] = 0
    names = sorted(config.models)
    errors: list[str] = []

    def deliver(n: int) -> tuple[float, bool]:
        model = names[n % len(names)]
        message = ImageUploaded.of(model, f"{('chicken', 'turkey')[n % 2]}/p{index}-{n:06d}.jpg", "e1", 10, source="blob")
        started = time.perf_counter()
        try:
            worker.handle(message)
            ok = True
        except Exception as exc:  # the delivery would be retried by the platform
            errors.append(f"{exc.__class__.__name__}: {str(exc)[:200]}")
            ok = False
        return time.perf_counter() - started, ok

    # Like a Functions instance, each process handles several deliveries at once. Processes start
    # together (after their imports) so the figure is the steady state, not interpreter start-up.
    barrier.wait()
    began = time.time()
    with ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(deliver, range(events)))
    return {
        "began": began,
        "ended": time.time(),
        "latencies": [t for t, _ in outcomes],
        "failed": sum(not ok for _, ok in outcomes),
        "calls": counter[0],
        "errors": errors[:3],
    }


def run(connection: str, latency_s: float, processes: int, models: int, events: int, concurrency: int) -> None:
    from worker.adapters.azure.table_store import TableStore

    table = f"ingest{uuid.uuid4().hex[:10]}"
    state = tempfile.mkdtemp(prefix="ingest-")
    TableStore.from_connection_string(connection, table).close()  # create the table outside the timing
    jobs = [(connection, table, latency_s, p, events, models, state, concurrency) for p in range(processes)]
    context = mp.get_context("spawn")
    with context.Pool(processes, initializer=_init, initargs=(context.Barrier(processes),)) as pool:
        results = pool.map(feed, jobs)
    elapsed = max(r["ended"] for r in results) - min(r["began"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    total = len(latencies)
    calls = sum(r["calls"] for r in results)
    p99 = latencies[min(total - 1, int(total * 0.99))]
    print(
        f"{processes} processes, {models} model(s): {total / elapsed:7.1f} images/s, {calls / total:4.2f} Table calls/image, "
        f"p50 {statistics.median(latencies) * 1000:6.1f} ms, p99 {p99 * 1000:7.1f} ms, failed {sum(r['failed'] for r in results)}",
        flush=True,
    )
    for error in sorted({e for r in results for e in r["errors"]})[:3]:
        print(f"    a failed delivery: {error}", flush=True)
    # Fold what is still staged (what the next tick does), then check every image is counted once.
    from tests.fakes.backend import FakeTrainingBackend
    from worker.app.bootstrap import build_worker

    counter = [0]
    store = TableStore(latency_client(connection, table, latency_s, counter))
    worker = build_worker(config_for(models, Path(state)), store=store, backend=FakeTrainingBackend())
    drain_started = time.perf_counter()
    worker.tick()
    with store.transaction() as tx:
        counted = sum(sum(tx.count_images(m).values()) for m in sorted(worker.config.models))
        staged = sum(tx.count_images(m).get("staged", 0) for m in sorted(worker.config.models))
    print(
        f"    then the tick folded the rest in {time.perf_counter() - drain_started:.1f} s ({counter[0]} calls); "
        f"{counted} images counted of {total} sent, {staged} still staged",
        flush=True,
    )
    store.table.delete_table()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=10.0)
    parser.add_argument("--events", type=int, default=400, help="image events per process")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--concurrency", type=int, default=16, help="deliveries in flight per process (a Functions instance runs several)")
    args = parser.parse_args()
    from tests.azurite import Azurite

    with Azurite() as azurite:
        print(
            f"Azurite on loopback, {args.latency_ms:g} ms added to every Table call, {args.events} events per process, "
            f"{args.concurrency} in flight per process",
            flush=True,
        )
        for models in args.models:
            for processes in args.processes:
                run(azurite.connection_string, args.latency_ms / 1000, processes, models, args.events, args.concurrency)


if __name__ == "__main__":
    main()
