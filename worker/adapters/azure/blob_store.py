"""Azure Blob Storage as a blob store: one container, the service's ETags, write-once by a conditional PUT.

The contract is DirectoryBlobStore's, so the worker cannot tell them apart: `list` is sorted by
path (the service's own order is not guaranteed to match Python's for non-ASCII names), a
missing blob is `None` from `info` and FileNotFoundError from `read`, and `write_once` sends
If-None-Match: * (`overwrite=False`), so when writers race the service admits exactly one and
every other gets False, whatever it tried to write. A call whose PUT succeeded but whose
response was lost is retried by the SDK and then also reports False; the port allows that
("same content twice is fine"), and the stored bytes are still this writer's.

The Azure SDK is imported only when a store is built, so importing the worker needs no Azure
packages and does no I/O. Unexpected SDK errors become BlobStoreError with a redacted one-line
message and no chained cause, because SDK messages and tracebacks can carry request URLs with
SAS signatures or connection-string fragments.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import RetrainError
from shared.redact import redact
from worker.ports import BlobInfo, BlobStore

if TYPE_CHECKING:
    from azure.storage.blob import ContainerClient


class BlobStoreError(RetrainError):
    """A blob store operation failed for a reason the caller cannot fix by itself (treated as transient)."""

    def __init__(self, message: str, *, status_code: int | None = None, error_code: str | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.error_code = error_code


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


class AzureBlobStore(BlobStore):
    """One container. Pass a ContainerClient (not closed by `close()`), or a connection string or account URL plus the container name."""

    def __init__(
        self,
        container: ContainerClient | str,
        container_name: str | None = None,
        *,
        credential: Any = None,
        create_container: bool = True,
        **client_options: Any,
    ):
        from azure.storage.blob import ContainerClient

        self._owned: list[Any] = []  # clients and credentials this store made, closed by close()
        if isinstance(container, str):
            if not container_name:
                raise TypeError("container_name is required with a connection string or account URL")
            if container.startswith(("https://", "http://")):
                client = ContainerClient(container, container_name, credential=credential, **client_options)
            else:
                client = ContainerClient.from_connection_string(container, container_name, credential=credential, **client_options)
            self._owned.append(client)
        else:
            if container_name is not None or credential is not None or client_options:
                raise TypeError("a ContainerClient carries its own name, credential and options")
            client = container
        self.container = client
        self.container_name: str = client.container_name
        if create_container:
            try:
                self._ensure_container()
            except BaseException:
                self.close()
                raise

    @classmethod
    def from_connection_string(cls, conn: str, container: str, **options: Any) -> AzureBlobStore:
        """For Azurite and shared-key accounts (`create_container=False` where the identity may not create one)."""
        if conn.startswith(("https://", "http://")):
            raise ValueError("expected a connection string, got a URL; use AzureBlobStore.from_account_url")
        return cls(conn, container, **options)

    @classmethod
    def from_account_url(cls, account_url: str, container: str, credential: Any = None, **options: Any) -> AzureBlobStore:
        """For Entra ID: `credential` defaults to DefaultAzureCredential (managed identity in Azure, az login locally)."""
        owned_credential = None
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = owned_credential = DefaultAzureCredential()
        try:
            store = cls(account_url, container, credential=credential, **options)
        except BaseException:
            if owned_credential is not None:
                owned_credential.close()
            raise
        if owned_credential is not None:
            store._owned.append(owned_credential)
        return store

    # -- the port ------------------------------------------------------------------------------
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        from azure.core.exceptions import ResourceNotFoundError

        with self._errors("list", prefix):
            try:
                found = [
                    BlobInfo(path=b.name, etag=_etag(b.etag), size=b.size or 0)
                    for b in self.container.list_blobs(name_starts_with=prefix or None)
                ]
            except ResourceNotFoundError:
                return  # no container yet: nothing stored, like a directory store whose root is missing
        yield from sorted(found, key=lambda b: b.path)

    def info(self, path: str) -> BlobInfo | None:
        from azure.core.exceptions import ResourceNotFoundError

        with self._errors("info", path):
            try:
                props = self.container.get_blob_client(path).get_blob_properties()
            except ResourceNotFoundError:
                return None
        return BlobInfo(path=path, etag=_etag(props.etag), size=props.size or 0)

    def read(self, path: str) -> bytes:
        from azure.core.exceptions import ResourceNotFoundError

        with self._errors("read", path):
            try:
                return self.container.download_blob(path).readall()
            except ResourceNotFoundError:
                raise FileNotFoundError(f"blob not found: {self.container_name}/{path}") from None

    def write_once(self, path: str, data: bytes) -> bool:
        from azure.core.exceptions import ResourceExistsError

        with self._errors("write", path):
            try:
                self.container.upload_blob(path, data, overwrite=False)  # If-None-Match: *
            except ResourceExistsError:
                return False
        return True

    def local_path(self, path: str) -> Path | None:
        return None

    # -- lifecycle -----------------------------------------------------------------------------
    def _ensure_container(self) -> None:
        from azure.core.exceptions import ResourceExistsError

        with self._errors("create container", ""):
            if not self.container.exists():
                with suppress(ResourceExistsError):  # another worker created it between our check and our create
                    self.container.create_container()

    def close(self) -> None:
        """Close the client (and credential) this store created; a ContainerClient passed in stays open."""
        owned, self._owned = self._owned, []
        for resource in reversed(owned):
            resource.close()

    def __enter__(self) -> AzureBlobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _errors(self, operation: str, path: str) -> Iterator[None]:
        """Re-raise SDK errors as BlobStoreError: first line of the message only, redacted, cause dropped."""
        from azure.core.exceptions import AzureError, HttpResponseError

        try:
            yield
        except AzureError as exc:
            status = exc.status_code if isinstance(exc, HttpResponseError) else None
            code = getattr(exc, "error_code", None)
            code = getattr(code, "value", code)  # StorageErrorCode is a str enum; keep the service's spelling
            summary = (str(exc.message or exc).strip().splitlines() or [""])[0]
            request_id = None
            response = getattr(exc, "response", None)
            if response is not None:
                request_id = response.headers.get("x-ms-request-id")
            detail = ", ".join(f"{k} {v}" for k, v in (("status", status), ("code", code), ("request id", request_id)) if v)
            target = f"{self.container_name}/{path}" if path else self.container_name
            message = f"Azure blob {operation} failed for {target!r}: {type(exc).__name__}: {summary}" + (f" ({detail})" if detail else "")
            raise BlobStoreError(redact(message), status_code=status, error_code=str(code) if code else None) from None
