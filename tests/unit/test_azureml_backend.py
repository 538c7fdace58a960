"""The Azure ML backend and registry, offline: real azureml-core objects, a fake workspace seam."""

from __future__ import annotations

import json

import pytest

from tests.fakes.azureml import FakeAzureMLSeam
from worker.adapters.azure.azureml.backend import AzureMLBackend, AzureMLSettings
from worker.adapters.azure.azureml.registry import AzureMLModelRegistry
from worker.adapters.azure.azureml.seam import AzureMLError, PermanentSubmitError, map_status
from worker.adapters.azure.azureml.v1 import V1Jobs, build_environment, build_script_run_config, serialized_run_config
from worker.ports import RunSpec, TrainingArgs

pytestmark = pytest.mark.unit

SETTINGS = AzureMLSettings(compute_target="gpu-nc24", node_count=2, gpus_per_node=4, retry_wait_seconds=0.001)


def spec(distributed="ddp", init=None, run_id="birds-0003-abcd1234-a1") -> RunSpec:
    return RunSpec(
        backend_run_id=run_id,
        model="birds",
        manifest={"images": []},
        data_dir="unused-on-azure",
        training=TrainingArgs(epochs=30, batch_size=32, image_size=224, learning_rate=0.001, nproc=4, distributed=distributed),
        init_checkpoint=init,
        tags={"model": "birds", "run_id": "birds-0003-abcd1234", "manifest_sha256": "ab" * 32},
    )


@pytest.fixture(scope="module")
def environment():
    return build_environment(SETTINGS)


def test_ddp_runs_are_submitted_as_the_article_does_with_nccl_on_n_nodes(environment):
    config = serialized_run_config(build_script_run_config(spec(init="champions/birds/2/model.pt"), SETTINGS, environment))
    assert (config["script"], config["target"], config["framework"], config["communicator"]) == ("train.py", "gpu-nc24", "PyTorch", "nccl")
    assert config["nodeCount"] == 2
    assert config["pytorch"]["processCount"] == 8
    args = config["arguments"]
    assert args[args.index("--data_dir") + 1] == "$AZUREML_DATAREFERENCE_images"
    assert args[args.index("--manifest") + 1] == f"$AZUREML_DATAREFERENCE_manifests/{'ab' * 32}.json"  # content-addressed
    assert args[args.index("--manifest_sha256") + 1] == "ab" * 32  # train.py refuses any other manifest
    assert args[args.index("--init_checkpoint") + 1] == "$AZUREML_DATAREFERENCE_champion/model.pt"
    assert args[args.index("--num_epochs") + 1] == "30"
    assert args[args.index("--output_dir") + 1] == "./outputs"
    refs = config["dataReferences"]
    assert refs["images"]["dataStoreName"] == "images"
    assert refs["images"]["pathOnDataStore"] == "birds"
    assert refs["champion"]["mode"] == "download"
    assert config["environment"]["docker"]["baseImage"].startswith("mcr.microsoft.com/azureml/openmpi")
    pip = json.dumps(config["environment"]["python"])
    assert "torch==2.14.1" in pip
    assert "torchvision==0.29.1" in pip


def test_horovod_runs_use_mpi_with_processes_per_node(environment):
    config = serialized_run_config(build_script_run_config(spec("horovod"), SETTINGS, environment))
    assert config["mpi"] == {"processCountPerNode": 4, "nodeCount": 2}
    assert config["nodeCount"] == 2
    assert "--distributed" in config["arguments"]
    assert config["arguments"][config["arguments"].index("--distributed") + 1] == "horovod"
    assert "champion" not in config["dataReferences"]


def test_a_run_without_distribution_is_a_plain_script_run_on_one_node(environment):
    config = serialized_run_config(build_script_run_config(spec("none"), SETTINGS, environment))
    assert (config["framework"], config["communicator"], config["nodeCount"]) == ("Python", "None", 1)
    assert config["arguments"][config["arguments"].index("--distributed") + 1] == "none"


