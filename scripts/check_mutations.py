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
        ("tests/unit/test_worker.py", "tests/unit/test_store_rules.py", "tests/unit/test_completion.py"),
    ),
    Mutation(
        "the tick leaves staged arrivals unfolded",
        "worker/bus.py",
        "            self._drain(tick.model)\n        return self._after_commit(self._apply(tick))\n",
        "            pass\n        return self._after_commit(self._apply(tick))\n",
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
    # -- issues 23-25: each mutation below was applied by hand once and seen to fail its tests --------
    Mutation(
        "loader workers are forked from the training process again",
        "training/imagedata.py",
        '        common["multiprocessing_context"] = worker_context(start_method)\n',
        "        pass\n",
        (
            "tests/unit/test_imagedata.py",
            "tests/integration/test_training_never_hangs.py::test_two_ranks_with_loader_workers_train_and_evaluate_without_forking_a_threaded_process",
        ),
    ),
    Mutation(
        "the fork server starts with numpy's BLAS threads",
        "training/train.py",
        '    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")\n',
        "    pass\n",
        (
            "tests/integration/test_training_never_hangs.py::test_one_process_without_thread_settings_forks_its_workers_from_a_single_threaded_server",
        ),
    ),
    Mutation(
        "the runner leaves orphaned ranks running",
        "worker/adapters/local/torchrun_runner.py",
        "        left = kill_descendants()\n",
        "        left = []\n",
        (
            "tests/integration/test_local_backend_torchrun.py::test_ranks_orphaned_by_a_launcher_that_died_are_killed_before_the_run_is_recorded_as_ended",
        ),
    ),
    Mutation(
        "the runner is not the ranks' subreaper",
        "worker/adapters/local/torchrun_runner.py",
        "        if not become_subreaper():\n",
        "        if not True:\n",
        (
            "tests/integration/test_local_backend_torchrun.py::test_ranks_orphaned_by_a_launcher_that_died_are_killed_before_the_run_is_recorded_as_ended",
        ),
    ),
    Mutation(
        "a cancel never kills a training that ignores SIGTERM",
        "worker/adapters/local/torchrun_runner.py",
        "                    kill_descendants()\n                    killed = True\n",
        "                    killed = True\n",
        ("tests/integration/test_local_backend_torchrun.py::test_cancel_leaves_no_process_behind_even_ranks_that_ignore_sigterm",),
    ),
    Mutation(
        "a job reporting Unknown fails its run",
        "worker/adapters/azure/azureml/backend.py",
        '        if state == "unknown":\n',
        "        if False:\n",
        ("tests/unit/test_azureml_v2.py",),
    ),
    Mutation(
        "status-less SDK errors are retried for ever",
        "worker/adapters/azure/azureml/seam.py",
        "    transient = (code in (408, 429) or code >= 500) if code is not None else isinstance(exc, _network_error_types())\n",
        "    transient = (code in (408, 429) or code >= 500) if code is not None else True\n",
        ("tests/unit/test_azureml_v2.py",),
    ),
    Mutation(
        "a full-document Table write merges (stale chunks stay)",
        "worker/adapters/azure/table_store.py",
        '    return ("upsert", entity, {"mode": UpdateMode.REPLACE})\n',
        '    return ("upsert", entity)\n',
        ("tests/integration/test_table_store_guarantees.py::test_a_document_that_shrinks_leaves_no_stale_chunk_behind",),
    ),
    Mutation(
        "Service Bus sends every event in one list",
        "worker/adapters/azure/servicebus.py",
        "                    _send_in_batches(sender, messages)\n",
        "                    sender.send_messages(messages)\n",
        ("tests/unit/test_servicebus.py",),
    ),
    Mutation(
        "a run trained from a model that is no longer the champion passes the gate",
        "worker/gate.py",
        "    if started_from is not None and started_from != champion.model_sha256:\n",
        "    if False:\n",
        ("tests/unit/test_steering.py", "tests/unit/test_gate.py"),
    ),
    Mutation(
        "a pause no longer outranks a run in flight",
        "worker/policy.py",
        "    if head.paused is not None:  # an operator's stop outranks every trigger; a run in flight goes on\n",
        "    if head.paused is not None and snapshot.in_flight is None:\n",
        ("tests/unit/test_policy.py",),
    ),
    Mutation(
        "the staged pending floor counts the image at the floor as pending",
        "worker/adapters/azure/table_store.py",
        '                    if pending is not None and pointer["seq"] > pending["floor"]:\n',
        '                    if pending is not None and pointer["seq"] >= pending["floor"]:\n',
        ("tests/integration/test_table_store_guarantees.py::test_overwriting_the_image_at_the_pending_floor_counts_only_its_new_version",),
    ),
    Mutation(
        "the Idempotency-Key fingerprint is over the parsed request",
        "functions/http_api.py",
        "        fingerprint = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()\n",
        "        fingerprint = hashlib.sha256(request.model_dump_json().encode()).hexdigest()\n",
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "the Idempotency-Key is not scoped to the model",
        "functions/http_api.py",
        "    scope = f\"{cls.__name__}\\n{document.get('model')}\\n{key}\"\n",
        "    scope = str(key)\n",
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "the manifest digest leaves out the class list",
        "training/manifests.py",
        '    body = {\n        "classes": list(classes),\n',
        '    body = {\n        "classes": [],\n',
        ("tests/unit/test_manifests.py",),
    ),
    Mutation(
        "the GPU budget counts one node of a multi-node run",
        "worker/config.py",
        "            return self.azureml.node_count * self.azureml.gpus_per_node\n",
        "            return self.azureml.gpus_per_node\n",
        ("tests/unit/test_gpu_budget.py",),
    ),
    Mutation(
        "symlink containment by string prefix",
        "worker/adapters/local/directory_blobs.py",
        "                if root != target and root not in target.parents:\n",
        "                if not str(target).startswith(str(root)):\n",
        ("tests/unit/test_hostile_inputs.py",),
    ),
    Mutation(
        "the Functions app installs no log redaction",
        "functions/runtime.py",
        "            install_log_redaction()\n",
        "            pass\n",
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "the in-process ONNX exporter checks at the default tolerance",
        "worker/adapters/local/onnx_exporter.py",
        "                tolerance=tolerance,\n",
        "",
        ("tests/integration/test_onnx_export.py::test_the_worker_exporters_report_parity_for_a_trained_model",),
    ),
    Mutation(
        "ranks share one validation spill folder",
        "training/imagedata.py",
        '            DecodedCache(side, cache_bytes // 4, cache_dir / f"val-{rank}" if cache_dir else None),\n',
        '            DecodedCache(side, cache_bytes // 4, cache_dir / "val" if cache_dir else None),\n',
        ("tests/unit/test_imagedata.py",),
    ),
    Mutation(
        "the Event Grid workspace topic is compared with its case",
        "functions/eventgrid_runs.py",
        '    if expected_topic and (event.topic or "").lower() != expected_topic.lower():\n',
        '    if expected_topic and (event.topic or "") != expected_topic:\n',
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "the simulator ignores budget overrides behind another request",
        "worker/simulate.py",
        "            if request.override_budget:\n",
        "            if False:\n",
        ("tests/unit/test_gpu_budget.py",),
    ),
    Mutation(
        "a traceparent always says sampled",
        "worker/telemetry.py",
        '    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"\n',
        '    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-01"\n',
        ("tests/unit/test_telemetry.py",),
    ),
    Mutation(
        "the local inbox file is removed before its message is handled",
        "worker/app/serve.py",
        "            report.planned += self.worker.handle(message).planned_runs\n            self.inbox.done(path)\n",
        "            self.inbox.done(path)\n            report.planned += self.worker.handle(message).planned_runs\n",
        ("tests/unit/test_serve_progress.py",),
    ),
    Mutation(
        "a planned run whose manifest cannot be used is never failed",
        "worker/submission.py",
        "            if not manifest_unusable(exc):\n",
        "            if True:\n",
        ("tests/unit/test_run_transitions.py",),
    ),
    Mutation(
        "train.py trains on a manifest other than the frozen one",
        "training/manifests.py",
        "    if expected_sha256 is not None and manifest.sha256 != expected_sha256:\n",
        "    if False:\n",
        ("tests/unit/test_manifests.py", "tests/unit/test_train_run.py"),
    ),
    Mutation(
        "a principal header is trusted while the platform's authentication is off",
        "functions/auth.py",
        "    if header and not platform_on:\n",
        "    if False:\n",
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "the body's requested_by is recorded as the actor",
        "functions/http_api.py",
        '    document["requested_by"] = auth.recorded_by(who.actor, document.get("requested_by"))\n',
        '    document.setdefault("requested_by", who.actor)\n',
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "a reader may control a model",
        "functions/auth.py",
        '    "control": frozenset({OPERATOR}),\n',
        '    "control": frozenset({READER, REQUESTER, OPERATOR}),\n',
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "model controls are accepted on the requests queue by default",
        "functions/servicebus_requests.py",
        '        if document["kind"] == "model.control" and runtime.setting(QUEUE_CONTROLS_SETTING, "false").strip().lower() != "true":\n',
        "        if False:\n",
        ("tests/unit/test_functions.py",),
    ),
    Mutation(
        "the command line records $USER",
        "worker/app/cli.py",
        "        user = pwd.getpwuid(os.getuid()).pw_name\n",
        '        user = os.environ.get("USER", "cli")\n',
        ("tests/unit/test_cli.py",),
    ),
    Mutation(
        "the simulator ignores pauses (a forced request refused while paused becomes a run)",
        "worker/simulate.py",
        '            if control.action == "pause":\n',
        "            if False:\n",
        ("tests/unit/test_simulate.py",),
    ),
    Mutation(
        "the simulator replays past the end of the record",
        "worker/simulate.py",
        "        self.cutoff = until or history.observed_until\n",
        "        self.cutoff = until\n",
        ("tests/unit/test_simulate.py",),
    ),
    Mutation(
        "an environment override for an unconfigured model adds a model",
        "worker/config.py",
        "            if path[1] not in known:  # a typo must not make a model of its own\n",
        "            if False:\n",
        ("tests/unit/test_config.py", "tests/unit/test_misconfiguration.py"),
    ),
    Mutation(
        "serve creates a missing images folder without being asked",
        "worker/app/cli.py",
        "        if not create:\n",
        "        if False:\n",
        ("tests/unit/test_cli.py",),
    ),
    Mutation(
        "serve starts a backend whose packages are missing",
        "worker/app/cli.py",
        "    missing = missing_dependencies(cfg, os.environ)\n",
        "    missing = []\n",
        ("tests/unit/test_misconfiguration.py",),
    ),
    Mutation(
        "a malformed connection setting is a bare SDK error",
        "worker/app/bootstrap.py",
        "    except ValueError as exc:\n        from shared.redact import printable, redact\n",
        "    except ZeroDivisionError as exc:\n        from shared.redact import printable, redact\n",
        ("tests/unit/test_misconfiguration.py",),
    ),
    Mutation(
        "inject exits 0 for a refused forced request",
        "worker/app/inject.py",
        '    if message.force and decision is not None and decision.outcome == "drop":\n',
        "    if False:\n",
        ("tests/unit/test_cli.py",),
    ),
    Mutation(
        "inject --wait exits 0 whatever the run's end",
        "worker/app/inject.py",
        '            return Answer([f"{run.run_id} {ended}: {run.detail}"], data, 0 if ended == "registered" else 1)\n',
        '            return Answer([f"{run.run_id} {ended}: {run.detail}"], data, 0)\n',
        ("tests/unit/test_cli.py",),
    ),
    Mutation(
        "serve does not log how a run ended",
        "worker/app/serve.py",
        '                log.log(level, "%s %s: %s", done.run_id, done.outcome or done.state, printable(done.detail, limit=300))\n',
        "                pass\n",
        ("tests/unit/test_serve_progress.py",),
    ),
    Mutation(
        "the console's timeline does not collapse decisions of one kind",
        "worker/app/dashboard_data.py",
        '        if rows and rows[-1]["key"] == key:\n',
        "        if False:\n",
        ("tests/unit/test_dashboard_pages.py",),
    ),
    Mutation(
        "a run's cost ignores the devices it held",
        "worker/app/dashboard_data.py",
        '        "hours": round(seconds * devices / 3600, 4),\n',
        '        "hours": round(seconds / 3600, 4),\n',
        ("tests/unit/test_dashboard_pages.py",),
    ),
    Mutation(
        "a link's id and text are not escaped",
        "worker/app/dashboard.py",
        "    return f'<a href=\"{e(href)}\">{e(text)}</a>'\n",
        "    return f'<a href=\"{href}\">{text}</a>'\n",
        ("tests/unit/test_dashboard_pages.py",),
    ),
    Mutation(
        "the console refreshes nothing in place",
        "worker/app/dashboard.py",
        "    \"document.querySelector('main').replaceWith(document.adoptNode(m));\"\n",
        '    ""\n',
        ("tests/e2e/test_dashboard.py",),
    ),
    Mutation(
        "the validation confusion matrix is never filled",
        "training/train.py",
        "            sums[3:] += torch.bincount(cells, minlength=num_classes * num_classes).to(sums.dtype)\n",
        "            pass\n",
        ("tests/unit/test_train_run.py",),
    ),
    Mutation(
        "a decision keeps text from outside raw and unbounded",
        "worker/store.py",
        "reason=clipped(reason), run_id=run_id",
        "reason=reason, run_id=run_id",
        ("tests/unit/test_worker.py",),
    ),
    Mutation(
        "the console serves an address of any length",
        "worker/app/dashboard_server.py",
        "            if len(self.path) > MAX_URL:\n",
        "            if False:\n",
        ("tests/unit/test_dashboard_pages.py",),
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
