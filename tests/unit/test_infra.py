"""infra/ checked offline: checkov scans it with no failed check, every app setting the code reads
is set by the Bicep (identity-based, never a connection string), the settings make a valid Azure
configuration, every role in docs/azure.md's table is assigned and nothing else is, the training
image is pinned and builds Horovod with NCCL and MPI. Nothing here reaches Azure."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
# mutmut runs the suite in a copy of the source folders only (pyproject [tool.mutmut]): there is no
# infra/ or functions/ to check there, and nothing in them is mutated.
pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(not (INFRA.is_dir() and (ROOT / "functions").is_dir()), reason="mutmut's copy of the tree has no infra/"),
]
APP_BICEP = INFRA / "modules" / "functionapp.bicep"
ROLES_BICEP = INFRA / "modules" / "roles.bicep"

# A connection-string setting -> the identity-based setting the deployment uses instead.
IDENTITY_FORM = {
    "RETRAIN_STORAGE": "RETRAIN_STORAGE__blobServiceUri",
    "RETRAIN_SERVICEBUS": "RETRAIN_SERVICEBUS__fullyQualifiedNamespace",
    "RETRAIN_TABLES": "RETRAIN_TABLES__tableServiceUri",
    "RETRAIN_ARTIFACTS": "RETRAIN_ARTIFACTS__blobServiceUri",
}
# Names the code reads that are not app settings of a deployment, and why.
NOT_APP_SETTINGS = {
    "RETRAIN_CONFIG": "optional: a TOML policy file deployed with the app; the RETRAIN__ settings cover the defaults",
    "RETRAIN_CRASH_AT": "tests only: the crash points of the SIGKILL tests",
    "RETRAIN_RUN_ID": "set by the backend for each training run, not on the app",
    "RETRAIN_TRAINING_DIR": "local runs only: where train.py is",
    "RETRAIN_DEBUG": "the command line only: show a traceback instead of one line",
}


def app_settings() -> dict[str, str]:
    """The Function App's appSettings as name -> value, Bicep expressions replaced by sample values."""
    text = APP_BICEP.read_text()
    block = text[text.index("appSettings: [") : text.index("]", text.index("appSettings: ["))]
    samples = {"trainingImage": "", "nodesPerJob": "1", "gpusPerNode": "1", "modelName": "birds"}
    settings = {}
    for name, value in re.findall(r"^\s*\{ name: '([^']+)', value: (.+?) \}\s*(?://.*)?$", block, re.M):
        name = re.sub(r"\$\{[^}]+\}", "BIRDS", name)
        value = value.strip()
        if re.fullmatch(r"'[^']*'", value):
            value = re.sub(r"\$\{[^}]+\}", "sample", value.strip("'"))
        else:
            inner = re.fullmatch(r"string\((\w+)\)", value)
            value = samples.get(inner.group(1) if inner else value, "sample-" + re.sub(r"\W", "", value))
        settings[name] = value
    return settings