@pytest.mark.parametrize(
    ("azure", "ours"),
    [("NotStarted", "queued"), ("Starting", "queued"), ("Provisioning", "queued"), ("Preparing", "queued"), ("Queued", "queued"), ("Running", "running"),
     ("Finalizing", "running"), ("CancelRequested", "running"), ("NotResponding", "running"), ("Completed", "succeeded"), ("Failed", "failed"), ("Canceled", "canceled")],
)  # fmt: skip
def test_azure_ml_statuses_map_to_ours(azure, ours):
    assert map_status(azure) == ours


def backend(seam, tmp_path, environment):
    return AzureMLBackend(seam, SETTINGS, jobs=V1Jobs(), environment=environment, outputs_root=tmp_path / "aml-outputs")


def test_the_environment_is_registered_once_per_worker_and_reused(tmp_path):
    seam = FakeAzureMLSeam()
    b = AzureMLBackend(seam, SETTINGS, jobs=V1Jobs(), outputs_root=tmp_path)
    b.submit(spec(run_id="birds-0001-abcd1234-a1"))
    b.submit(spec(run_id="birds-0002-abcd1234-a1"))
    assert [c for c in seam.calls if c[0] == "ensure_environment"] == [("ensure_environment", "retrain-training")]


def test_submitting_twice_makes_one_run_and_tags_it(tmp_path, environment):
    seam = FakeAzureMLSeam()
    b = backend(seam, tmp_path, environment)
    assert b.submit(spec()).state == "queued"
    assert b.submit(spec()).state == "queued"
    assert [c for c in seam.calls if c[0] == "submit"] == [("submit", "birds-0003-abcd1234-a1")]
    assert seam.tags["birds-0003-abcd1234-a1"]["manifest_sha256"] == "ab" * 32
    assert seam.tags["birds-0003-abcd1234-a1"]["worker_version"]


def test_429_three_times_is_retried_to_one_run(tmp_path, environment):
    seam = FakeAzureMLSeam()
    seam.submit_failures.extend([AzureMLError("throttled", 429)] * 3)
    assert backend(seam, tmp_path, environment).submit(spec()).state == "queued"
    assert len([c for c in seam.calls if c[0] == "submit"]) == 4
    assert len(seam.runs) == 1


def test_a_timeout_after_the_run_was_created_finds_the_run_instead_of_making_another(tmp_path, environment):
    seam = FakeAzureMLSeam()
    seam.create_then_fail = TimeoutError("read timed out")
    assert backend(seam, tmp_path, environment).submit(spec()).state == "queued"
    assert len([c for c in seam.calls if c[0] == "submit"]) == 1
    assert len(seam.runs) == 1


def test_a_403_is_permanent_and_not_retried(tmp_path, environment):
    seam = FakeAzureMLSeam()
    seam.submit_failures.append(PermanentSubmitError("AuthorizationFailed: no access to compute", 403))
    with pytest.raises(PermanentSubmitError):
        backend(seam, tmp_path, environment).submit(spec())
    assert len([c for c in seam.calls if c[0] == "submit"]) == 1


def test_a_succeeded_run_downloads_its_outputs_and_cancel_reaches_the_run(tmp_path, environment):
    seam = FakeAzureMLSeam()
    b = backend(seam, tmp_path, environment)
    b.submit(spec())
    seam.set_status("birds-0003-abcd1234-a1", "NotResponding")
    assert b.status("birds-0003-abcd1234-a1").state == "running"
    seam.outputs["birds-0003-abcd1234-a1"] = {"model.pt": b"weights", "metrics.json": b"{}"}
    seam.set_status("birds-0003-abcd1234-a1", "Completed")
    status = b.status("birds-0003-abcd1234-a1")
    assert status.state == "succeeded"
    assert (tmp_path / "aml-outputs" / "birds-0003-abcd1234-a1" / "model.pt").read_bytes() == b"weights"
    assert b.status("nobody").state == "unknown"
    b.submit(spec(run_id="birds-0004-abcd1234-a1"))
    assert b.cancel("birds-0004-abcd1234-a1").state == "canceled"


