"""Off-machine copies of the checkpoints (--mirror URL): S3, GCS, Azure or a local folder, through fsspec.

The trainer imports this module only when --mirror is given, and calls it through one narrow seam:

    mirror = Mirror(url, keep_last=cfg.keep_last)
    mirror.check()                                   # at start: one-line MirrorError if the mirror cannot be used
    mirror.submit(manager.lasting_name(names), step, names, manager.held)  # after each durable save; never raises
    mirror.status()                                  # plain numbers for the step line, metrics.jsonl, TensorBoard
    mirror.finish(saved_step, wait_seconds)          # at the end of the run: waits, says where the last one is, closes
    mirror.fetch_newest_valid(manager, newer_than=step)  # resume: the mirror's, if newer, named by the manager
    mirror.fetch(mirror.copy_of(path, ...)[0], manager)  # a node without rank 0's file (uploaded first if missing)

Remote layout under the URL (s3://bucket/prefix):

    blobs/step_000010-<id>.pt          the checkpoint file, byte for byte; <id> is random, so no object is rewritten
    manifests/step_000010-<id>.json    {format, step, names, size, sha256, blob, written_at}, written LAST

A checkpoint is committed when its manifest exists and its blob exists with the manifest's size. An upload cut off
at any instant leaves at most a blob without a manifest, which is never listed nor fetched (and later removed);
a download is checked against the manifest's size and sha256, then by the caller's verify (the CRC-32 checks).

Retention after each commit, as on local disk: the newest keep_last rolling checkpoints, every epoch checkpoint, the
newest that holds best_model.pt, and always the newest committed one (what resume would take). A manifest is deleted
before its blob.

Uploads run in one background thread, the newest submission first. What waits is bounded however long the mirror
is down: a newer submission supersedes a pending one that holds only rolling names, a newer best a pending best
(they are skipped and counted); only epoch checkpoints are never superseded. Until its upload ends, a submitted file
is held open and held on disk by the folder's owner (the trainer's HeldFiles: a hard link its retention leaves
alone, which its disk-space guard may take back, giving that upload up).
Failures (network, server, permission) never reach the caller: the thread retries with exponential backoff, going
for the newest submission, logs loudly at most once per failure_log_interval_seconds and once when it recovers.
An S3 request that gets no answer, or sends slower than min_upload_rate_bytes_per_second, is cancelled: a hung
server cannot hold the uploader forever.
Credentials come the standard way (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL or ~/.aws for S3)
or as user:secret@ in the URL; no secret ever appears in a log line or an error message.

The parts, one job each: mirror_store.py (the remote objects: names, manifests, what is committed, retention, the
start-up probe), mirror_secrets.py (the one redactor), mirror_transfer.py (bytes up and down, each request with a
deadline; one file committed as blob then manifest), mirror_upload.py (the background uploader: its bounded queue,
retries, status) and this module (the seam the trainer calls, fetching back, the end-of-run report).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Callable

from mirror_store import CHUNK_BYTES, MirrorError, RemoteStore, one_line, redact_url
from mirror_transfer import download
from mirror_upload import Holder, Uploader

__all__ = ["Mirror", "MirrorError", "SeveralRuns", "redact_url"]

log = logging.getLogger("train")


class SeveralRuns(MirrorError):
    """A fetch that was to take the URL's only run found copies of several (the message lists them)."""


