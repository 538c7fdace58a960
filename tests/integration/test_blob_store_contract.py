"""One behavioural contract for every BlobStore adapter: a directory, and Azure Blob Storage on a real Azurite.

The worker treats blob stores as interchangeable, so each test here runs against both; a
difference between them is a bug in one. The Azure case gets a fresh container per test,
deleted afterwards; the emulator itself is shared by the session (`azurite` fixture).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from worker.adapters.azure.blob_store import AzureBlobStore
from worker.adapters.local.directory_blobs import DirectoryBlobStore
from worker.ports import BlobStore

pytestmark = pytest.mark.integration


@dataclass
class Backend:
    name: str
    make: Callable[[], BlobStore]  # a new store over the same storage: another writer
    overwrite: Callable[[str, bytes], None]  # change a blob's bytes behind the store's back


def _directory_backend(tmp_path) -> Iterator[Backend]:
    root = tmp_path / "blobs"

    def overwrite(path: str, data: bytes) -> None:
        (root / path).write_bytes(data)

    yield Backend("directory", lambda: DirectoryBlobStore(root, images_only=False), overwrite)


def _azure_backend(azurite) -> Iterator[Backend]:
    from azure.storage.blob import ContainerClient

    conn, name = azurite.connection_string, f"contract-{uuid.uuid4().hex[:20]}"
    admin = ContainerClient.from_connection_string(conn, name)
    stores: list[AzureBlobStore] = []

    def make() -> AzureBlobStore:
        stores.append(AzureBlobStore.from_connection_string(conn, name))
        return stores[-1]

    def overwrite(path: str, data: bytes) -> None:
        admin.upload_blob(path, data, overwrite=True)

    try:
        yield Backend("azure", make, overwrite)
    finally:
        for store in stores:
            store.close()
        if admin.exists():
            admin.delete_container()
        admin.close()


@pytest.fixture(params=["directory", "azure"])
def backend(request, tmp_path) -> Iterator[Backend]:
    if request.param == "directory":
        yield from _directory_backend(tmp_path)
    else:
        yield from _azure_backend(request.getfixturevalue("azurite"))


def test_write_once_then_read(backend):
    store = backend.make()
    data = b'{"run": "birds-0001"}'
    assert store.write_once("manifests/birds-0001.json", data) is True
    assert store.read("manifests/birds-0001.json") == data
    info = store.info("manifests/birds-0001.json")
    assert info is not None
    assert (info.path, info.size) == ("manifests/birds-0001.json", len(data))
    assert info.etag
    assert '"' not in info.etag
    local = store.local_path("manifests/birds-0001.json")
    assert local is None or local.read_bytes() == data  # only a directory store has a local path


def test_second_write_once_returns_false_and_keeps_the_first_content(backend):
    store, other = backend.make(), backend.make()
    assert store.write_once("runs/a.bin", b"first") is True
    etag = store.info("runs/a.bin").etag
    assert other.write_once("runs/a.bin", b"second, longer") is False
    assert store.write_once("runs/a.bin", b"first") is False  # the same content again is fine, and not a write
    assert other.read("runs/a.bin") == b"first"
    assert store.info("runs/a.bin").etag == etag


def test_concurrent_write_once_admits_exactly_one_writer(backend):
    writers = 4
    stores = [backend.make() for _ in range(writers)]
    for round_ in range(5):  # several rounds: a single race can be won by whoever starts first
        path = f"race/{round_}.bin"
        payloads = [bytes([i]) * (64 * 1024 + i) for i in range(writers)]
        barrier = threading.Barrier(writers)

        def write(i: int, path: str = path, payloads: list[bytes] = payloads, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait(timeout=10)
            return stores[i].write_once(path, payloads[i])

        with ThreadPoolExecutor(writers) as pool:
            results = list(pool.map(write, range(writers)))
        assert results.count(True) == 1, results
        winner = results.index(True)
        assert stores[0].read(path) == payloads[winner]
        assert stores[0].info(path).size == len(payloads[winner])


def test_missing_blob_has_no_info_and_cannot_be_read(backend):
    store = backend.make()
    assert store.info("nothing/here.bin") is None
    assert list(store.list()) == []
    store.write_once("something/else.bin", b"x")
    assert store.info("nothing/here.bin") is None
    with pytest.raises(FileNotFoundError):
        store.read("nothing/here.bin")


def test_list_with_and_without_prefix_is_sorted_with_current_etags(backend):
    store = backend.make()
    names = ["manifests/r2.json", "birds/turkey/1.jpg", "birds/chicken/2.jpg", "birds/chicken/1.jpg", "manifests/r1.json"]
    for i, name in enumerate(names):
        assert store.write_once(name, f"content {i}".encode() * (i + 1))

    listed = list(store.list())
    assert [b.path for b in listed] == sorted(names)
    for blob in listed:
        assert blob == store.info(blob.path)
        assert blob.size == len(store.read(blob.path))
    assert [b.path for b in store.list("birds/")] == ["birds/chicken/1.jpg", "birds/chicken/2.jpg", "birds/turkey/1.jpg"]
    assert [b.path for b in store.list("birds/ch")] == ["birds/chicken/1.jpg", "birds/chicken/2.jpg"]  # a string prefix
    assert [b.path for b in store.list("manifests/r1")] == ["manifests/r1.json"]
    assert list(store.list("nothing/")) == []
    assert len({b.etag for b in listed}) == len(names)  # different content, different etags


def test_list_is_sorted_by_full_path_across_depths(backend):
    store = backend.make()
    names = ["z.bin", "a/x.bin", "a b/y.bin", "a-c/q.bin", "a/b/deeper.bin"]
    for name in names:
        store.write_once(name, b"x")
    assert [b.path for b in store.list()] == sorted(names)


def test_etag_changes_when_content_changes(backend):
    store = backend.make()
    store.write_once("birds/chicken/1.jpg", b"version 1")
    first = store.info("birds/chicken/1.jpg")
    assert store.info("birds/chicken/1.jpg") == first  # stable while unchanged
    assert list(store.list()) == [first]

    backend.overwrite("birds/chicken/1.jpg", b"version 2, a different size")
    second = store.info("birds/chicken/1.jpg")
    assert second.etag != first.etag
    assert second.size == len(b"version 2, a different size")
    assert list(store.list()) == [second]
    assert store.read("birds/chicken/1.jpg") == b"version 2, a different size"


def test_names_with_spaces_and_unicode_round_trip(backend):
    store = backend.make()
    # "！" (U+FF01) sorts before "🐔" (U+1F414) by code point but after it in UTF-16, which Azurite lists by
    names = ["birds/blue jay/ñandú 1.jpg", "birds/курица/🐔 鸡.png", "birds/курица/！.png", "odd/100% + more#1 ?.bin", "odd/a&b=c;d.bin"]
    for i, name in enumerate(names):
        assert store.write_once(name, f"{i}:{name}".encode()) is True
    for i, name in enumerate(names):
        assert store.read(name) == f"{i}:{name}".encode()
        assert store.info(name).path == name
        assert store.write_once(name, b"again") is False
    assert [b.path for b in store.list()] == sorted(names)
    assert [b.path for b in store.list("birds/blue jay/")] == ["birds/blue jay/ñandú 1.jpg"]


# -- Azure only: what the directory store has no counterpart for ------------------------------------


def test_azure_errors_are_wrapped_redacted_and_unchained(azurite):
    from worker.adapters.azure.blob_store import BlobStoreError

    key = azurite.connection_string.split("AccountKey=")[1].split(";")[0]
    wrong = azurite.connection_string.replace(key, "A" * 86 + "==")
    with pytest.raises(BlobStoreError) as caught:
        AzureBlobStore.from_connection_string(wrong, f"denied-{uuid.uuid4().hex[:8]}")
    error = caught.value
    assert error.status_code == 403
    assert error.error_code == "AuthorizationFailure"
    assert error.__cause__ is None
    assert error.__suppress_context__
    assert key not in str(error)
    assert "A" * 86 not in str(error)

    sas_url = f"{azurite.blob_endpoint}?sv=2021-08-06&ss=b&srt=co&sp=rl&se=2030-01-01T00:00:00Z&sig=NotARealSignature0123"
    with pytest.raises(BlobStoreError) as caught:
        AzureBlobStore(sas_url, f"denied-{uuid.uuid4().hex[:8]}")
    assert caught.value.status_code == 403
    assert "NotARealSignature0123" not in str(caught.value)


def test_azure_store_creates_its_container_once_and_leaves_a_given_client_open(azurite):
    from azure.storage.blob import ContainerClient

    name = f"created-{uuid.uuid4().hex[:12]}"
    with ContainerClient.from_connection_string(azurite.connection_string, name) as client:
        assert not client.exists()
        with AzureBlobStore(client) as store:
            assert client.exists()
            assert store.write_once("a.bin", b"a")
        with AzureBlobStore.from_connection_string(azurite.connection_string, name) as again:  # exists already: fine
            assert again.read("a.bin") == b"a"
        assert client.exists()  # still usable after the store that borrowed it closed
        client.delete_container()


def test_info_on_a_folder_is_none_like_a_missing_blob(backend):
    store = backend.make()
    store.write_once("birds/chicken/1.jpg", b"x")
    assert store.info("birds") is None
    assert store.info("birds/chicken") is None


def test_a_models_view_of_the_images_container_backfills_by_prefix(azurite, tmp_path):
    """`retrain` in the Functions app: the images container holds <model>/<label>/<file>."""
    from tests.fakes.harness import make_harness
    from worker.app.bootstrap import images_stores
    from worker.config import load_config

    container = f"images{uuid.uuid4().hex[:12]}"
    admin = AzureBlobStore.from_connection_string(azurite.connection_string, container)
    for i in range(3):
        admin.write_once(f"birds/chicken/{i}.jpg", b"c%d" % i)
    admin.write_once("cats/tabby/0.jpg", b"not a bird")
    config = load_config(None, env={"RETRAIN__WORKER__STATE_DIR": str(tmp_path)})
    stores = images_stores(config, {"RETRAIN_STORAGE": azurite.connection_string, "RETRAIN_IMAGES_CONTAINER": container})
    assert [b.path for b in stores["birds"].list()] == ["chicken/0.jpg", "chicken/1.jpg", "chicken/2.jpg"]
    assert stores["birds"].info("chicken/1.jpg").etag == admin.info("birds/chicken/1.jpg").etag
    h = make_harness(tmp_path)
    h.worker.blobs = stores
    assert h.request(prefix="chicken/").detail == "registered 3 images"
    admin.close()
