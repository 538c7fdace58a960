"""Azure ML: training runs and the model registry.

`backend` submits runs and follows them, `registry` registers versions and moves the champion tag,
both SDK-neutral through `seam.AzureMLSeam`. `v2` is the supported SDK (azure-ai-ml command jobs,
MLflow metrics; the default), `v1` the one the reference article uses (azureml-core, out of
support since 2026-06-30, still accepted by workspaces; `[azureml] sdk = "v1"`).
"""
