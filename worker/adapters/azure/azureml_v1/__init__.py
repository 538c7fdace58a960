"""Azure ML through azureml-core (SDK v1), as the reference article does it: out of support since
2026-06-30 but still accepted by workspaces. `seam` wraps the SDK calls, `backend` submits runs,
`registry` registers models, `workspace` connects from configuration."""

from .backend import AzureMLBackend, AzureMLSettings, build_environment, build_script_run_config, serialized_run_config
from .registry import AzureMLModelRegistry
from .seam import AzureMLError, AzureMLSeam, PermanentSubmitError, RunInfo, WorkspaceSeam, is_transient, map_status
from .workspace import authentication, compute_provisioning, ensure_compute, load_workspace, settings_from_config

__all__ = [
    "AzureMLBackend",
    "AzureMLError",
    "AzureMLModelRegistry",
    "AzureMLSeam",
    "AzureMLSettings",
    "PermanentSubmitError",
    "RunInfo",
    "WorkspaceSeam",
    "authentication",
    "build_environment",
    "build_script_run_config",
    "compute_provisioning",
    "ensure_compute",
    "is_transient",
    "load_workspace",
    "map_status",
    "serialized_run_config",
    "settings_from_config",
]
