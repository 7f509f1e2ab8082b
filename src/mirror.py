"""Off-machine copies of the checkpoints (--mirror URL): S3, GCS, Azure or a local folder, through fsspec.

The trainer imports this module only when --mirror is given, and calls it through one narrow seam:

    mirror = Mirror(url, keep_last=cfg.keep_last)
    mirror.check()                                   # at start: one-line MirrorError if the mirror cannot be used
    mirror.submit(ckpt_dir / names[0], step, names)  # after each durable, verified save; never blocks, never raises
    mirror.status()                                  # plain numbers for the step line, metrics.jsonl, TensorBoard
    mirror.wait(timeout_seconds); mirror.close()     # at the end of the run
    mirror.fetch_newest_valid(manager, newer_than=step)  # resume: the mirror's, if newer, named by the manager
    mirror.fetch(mirror.find_copy_of(path), manager)     # a node without rank 0's file

Remote layout under the URL (s3://bucket/prefix):

    blobs/step_000010-<id>.pt          the checkpoint file, byte for byte; <id> is random, so no object is rewritten
    manifests/step_000010-<id>.json    {format, step, names, size, sha256, blob, written_at}, written LAST

A checkpoint is committed when its manifest exists and its blob exists with the manifest's size. An upload cut off
at any instant leaves at most a blob without a manifest, which is never listed nor fetched (and later removed);
a download is checked against the manifest's size and sha256, then by the caller's verify (the CRC-32 checks).

Retention after each commit, as on local disk: the newest keep_last rolling checkpoints, every epoch checkpoint, the
newest that holds best_model.pt, and always the newest committed one (what resume would take). A manifest is deleted
before its blob.

Uploads run in one background thread. When they fall behind, only the newest pending rolling submission waits
(older ones are skipped and counted); a submission that carries an epoch or best file is always uploaded. Until
its upload ends, a submitted file is held open and hard-linked as <dir>/.tmp-mirror-pin-*.pt, so local retention
cannot recycle its blocks (it reuses only files no other name shares); the trainer removes leftover pins at start.
Failures (network, server, permission) never reach the caller: the thread retries with exponential backoff, going
for the newest submission, logs loudly at most once per failure_log_interval_seconds and once when it recovers.
An S3 request that gets no answer, or sends slower than min_upload_rate_bytes_per_second, is cancelled: a hung
server cannot hold the uploader forever.
Credentials come the standard way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL or ~/.aws for S3)
or as user:secret@ in the URL; no secret ever appears in a log line or an error message.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote

log = logging.getLogger("train")

MANIFEST_FORMAT = 1
CHUNK_BYTES = 8 << 20  # read and hash the local file in pieces of this size: never a second copy in memory
BEST = "best_model.pt"
ROLLING_NAME = re.compile(r"rolling_step_\d+\.pt")
EPOCH_NAME = re.compile(r"epoch_\d+\.pt")
STEM = re.compile(r"step_(\d+)-([0-9a-f]+)")
# A hard link that keeps a submitted file's content until it is uploaded. A .tmp-* name: the trainer removes
# leftovers of a killed run at start (CheckpointManager.clean_stale_temporaries), with or without --mirror.
PIN_PREFIX = ".tmp-mirror-pin-"
S3_PROTOCOLS = ("s3", "s3a")
SECRET_OPTIONS = ("secret", "password", "token", "account_key", "sas_token", "client_secret", "credential")


class MirrorError(Exception):
    """A mirror that cannot be used: one line that says what to do (bad URL, no bucket, no permission)."""


class _LocalFileError(Exception):
    """A local file could not be read (an upload: not retried, the submission is dropped) or written (a fetch)."""


class _Closing(Exception):
    """close() was called while an upload was in progress."""


@dataclass
class _Job:
    """One submitted checkpoint file, held open (and hard-linked) so that its content stays until it is uploaded."""
    seq: int
    step: int
    names: list[str]
    path: Path
    file: BinaryIO
    identity: tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns) at submit
    pin: Path | None
    submitted_at: float  # time.monotonic()
    keep: bool  # holds an epoch or best file: never skipped for a newer submission
    state: str = "pending"  # pending, committed, skipped, failed
    attempts: int = 0


@dataclass
class _Failing:
    """The current run of failed attempts (last_loud carries over: one loud line per interval, even if flapping)."""
    since: float = 0.0
    count: int = 0
    last_loud: float = float("-inf")
    loud_lines: int = 0


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "no message"
    return f"{type(e).__name__}: {text[:300]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without user:secret@, user, secret). A secret may hold an unescaped '/', as AWS secret keys do."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, None, None
    userinfo, at, host_path = rest.partition("@")
    user, colon, secret = userinfo.partition(":")
    if not at or "/" in user or (not colon and "/" in userinfo):
        return url, None, None
    return f"{scheme}://{host_path}", unquote(user), unquote(secret) if colon else None


def redact_url(url: str) -> str:
    """The URL as it may be shown or logged: without user:secret@ (a secret may hold '/', as AWS secret keys do) and
    without a query string (SAS tokens, signatures). The one redactor: the trainer uses it too."""
    clean = _split_userinfo(url)[0]
    if "://" in clean and "?" in clean:
        clean = clean.partition("?")[0] + "?***"
    return clean


class Mirror:
    """Copies finished checkpoint files to an fsspec URL in the background and fetches the newest valid one back."""

    def __init__(self, url: str, keep_last: int = 10, *, timeout_seconds: float = 60.0,
                 retry_initial_seconds: float = 1.0, retry_max_seconds: float = 60.0,
                 failure_log_interval_seconds: float = 300.0, part_bytes: int = 64 << 20,
                 min_upload_rate_bytes_per_second: float = 1e6, storage_options: dict[str, Any] | None = None):
        """url: any fsspec URL (s3://bucket/prefix, gs://..., az://..., file:///path) or a plain local path.

        keep_last: rolling checkpoints kept on the mirror. timeout_seconds: to connect and to wait for an answer
        (S3). retry_*: backoff between failed attempts. failure_log_interval_seconds: at most one loud failure line
        per this interval. part_bytes: the multipart upload's part size (the memory one upload holds; S3: >= 5 MiB).
        min_upload_rate_bytes_per_second: an S3 request slower than this (after timeout_seconds) counts as hung.
        storage_options: extra fsspec options (they override the defaults chosen here)."""
        if keep_last < 0:
            raise MirrorError(f"the mirror's keep_last must be >= 0, not {keep_last}")
        if part_bytes < 5 << 20:
            raise MirrorError(f"the mirror's part size must be at least 5 MiB (S3's smallest part), not {part_bytes}")
        self.keep_last = keep_last
        self.timeout_seconds = timeout_seconds
        self.min_upload_rate_bytes_per_second = min_upload_rate_bytes_per_second
        self.retry_initial_seconds = retry_initial_seconds
        self.retry_max_seconds = retry_max_seconds
        self.failure_log_interval_seconds = failure_log_interval_seconds
        self.part_bytes = part_bytes
        clean_url, user, secret = _split_userinfo(url)
        protocol = clean_url.partition("://")[0] if "://" in clean_url else "file"
        options = dict(storage_options or {})
        self._secrets = [s for s in (secret, url.partition("://")[2].partition("@")[0] if user else None,
                                     os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN"))
                         if s and len(s) >= 3]
        self._secrets += [str(v) for k, v in options.items() if k in SECRET_OPTIONS and v and len(str(v)) >= 3]
        if user and len(user) >= 8:  # an access key id: not secret by itself, but nobody's business in a log
            self._secrets.append(user)
        query = clean_url.partition("?")[2] if "://" in clean_url else ""
        self._secrets += [v for _, _, v in (p.partition("=") for p in query.split("&")) if len(v) >= 3]
        self._url = clean_url if protocol in S3_PROTOCOLS else url
        self._shown_url = redact_url(url)
        if protocol in S3_PROTOCOLS:
            if user:
                options.setdefault("key", user)
                options.setdefault("secret", secret)
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
                options["endpoint_url"] = endpoint  # botocore >= 1.31 reads it too; older versions do not
            options["config_kwargs"] = {"connect_timeout": min(10.0, timeout_seconds), "read_timeout": timeout_seconds,
                                        # one quick retry inside a call; the uploader's backoff does the rest
                                        "retries": {"max_attempts": 2, "mode": "standard"},
                                        **options.get("config_kwargs", {})}
        try:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(self._url, skip_instance_cache=True, **options)
        except ImportError as e:
            raise MirrorError(f"--mirror {self.redacted_url()}: {self._redact(str(e))} (for s3:// pip install s3fs, "
                              "gs:// gcsfs, az:// adlfs)") from None
        except (ValueError, TypeError, KeyError) as e:
            raise MirrorError(f"--mirror {self.redacted_url()} is not a usable fsspec URL "
                              f"({self._redact(_one_line(e))}); use s3://bucket/prefix or a local path") from None
        if protocol in S3_PROTOCOLS:
            self.fs.retries = 1  # s3fs's own retry loop on top of botocore's would multiply the wait on a dead server
        from fsspec.implementations.local import LocalFileSystem

        self._local = isinstance(self.fs, LocalFileSystem)
        self._s3 = protocol in S3_PROTOCOLS and hasattr(self.fs, "_call_s3")
        self.root = root.rstrip("/")
        if not self.root:
            raise MirrorError(f"--mirror {self.redacted_url()} names no bucket or folder; use s3://bucket/prefix")
        self._cond = threading.Condition()
        self._pending: list[_Job] = []  # oldest first; the job being uploaded stays in it until it is done
        self._current: _Job | None = None
        self._newest: _Job | None = None
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._cleaned_pin_dirs: set[Path] = set()
        self._manifests: dict[str, dict | None] = {}  # manifest key -> parsed content (manifests never change)
        self._failing = _Failing()
        self._committed_step: int | None = None
        self._skipped = 0
        self._uploaded_bytes = 0
        self._rate = 0.0
        self._last_error: str | None = None
        self._first_commit_logged = False

    # names and secrets ------------------------------------------------------------------------------------
    def redacted_url(self) -> str:
        """The URL without user:secret@, for logs and messages."""
        return self._shown_url

    def _redact(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _key(self, relative: str) -> str:
        return f"{self.root}/{relative}"

    def _relative(self, key: str) -> str:
        return key[len(self.root) + 1:] if key.startswith(self.root + "/") else key

    # start-up check ---------------------------------------------------------------------------------------
    def check(self) -> None:
        """Write, list, read back and delete a small probe object; raise a one-line MirrorError if any step fails."""
        probe = self._key(f".probe-{uuid.uuid4().hex[:12]}")
        action = "create the folder"
        try:
            if self._local:
                self.fs.makedirs(self.root, exist_ok=True)
            action = "write a probe object"
            self.fs.pipe_file(probe, b"mirror probe\n")
            action = "list the prefix"
            self.fs.invalidate_cache(self.root)
            listed = {e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.root, detail=False)}
            if probe.rsplit("/", 1)[-1] not in listed:
                raise FileNotFoundError(f"the probe object just written is not listed under {self.root}")
            action = "read back the probe object"
            if self.fs.cat_file(probe) != b"mirror probe\n":
                raise OSError("the probe object read back differs from what was written")
            action = "delete the probe object"
            self.fs.rm_file(probe)
        except Exception as e:
            raise MirrorError(self._explain(e, action)) from None
        endpoint = self.fs.__dict__.get("endpoint_url") or ""
        log.info("mirror: %s%s can be written, listed, read and deleted; checkpoints will be copied there",
                 self.redacted_url(), f" (endpoint {_split_userinfo(endpoint)[0]})" if endpoint else "")

    def _explain(self, e: BaseException, action: str) -> str:
        """One line: what failed at the mirror, and what to do about it."""
        where = f"mirror {self.redacted_url()}: could not {action}"
        cause = self._redact(_one_line(e))
        text = f"{type(e).__name__} {e}".lower()
        if self._local and isinstance(e, PermissionError):
            fix = "no permission: fix the folder's permissions, or choose another --mirror"
        elif isinstance(e, PermissionError) or "accessdenied" in text or "access denied" in text \
                or "invalidaccesskeyid" in text or "signaturedoesnotmatch" in text or "forbidden" in text:
            fix = ("no permission: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws) and "
                   "that they may list, write and delete under this prefix")
        elif "nocredentials" in text or "unable to locate credentials" in text:
            fix = "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or configure ~/.aws"
        elif isinstance(e, FileNotFoundError) or "nosuchbucket" in text or "does not exist" in text:
            fix = "the bucket (or folder) does not exist: create it, or fix --mirror"
        else:
            fix = ("the mirror is unreachable or refused the request: check the URL, AWS_ENDPOINT_URL and the "
                   "network")
        return f"{where} ({cause}); {fix}"

    # submitting -------------------------------------------------------------------------------------------
    def submit(self, local_path: Path, step: int, names: list[str]) -> None:
        """Queue a finished, durable, verified checkpoint file (known locally under `names`) for upload; returns at
        once. The file is held open and hard-linked as <dir>/.tmp-mirror-pin-* until uploaded, so that local
        retention reusing its blocks cannot change what is uploaded."""
        local_path, names = Path(local_path), list(names)
        with self._cond:
            if self._closed:
                log.warning("mirror: step %d submitted after close(); not copied", step)
                return
            self._seq += 1
            seq = self._seq
            try:
                f = open(local_path, "rb")
            except OSError as e:
                self._last_error = self._redact(_one_line(e))
                log.error("MIRROR: cannot open %s to copy it off the machine (%s); step %d will not be mirrored",
                          local_path, self._last_error, step)
                return
            st = os.fstat(f.fileno())
            job = _Job(seq=seq, step=step, names=names, path=local_path, file=f,
                       identity=(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), pin=self._pin(local_path, st, seq,
                                                                                                 step),
                       submitted_at=time.monotonic(),
                       keep=any(n == BEST or EPOCH_NAME.fullmatch(n) for n in names))
            if not job.keep:  # skip-to-newest: an older rolling submission not yet being uploaded is not worth it
                for old in [j for j in self._pending if not j.keep and j is not self._current]:
                    self._finish(old, "skipped")
            self._pending.append(job)
            self._newest = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mirror-upload", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _pin(self, local_path: Path, st: os.stat_result, seq: int, step: int) -> Path | None:
        """A hard link to the submitted file: local retention then never overwrites it in place (it reuses only a
        file no other name shares). None where links are refused; the upload then checks the file is unchanged."""
        folder = local_path.parent
        try:
            if folder not in self._cleaned_pin_dirs:  # links a killed run left behind (one run per folder)
                for stale in folder.glob(f"{PIN_PREFIX}*"):
                    stale.unlink(missing_ok=True)
                self._cleaned_pin_dirs.add(folder)
            pin = folder / f"{PIN_PREFIX}{step:06d}-{seq}.pt"
            os.link(local_path, pin)
            pst = pin.stat()
        except OSError:
            return None
        if (pst.st_dev, pst.st_ino) != (st.st_dev, st.st_ino):  # the name moved to another file in between
            pin.unlink(missing_ok=True)
            return None
        return pin

    def _finish(self, job: _Job, state: str) -> None:
        """Retire a job (lock held): drop it from the queue, release its file and pin, count it."""
        job.state = state
        if job in self._pending:
            self._pending.remove(job)
        if state == "skipped":
            self._skipped += 1
        with contextlib.suppress(OSError):
            job.file.close()
        if job.pin is not None:
            job.pin.unlink(missing_ok=True)
        self._cond.notify_all()

    # the uploader thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice value
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # training comes first for the CPU
        delay = self.retry_initial_seconds
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._pending[0]
                self._current = job
                seen = self._newest  # a checkpoint submitted after this moment ends a backoff (below)
            job.attempts += 1
            try:
                manifest, seconds = self._upload(job)
            except _Closing:
                with self._cond:
                    self._current = None
                    self._finish(job, "skipped")
                return
            except _LocalFileError as e:
                with self._cond:
                    self._current = None
                    self._last_error = self._redact(str(e))
                    self._finish(job, "failed")
                log.error("MIRROR: step %d not copied: %s", job.step, self._last_error)
                continue
            except Exception as e:
                self._on_failure(job, e, delay)
                with self._cond:
                    self._current = None
                    if not job.keep and self._pending and self._pending[-1] is not job:
                        self._finish(job, "skipped")  # the retry goes for the newer submission
                    # back off, but not past a checkpoint submitted since this attempt began (even during it): the
                    # one a graceful stop saves must not spend its --mirror_wait_seconds waiting out the backoff
                    self._cond.wait_for(lambda: self._closed or self._newest is not seen, timeout=delay)
                delay = min(delay * 2, self.retry_max_seconds)
                continue
            delay = self.retry_initial_seconds
            self._on_commit(job, manifest, seconds)
            try:
                self._retain()
            except Exception as e:  # the next commit tries again; nothing committed is lost by not deleting
                log.warning("mirror: could not remove old checkpoints from %s (%s)", self.redacted_url(),
                            self._redact(_one_line(e)))
            with self._cond:  # done only now, so that wait() returns with the mirror in its steady state
                self._current = None
                self._finish(job, "committed")

    def _upload(self, job: _Job) -> tuple[dict, float]:
        """Stream the file to blobs/ while hashing it (one read), then write its manifest. Raises on any failure."""
        stem = f"step_{job.step:06d}-{uuid.uuid4().hex[:12]}"
        blob_rel, manifest_rel = f"blobs/{stem}.pt", f"manifests/{stem}.json"
        blob = self._key(blob_rel)
        digest, t0 = hashlib.sha256(), time.monotonic()
        try:
            job.file.seek(0)
        except OSError as e:
            raise _LocalFileError(f"cannot read {job.path}: {_one_line(e)}") from None
        size = (self._put_s3 if self._s3 else self._put_stream)(blob, job, digest)
        seconds = time.monotonic() - t0
        st = os.fstat(job.file.fileno())
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != job.identity or size != st.st_size:
            with contextlib.suppress(Exception):
                self.fs.rm_file(blob)
            raise _LocalFileError(f"{job.path} was overwritten before it could be uploaded")
        self.fs.invalidate_cache(blob)
        remote_size = self.fs.info(blob)["size"]
        if remote_size != size:
            raise OSError(f"the mirror holds {remote_size} bytes of {blob_rel}, {size} were sent")
        manifest = dict(format=MANIFEST_FORMAT, step=job.step, names=job.names, size=size,
                        sha256=digest.hexdigest(), blob=blob_rel,
                        written_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"))
        self._write_small(self._key(manifest_rel), json.dumps(manifest, indent=1).encode())
        self._manifests[self._key(manifest_rel)] = manifest
        return manifest, seconds

    def _read(self, job: _Job, nbytes: int, digest) -> bytes:
        """The next nbytes of the submitted file (fewer only at its end), hashed on the way."""
        if self._closed:
            raise _Closing()
        try:
            data = job.file.read(nbytes)  # a regular file returns all nbytes at once: one buffer, no copies
        except OSError as e:
            raise _LocalFileError(f"cannot read {job.path}: {_one_line(e)}") from None
        digest.update(data)
        return data

    def _put_s3(self, blob: str, job: _Job, digest) -> int:
        """S3: one PUT, or a multipart upload of part_bytes parts, each call with a deadline. botocore's timeouts
        cover connecting and waiting for an answer but not sending: a hung server that accepts the connection and
        never reads would block a send forever, so every call is cancelled after timeout_seconds plus its bytes at
        min_upload_rate_bytes_per_second."""
        from fsspec.asyn import sync
        from fsspec.exceptions import FSTimeoutError

        bucket, key, _ = self.fs.split_path(blob)

        def call(method: str, nbytes: int = 0, **kwargs):
            # room for botocore's two attempts and its backoff between them, then the bytes at the slowest rate
            deadline = 2 * self.timeout_seconds + 1 + nbytes / self.min_upload_rate_bytes_per_second
            try:
                return sync(self.fs.loop, self.fs._call_s3, method, Bucket=bucket, Key=key, timeout=deadline, **kwargs)
            except FSTimeoutError:
                raise TimeoutError(f"{method} got no answer within {deadline:.3g} s") from None

        part = self._read(job, self.part_bytes, digest)
        size = len(part)
        if size < self.part_bytes:
            call("put_object", size, Body=part)
            return size
        upload_id = call("create_multipart_upload")["UploadId"]
        try:
            parts = []
            while part:
                answer = call("upload_part", len(part), UploadId=upload_id, PartNumber=len(parts) + 1, Body=part)
                parts.append(dict(PartNumber=len(parts) + 1, ETag=answer["ETag"]))
                part = self._read(job, self.part_bytes, digest)
                size += len(part)
            call("complete_multipart_upload", UploadId=upload_id, MultipartUpload=dict(Parts=parts))
        except BaseException:
            with contextlib.suppress(Exception):  # else the parts wait on the server for its lifecycle rules
                call("abort_multipart_upload", UploadId=upload_id)
            raise
        return size

    def _put_stream(self, blob: str, job: _Job, digest) -> int:
        """Any other fsspec filesystem: write through fs.open in CHUNK_BYTES pieces (a local one fsync'ed)."""
        if self._local:
            self.fs.makedirs(self._key("blobs"), exist_ok=True)
            self.fs.makedirs(self._key("manifests"), exist_ok=True)
        size = 0
        out = self.fs.open(blob, "wb", block_size=self.part_bytes)
        try:
            while chunk := self._read(job, CHUNK_BYTES, digest):
                out.write(chunk)
                size += len(chunk)
            if self._local:
                out.flush()
                os.fsync(out.fileno())
            out.close()
        except BaseException:
            with contextlib.suppress(Exception):
                if self._local:
                    out.close()
                else:
                    out.discard()
                    out.closed = True  # AbstractBufferedFile: close() (or garbage collection) would commit it
            with contextlib.suppress(Exception):
                self.fs.rm_file(blob)
            raise
        return size

    def _write_small(self, key: str, data: bytes) -> None:
        """Write a small object in one piece (a local file: temporary name, fsync, rename, fsync the folder)."""
        if not self._local:
            self.fs.pipe_file(key, data)
            return
        path = Path(key)
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def _on_failure(self, job: _Job, e: BaseException, delay: float) -> None:
        now = time.monotonic()
        with self._cond:
            self._last_error = self._redact(_one_line(e))
            if self._failing.count == 0:
                self._failing.since = now
            self._failing.count += 1
            loud = now - self._failing.last_loud >= self.failure_log_interval_seconds
            if loud:
                self._failing.last_loud = now
                self._failing.loud_lines += 1
        if loud:
            log.error("MIRROR UPLOAD FAILING: step %d could not be copied to %s (%s); %d attempt(s) failed over "
                      "%.0f s, retrying in %.3g s. Training goes on; checkpoints since the last commit exist on this "
                      "machine only", job.step, self.redacted_url(), self._last_error, self._failing.count,
                      now - self._failing.since, delay)

    def _on_commit(self, job: _Job, manifest: dict, seconds: float) -> None:
        now = time.monotonic()
        behind = now - job.submitted_at
        with self._cond:
            job.state = "committed"
            self._committed_step = job.step
            self._uploaded_bytes += manifest["size"]
            self._rate = manifest["size"] / max(seconds, 1e-9)
            self._last_error = None
            failing, self._failing = self._failing, _Failing(last_loud=self._failing.last_loud)
        if failing.loud_lines:  # a failure that was announced is announced over
            log.info("mirror recovered: step %d committed to %s after %d failed attempt(s) over %.0f s", job.step,
                     self.redacted_url(), failing.count, now - failing.since)
        if not self._first_commit_logged:
            self._first_commit_logged = True
            log.info("mirror: step %d committed to %s (%.1f MB in %.2f s, %.1f MB/s); the mirror is %.1f s behind "
                     "the save", job.step, self.redacted_url(), manifest["size"] / 1e6, seconds, self._rate / 1e6,
                     behind)

    # waiting and reporting --------------------------------------------------------------------------------
    def wait(self, timeout_seconds: float) -> bool:
        """Block until everything submitted so far is committed or skipped (or timeout_seconds pass); True if the
        newest submission is committed (or nothing was submitted)."""
        deadline = time.monotonic() + timeout_seconds
        with self._cond:
            while self._pending and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._newest is None or self._newest.state == "committed"

    def status(self) -> dict[str, Any]:
        """Plain numbers for logs and TensorBoard: committed_step (None before the first commit), lag_seconds (age
        of the newest submission not yet committed; 0 if none), pending, skipped, uploaded_bytes,
        upload_rate_bytes_per_second (the last upload's), last_error (None while uploads work),
        consecutive_failures."""
        with self._cond:
            waiting = [j for j in self._pending if j.state == "pending"]  # not the one committed, being retained
            lag = time.monotonic() - waiting[-1].submitted_at if waiting else 0.0
            return dict(committed_step=self._committed_step, lag_seconds=lag, pending=len(waiting),
                        skipped=self._skipped, uploaded_bytes=self._uploaded_bytes,
                        upload_rate_bytes_per_second=self._rate, last_error=self._last_error,
                        consecutive_failures=self._failing.count)

    def close(self, timeout_seconds: float = 10.0) -> None:
        """Stop uploading (call wait() first to finish): an upload in progress is abandoned, pending ones dropped."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            dropped = [j for j in self._pending if j is not self._current]
            for job in dropped:
                self._finish(job, "skipped")
            self._cond.notify_all()
        if dropped:
            log.warning("mirror: closed with %d checkpoint(s) not copied to %s (newest: step %d)", len(dropped),
                        self.redacted_url(), dropped[-1].step)
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    # the remote side --------------------------------------------------------------------------------------
    def _list(self, relative: str) -> dict[str, int]:
        """{full key: size} of the objects directly under root/relative ({} if there are none)."""
        path = self._key(relative)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/"): e.get("size") for e in entries if e.get("type") != "directory"}

    def _manifest(self, key: str) -> dict | None:
        """The manifest at `key`, or None if it is not one this code understands (another format, unparseable):
        such a manifest is ignored, and never deleted."""
        if key not in self._manifests:
            try:
                m = json.loads(self.fs.cat_file(key))
                ok = (isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT and isinstance(m.get("step"), int)
                      and isinstance(m.get("names"), list) and isinstance(m.get("size"), int)
                      and re.fullmatch(r"[0-9a-f]{64}", str(m.get("sha256")))
                      and re.fullmatch(r"blobs/[\w.-]+", str(m.get("blob"))))
            except FileNotFoundError:
                return None  # deleted since it was listed
            except ValueError:
                ok = False
            if not ok:
                log.warning("mirror: ignoring %s on %s: not a format-%d manifest", self._relative(key),
                            self.redacted_url(), MANIFEST_FORMAT)
            self._manifests[key] = m if ok else None
        return self._manifests[key]

    def _scan(self) -> tuple[list[dict], list[str], dict[str, int], bool]:
        """(committed checkpoints newest first, keys of our manifests whose blob is missing or not whole,
        {blob key: size}, whether every manifest was understood)."""
        blobs = self._list("blobs")
        committed, broken, understood = [], [], True
        for key in sorted(self._list("manifests")):
            if not key.endswith(".json"):
                continue
            m = self._manifest(key)
            if m is None:
                understood = False
                continue
            blob = self._key(m["blob"])
            if blobs.get(blob) != m["size"]:
                broken.append(key)  # its blob is missing or not whole: not committed
                continue
            committed.append(dict(step=m["step"], names=list(m["names"]), size=m["size"], sha256=m["sha256"],
                                  key=blob, manifest_key=key, written_at=m.get("written_at", "")))
        committed.sort(key=lambda c: (c["step"], c["written_at"]), reverse=True)
        return committed, broken, blobs, understood

    def remote_checkpoints(self) -> list[dict]:
        """Committed checkpoints on the mirror, newest first: dict(step, names, size, sha256, key, manifest_key,
        written_at); key is the blob's path on the mirror's filesystem. A one-line MirrorError if it cannot be read."""
        try:
            return self._scan()[0]
        except Exception as e:
            raise MirrorError(self._explain(e, "list the checkpoints")) from None

    def _retain(self) -> None:
        """Delete what local retention would: all but the newest keep_last rolling checkpoints, every epoch one and
        the newest best one, never the newest committed one; then manifests that are not committed and blobs no
        manifest names (left by cut-off uploads) older than the newest commit. Manifest first, then blob."""
        committed, broken, blobs, understood = self._scan()
        if not committed:
            return
        keep = {committed[0]["manifest_key"]}
        rolling = [c for c in committed if any(ROLLING_NAME.fullmatch(n) for n in c["names"])
                   or not any(n == BEST or EPOCH_NAME.fullmatch(n) for n in c["names"])]
        keep |= {c["manifest_key"] for c in rolling[:self.keep_last]}
        keep |= {c["manifest_key"] for c in committed if any(EPOCH_NAME.fullmatch(n) for n in c["names"])}
        keep |= {c["manifest_key"] for c in [c for c in committed if BEST in c["names"]][:1]}
        kept_blobs = {c["key"] for c in committed if c["manifest_key"] in keep}
        for key in [c["manifest_key"] for c in committed if c["manifest_key"] not in keep] + broken:
            m = self._manifests.get(key)
            self.fs.rm_file(key)
            self._manifests.pop(key, None)
            if m is not None and self._key(m["blob"]) in blobs and self._key(m["blob"]) not in kept_blobs:
                self.fs.rm_file(self._key(m["blob"]))
        if not understood:
            return  # a blob may belong to a manifest this code cannot read: leave every blob alone
        named = {self._key(m["blob"]) for m in list(self._manifests.values()) if m is not None}
        newest_step = committed[0]["step"]
        for blob in blobs:
            found = STEM.fullmatch(blob.rsplit("/", 1)[-1].removesuffix(".pt"))
            if blob not in named and blob not in kept_blobs and found and int(found.group(1)) < newest_step:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(blob)

    # fetching ---------------------------------------------------------------------------------------------
    def fetch_newest_valid(self, target, newer_than: int = -1) -> tuple[Path, dict] | None:
        """Fetch (as fetch() does) the newest committed checkpoint after step `newer_than` that passes its manifest's
        size and sha256 and the target's verification, trying older ones in turn and logging why each was skipped.
        Returns (its local path, manifest), or None if the mirror holds no valid checkpoint after that step. Raises
        MirrorError if the mirror cannot be read, OSError if the local folder cannot be written: neither means
        "nothing valid"."""
        candidates = [c for c in self.remote_checkpoints() if c["step"] > newer_than]
        skipped = []
        for entry in candidates:
            path = self.fetch(entry, target)
            if path is not None:
                if skipped:
                    log.info("mirror: used step %d after skipping unusable step(s) %s", entry["step"], skipped)
                return path, entry
            skipped.append(entry["step"])
            if entry is not candidates[-1]:
                log.warning("mirror: trying the next older checkpoint")
        if candidates:
            log.error("mirror: none of the %d checkpoint(s) on %s%s is usable", len(candidates), self.redacted_url(),
                      f" newer than step {newer_than}" if newer_than >= 0 else "")
        return None

    def find_copy_of(self, local_path: Path) -> dict | None:
        """The committed checkpoint whose content is the local file's, byte for byte (its size, then the sha256 of
        its upload), or None. The file is read only if a committed checkpoint has its size."""
        size = Path(local_path).stat().st_size
        same_size = [c for c in self.remote_checkpoints() if c["size"] == size]
        if not same_size:
            return None
        digest = hashlib.sha256()
        with open(local_path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        return next((c for c in same_size if c["sha256"] == digest.hexdigest()), None)

    def fetch(self, entry: dict, target) -> Path | None:
        """Download the checkpoint `entry` (from remote_checkpoints) for `target`, the local folder's owner (the
        trainer's CheckpointManager): into target.incoming_path(), fsync'ed, checked against its manifest's size and
        sha256 and by target.load(path) (which raises, or returns False, for an invalid file), then named by
        target.adopt(path, names). Returns the adopted path, or None (the reason logged) if the copy is not usable.
        Raises as download() does."""
        tmp = target.incoming_path()
        try:
            problem = self.download(entry, tmp)
            if problem is None:
                try:
                    problem = "failed verification" if target.load(tmp) is False else None
                except Exception as e:
                    problem = f"failed verification ({_one_line(e)})"
            if problem is not None:
                log.error("mirror: the copy of step %d on %s (%s) is not usable: %s", entry["step"],
                          self.redacted_url(), self._relative(entry["key"]), problem)
                return None
            path = target.adopt(tmp, entry["names"])
            log.info("mirror: fetched step %d from %s (%.1f MB) into %s", entry["step"], self.redacted_url(),
                     entry["size"] / 1e6, path.parent)
            return path
        finally:
            tmp.unlink(missing_ok=True)

    def download(self, entry: dict, tmp: Path) -> str | None:
        """Copy the blob of `entry` (from remote_checkpoints) to tmp, fsync'ed, and check its size and sha256: None
        if it matches, else the problem. Raises MirrorError if the mirror cannot be read, OSError for the disk."""
        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as dst:
            try:
                with self.fs.open(entry["key"], "rb", block_size=self.part_bytes) as src:
                    while chunk := src.read(CHUNK_BYTES):
                        digest.update(chunk)
                        try:
                            dst.write(chunk)
                        except OSError as e:  # the local disk, not the mirror: raised as it is, below
                            raise _LocalFileError(e) from None
                        size += len(chunk)
            except FileNotFoundError:
                return "its blob disappeared"
            except _LocalFileError as e:
                raise e.args[0] from None
            except Exception as e:
                raise MirrorError(self._explain(e, f"download step {entry['step']}")) from None
            dst.flush()
            os.fsync(dst.fileno())
        if size != entry["size"]:
            return f"{size} bytes instead of the manifest's {entry['size']}"
        if digest.hexdigest() != entry["sha256"]:
            return "sha256 mismatch: the copy on the mirror is damaged"
        return None
