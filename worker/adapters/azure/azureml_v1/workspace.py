"""Connecting to the workspace from configuration: settings, authentication, the compute cluster."""

from __future__ import annotations

from typing import Any

from .backend import AzureMLSettings


def settings_from_config(cfg: Any) -> AzureMLSettings:
    return AzureMLSettings(
        experiment=cfg.experiment, compute_target=cfg.compute_target, node_count=cfg.node_count, gpus_per_node=cfg.gpus_per_node,
        curated_environment=cfg.curated_environment, base_image=cfg.base_image, images_datastore=cfg.images_datastore,
        artifacts_datastore=cfg.artifacts_datastore, submit_budget_seconds=cfg.submit_budget_seconds,
    )  # fmt: skip


def authentication(cfg: Any, env: Any) -> Any:
    """Service principal, managed identity or the interactive default, chosen by settings."""
    from azureml.core.authentication import InteractiveLoginAuthentication, MsiAuthentication, ServicePrincipalAuthentication

    if cfg.auth == "service_principal":
        secret = env.get(cfg.client_secret_env)
        if not (cfg.tenant_id and cfg.client_id and secret):
            raise ValueError(f"service_principal auth needs azureml.tenant_id, azureml.client_id and ${cfg.client_secret_env}")
        return ServicePrincipalAuthentication(
            tenant_id=cfg.tenant_id, service_principal_id=cfg.client_id, service_principal_password=secret
        )
    if cfg.auth == "managed_identity":
        return MsiAuthentication(identity_config={"client_id": cfg.client_id} if cfg.client_id else None)
    return InteractiveLoginAuthentication(tenant_id=cfg.tenant_id)


def load_workspace(cfg: Any, env: Any) -> Any:
    """The workspace from config.json or from subscription / resource group / name (network)."""
    from azureml.core import Workspace

    auth = authentication(cfg, env)
    if cfg.config_path:
        return Workspace.from_config(path=cfg.config_path, auth=auth)
    if not (cfg.subscription_id and cfg.resource_group and cfg.workspace_name):
        raise ValueError("set azureml.config_path, or azureml.subscription_id, resource_group and workspace_name")
    return Workspace.get(name=cfg.workspace_name, subscription_id=cfg.subscription_id, resource_group=cfg.resource_group, auth=auth)


def compute_provisioning(cfg: Any) -> Any:
    """The AmlCompute cluster the article creates, from settings (built offline, created by ensure_compute)."""
    from azureml.core.compute import AmlCompute

    return AmlCompute.provisioning_configuration(
        vm_size=cfg.vm_size,
        min_nodes=cfg.min_nodes,
        max_nodes=cfg.max_nodes,
        idle_seconds_before_scaledown=cfg.idle_seconds_before_scaledown,
    )


def ensure_compute(workspace: Any, cfg: Any) -> Any:
    from azureml.core.compute import ComputeTarget
    from azureml.exceptions import ComputeTargetException

    try:
        return ComputeTarget(workspace=workspace, name=cfg.compute_target)
    except ComputeTargetException:
        if not cfg.create_compute:
            raise
    target = ComputeTarget.create(workspace, cfg.compute_target, compute_provisioning(cfg))
    target.wait_for_completion(show_output=False, timeout_in_minutes=20)
    return target
