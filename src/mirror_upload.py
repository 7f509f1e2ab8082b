"""The mirror's background uploader (see mirror.py): a bounded queue of submitted checkpoint files, each held open
(and held on disk by the folder's owner) until it is uploaded, one thread that uploads the newest first (blob, then
manifest), retries with backoff, and reports plain numbers. Nothing here raises into the training loop.

What waits is bounded, however long the mirror is down: a newer submission supersedes every pending one that holds
only rolling names, and a newer best supersedes a pending best; only epoch checkpoints (which the local folder keeps
anyway) are never superseded. So at most the newest submission, the newest best and the epoch files wait."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

from mirror_store import BEST, EPOCH_NAME, RemoteStore, one_line
from mirror_transfer import LocalFileError, commit_file

log = logging.getLogger("train")


class Holder(Protocol):
    """The owner of the folder a submitted file is in (the trainer's CheckpointManager): it keeps the file's content
    on disk until let go, and may ask for it back when it needs the space."""

    def hold(self, path: Path, release: Callable[[], bool]) -> Any:
        """Keep the content of `path` (None if it cannot); release() is called if the space is needed and says
        whether the file was given up."""

    def let_go(self, held: Any) -> None:
        """The content is no longer needed."""


class _Closing(Exception):
    """close() was called while an upload was in progress."""


@dataclass
class _Job:
    """One submitted checkpoint file, held open (and held on disk by its folder's owner) until it is uploaded."""
    seq: int
    step: int
    names: list[str]
    path: Path
    file: BinaryIO
    identity: tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns) at submit
    submitted_at: float  # time.monotonic()
    epoch: bool  # holds an epoch file: never superseded
    best: bool  # holds best_model.pt: superseded only by a newer best
    holder: Holder | None = None
    held: Any = None  # what holder.hold returned
    state: str = "pending"  # pending, committed, skipped, failed
    attempts: int = 0

    def superseded_by(self, newer: "_Job") -> bool:
        """A newer submission makes this one not worth uploading: it holds only rolling names, or it is a best and
        the newer one is a best too. An epoch checkpoint is never superseded."""
        return not self.epoch and (not self.best or newer.best)


@dataclass
class _Failing:
    """The current run of failed attempts (last_loud carries over: one loud line per interval, even if flapping)."""
    since: float = 0.0
    count: int = 0
    last_loud: float = float("-inf")
    loud_lines: int = 0


class Uploader:
    """Uploads submitted checkpoint files to a RemoteStore in one background thread, newest first when behind."""

    def __init__(self, store: RemoteStore, keep_last: int, *, retry_initial_seconds: float = 1.0,
                 retry_max_seconds: float = 60.0, failure_log_interval_seconds: float = 300.0):
        """See Mirror for the settings."""
        self.store, self.keep_last = store, keep_last
        self.retry_initial_seconds = retry_initial_seconds
        self.retry_max_seconds = retry_max_seconds
        self.failure_log_interval_seconds = failure_log_interval_seconds
        self._cond = threading.Condition()
        self._pending: list[_Job] = []  # oldest first; the job being uploaded stays in it until it is done
        self._current: _Job | None = None
        self._newest: _Job | None = None
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._owe_older = False  # newest first, but an older epoch/best upload is never starved (see _pick)
        self._failing = _Failing()
        self._committed_step: int | None = None
        self._skipped = 0
        self._uploaded_bytes = 0
        self._rate = 0.0
        self._last_error: str | None = None
        self._first_commit_logged = False

    def submit(self, local_path: Path, step: int, names: list[str], holder: Holder | None = None) -> None:
        """Queue a finished, durable, verified checkpoint file (known locally under `names`) for upload; returns at
        once. The file is held open, and by `holder` (the folder's owner) on disk, until it is uploaded or
        superseded, so that local retention reusing its blocks cannot change what is uploaded. Without a holder (or
        if holding fails) the upload checks that the file did not change meanwhile."""
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
                self._last_error = self.store.redact(one_line(e))
                log.error("MIRROR: cannot open %s to copy it off the machine (%s); step %d will not be mirrored",
                          local_path, self._last_error, step)
                return
            st = os.fstat(f.fileno())
            job = _Job(seq=seq, step=step, names=names, path=local_path, file=f,
                       identity=(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), submitted_at=time.monotonic(),
                       epoch=any(EPOCH_NAME.fullmatch(n) for n in names), best=BEST in names)
            if holder is not None:  # its lock nests inside ours; it calls release() only without holding it
                job.holder, job.held = holder, holder.hold(local_path, lambda: self._release(job))
            for old in [j for j in self._pending if j is not self._current and j.superseded_by(job)]:
                self._finish(old, "skipped")  # bounded: what this submission makes not worth uploading goes now
            self._pending.append(job)
            self._newest = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mirror-upload", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _release(self, job: _Job) -> bool:
        """The holder needs the space of a waiting job's file: give the job up; whether it was. The upload being
        read keeps its file: a file is given up only between attempts, never halfway through."""
        with self._cond:
            if job.state != "pending" or job is self._current:
                return False
            self._finish(job, "skipped")
        log.warning("mirror: step %d will not be copied off the machine: its file's space was needed for a save (a "
                    "newer checkpoint goes instead once the mirror answers)", job.step)
        return True

    def _finish(self, job: _Job, state: str) -> None:
        """Retire a job (lock held): drop it from the queue, close its file, let its holder go of it, count it."""
        job.state = state
        if job in self._pending:
            self._pending.remove(job)
        if state == "skipped":
            self._skipped += 1
        with contextlib.suppress(OSError):
            job.file.close()
        if job.held is not None:
            held, job.held = job.held, None
            job.holder.let_go(held)  # the holder's own lock only: it never calls into us while holding it
        self._cond.notify_all()

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice value
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # training comes first for the CPU
        delay = self.retry_initial_seconds
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:  # close() left the one in flight then; it may have ended in a failure since
                    for job in list(self._pending):
                        self._finish(job, "skipped")
                    return
                job = self._pick()
                picked_newest = job is self._pending[-1]
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
            except LocalFileError as e:
                with self._cond:
                    self._current = None
                    self._last_error = self.store.redact(str(e))
                    self._finish(job, "failed")
                log.error("MIRROR: step %d not copied: %s", job.step, self._last_error)
                continue
            except Exception as e:
                self._on_failure(job, e, delay)
                with self._cond:
                    self._current = None
                    if any(j.seq > job.seq and job.superseded_by(j) for j in self._pending):
                        self._finish(job, "skipped")  # not worth a retry: a newer submission supersedes it
                    # back off, but not past a checkpoint submitted since this attempt began (even during it): the
                    # one a graceful stop saves must not spend its --mirror_wait_seconds waiting out the backoff
                    self._cond.wait_for(lambda: self._closed or self._newest is not seen, timeout=delay)
                delay = min(delay * 2, self.retry_max_seconds)
                continue
            delay = self.retry_initial_seconds
            self._on_commit(job, manifest, seconds)
            try:
                self.store.retain(self.keep_last)
            except Exception as e:  # the next commit tries again; nothing committed is lost by not deleting
                log.warning("mirror: could not remove old checkpoints from %s (%s)", self.store.redacted_url(),
                            self.store.redact(one_line(e)))
            with self._cond:  # done only now, so that wait() returns with the mirror in its steady state
                # an older one that waited all through this upload goes next (saves faster than uploads never starve it)
                self._owe_older = picked_newest and self._pending[0] is not job
                self._current = None
                self._finish(job, "committed")

    def _pick(self) -> _Job:
        """The next job (lock held): the newest submission first; but right after committing a newest one that
        older ones waited behind, the oldest (an epoch or best file), so that saves faster than uploads never
        starve it."""
        newest, oldest = self._pending[-1], self._pending[0]
        if self._owe_older and oldest is not newest:
            self._owe_older = False
            return oldest
        return newest

    def _upload(self, job: _Job) -> tuple[dict, float]:
        """Commit the job's file to the mirror (blob, then manifest); stops with _Closing once close() is called."""
        def still_open() -> None:
            if self._closed:
                raise _Closing()

        return commit_file(self.store, job.file, job.path, job.identity, job.step, job.names, still_open)

    def _on_failure(self, job: _Job, e: BaseException, delay: float) -> None:
        now = time.monotonic()
        with self._cond:
            self._last_error = self.store.redact(one_line(e))
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
                      "machine only", job.step, self.store.redacted_url(), self._last_error, self._failing.count,
                      now - self._failing.since, delay)

    def _on_commit(self, job: _Job, manifest: dict, seconds: float) -> None:
        now = time.monotonic()
        behind = now - job.submitted_at
        with self._cond:
            job.state = "committed"
            self._committed_step = max(job.step, self._committed_step or 0)  # newest first: not always the last
            self._uploaded_bytes += manifest["size"]
            self._rate = manifest["size"] / max(seconds, 1e-9)
            self._last_error = None
            failing, self._failing = self._failing, _Failing(last_loud=self._failing.last_loud)
        if failing.loud_lines:  # a failure that was announced is announced over
            log.info("mirror recovered: step %d committed to %s after %d failed attempt(s) over %.0f s", job.step,
                     self.store.redacted_url(), failing.count, now - failing.since)
        if not self._first_commit_logged:
            self._first_commit_logged = True
            log.info("mirror: step %d committed to %s (%.1f MB in %.2f s, %.1f MB/s); the mirror is %.1f s behind "
                     "the save", job.step, self.store.redacted_url(), manifest["size"] / 1e6, seconds, self._rate / 1e6,
                     behind)

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
        """Plain numbers for logs and TensorBoard: submitted (checkpoints submitted so far), committed_step (the
        highest step this process committed; None before its first commit), lag_seconds (age of the newest
        submission not yet committed; 0 if none), pending, skipped, uploaded_bytes,
        upload_rate_bytes_per_second (the last upload's), last_error (None while uploads work),
        consecutive_failures."""
        with self._cond:
            waiting = [j for j in self._pending if j.state == "pending"]  # not the one committed, being retained
            lag = time.monotonic() - waiting[-1].submitted_at if waiting else 0.0
            return dict(submitted=self._seq, committed_step=self._committed_step, lag_seconds=lag, pending=len(waiting),
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
                        self.store.redacted_url(), dropped[-1].step)
        if self._thread is not None:
            self._thread.join(timeout_seconds)
