"""A configuration or credential problem met at run time, as one line that names the setting and
the fix (the command line prints it instead of a traceback; `--debug` shows the traceback)."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from typing import Any

from shared.redact import printable, redact

# What to install for a package that is not installed, by the top-level module that was missing.
EXTRAS = {"torch": "retrain[train]", "torchvision": "retrain[train]", "onnx": "retrain[train]", "onnxruntime": "retrain[train]",
          "numpy": "retrain[train]", "PIL": "retrain[train]", "azure": "retrain[azure]", "azureml": "retrain[azureml-v1]",
          "mlflow": "retrain[tracking]", "sqlalchemy": "retrain[tracking]", "horovod": "horovod (scripts/build_horovod.sh)"}  # fmt: skip

TRAINING_MODULES = ("torch", "torchvision", "numpy", "PIL", "onnx", "onnxruntime")  # train.py, and the ONNX export at completion
IDENTITY_SETTINGS = ("RETRAIN_TABLES__tableServiceUri", "RETRAIN_STORAGE__blobServiceUri", "RETRAIN_ARTIFACTS__blobServiceUri",
                     "RETRAIN_SERVICEBUS__fullyQualifiedNamespace")  # fmt: skip
SIGN_IN = "sign in (`az login` here; a managed identity in Azure; or AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_CLIENT_SECRET)"


def missing_dependencies(config: Any, env: Mapping[str, str]) -> list[str]:
    """What the configured backend, ledger and tracking need in this Python and is not installed,
    each as 'module (pip install ...)'; empty when all is there."""
    needed: list[str] = []
    if config.worker.backend == "local":
        needed += list(TRAINING_MODULES)
        if any(m.training.distributed == "horovod" for m in config.models.values()):
            needed.append("horovod")
        if config.worker.tracking == "mlflow":
            needed += ["mlflow", "sqlalchemy"]
    elif config.azureml.sdk == "v1":
        needed += ["azureml.core", "azure.identity"]
    else:
        needed += ["azure.ai.ml", "azure.identity"]
    if config.worker.store == "table":
        needed.append("azure.data.tables")
    if any(
        env.get(name)
        for name in ("RETRAIN_STORAGE", "RETRAIN_STORAGE__blobServiceUri", "RETRAIN_ARTIFACTS", "RETRAIN_ARTIFACTS__blobServiceUri")
    ):
        needed.append("azure.storage.blob")
    return [f"{module} (pip install '{EXTRAS.get(module.split('.')[0], module)}')" for module in missing_modules(needed)]


def missing_modules(modules: list[str] | tuple[str, ...]) -> list[str]:
    """The modules (once each, in order) that cannot be imported here."""
    missing = []
    for module in dict.fromkeys(modules):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            missing.append(module)
    return missing


CONNECTION_SETTINGS = ("RETRAIN_TABLES", "RETRAIN_STORAGE", "RETRAIN_ARTIFACTS", "RETRAIN_SERVICEBUS", *IDENTITY_SETTINGS)


def _setting_holding(text: str, config: Any, env: Mapping[str, str]) -> str | None:
    """The setting an error's host or path comes from (which one to fix), if one can be told."""
    for name in CONNECTION_SETTINGS:
        value = env.get(name) or ""
        hosts = re.findall(r"(?:https?|sb)://([^/;:]+)", value) + [f"{a}." for a in re.findall(r"AccountName=([^;]+)", value)]
        if "://" not in value and "=" not in value and value:  # a bare namespace, e.g. name.servicebus.windows.net
            hosts.append(value)
        if any(host and host in text for host in hosts):
            return name
    if config is not None:
        for field in ("state_dir", "images_root", "registry_dir", "events_file"):
            folder = getattr(config.worker, field)
            if folder is not None and (text.startswith(str(folder)) or str(folder).startswith(text.rstrip("/") + "/")):
                variable = f"RETRAIN__WORKER__{field.upper()}"
                return f"worker.{field} = {folder}" + (f", from {variable}" if env.get(variable) else "")
    return None


def explain(exc: BaseException, config: Any = None, env: Mapping[str, str] | None = None) -> str:
    """One line a person can act on: what failed, which setting it comes from, what to do."""
    import os

    env = os.environ if env is None else env
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        return f"{exc.name} is not installed here: pip install '{EXTRAS.get(top, exc.name)}'"
    first = printable(redact((str(exc).strip().splitlines() or [""])[0]), limit=300)
    kind = type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        path = str(exc.filename)
        setting = _setting_holding(path, config, env)
        where = f" ({setting})" if setting else ""
        return printable(
            f"cannot use {path}{where}: {exc.strerror or kind}; choose a folder this user can write, or fix the setting", limit=500
        )
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"ClientAuthenticationError", "CredentialUnavailableError"}:
        used = [name for name in IDENTITY_SETTINGS if env.get(name)]
        via = f" for {', '.join(used)}" if used else ""
        return f"Azure sign-in failed{via}: no credential could get a token; {SIGN_IN}, or use the connection-string setting instead"
    if "ServiceRequestError" in names:
        setting = _setting_holding(str(exc), config, env)
        return printable(
            f"cannot reach Azure ({first}){f'; check {setting}' if setting else ''}: is the account or namespace name right?", limit=500
        )
    if "HttpResponseError" in names and getattr(exc, "status_code", None) == 403:
        return printable(
            f"Azure refused the call (403: {first}): the identity lacks a role; docs/azure.md lists each role and its scope", limit=500
        )
    return printable(f"{kind}: {first}" if first else kind, limit=400)