class _HalfWrittenDownloads(FakeAzureMLSeam):
    """Writes each output in two halves and, between them, records what a completion reading the
    outputs folder at that moment would see (another worker or thread downloading the same run)."""

    def __init__(self, outputs_dir):
        super().__init__()
        self.outputs_dir, self.seen_mid_download = outputs_dir, []

    def download_outputs(self, run_id, names, dest):
        dest.mkdir(parents=True, exist_ok=True)
        for name, data in self.outputs.get(run_id, {}).items():
            with open(dest / name, "wb") as file:
                file.write(data[: len(data) // 2])
                file.flush()
                visible = self.outputs_dir / name
                self.seen_mid_download.append(visible.read_bytes() if visible.exists() else None)
                file.write(data[len(data) // 2 :])
        return dest


def test_outputs_appear_whole_or_not_at_all_while_they_download(tmp_path, environment):
    run_id = "birds-0003-abcd1234-a1"
    seam = _HalfWrittenDownloads(tmp_path / "aml-outputs" / run_id)
    b = backend(seam, tmp_path, environment)
    b.submit(spec())
    seam.outputs[run_id] = {"model.pt": b"weights of the run", "metrics.json": b'{"best_val_acc": 0.9}'}
    seam.set_status(run_id, "Completed")
    b.status(run_id)
    b.status(run_id)  # downloaded again (no ONNX export yet) over the complete files
    assert seam.seen_mid_download == [None, None, b"weights of the run", b'{"best_val_acc": 0.9}']
    assert sorted(p.name for p in (tmp_path / "aml-outputs").iterdir()) == [run_id], "no private folder left behind"
    seam.outputs[run_id].update({"model.onnx": b"onnx", "onnx_report.json": b"{}"})
    b.status(run_id)
    calls = len(seam.seen_mid_download)
    b.status(run_id)
    assert len(seam.seen_mid_download) == calls, "all four outputs present: not downloaded again"


def test_registration_is_idempotent_by_run_id_and_carries_lineage(tmp_path):
    seam = FakeAzureMLSeam()
    registry = AzureMLModelRegistry(seam, tmp_path / "staging")
    files = {}
    for name in ("model.pt", "model.onnx"):
        (tmp_path / name).write_bytes(name.encode())
        files[name] = tmp_path / name
    card = {
        "manifest": {"sha256": "cd" * 32},
        "parent_version": 1,
        "metrics": {"best_val_acc": 0.93},
        "artifacts": {"model.pt": {"sha256": "ef" * 32}},
    }
    first = registry.register("birds", "birds-0003-abcd1234", files, card)
    again = registry.register("birds", "birds-0003-abcd1234", files, card)
    assert first.version == again.version == 3  # the run's sequence number, asked of the seam
    [model] = seam.models["birds"]
    assert model["tags"] == {"run_id": "birds-0003-abcd1234", "manifest_sha256": "cd" * 32, "parent_version": "1"}
    assert model["properties"]["best_val_acc"] == "0.93"
    assert model["files"] == ["card.json", "model.onnx", "model.pt"]
    registry.set_champion("birds", 3)
    assert registry.champion_alias("birds") == 3


def test_a_permanently_refused_submission_fails_the_run_without_retries(tmp_path):
    from shared import events as ev
    from tests.fakes.harness import make_harness

    h = make_harness(tmp_path)
    h.backend.fail_next_submit(PermanentSubmitError("BadRequest: unknown compute target", 400))
    h.uploads(6)
    h.clock.advance(11)
    h.worker.tick()
    run = h.runs()[0]
    assert (run.state, run.outcome) == ("finalized", "submit_failed")
    assert "unknown compute target" in run.detail
    with h.store.transaction() as tx:
        assert tx.pending_stats("birds").count == 12
    assert [e.type for e in h.events()] == [ev.RUN_FAILED]


def test_configuration_chooses_azure_ml_and_its_cluster(tmp_path):
    from worker.adapters.azure.azureml.backend import settings_from_config
    from worker.adapters.azure.azureml.v1 import compute_provisioning
    from worker.config import load_config

    path = tmp_path / "retrain.toml"
    path.write_text(
        '[worker]\nbackend = "azureml"\n[azureml]\nsubscription_id = "s"\nresource_group = "rg"\nworkspace_name = "ws"\n'
        'compute_target = "a100"\nnode_count = 2\ngpus_per_node = 4\nvm_size = "Standard_NC24ads_A100_v4"\nmax_nodes = 4\n'
    )
    config = load_config(path, env={})
    assert config.worker.backend == "azureml"
    settings = settings_from_config(config.azureml)
    assert (settings.compute_target, settings.node_count, settings.gpus_per_node) == ("a100", 2, 4)
    provisioning = compute_provisioning(config.azureml)
    scale = provisioning.scale_settings
    assert (provisioning.vm_size, scale.maximum_node_count, scale.minimum_node_count) == ("Standard_NC24ads_A100_v4", 4, 0)


def test_service_principal_auth_needs_its_secret_from_the_environment():
    from worker.adapters.azure.azureml.v1 import authentication
    from worker.config import AzureMLConfig

    cfg = AzureMLConfig(auth="service_principal", tenant_id="t", client_id="c")
    with pytest.raises(ValueError, match="AZUREML_CLIENT_SECRET"):
        authentication(cfg, {})
    auth = authentication(cfg, {"AZUREML_CLIENT_SECRET": "s3cret"})
    assert type(auth).__name__ == "ServicePrincipalAuthentication"


def test_the_worker_drives_azure_ml_end_to_end_offline(tmp_path, environment):
    """Uploads -> a run on Azure ML (fake workspace) -> outputs -> gate -> Azure ML registry -> a warm start."""
    import hashlib

    from shared import events as ev
    from tests.fakes.adapters import FakeBlobStore, FakeClock, FakeOnnxExporter, RecordingPublisher
    from tests.fakes.harness import small_config
    from tests.fakes.memory_store import MemoryStore
    from worker.app.bootstrap import build_worker

    seam, artifacts = FakeAzureMLSeam(), FakeBlobStore()
    aml = AzureMLBackend(seam, SETTINGS, jobs=V1Jobs(), environment=environment, outputs_root=tmp_path / "aml-outputs")
    registry = AzureMLModelRegistry(seam, tmp_path / "staging", artifacts=artifacts)
    clock, store = FakeClock(), MemoryStore()
    worker = build_worker(
        small_config(tmp_path, cooldown=0), store=store, backend=aml, clock=clock, publisher=RecordingPublisher(), blobs={"birds": FakeBlobStore()},
        registry=registry, exporter=FakeOnnxExporter(), artifacts=artifacts,
    )  # fmt: skip

    def upload_and_run(start: int):
        from shared.messages import ImageUploaded

        for i in range(start, start + 12):
            worker.handle(ImageUploaded.of("birds", f"{'chicken' if i % 2 else 'turkey'}/{i:03d}.jpg", "e1", 10))
        clock.advance(11)
        worker.tick()
        with store.transaction() as tx:
            return tx.runs("birds")[0]

    def finish(run, best, baseline, init_sha=None):
        weights = f"weights of {run.run_id}".encode()
        metrics = {"best_val_acc": best, "baseline_val_acc": baseline, "model_sha256": hashlib.sha256(weights).hexdigest(),
                   "manifest_sha256": run.manifest_sha256, "init_checkpoint_sha256": init_sha}  # fmt: skip
        seam.outputs[run.backend_run_id] = {"model.pt": weights, "metrics.json": json.dumps(metrics).encode()}
        seam.set_status(run.backend_run_id, "Completed")
        worker.tick()  # polls Azure ML, downloads outputs, completes
        return hashlib.sha256(weights).hexdigest()

    first = upload_and_run(0)
    assert artifacts.blobs[f"manifests/{first.manifest_sha256}.json"]  # the run's manifest input, named by its digest
    config = serialized_run_config(seam.configs[first.backend_run_id])
    assert "champion" not in config["dataReferences"]
    champion_sha = finish(first, 0.8, None)
    assert seam.models["birds"][0]["tags"]["run_id"] == first.run_id
    assert artifacts.blobs["champions/birds/1/model.pt"] == f"weights of {first.run_id}".encode()
    second = upload_and_run(100)
    config = serialized_run_config(seam.configs[second.backend_run_id])
    assert config["dataReferences"]["champion"]["pathOnDataStore"] == "champions/birds/1/model.pt"
    finish(second, 0.9, 0.8, init_sha=champion_sha)
    assert [m["version"] for m in seam.models["birds"]] == [1, 2]
    assert seam.champions["birds"] == 2
    assert [e.type for e in store.all_events()].count(ev.MODEL_REGISTERED) == 2
