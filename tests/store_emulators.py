"""Local emulators of the other object stores the mirror names, started by the tests on 127.0.0.1:

    gcs = GcsEmulator.start(folder)      # gs://  gcp-storage-emulator (PyPI, requirements-dev.txt), in memory
    azure = Azurite.start(folder)        # az://  Azurite, Microsoft's Azure Storage emulator (npm, installed on first
                                         #        use into ~/.cache/train_improved/azurite: the npm registry is the
                                         #        only network needed)
    url = gcs.url("run1"); os.environ.update(gcs.env)   # what a trainer process needs to reach it
    gcs.filesystem()                                     # an fsspec filesystem on it, for the test's own checks
    gcs.stop()

Emulator limits the tests work around, each in .env: gcsfs >= 2026.10 asks GCS's gRPC control plane for a bucket's
layout first, which an emulator does not serve (60 s per call): GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false keeps to
gcsfs's plain HTTP client (the one that handles ordinary buckets on real GCS too); NO_GCE_CHECK=true skips the
metadata-server probe of credential discovery (the emulator takes anonymous requests)."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from s3_server import HOST, free_ports

AZURITE_VERSION = "3.37.0"
AZURITE_CACHE = Path.home() / ".cache" / "train_improved" / f"azurite-{AZURITE_VERSION}"
# Azurite's documented development account (public: https://learn.microsoft.com/azure/storage/common/storage-use-azurite)
AZURE_ACCOUNT = "devstoreaccount1"
AZURE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the emulator exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the emulator did not listen on {HOST}:{port} within {seconds:.0f} s")


class _Emulator:
    bucket = "test-bucket"
    protocol = ""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log

    def url(self, prefix: str) -> str:
        return f"{self.protocol}://{self.bucket}/{prefix}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def filesystem(self):
        import fsspec
        with mock.patch.dict(os.environ, self.env):  # the backend reads its endpoint and credentials when built
            return fsspec.filesystem(self.protocol, skip_instance_cache=True)


class GcsEmulator(_Emulator):
    """gcp-storage-emulator, in memory, with its default bucket made at start."""

    protocol = "gs"

    @staticmethod
    def binary() -> str | None:
        here = Path(sys.executable).parent / "gcp-storage-emulator"
        return str(here) if here.exists() else shutil.which("gcp-storage-emulator")

    @classmethod
    def start(cls, folder: Path) -> "GcsEmulator":
        port, log = free_ports(1)[0], folder / "gcs.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([cls.binary(), "start", f"--host={HOST}", f"--port={port}", "--in-memory",
                                     f"--default-bucket={cls.bucket}"], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        wait_for_port(port, proc, log)
        return cls(proc, port, log)

    @property
    def env(self) -> dict[str, str]:
        return dict(STORAGE_EMULATOR_HOST=f"http://{HOST}:{self.port}", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
                    NO_GCE_CHECK="true")


class Azurite(_Emulator):
    """Azurite's blob service, its data in `folder`, with the container made at start."""

    protocol = "az"

    @staticmethod
    def binary(install: bool = True) -> str | None:
        """azurite-blob on PATH, or the cached install; installed there with npm on first use if npm exists (into a
        temporary folder renamed into place once complete, under a lock: never a half-installed emulator)."""
        cached = AZURITE_CACHE / "node_modules" / ".bin" / "azurite-blob"
        found = shutil.which("azurite-blob") or (str(cached) if cached.exists() else None)
        if found or not install or not shutil.which("npm"):
            return found
        AZURITE_CACHE.parent.mkdir(parents=True, exist_ok=True)
        with open(AZURITE_CACHE.parent / f"{AZURITE_CACHE.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not cached.exists():
                staging = Path(tempfile.mkdtemp(prefix=f"{AZURITE_CACHE.name}-", dir=AZURITE_CACHE.parent))
                result = subprocess.run(["npm", "install", "--prefix", str(staging), "--no-audit", "--no-fund",
                                         f"azurite@{AZURITE_VERSION}"], capture_output=True, text=True,
                                        stdin=subprocess.DEVNULL, timeout=600)
                if result.returncode != 0:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise RuntimeError(f"npm install azurite@{AZURITE_VERSION} failed: {result.stderr[-2000:]}")
                shutil.rmtree(AZURITE_CACHE, ignore_errors=True)
                staging.rename(AZURITE_CACHE)
        return str(cached) if cached.exists() else None

    @classmethod
    def start(cls, folder: Path) -> "Azurite":
        port, log = free_ports(1)[0], folder / "azurite.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([cls.binary(), "--blobHost", HOST, "--blobPort", str(port), "--location",
                                     str(folder / "data"), "--silent", "--skipApiVersionCheck", "--loose"],
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(port, proc, log)
        emulator = cls(proc, port, log)
        emulator.filesystem().mkdir(cls.bucket)
        return emulator

    @property
    def env(self) -> dict[str, str]:
        return dict(AZURE_STORAGE_CONNECTION_STRING=(
            f"DefaultEndpointsProtocol=http;AccountName={AZURE_ACCOUNT};AccountKey={AZURE_KEY};"
            f"BlobEndpoint=http://{HOST}:{self.port}/{AZURE_ACCOUNT};"))
