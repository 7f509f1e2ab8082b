"""Off-machine copies of the checkpoints (--mirror URL): S3, GCS, Azure or a local folder, through fsspec.

The trainer imports this module only when --mirror is given, and calls it through one narrow seam, for three
jobs (the checkpoint names are the folder owner's: the mirror only learns what each is kept for, through kinds):

    mirror = Mirror(url, keep_last=cfg.keep_last, run_id=cfg.run_id, kinds=CheckpointManager.kinds)
    mirror.check(new_run=True)  # at start: a one-line MirrorError if it cannot be used (OtherRuns: others' copies)
    # 1. copy each save off the machine (the loop's Checkpointer)
    mirror.submit(held_file, step, names, manager.held)  # after each durable save (its bytes); never raises
    mirror.status()                                  # plain numbers for the step line, metrics.jsonl, TensorBoard
    mirror.finish(saved_step, wait_seconds)          # at the end of the run: waits, says where the last one is, closes
    # 2. resume: what it holds (the trainer's resume plan chooses), then the one copy chosen, fetched and checked
    mirror.remote_checkpoints(); mirror.fetch(entry, manager)
    mirror.resumed(step, holds)                      # a resumed launch: what the mirror held of the run at its start
    # 3. a node without rank 0's file: rank 0 finds (or uploads) its copy, the node fetches exactly that one
    mirror.fetch(mirror.copy_of(path, ...)[0], manager)

Remote layout under the URL (s3://bucket/prefix):

    blobs/step_000010-<id>.pt          the checkpoint file, byte for byte; <id> is random, so no object is rewritten
    manifests/step_000010-<id>.json    {format, step, names, size, sha256, blob, run, parent, written_at},
                                       written LAST

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
start-up probe), mirror_messages.py (the one redactor; each failure as one line that says what to do),
mirror_transfer.py (bytes up and down, each request with a deadline; one file committed as blob then manifest),
mirror_queue.py (what waits for the mirror, what goes next), mirror_upload.py (the background uploader: retries,
retention, status), mirror_fetch.py (fetching a copy back, checked) and this module (the seam the trainer calls,
the end-of-run report).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable

from mirror_fetch import fetch, find_copy_of
from mirror_queue import Holder
from mirror_store import Kinds, MirrorError, RemoteStore, redact_url
from mirror_transfer import download
from mirror_upload import Uploader

__all__ = ["Mirror", "MirrorError", "OtherRuns", "redact_url"]

log = logging.getLogger("train")


class OtherRuns(MirrorError):
    """A new run's mirror URL holds copies of other runs (the message lists them)."""


