"""Applies, one at a time, each mutation that once survived the suite (issues 9 and 11), runs the
tests that should catch it, and reports KILLED or SURVIVED. The tree is restored after each.

    python scripts/check_mutations.py [--only SUBSTRING]

Exit status 1 if any mutation survives. Not part of `make test` (it runs parts of the suite
about twenty times); run it after touching a guard it lists.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "ONNX parity compares PyTorch with itself",
        "training/export_onnx.py",
        "    got = run_ort(batch)\n",
        "    got = run_torch(batch)\n",
        ("tests/integration/test_onnx_export.py",),
    ),
    Mutation(
        "the Event Grid run trigger does nothing",
        "functions/eventgrid_runs.py",
        "    effects = runtime.worker().handle(message)\n",
        "    return\n    effects = runtime.worker().handle(message)\n",
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "RunCompleted maps to failed",
        "functions/eventgrid_runs.py",
        '"microsoft.machinelearningservices.runcompleted": "Completed"',
        '"microsoft.machinelearningservices.runcompleted": "Failed"',
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "Service Bus errors are not redacted",
        "worker/adapters/azure/servicebus.py",
        "        super().__init__(redact(message))\n",
        "        super().__init__(message)\n",
        ("tests/unit/test_servicebus.py",),
    ),
    Mutation(
        "the out-of-order (stale version) rule never fires",
        "worker/store.py",
        "    return known_at is not None and mine is not None and mine < known_at\n",
        "    return False\n",
        ("tests/unit/test_hostile_inputs.py", "tests/unit/test_worker.py"),
    ),
    Mutation(
        "completion ignores a champion that moved (no compare-and-swap)",
        "worker/completion.py",
        "            if head.champion_version != (champion.version if champion else None):\n",
        "            if False:\n",
        ("tests/unit/test_completion.py",),
    ),
    Mutation(
        "completion does not re-check the run's state before finalizing",
        "worker/completion.py",
        '            if current is None or current.state != "succeeded":\n                return []  # another completion of the same run finished first\n',
        "            if current is None:\n                return []\n",
        ("tests/unit/test_completion.py",),
    ),
    Mutation(
        "a status event that overtakes the submitter queues no run.submitted",
        "worker/handlers.py",
        "            queue_submitted_event(ctx, tx, run)\n        run_succeeded(ctx, tx, run)\n",
        "            pass\n        run_succeeded(ctx, tx, run)\n",
        ("tests/unit/test_hostile_inputs.py",),
    ),
    Mutation(
        "a run planned over images already trained (no watermark base)",
        "worker/runs.py",
        "    base = head.trained_watermark\n",
        "    base = 0\n",
        ("tests/unit/test_worker_properties.py",),
    ),
    Mutation(
        "the memory fake lets a commit grow past one batch",
        "tests/fakes/memory_store.py",
        "        if self.writes > MAX_WRITES_PER_COMMIT:\n",
        "        if False:\n",
        ("tests/unit/test_hostile_inputs.py",),
    ),
    Mutation(
        "the Idempotency-Key is stored outside the request's transaction",
        "worker/bus.py",
        "                previous = tx.remember_response(message.model, remember.key, remember.fingerprint, remember.response, ctx.now)",
        "                previous = None and tx.remember_response(message.model, remember.key, remember.fingerprint, remember.response, ctx.now)",
        ("tests/unit/test_hostile_inputs.py",),
    ),
    Mutation(
        "a NaN metric passes the gate",
        "worker/gate.py",
        "    if not _finite(value):",
        "    if False:",
        ("tests/unit/test_hostile_inputs.py",),
    ),
    Mutation(
        "a lone surrogate passes the message check",
        "shared/messages.py",
        "    elif isinstance(value, str) and (bad := lone_surrogate(value)) is not None:\n",
        "    elif False and isinstance(value, str) and (bad := lone_surrogate(value)) is not None:\n",
        ("tests/unit/test_message_reasons.py", "tests/unit/test_hostile_inputs.py"),
    ),
    Mutation(
        "a lost optimistic race is not retried",
        "worker/store.py",
        "        retry=retry_if_exception_type(ConcurrencyConflict),\n",
        "",
        ("tests/unit/test_bus_effects.py", "tests/unit/test_store_rules.py", "tests/unit/test_completion_effects.py"),
    ),
    Mutation(
        "the tick leaves staged arrivals unfolded",
        "worker/bus.py",
        "            self._drain(message.model)\n        backfill = None\n",
        "            pass\n        backfill = None\n",
        ("tests/unit/test_staged_ingest.py",),
    ),
    Mutation(
        "a trigger during a run does not owe a follow-up",
        "worker/runs.py",
        "        head.followup_wanted = True\n",
        "        head.followup_wanted = False\n",
        ("tests/unit/test_worker.py",),
    ),
    Mutation(
        "an unchanged verdict is recorded at every tick",
        "worker/runs.py",
        "    last = next(iter(tx.decisions(model, 1)), None)\n",
        "    last = None\n",
        ("tests/unit/test_worker.py",),
    ),
    Mutation(
        "a retried attempt's run.submitted has the first attempt's id",
        "worker/runs.py",
        "ctx.now, discriminator=str(run.attempt))",
        "ctx.now, discriminator=None)",
        ("tests/unit/test_worker.py",),
    ),
    Mutation(
        "the GPU budget lets a run start at its exact limit",
        "worker/policy.py",
        "snapshot.gpu_hours_24h >= budget and",
        "snapshot.gpu_hours_24h > budget and",
        ("tests/unit/test_policy.py",),
    ),
    Mutation(
        "the model's process count does not reach the run",
        "worker/submission.py",
        "        nproc=t.nproc,\n",
        "",
        ("tests/unit/test_worker.py",),
    ),
    Mutation(
        "Azure ML outputs are downloaded straight into the folder completion reads",
        "worker/adapters/azure/azureml/backend.py",
        "self.seam.download_outputs(backend_run_id, list(OUTPUT_FILES), Path(private))",
        "self.seam.download_outputs(backend_run_id, list(OUTPUT_FILES), dest)",
        ("tests/unit/test_azureml_backend.py",),
    ),
]


def run(mutation: Mutation) -> bool:
    """True if the tests caught the mutation."""
    path = ROOT / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: the guarded line was not found exactly once in {mutation.path}; update this script")
    path.write_text(original.replace(mutation.old, mutation.new))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutation.tests],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        return proc.returncode != 0
    finally:
        path.write_text(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this")
    args = parser.parse_args()
    survived = 0
    for mutation in MUTATIONS:
        if args.only not in mutation.name:
            continue
        killed = run(mutation)
        survived += not killed
        print(f"{'KILLED  ' if killed else 'SURVIVED'} {mutation.name}  ({', '.join(mutation.tests)})", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
