"""The Azure ML v2 backend and registry, offline: real azure-ai-ml job and model entities, a fake
MLClient (its `jobs`, `models`, `environments` operations) at the SDK boundary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from tests.fakes.azureml import FakeAzureMLSeam
from worker.adapters.azure.azureml.backend import AzureMLBackend, AzureMLSettings
from worker.adapters.azure.azureml.registry import AzureMLModelRegistry
from worker.adapters.azure.azureml.seam import PermanentSubmitError, map_status
from worker.adapters.azure.azureml.v2 import (
    MLClientSeam,
    V2Jobs,
    build_command_job,
    build_environment,
    check_job_name,
    compute_cluster,
    job_document,
)
from worker.ports import RunSpec, TrainingArgs

pytestmark = pytest.mark.unit

SETTINGS = AzureMLSettings(compute_target="gpu-nc24", node_count=2, gpus_per_node=4, retry_wait_seconds=0.001)
SHA = "ab" * 32


def spec(distributed="ddp", init=None, run_id="birds-0003-abcd1234-a1") -> RunSpec:
    return RunSpec(
        backend_run_id=run_id,
        model="birds",
        manifest={},
        data_dir="",
        training=TrainingArgs(epochs=30, batch_size=32, image_size=224, learning_rate=0.001, nproc=4, distributed=distributed),
        init_checkpoint=init,
        tags={"model": "birds", "run_id": run_id.rsplit("-a", 1)[0], "manifest_sha256": SHA},
    )


def test_a_ddp_run_is_a_pytorch_command_job_with_one_process_per_gpu_on_every_node():
    job = job_document(build_command_job(spec(init="champions/birds/2/model.pt"), SETTINGS, build_environment(SETTINGS)))
    assert job["type"] == "command"
    assert job["name"] == job["display_name"] == "birds-0003-abcd1234-a1"
    assert job["experiment_name"] == "retrain"
    assert job["compute"] == "azureml:gpu-nc24"
    assert job["distribution"] == {"type": "pytorch", "process_count_per_instance": 4}
    assert job["resources"]["instance_count"] == 2
    assert job["limits"]["timeout"] == SETTINGS.max_run_seconds
    assert job["inputs"]["images"] == {"type": "uri_folder", "path": "azureml://datastores/images/paths/birds", "mode": "ro_mount"}
    assert job["inputs"]["manifest"] == {
        "type": "uri_file",
        "path": f"azureml://datastores/retrain/paths/manifests/{SHA}.json",  # content-addressed
        "mode": "download",
    }
    assert job["inputs"]["champion"]["path"] == "azureml://datastores/retrain/paths/champions/birds/2/model.pt"
    assert job["outputs"]["outputs"]["type"] == "uri_folder"
    command = job["command"].split()
    assert command[:2] == ["python", "train.py"]
    for flag, value in [("--data_dir", "${{inputs.images}}"), ("--manifest", "${{inputs.manifest}}"), ("--manifest_sha256", SHA),
                        ("--output_dir", "${{outputs.outputs}}"),
                        ("--init_checkpoint", "${{inputs.champion}}"), ("--distributed", "ddp"), ("--num_epochs", "30")]:  # fmt: skip
        assert command[command.index(flag) + 1] == value
    assert "--export_onnx" in command
    assert job["tags"]["manifest_sha256"] == job["properties"]["manifest_sha256"] == SHA
    assert job["code"] == str(Path(__file__).resolve().parents[2] / "training")


IMAGE = "crretrain.azurecr.io/retrain-training:2.14.1-hvd0.28.1"


def test_a_horovod_run_is_an_mpi_command_job_and_a_cold_start_has_no_champion_input():
    settings = dataclasses.replace(SETTINGS, training_image=IMAGE)
    job = job_document(build_command_job(spec("horovod"), settings, build_environment(settings)))
    assert job["environment"]["image"] == IMAGE  # the image with Horovod (training/environment/Dockerfile)
    assert job["distribution"] == {"type": "mpi", "process_count_per_instance": 4}
    assert job["resources"]["instance_count"] == 2
    assert "champion" not in job["inputs"]
    command = job["command"].split()
    assert command[command.index("--distributed") + 1] == "horovod"
    assert command.count("--distributed") == 1


def test_the_environment_is_training_requirements_on_the_base_image_or_a_curated_one_by_name():
    env = build_environment(SETTINGS)
    pip = env.conda_file["dependencies"][-1]["pip"]
    assert any(p.startswith("torch==") for p in pip)
    assert any(p.startswith("azureml-mlflow==") for p in pip)  # MLflow in the job reaches the workspace
    assert env.image == SETTINGS.base_image
    curated = AzureMLSettings(curated_environment="AzureML-acpt-pytorch-2.2-cuda12.1:23")
    assert build_environment(curated) == "azureml:AzureML-acpt-pytorch-2.2-cuda12.1:23"  # pinned, never @latest
    pinned = AzureMLSettings(curated_environment="azureml:my-env:3")
    assert build_environment(pinned) == "azureml:my-env:3"
    image = build_environment(AzureMLSettings(training_image=IMAGE, curated_environment="azureml:my-env:3"))
    assert (image.image, image.conda_file) == (IMAGE, None)  # the training image wins: everything is in it


def test_a_horovod_run_without_the_training_image_is_refused_with_what_to_do():
    with pytest.raises(PermanentSubmitError, match=r"Horovod jobs need azureml\.training_image"):
        build_command_job(spec("horovod"), SETTINGS, build_environment(SETTINGS))


def test_jobs_read_the_datastores_with_the_clusters_identity_when_one_is_configured():
    settings = dataclasses.replace(SETTINGS, job_identity_client_id="00000000-0000-0000-0000-0000000000c1")
    job = job_document(build_command_job(spec(), settings, build_environment(settings)))
    assert job["identity"] == {"type": "managed_identity", "client_id": "00000000-0000-0000-0000-0000000000c1"}
    assert "identity" not in job_document(build_command_job(spec(), SETTINGS, build_environment(SETTINGS)))


@pytest.mark.parametrize("value", ["AzureML-acpt-pytorch-2.2-cuda12.1", "AzureML-acpt-pytorch-2.2-cuda12.1@latest", "azureml:env:"])
def test_an_unpinned_curated_environment_is_refused_at_start(value):
    from shared.errors import ConfigError
    from worker.config import load_config

    with pytest.raises(ConfigError, match="pin the curated environment"):
        load_config(None, env={"RETRAIN__AZUREML__CURATED_ENVIRONMENT": value})


@pytest.mark.parametrize("value", ["crretrain.azurecr.io/retrain-training", "crretrain.azurecr.io/retrain-training:latest"])
def test_an_untagged_training_image_is_refused_at_start(value):
    from shared.errors import ConfigError
    from worker.config import load_config

    with pytest.raises(ConfigError, match="version tag or digest"):
        load_config(None, env={"RETRAIN__AZUREML__TRAINING_IMAGE": value})
    assert load_config(None, env={"RETRAIN__AZUREML__TRAINING_IMAGE": ""}).azureml.training_image is None  # an empty setting is unset


def test_job_names_take_our_longest_run_ids_and_refuse_what_azure_ml_refuses():
    longest = f"{'m' * 63}-9999999-abcdef12-a99"
    assert check_job_name(longest) == longest
    for bad in ("birds:0003", "birds/0003", "-birds", "x" * 256, "", "bírds"):
        with pytest.raises(PermanentSubmitError):
            check_job_name(bad)


@pytest.mark.parametrize(
    ("azure", "ours"),
    [("NotStarted", "queued"), ("Starting", "queued"), ("Provisioning", "queued"), ("Preparing", "queued"), ("Queued", "queued"),
     ("Running", "running"), ("Finalizing", "running"), ("CancelRequested", "running"), ("NotResponding", "running"),
     ("Paused", "queued"), ("Completed", "succeeded"), ("Failed", "failed"), ("Canceled", "canceled"), ("Unknown", "unknown"),
     ("", "unknown")],
)  # fmt: skip
def test_every_v2_job_status_maps_to_one_of_ours(azure, ours):
    assert map_status(azure) == ours


def test_the_compute_cluster_is_built_from_settings():
    cfg = SimpleNamespace(
        compute_target="gpu", vm_size="Standard_NC24ads_A100_v4", min_nodes=0, max_nodes=4, idle_seconds_before_scaledown=900
    )
    cluster = compute_cluster(cfg)._to_dict()
    assert (cluster["name"], cluster["size"], cluster["min_instances"], cluster["max_instances"]) == (
        "gpu",
        "Standard_NC24ads_A100_v4",
        0,
        4,
    )
    assert cluster["idle_time_before_scale_down"] == 900


# -- the seam against a fake MLClient ---------------------------------------------------------


class FakeJobs:
    def __init__(self) -> None:
        self.jobs: dict[str, object] = {}
        self.creates: list[str] = []
        self.fail_creates: list[BaseException] = []
        self.race = False  # another submitter creates the job first, then this create is refused
        self.outputs: dict[str, dict[str, bytes]] = {}

    def get(self, name):
        if name not in self.jobs:
            raise ResourceNotFoundError(f"job {name} not found")
        return self.jobs[name]

    def create_or_update(self, job, *, experiment_name=None, **_):
        self.creates.append(job.name)
        if self.fail_creates:
            raise self.fail_creates.pop(0)
        if self.race:
            self.jobs[job.name] = SimpleNamespace(name=job.name, status="Running", error=None)
            raise ResourceExistsError(f"A job with name {job.name} already exists")
        if job.name in self.jobs:
            raise HttpResponseError("UserError: a job with this name already exists")
        assert experiment_name == "retrain"
        self.jobs[job.name] = SimpleNamespace(name=job.name, status="NotStarted", error=None, entity=job)
        return self.jobs[job.name]

    def begin_cancel(self, name):
        self.jobs[name].status = "CancelRequested"
        return SimpleNamespace(result=lambda: None)

    def download(self, name, *, download_path, output_name=None, all=False):
        folder = Path(download_path) / "named-outputs" / output_name
        folder.mkdir(parents=True)
        for file, data in self.outputs[name].items():
            (folder / file).write_bytes(data)


class FakeModels:
    """The model operations as the service behaves: a version is created once (PUT name/version);
    a second create of that version with other files (another upload path) is refused, an update
    of the same entity (tags) is accepted; no version given: the next number."""

    def __init__(self) -> None:
        self.versions: list[object] = []
        self.uploaded: dict[tuple[str, str], list[str]] = {}
        self.during_create = None  # called once inside the next create, before it takes effect: another completion

    def list(self, name=None):
        return [m for m in self.versions if m.name == name]

    def get(self, name, version):
        for m in self.list(name):
            if m.version == str(version):
                return m
        raise ResourceNotFoundError(f"model {name}:{version} not found")

    def create_or_update(self, model):
        if self.during_create is not None:
            interleaved, self.during_create = self.during_create, None
            interleaved()
        if getattr(model, "version", None) is None:
            model.version = str(len(self.list(model.name)) + 1)
        existing = next((m for m in self.list(model.name) if m.version == model.version), None)
        if existing is not None and existing is not model:
            raise ResourceExistsError(f"model {model.name}:{model.version} exists with another asset path")
        if existing is None:
            files = sorted(p.name for p in Path(model.path).iterdir())  # the SDK uploads the folder now
            assert files, "the staged folder was emptied under the registration"
            self.uploaded[(model.name, model.version)] = files
            self.versions.append(model)
        return model


class FakeEnvironments:
    def __init__(self) -> None:
        self.registered: list[str] = []

    def create_or_update(self, env):
        self.registered.append(env.name)
        env.version = "1"
        return env


def client():
    return SimpleNamespace(jobs=FakeJobs(), models=FakeModels(), environments=FakeEnvironments())


def backend(fake, tmp_path) -> AzureMLBackend:
    return AzureMLBackend(MLClientSeam(fake), SETTINGS, jobs=V2Jobs(), outputs_root=tmp_path / "outputs")


def test_submitting_twice_creates_one_job_and_registers_the_environment_once(tmp_path):
    fake = client()
    aml = backend(fake, tmp_path)
    first = aml.submit(spec())
    again = aml.submit(spec())
    assert (first.backend_run_id, first.state, again.state) == ("birds-0003-abcd1234-a1", "queued", "queued")
    assert fake.jobs.creates == ["birds-0003-abcd1234-a1"]
    aml.submit(spec(run_id="birds-0004-abcd1234-a1"))
    assert fake.environments.registered == ["retrain-training"]
    tags = fake.jobs.jobs["birds-0003-abcd1234-a1"].entity.tags
    assert (tags["run_id"], tags["manifest_sha256"], tags["sdk"], tags["backend_run_id"]) == (
        "birds-0003-abcd1234",
        SHA,
        "v2",
        "birds-0003-abcd1234-a1",
    )
    assert "worker_version" in tags


def test_a_create_that_loses_the_race_returns_the_job_that_won(tmp_path):
    fake = client()
    fake.jobs.race = True
    status = backend(fake, tmp_path).submit(spec())
    assert (status.backend_run_id, status.state) == ("birds-0003-abcd1234-a1", "running")
    assert fake.jobs.creates == ["birds-0003-abcd1234-a1"]


def test_transient_errors_are_retried_and_permanent_ones_fail_at_once(tmp_path):
    fake = client()
    busy = HttpResponseError("service busy")
    busy.status_code = 503
    fake.jobs.fail_creates = [busy, busy]
    assert backend(fake, tmp_path).submit(spec()).state == "queued"
    assert len(fake.jobs.creates) == 3

    denied = client()
    forbidden = HttpResponseError("AuthorizationFailed: the identity may not create jobs")
    forbidden.status_code = 403
    denied.jobs.fail_creates = [forbidden]
    with pytest.raises(PermanentSubmitError, match="AuthorizationFailed"):
        backend(denied, tmp_path).submit(spec())
    assert len(denied.jobs.creates) == 1


def test_outputs_are_downloaded_by_output_name_and_cancel_asks_azure_ml(tmp_path):
    fake = client()
    aml = backend(fake, tmp_path)
    aml.submit(spec())
    fake.jobs.outputs["birds-0003-abcd1234-a1"] = {"model.pt": b"weights", "metrics.json": b"{}", "other.bin": b"x"}
    fake.jobs.jobs["birds-0003-abcd1234-a1"].status = "Completed"
    status = aml.status("birds-0003-abcd1234-a1")
    assert status.state == "succeeded"
    out = Path(status.outputs_dir)
    assert (out / "model.pt").read_bytes() == b"weights"
    assert not (out / "other.bin").exists()
    assert aml.status("birds-9999-abcd1234-a1").state == "unknown"
    aml.submit(spec(run_id="birds-0005-abcd1234-a1"))
    fake.jobs.jobs["birds-0005-abcd1234-a1"].status = "Running"
    assert aml.cancel("birds-0005-abcd1234-a1").state == "running"  # CancelRequested: not over yet
    assert fake.jobs.jobs["birds-0005-abcd1234-a1"].status == "CancelRequested"


def test_the_registry_is_idempotent_by_run_id_and_moves_the_champion_tag(tmp_path):
    fake = client()
    seam = MLClientSeam(fake)
    registry = AzureMLModelRegistry(seam, tmp_path / "staging")
    files = {"model.pt": tmp_path / "model.pt", "model.onnx": tmp_path / "model.onnx"}
    for f in files.values():
        f.write_bytes(b"x")
    card = {"metrics": {"best_val_acc": 0.9}, "manifest": {"sha256": SHA}, "artifacts": {"model.pt": {"sha256": "cd" * 32}}}
    first = registry.register("birds", "birds-0001-abcd1234", files, card)
    again = registry.register("birds", "birds-0001-abcd1234", files, card)
    second = registry.register("birds", "birds-0002-abcd1234", files, card)
    assert (first.version, again.version, second.version) == (1, 1, 2)  # the runs' sequence numbers
    [v1, v2] = fake.models.versions
    assert v1.type == "custom_model"
    assert v1.tags["run_id"] == "birds-0001-abcd1234"
    assert v1.properties["best_val_acc"] == "0.9"
    registry.set_champion("birds", 1)
    registry.set_champion("birds", 2)
    assert (v1.tags.get("champion"), v2.tags.get("champion")) == (None, "true")
    assert registry.champion_alias("birds") == 2


def test_two_overlapping_registrations_of_one_run_make_one_version(tmp_path):
    """A tick's completion and the Event Grid one register the same run at once: the model version
    is the run's sequence number, so the second create names the same version and finds the first's."""
    fake = client()
    registry = AzureMLModelRegistry(MLClientSeam(fake), tmp_path / "staging")
    files = {"model.pt": tmp_path / "model.pt"}
    files["model.pt"].write_bytes(b"weights")
    card = {"metrics": {"best_val_acc": 0.9}, "manifest": {"sha256": SHA}}
    other: list = []
    fake.models.during_create = lambda: other.append(registry.register("birds", "birds-0007-abcd1234", files, {**card, "by": "event"}))

    mine = registry.register("birds", "birds-0007-abcd1234", files, {**card, "by": "tick"})

    assert [(m.version, m.tags["run_id"]) for m in fake.models.versions] == [("7", "birds-0007-abcd1234")]
    assert mine.version == other[0].version == 7
    assert fake.models.uploaded[("birds", "7")] == ["card.json", "model.pt"]
    assert list((tmp_path / "staging").iterdir()) == []  # each registration staged in a folder of its own, then removed


def test_a_version_held_by_another_run_is_refused_with_both_run_ids(tmp_path):
    fake = client()
    registry = AzureMLModelRegistry(MLClientSeam(fake), tmp_path / "staging")
    files = {"model.pt": tmp_path / "model.pt"}
    files["model.pt"].write_bytes(b"weights")
    registry.register("birds", "birds-0003-abcd1234", files, {})
    with pytest.raises(PermanentSubmitError, match=r"version 3 is registered for run 'birds-0003-abcd1234', not 'birds-0003-ffff0000'"):
        registry.register("birds", "birds-0003-ffff0000", files, {})


def test_the_worker_trains_registers_and_warm_starts_through_the_v2_backend(tmp_path):
    """The loop end to end with the v2 job builder behind the fake seam: two runs, the second warm-started."""
    from shared import events as ev
    from shared.messages import ImageUploaded
    from tests.fakes.adapters import FakeBlobStore, FakeClock, FakeOnnxExporter, RecordingPublisher
    from tests.fakes.harness import small_config
    from tests.fakes.memory_store import MemoryStore
    from worker.app.bootstrap import build_worker

    seam, artifacts = FakeAzureMLSeam(), FakeBlobStore()
    aml = AzureMLBackend(seam, SETTINGS, jobs=V2Jobs(), environment="azureml:curated@latest", outputs_root=tmp_path / "aml-outputs")
    registry = AzureMLModelRegistry(seam, tmp_path / "staging", artifacts=artifacts)
    clock, store = FakeClock(), MemoryStore()
    worker = build_worker(
        small_config(tmp_path, cooldown=0), store=store, backend=aml, clock=clock, publisher=RecordingPublisher(),
        blobs={"birds": FakeBlobStore()}, registry=registry, exporter=FakeOnnxExporter(), artifacts=artifacts,
    )  # fmt: skip

    def upload_and_run(start: int):
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
        worker.tick()
        return hashlib.sha256(weights).hexdigest()

    first = upload_and_run(0)
    job = job_document(seam.configs[first.backend_run_id])
    assert job["name"] == first.backend_run_id
    assert job["inputs"]["manifest"]["path"].endswith(f"manifests/{first.manifest_sha256}.json")
    assert artifacts.blobs[f"manifests/{first.manifest_sha256}.json"]
    assert "champion" not in job["inputs"]
    assert seam.tags[first.backend_run_id]["sdk"] == "v2"
    champion_sha = finish(first, 0.8, None)
    second = upload_and_run(100)
    job = job_document(seam.configs[second.backend_run_id])
    assert job["inputs"]["champion"]["path"].endswith("champions/birds/1/model.pt")
    finish(second, 0.9, 0.8, init_sha=champion_sha)
    assert [m["version"] for m in seam.models["birds"]] == [1, 2]
    assert seam.champions["birds"] == 2
    assert [e.type for e in store.all_events()].count(ev.MODEL_REGISTERED) == 2


# -- configuration --------------------------------------------------------------------------------


def test_v2_is_the_default_sdk_and_v1_is_selectable():
    from worker.config import load_config

    assert load_config(None, env={}).azureml.sdk == "v2"
    assert load_config(None, env={"RETRAIN__AZUREML__SDK": "v1"}).azureml.sdk == "v1"


def test_every_missing_workspace_setting_is_reported_at_once():
    from shared.errors import ConfigError
    from worker.app.bootstrap import check_azureml_settings
    from worker.config import load_config

    cfg = load_config(None, env={"RETRAIN__AZUREML__AUTH": "service_principal", "RETRAIN__AZUREML__RESOURCE_GROUP": "rg"}).azureml
    with pytest.raises(ConfigError) as caught:
        check_azureml_settings(cfg, {})
    message = str(caught.value)
    assert len(message.splitlines()) == 2  # the workspace ids, the service principal: a line each
    for name in ("azureml.subscription_id", "azureml.workspace_name", "azureml.tenant_id", "azureml.client_id", "$AZUREML_CLIENT_SECRET"):
        assert name in message
    assert "resource_group" not in message
    complete = load_config(None, env={"RETRAIN__AZUREML__SUBSCRIPTION_ID": "s", "RETRAIN__AZUREML__RESOURCE_GROUP": "rg",
                                      "RETRAIN__AZUREML__WORKSPACE_NAME": "ws"}).azureml  # fmt: skip
    check_azureml_settings(complete, {})  # managed identity needs no secret


def test_the_cli_says_what_is_missing_in_one_line_not_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "RETRAIN__WORKER__BACKEND": "azureml", "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"),
           "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images")}  # fmt: skip
    env.pop("RETRAIN_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "worker", "serve", "--cycles", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: worker.backend = 'azureml' needs azureml.subscription_id, azureml.resource_group, azureml.workspace_name "
        "(or azureml.config_path, a workspace config.json)"
    ]


# -- what a first deployment would have hit ---------------------------------------------------


def test_a_job_reporting_unknown_stays_in_flight_rather_than_failing(tmp_path):
    """'Unknown' while the service loses track of a node is not 'no such job': failing the run
    would start a second attempt beside one that may still be training."""
    fake = client()
    aml = backend(fake, tmp_path)
    aml.submit(spec())
    fake.jobs.jobs["birds-0003-abcd1234-a1"].status = "Unknown"
    status = aml.status("birds-0003-abcd1234-a1")
    assert status.state == "running"
    assert "'Unknown'" in status.detail
    fake.jobs.jobs["birds-0003-abcd1234-a1"].status = None
    assert aml.status("birds-0003-abcd1234-a1").state == "running"
    assert aml.status("birds-0009-abcd1234-a1").state == "unknown"  # no such job: that is what 'unknown' means


def _validation_error():
    from azure.ai.ml.exceptions import ErrorCategory, ErrorTarget, ValidationException

    return ValidationException(
        message="compute 'gpu' is not a valid target", no_personal_data_message="invalid compute",
        target=ErrorTarget.JOB, error_category=ErrorCategory.USER_ERROR,
    )  # fmt: skip


def _auth_error():
    from azure.core.exceptions import ClientAuthenticationError

    return ClientAuthenticationError("ManagedIdentityCredential: no managed identity endpoint is available")


@pytest.mark.parametrize("make_error", [_validation_error, _auth_error], ids=["ValidationException", "ClientAuthenticationError"])
def test_sdk_errors_without_a_status_code_fail_the_submission_at_once(tmp_path, make_error):
    """They are raised before any request is answered, and a retry cannot change them: retried,
    they kept the run planned forever, one failing attempt per tick."""
    fake = client()
    fake.jobs.fail_creates = [make_error()]
    with pytest.raises(PermanentSubmitError):
        backend(fake, tmp_path).submit(spec())
    assert len(fake.jobs.creates) == 1


def test_a_service_that_cannot_be_reached_is_retried(tmp_path):
    from azure.core.exceptions import ServiceRequestError

    fake = client()
    fake.jobs.fail_creates = [ServiceRequestError("Failed to resolve 'westeurope.api.azureml.ms'")] * 2
    assert backend(fake, tmp_path).submit(spec()).state == "queued"
    assert len(fake.jobs.creates) == 3


def test_a_run_without_distribution_is_one_process_on_one_node():
    job = job_document(build_command_job(spec("none"), SETTINGS, build_environment(SETTINGS)))
    assert job.get("distribution") is None
    assert job["resources"]["instance_count"] == 1
    command = job["command"].split()
    assert command[command.index("--distributed") + 1] == "none"
    assert command.count("--distributed") == 1


def test_a_worker_built_while_azure_ml_is_unreachable_still_ingests_ticks_and_serves_status(tmp_path, monkeypatch):
    """Building the worker (every Functions cold start) no longer reaches Azure ML: only the calls
    that need it fail (submission: retried on the next tick), never ingest, status or the tick."""
    import datetime as dt

    from azure.core.exceptions import ServiceRequestError

    from shared.messages import ImageUploaded
    from worker.adapters.azure.azureml import v2
    from worker.app.bootstrap import build_worker_from_settings
    from worker.views import status_view

    class Unreachable:
        def __getattr__(self, _name):
            def call(*_args, **_kwargs):
                raise ServiceRequestError("Failed to resolve 'management.azure.com'")

            return SimpleNamespace(
                get=call, list=call, create_or_update=call, begin_create_or_update=call, begin_cancel=call, download=call
            )

    clients: list[object] = []
    monkeypatch.setattr(v2, "ml_client", lambda cfg, env: clients.append(Unreachable()) or clients[-1])
    env = {
        "RETRAIN__WORKER__BACKEND": "azureml", "RETRAIN__WORKER__STATE_DIR": str(tmp_path / "state"),
        "RETRAIN__WORKER__IMAGES_ROOT": str(tmp_path / "images"), "RETRAIN__AZUREML__SUBSCRIPTION_ID": "sub",
        "RETRAIN__AZUREML__RESOURCE_GROUP": "rg", "RETRAIN__AZUREML__WORKSPACE_NAME": "ws",
        "RETRAIN__MODELS__BIRDS__MIN_NEW_IMAGES": "2", "RETRAIN__MODELS__BIRDS__MIN_PER_CLASS": "1",
        "RETRAIN__MODELS__BIRDS__QUIET_PERIOD": "0s", "RETRAIN__AZUREML__SUBMIT_BUDGET_SECONDS": "0.2",
    }  # fmt: skip
    worker = build_worker_from_settings(env)
    assert clients == []  # nothing reached for Azure ML while building

    for i in range(20):  # enough for both classes in both splits
        label = ("chicken", "turkey")[i % 2]
        worker.handle(ImageUploaded.of("birds", f"{label}/{i}.jpg", "e1", 10, occurred_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC)))
    worker.tick()
    worker.tick()  # submission failed (unreachable) and was tried again; the tick itself went on

    assert len(clients) >= 1  # submission did try to connect
    with worker.store.transaction() as tx:
        [run] = tx.runs("birds")
    assert run.state == "planned"  # not failed: an unreachable service is retried
    assert run.detail.startswith("not submitted yet, retried at every tick: ")
    assert "Failed to resolve 'management.azure.com'" in run.detail  # why, where `retrain runs` and the status view show it
    view = status_view(worker.store, worker.config, "birds")
    assert json.dumps(view, default=str)  # the status endpoint's answer


def test_the_configured_onnx_tolerance_and_samples_reach_the_job_and_the_v1_run():
    from worker.adapters.azure.azureml.v1 import build_environment as v1_environment
    from worker.adapters.azure.azureml.v1 import build_script_run_config, serialized_run_config

    strict = RunSpec(backend_run_id="birds-0003-abcd1234-a1", model="birds", manifest={}, data_dir="",
                     training=TrainingArgs(onnx_tolerance=1e-6, onnx_samples=7), tags={"model": "birds", "manifest_sha256": SHA})  # fmt: skip
    command = job_document(build_command_job(strict, SETTINGS, build_environment(SETTINGS)))["command"].split()
    assert command[command.index("--onnx_tolerance") + 1] == "1e-06"
    assert command[command.index("--onnx_samples") + 1] == "7"
    assert "--export_onnx" in command
    v1 = serialized_run_config(build_script_run_config(strict, SETTINGS, v1_environment(SETTINGS)))["arguments"]
    assert v1[v1.index("--onnx_tolerance") + 1] == "1e-06"
    assert v1[v1.index("--onnx_samples") + 1] == "7"