class Mirror:
    """Copies finished checkpoint files to an fsspec URL in the background and fetches the newest valid one back."""

    def __init__(self, url: str, keep_last: int = 10, *, run_id: str | None = None, parent: str | None = None,
                 kinds: Kinds | None = None,
                 timeout_seconds: float = 60.0, retry_initial_seconds: float = 1.0, retry_max_seconds: float = 60.0,
                 failure_log_interval_seconds: float = 300.0, part_bytes: int = 64 << 20, parallel_parts: int = 4,
                 min_upload_rate_bytes_per_second: float = 1e6, storage_options: dict[str, Any] | None = None):
        """url: any fsspec URL (s3://bucket/prefix, gs://..., az://..., file:///path) or a plain local path.

        keep_last: rolling checkpoints kept on the mirror. run_id: the run whose copies this mirror uploads, keeps and
        fetches (None: copies written without one; another run's copies are never touched); parent: the run it
        branched from ("run@step"), recorded in its manifests. kinds: what a
        checkpoint's names keep it for ("epoch", "best", "rolling"), as the folder's owner defines them
        (CheckpointManager.kinds); needed to upload (retention), not to read. timeout_seconds: to
        connect and to wait for an answer (S3). retry_*: backoff between failed attempts.
        failure_log_interval_seconds: at most one loud failure line per this interval. part_bytes: the multipart
        upload's part size (S3: >= 5 MiB); parallel_parts: S3 parts sent side by side (the memory one upload holds
        is about parallel_parts x part_bytes: 256 MB by default).
        min_upload_rate_bytes_per_second: an S3 request slower than this (after timeout_seconds) counts as hung.
        storage_options: extra fsspec options (they override the defaults chosen here)."""
        if keep_last < 0:
            raise MirrorError(f"the mirror's keep_last must be >= 0, not {keep_last}")
        self.store = RemoteStore(url, run_id=run_id, parent=parent, kinds=kinds, timeout_seconds=timeout_seconds,
                                 part_bytes=part_bytes, parallel_parts=parallel_parts,
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

    def check(self, new_run: bool = False) -> None:
        """Write, list, read back and delete a small probe object; raise a one-line MirrorError if any step fails.
        new_run: also raise OtherRuns if the URL holds copies of other runs (each run's resume and retention go by
        its own copies: two runs' would be mixed)."""
        self.store.check()
        if new_run and (runs := self.runs()):
            held = "; ".join(f"run {run}, newest step {entry['step']}" for run, entry in runs.items())
            raise OtherRuns(f"the mirror {self.redacted_url()} already holds checkpoints of another run ({held})")

    # uploading --------------------------------------------------------------------------------------------
    def resumed(self, step: int, holds: int | None, known: bool = True) -> None:
        """A resumed launch: it continues its run from `step`, and the mirror held the run's steps up to `holds`
        (None: none; known=False: that could not be seen, and is asked before the first upload). A mirror that holds
        a newer step of the run than `step` gets no upload from this launch (see Uploader.resumed)."""
        self.uploader.resumed(step, holds, known)

    def submit(self, local_path: Path, step: int, names: list[str], holder: Holder | None = None) -> None:
        """Queue a finished, durable, verified checkpoint file (known locally under `names`) for upload; returns at
        once; a failed upload never raises (a Mirror opened without kinds, for reading only, raises TypeError here).
        holder: the folder's owner, which keeps the file on disk until it is uploaded (see Uploader.submit)."""
        if self.store.kinds is None:
            raise TypeError("Mirror(kinds=...) is needed to upload: retention must know what each name is kept for")
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
        holds = status["holds"]
        if not status["submitted"]:  # nothing saved in this launch: the run's newest may be on the mirror already
            with contextlib.suppress(Exception):  # MirrorError: then it is reported as behind, below
                held = [c["step"] for c in self.remote_checkpoints() if c["run"] == self.store.run_id]
                made_it = saved_step in held
                status = {**status, "committed_step": saved_step if made_it else max(held, default=None)}
                holds = f"step {status['committed_step']}" if held else "no checkpoint of this run"
        made_it = made_it and status["committed_step"] == saved_step
        if made_it:
            log.info("mirror: the last checkpoint (step %d) is on %s", saved_step, self.redacted_url())
        else:
            log.error("MIRROR BEHIND: the last checkpoint (step %d) did not reach %s within %.0f s (the mirror holds "
                      "%s; last error: %s); it is on the local disk only", saved_step, self.redacted_url(),
                      wait_seconds, holds, status["last_error"])
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
        """Copy the blob of `entry` to tmp and check its size and sha256: None if it matches, else the problem
        (list_checkpoints --verify)."""
        return download(self.store, entry, tmp)

    def copy_of(self, local_path: Path, step: int, names: list[str], wait_seconds: float,
                before_upload: Callable[[], None] = lambda: None) -> tuple[dict | None, str | None]:
        """The committed copy of a local checkpoint file (found by its content: see find_copy_of), uploading it first
        (before_upload() called, then up to wait_seconds) if the mirror does not hold it. Returns (its entry or None,
        None if it was there already, else what the upload ended with: "uploaded" or its last error)."""
        entry = find_copy_of(self.store, local_path)
        if entry is not None:
            return entry, None
        before_upload()
        self.submit(local_path, step, names)
        self.wait(wait_seconds)
        entry = find_copy_of(self.store, local_path)
        if entry is not None:
            return entry, "uploaded"
        return None, self.status()["last_error"] or f"not committed within {wait_seconds:.0f} s"

    def fetch(self, entry: dict, target) -> Path | None:
        """The checkpoint `entry` (from remote_checkpoints) downloaded, checked and named by `target`, the local
        folder's owner (see mirror_fetch.fetch); None (the reason logged) if the copy is not usable."""
        return fetch(self.store, entry, target)