class Mirror:
    """Copies finished checkpoint files to an fsspec URL in the background and fetches the newest valid one back."""

    def __init__(self, url: str, keep_last: int = 10, *, run_id: str | None = None, timeout_seconds: float = 60.0,
                 retry_initial_seconds: float = 1.0, retry_max_seconds: float = 60.0,
                 failure_log_interval_seconds: float = 300.0, part_bytes: int = 64 << 20, parallel_parts: int = 4,
                 min_upload_rate_bytes_per_second: float = 1e6, storage_options: dict[str, Any] | None = None):
        """url: any fsspec URL (s3://bucket/prefix, gs://..., az://..., file:///path) or a plain local path.

        keep_last: rolling checkpoints kept on the mirror. run_id: the run whose copies this mirror uploads, keeps and
        fetches (None: copies written without one; another run's copies are never touched). timeout_seconds: to
        connect and to wait for an answer (S3). retry_*: backoff between failed attempts.
        failure_log_interval_seconds: at most one loud failure line per this interval. part_bytes: the multipart
        upload's part size (S3: >= 5 MiB); parallel_parts: S3 parts sent side by side (the memory one upload holds
        is about parallel_parts x part_bytes: 256 MB by default).
        min_upload_rate_bytes_per_second: an S3 request slower than this (after timeout_seconds) counts as hung.
        storage_options: extra fsspec options (they override the defaults chosen here)."""
        if keep_last < 0:
            raise MirrorError(f"the mirror's keep_last must be >= 0, not {keep_last}")
        self.store = RemoteStore(url, run_id=run_id, timeout_seconds=timeout_seconds, part_bytes=part_bytes,
                                 parallel_parts=parallel_parts,
                                 min_upload_rate_bytes_per_second=min_upload_rate_bytes_per_second,
                                 storage_options=storage_options)
        self.uploader = Uploader(self.store, keep_last, retry_initial_seconds=retry_initial_seconds,
                                 retry_max_seconds=retry_max_seconds,
                                 failure_log_interval_seconds=failure_log_interval_seconds)

    @property
    def root(self) -> str:
        """The bucket and prefix (or folder) on the mirror's filesystem."""
        return self.store.root

    def redacted_url(self) -> str:
        """The URL without credentials, for logs and messages."""
        return self.store.redacted_url()

    def check(self) -> None:
        """Write, list, read back and delete a small probe object; raise a one-line MirrorError if any step fails."""
        self.store.check()

    # uploading --------------------------------------------------------------------------------------------
    def submit(self, local_path: Path, step: int, names: list[str], holder: Holder | None = None) -> None:
        """Queue a finished, durable, verified checkpoint file (known locally under `names`) for upload; returns at
        once and never raises. holder: the folder's owner, which keeps the file on disk until it is uploaded (see
        Uploader.submit)."""
        self.uploader.submit(local_path, step, names, holder)

    def status(self) -> dict[str, Any]:
        """Plain numbers for logs and TensorBoard (see Uploader.status)."""
        return self.uploader.status()

    def wait(self, timeout_seconds: float) -> bool:
        """Block until everything submitted is committed or skipped, at most timeout_seconds; True if the newest
        submission is committed (or nothing was submitted)."""
        return self.uploader.wait(timeout_seconds)

    def close(self, timeout_seconds: float = 10.0) -> None:
        """Stop uploading (call wait() first to finish): an upload in progress is abandoned, pending ones dropped."""
        self.uploader.close(timeout_seconds)

    def finish(self, saved_step: int, wait_seconds: float) -> bool:
        """At the end of a run: wait up to wait_seconds for the uploads, say whether the run's last checkpoint
        (saved_step) is on the mirror, and close. With nothing submitted in this process, the mirror is asked
        whether it holds that step already. Returns whether it does."""
        made_it = self.wait(wait_seconds)
        status = self.status()
        if not status["submitted"]:  # nothing saved in this launch: the run's newest may be on the mirror already
            with contextlib.suppress(Exception):  # MirrorError: then it is reported as behind, below
                held = [c["step"] for c in self.remote_checkpoints() if c["run"] == self.store.run_id]
                made_it = saved_step in held
                status = {**status, "committed_step": saved_step if made_it else max(held, default=None)}
        made_it = made_it and status["committed_step"] == saved_step
        if made_it:
            log.info("mirror: the last checkpoint (step %d) is on %s", saved_step, self.redacted_url())
        else:
            log.error("MIRROR BEHIND: the last checkpoint (step %d) did not reach %s within %.0f s (the mirror holds "
                      "step %s; last error: %s); it is on the local disk only", saved_step, self.redacted_url(),
                      wait_seconds, status["committed_step"], status["last_error"])
        self.close()
        return made_it

    # fetching back ----------------------------------------------------------------------------------------
    def remote_checkpoints(self) -> list[dict]:
        """Committed checkpoints on the mirror, newest first (see RemoteStore.remote_checkpoints)."""
        return self.store.remote_checkpoints()

    def runs(self) -> dict[str | None, dict]:
        """The runs whose copies the mirror holds: {run id: its newest committed checkpoint}."""
        newest: dict[str | None, dict] = {}
        for entry in self.remote_checkpoints():  # newest first
            newest.setdefault(entry["run"], entry)
        return newest

    def download(self, entry: dict, tmp: Path) -> str | None:
        """Copy the blob of `entry` to tmp and check its size and sha256: None if it matches, else the problem."""
        return download(self.store, entry, tmp)

    def fetch_newest_valid(self, target, newer_than: int = -1, only_run: bool = False) -> tuple[Path, dict] | None:
        """Fetch (as fetch() does) this run's newest committed checkpoint after step `newer_than` that passes its
        manifest's size and sha256 and the target's verification, trying older ones in turn and logging why each was
        skipped. only_run: the run is the URL's only one, whatever this mirror's run_id (SeveralRuns if it holds
        several). Returns (its local path, manifest), or None if the mirror holds no valid checkpoint after that step.
        Raises MirrorError if the mirror cannot be read, OSError if the local folder cannot be written: neither means
        "nothing valid"."""
        if only_run:
            runs = self.runs()
            if len(runs) > 1:
                listing = "; ".join(f"run {run} (newest step {entry['step']}, written {entry['written_at'][:19]})"
                                    for run, entry in runs.items())
                raise SeveralRuns(f"the mirror {self.redacted_url()} holds checkpoints of several runs ({listing})")
            self.store.run_id = next(iter(runs), None)
        candidates = [c for c in self.remote_checkpoints() if c["step"] > newer_than and c["run"] == self.store.run_id]
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

    def copy_of(self, local_path: Path, step: int, names: list[str], wait_seconds: float,
                before_upload: Callable[[], None] = lambda: None) -> tuple[dict | None, str | None]:
        """The committed copy of a local checkpoint file (see find_copy_of), uploading it first (before_upload()
        called, then up to wait_seconds) if the mirror does not hold it. Returns (its entry or None, None if it was
        there already, else what the upload ended with: "uploaded" or its last error)."""
        entry = self.find_copy_of(local_path)
        if entry is not None:
            return entry, None
        before_upload()
        self.submit(local_path, step, names)
        self.wait(wait_seconds)
        entry = self.find_copy_of(local_path)
        if entry is not None:
            return entry, "uploaded"
        return None, self.status()["last_error"] or f"not committed within {wait_seconds:.0f} s"

    def fetch(self, entry: dict, target) -> Path | None:
        """Download the checkpoint `entry` (from remote_checkpoints) for `target`, the local folder's owner (the
        trainer's CheckpointManager): into target.incoming_path(), fsync'ed, checked against its manifest's size and
        sha256 (a short download is tried once more) and by target.load(path) (which raises, or returns False, for
        an invalid file), then named by target.adopt(path, names). Returns the adopted path, or None (the reason
        logged) if the copy is not usable. Raises as download() does."""
        tmp = target.incoming_path()
        try:
            problem = download(self.store, entry, tmp)
            if problem is not None and "bytes instead of" in problem:  # cut off on the way: once more before giving up
                log.warning("mirror: the download of step %d was short (%s); trying once more", entry["step"], problem)
                problem = download(self.store, entry, tmp)
            if problem is None:
                try:
                    problem = "failed verification" if target.load(tmp) is False else None
                except Exception as e:
                    problem = f"failed verification ({one_line(e)})"
            if problem is not None:
                log.error("mirror: the copy of step %d on %s (%s) is not usable: %s", entry["step"],
                          self.redacted_url(), self.store.relative(entry["key"]), problem)
                return None
            path = target.adopt(tmp, entry["names"])
            log.info("mirror: fetched step %d from %s (%.1f MB) into %s", entry["step"], self.redacted_url(),
                     entry["size"] / 1e6, path.parent)
            return path
        finally:
            tmp.unlink(missing_ok=True)