def settings_the_code_reads() -> set[str]:
    names: set[str] = set()
    for folder in ("functions", "worker", "shared"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            names |= set(re.findall(r"[\"'%](RETRAIN_[A-Z][A-Z_]*?(?:__[A-Za-z]+)?)[\"'%]", text))
    return {n for n in names if not n.startswith("RETRAIN__")}  # RETRAIN__<SECTION>__<KEY> are configuration, checked below


def test_every_app_setting_the_code_reads_is_set_and_only_in_its_identity_based_form():
    bicep = app_settings()
    read = settings_the_code_reads()
    assert {"RETRAIN_REQUESTS_QUEUE", "RETRAIN_SERVICEBUS", "RETRAIN_EVENTS_TOPIC"} <= read  # the scan finds bindings and reads
    for name in sorted(read - set(NOT_APP_SETTINGS)):
        if name in IDENTITY_FORM:
            assert IDENTITY_FORM[name] in bicep, f"{name}: infra/ sets neither it nor {IDENTITY_FORM[name]}"
            assert name not in bicep, f"{name} is a connection string: infra/ uses identity-based connections only"
        elif name.split("__")[0] in IDENTITY_FORM:
            continue  # another spelling of an identity-based connection (e.g. __credential)
        else:
            assert name in bicep, f"the code reads {name} but infra/ does not set it"
    # The Service Bus trigger's identity-based connection needs the identity to use.
    assert bicep["RETRAIN_SERVICEBUS__credential"] == "managedidentity"
    assert "RETRAIN_SERVICEBUS__clientId" in bicep
    assert {"AzureWebJobsStorage__accountName", "AzureWebJobsStorage__credential", "AzureWebJobsStorage__clientId"} <= set(bicep)
    assert "AzureWebJobsStorage" not in bicep  # never a connection string (nor UseDevelopmentStorage=true from local settings)


def test_the_app_settings_make_a_valid_azure_configuration_that_creates_no_compute():
    from worker.app.bootstrap import check_azureml_settings
    from worker.config import load_config

    env = app_settings()
    config = load_config(None, env=env)
    assert (config.worker.backend, config.worker.store, config.azureml.sdk) == ("azureml", "table", "v2")
    assert config.azureml.auth == "managed_identity"
    assert config.azureml.create_compute is False  # the template creates the cluster; the app's role could not
    assert config.azureml.compute_target == env["RETRAIN__AZUREML__COMPUTE_TARGET"]
    assert config.azureml.job_identity_client_id
    assert config.azureml.training_image is None  # the parameter left empty: DDP on the default environment
    check_azureml_settings(config.azureml, env)  # every workspace id is there, no secret needed


def test_local_settings_hold_every_setting_of_the_deployment_under_the_same_names():
    local = json.loads((ROOT / "local.settings.json.example").read_text())["Values"]
    bicep = app_settings()
    local_only = {
        "FUNCTIONS_WORKER_RUNTIME",
        "AzureWebJobsStorage",
    }  # Flex sets the runtime itself; the host storage is identity-based there
    for name in set(local) - local_only:
        if name.startswith("RETRAIN__MODELS__"):
            continue  # a policy knob the example shows; models are configured per deployment
        assert name in bicep, f"local.settings.json.example has {name}; infra/ does not set it"


def role_assignments() -> set[tuple[str, str, str]]:
    """(identity, role, scope) of every assignment in roles.bicep."""
    text = ROLES_BICEP.read_text()
    found = set()
    for block in re.split(r"\nresource ", text)[1:]:
        if "Microsoft.Authorization/roleAssignments" not in block.split("\n", 1)[0]:
            continue
        scope = re.search(r"^\s*scope: (\w+)$", block, re.M)
        role = re.search(r"roleIds(?:\['([^']+)'\]|\.(\w+))", block)
        principal = re.search(r"principalId: (\w+)PrincipalId", block)
        assert scope is not None, block[:200]
        assert role is not None, block[:200]
        assert principal is not None, block[:200]
        found.add((principal.group(1), role.group(1) or role.group(2), scope.group(1)))
    return found


def documented_roles() -> set[tuple[str, str, str]]:
    """The rows of docs/azure.md's role table: | identity | role | `scope` | calls |."""
    text = (ROOT / "docs" / "azure.md").read_text()
    table = text[text.index("| identity | role | scope |") :].split("\n\n", 1)[0]
    rows = set()
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.add((cells[0], cells[1], cells[2].strip("`")))
    return rows


def test_every_role_in_the_docs_table_is_assigned_at_its_scope_and_nothing_else_is():
    assigned, documented = role_assignments(), documented_roles()
    assert len(documented) >= 10
    assert assigned == documented
    ids = dict(re.findall(r"^\s*'?([A-Za-z][A-Za-z .]+?)'?: '([0-9a-f-]{36})'$", ROLES_BICEP.read_text(), re.M))
    assert {role for _, role, _ in assigned} <= set(ids)
    # Least privilege: nothing at the resource group or subscription, no Owner/Contributor, no compute creation.
    assert not {role for _, role, _ in assigned} & {"Owner", "Contributor", "AzureML Compute Operator"}
    assert all(scope not in ("resourceGroup", "subscription") for _, _, scope in assigned)


def test_no_key_sas_or_connection_string_is_read_or_stored_by_the_template():
    for path in INFRA.rglob("*.bicep"):
        text = path.read_text()
        for forbidden in ("listKeys(", "listConnectionStrings(", "AccountKey=", "SharedAccessKey", "listAccountSas("):
            assert forbidden not in text, f"{path.name} uses {forbidden}"
    storage = (INFRA / "modules" / "storage.bicep").read_text()
    assert storage.count("allowSharedKeyAccess: false") == 2
    assert "disableLocalAuth: true" in (INFRA / "modules" / "servicebus.bicep").read_text()


def test_checkov_scans_infra_with_no_failed_check_and_a_reason_for_every_skip():
    installed = sorted((Path.home() / ".cache" / "retrain").glob("checkov-*/bin/checkov"))
    checkov = os.environ.get("RETRAIN_CHECKOV") or (str(installed[-1]) if installed else "checkov (not installed)")
    if not Path(checkov).exists():
        pytest.fail(f"checkov is not installed at {checkov}: `make checkov` installs it (make test does)")
    done = subprocess.run(
        [checkov, "-d", str(INFRA), "--framework", "bicep", "-o", "json", "--skip-download"],
        capture_output=True, text=True, timeout=600, check=False, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )  # fmt: skip
    report = json.loads(done.stdout)
    summary = report["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["resource_count"] >= 60  # every file was read: modules, main and events
    assert summary["failed"] == 0, [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    for skipped in report["results"]["skipped_checks"]:
        reason = (skipped.get("check_result") or {}).get("suppress_comment", "")
        assert len(reason) > 30, f"{skipped['check_id']} on {skipped['resource']} is skipped without a reason"


def test_the_training_image_is_pinned_and_builds_horovod_with_nccl_mpi_and_pytorch():
    dockerfile = (ROOT / "training" / "environment" / "Dockerfile").read_text()
    [base] = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    name, _, tag = base.rpartition(":")
    assert name
    assert re.fullmatch(r"\d+\.\d+\.\d+-[\w.-]+", tag), f"the base image is not pinned by version: {base}"
    for needed in ("requirements.txt", "requirements-horovod.txt", "HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_MPI=1",
                   "HOROVOD_WITH_PYTORCH=1", "HOROVOD_WITH_GLOO=1", "-std=c++20", "hvd.nccl_built()", "hvd.mpi_built()",
                   "openmpi-bin"):  # fmt: skip
        assert needed in dockerfile, needed
    pins = re.findall(r"(\S+?)==(\S+)", dockerfile)
    assert pins
    assert "latest" not in dockerfile.lower().replace("@latest changes", "")


def test_the_azd_template_provisions_infra_deploys_the_worker_and_then_subscribes_its_functions():
    template = yaml.safe_load((ROOT / "azure.yaml").read_text())
    assert template["infra"] == {"provider": "bicep", "path": "infra", "module": "main"}
    assert template["services"]["worker"]["host"] == "function"
    hook = template["hooks"]["postdeploy"]["run"]
    assert "infra/events.bicep" in hook
    outputs = set(re.findall(r"^output (\w+) ", (INFRA / "main.bicep").read_text(), re.M))
    for variable in re.findall(r"\$([A-Z_]+)", hook):
        assert variable in outputs | {"AZURE_RESOURCE_GROUP"}, f"the hook reads ${variable}, which main.bicep does not output"
    events = (INFRA / "events.bicep").read_text()
    from functions import blob_images, eventgrid_runs

    for module in (blob_images, eventgrid_runs):
        [name] = re.findall(r'@bp\.function_name\("(\w+)"\)', Path(module.__file__).read_text())
        assert f"/functions/{name}'" in events, f"events.bicep does not deliver to {name}"


def test_sign_in_is_wired_for_the_app_roles_the_code_checks_and_keeps_event_grid_reachable():
    from functions import auth

    roles = {r["value"] for r in json.loads((INFRA / "app-roles.json").read_text())}
    assert roles == {auth.READER, auth.REQUESTER, auth.OPERATOR}
    app = APP_BICEP.read_text()
    assert "{ name: 'RETRAIN_AUTH', value: empty(authClientId) ? 'function_key' : 'entra' }" in app
    assert "requireAuthentication: true" in app
    assert "excludedPaths: ['/runtime/webhooks/eventgrid']" in app  # Event Grid's deliveries carry the system key, not a sign-in
