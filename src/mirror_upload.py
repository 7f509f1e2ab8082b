"""The mirror's background uploader (see mirror.py): submitted checkpoint files, each held open (and held on disk by
the folder's owner) until it is uploaded, go into a bounded queue (mirror_queue.py: what waits, what goes next); one
thread uploads them (blob, then manifest), applies retention, retries with backoff, and reports plain numbers.
Nothing here raises into the training loop."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror_queue import Holder, Job, UploadQueue
from mirror_store import RemoteStore, one_line
from mirror_transfer import LocalFileError, commit_file

log = logging.getLogger("train")


class _Closing(Exception):
    """close() was called while an upload was in progress."""


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
        self._queue = UploadQueue()  # guarded by self._cond
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failing = _Failing()
        self._committed_step: int | None = None
        self._uploaded_bytes = 0
        self._rate = 0.0
        self._last_error: str | None = None
        self._first_commit_logged = False
        self._start_step: int | None = None  # a resumed run: the step this launch started from
        self._seen = True  # what the mirror holds of this run is known (see resumed)
        self.off: str | None = None  # why this launch does not upload at all (see resumed)

    def resumed(self, step: int, holds: int | None, known: bool = True) -> None:
        """This launch continues its run from `step`; the mirror held its steps up to `holds` when the launch began
        (None: none), or, with known=False, that could not be seen (the mirror was unreachable) and is asked before
        the first upload. If the mirror holds a newer step of the run than `step` (the launch took an older local
        checkpoint: the mirror unreachable at start, or its copy not fetched), this launch uploads nothing: its
        copies would be mixed with the newer ones under one run."""
        with self._cond:
            self._start_step, self._seen = step, known
            if known:
                self._holding(holds)

    def _holding(self, holds: int | None) -> None:
        """The mirror holds steps up to `holds` of this run (under self._cond)."""
        self._committed_step = holds if self._committed_step is None else max(holds or 0, self._committed_step)
        if holds is not None and self._start_step is not None and holds > self._start_step and self.off is None:
            self.off = (f"it holds step {holds} of this run, newer than step {self._start_step} this launch resumed "
                        "from: this launch uploads nothing, so that the two histories are never mixed under one run. "
                        f"Resume with --resume latest --mirror URL to continue from step {holds}")
            log.error("MIRROR OFF: %s (%s)", self.off, self.store.redacted_url())

    def _see_holdings(self) -> None:
        """Before the first upload of a launch that could not see the mirror at start: what it holds of this run.
        Raises as a failed attempt does when the mirror cannot be read."""
        held = [c["step"] for c in self.store.remote_checkpoints() if c["run"] == self.store.run_id]
        with self._cond:
            self._seen = True
            self._holding(max(held, default=None))

    def submit(self, local_path: Path, step: int, names: list[str], holder: Holder | None = None) -> None:
        """Queue a finished, durable, verified checkpoint file (known locally under `names`) for upload; returns at
        once. The file is held open, and by `holder` (the folder's owner) on disk, until it is uploaded or
        superseded, so that local retention reusing its blocks cannot change what is uploaded. Without a holder (or
        if holding fails) the upload checks that the file did not change meanwhile."""
        local_path, names = Path(local_path), list(names)
        kinds = self.store.kinds(names)  # what the folder's owner keeps this file for
        with self._cond:
            if self._closed:
                log.warning("mirror: step %d submitted after close(); not copied", step)
                return
            if self.off is not None:  # said once, when it was found; the step line says it meanwhile
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
            job = Job(seq=seq, step=step, names=names, path=local_path, file=f,
                      identity=(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), submitted_at=time.monotonic(),
                      epoch="epoch" in kinds, best="best" in kinds)
            if holder is not None:  # its lock nests inside ours; it calls release() only without holding it
                job.holder, job.held = holder, holder.hold(local_path, lambda: self._release(job))
            self._queue.add(job)  # bounded: what this submission makes not worth uploading is skipped now
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mirror-upload", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _release(self, job: Job) -> bool:
        """The holder needs the space of a waiting job's file: give the job up; whether it was. The upload being
        read keeps its file: a file is given up only between attempts, never halfway through."""
        with self._cond:
            if job.state != "pending" or job is self._queue.current:
                return False
            self._queue.retire(job, "skipped")
            self._cond.notify_all()
        log.warning("mirror: step %d will not be copied off the machine: its file's space was needed for a save (a "
                    "newer checkpoint goes instead once the mirror answers)", job.step)
        return True

    def _run(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice value
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # training comes first for the CPU
        delay = self.retry_initial_seconds
        queue = self._queue
        while True:
            with self._cond:
                while not queue.pending and not self._closed:
                    self._cond.wait()
                if self._closed or self.off is not None:  # close() left the one in flight; it may have failed since
                    for job in list(queue.pending):
                        queue.retire(job, "skipped")
                    self._cond.notify_all()
                    return
                job = queue.take()
                seen = queue.newest  # a checkpoint submitted after this moment ends a backoff (below)
            job.attempts += 1
            try:
                if not self._seen:
                    self._see_holdings()
                    if self.off is not None:
                        self._done(job, "skipped")
                        continue
                manifest, seconds = self._upload(job)
            except _Closing:
                self._done(job, "skipped")
                return
            except LocalFileError as e:
                with self._cond:
                    self._last_error = self.store.redact(str(e))
                self._done(job, "failed")
                log.error("MIRROR: step %d not copied: %s", job.step, self._last_error)
                continue
            except Exception as e:
                self._on_failure(job, e, delay)
                with self._cond:
                    queue.attempt_failed(job)  # pending again, for a retry, or skipped if a newer one supersedes it
                    self._cond.notify_all()
                    # back off, but not past a checkpoint submitted since this attempt began (even during it): the
                    # one a graceful stop saves must not spend its --mirror_wait_seconds waiting out the backoff
                    self._cond.wait_for(lambda: self._closed or queue.newest is not seen, timeout=delay)
                delay = min(delay * 2, self.retry_max_seconds)
                continue
            delay = self.retry_initial_seconds
            self._on_commit(job, manifest, seconds)
            try:
                self.store.retain(self.keep_last)
            except Exception as e:  # the next commit tries again; nothing committed is lost by not deleting
                log.warning("mirror: could not remove old checkpoints from %s (%s)", self.store.redacted_url(),
                            self.store.redact(one_line(e)))
            self._done(job, "committed")  # only now, so that wait() returns with the mirror in its steady state

    def _done(self, job: Job, state: str) -> None:
        """The current upload ended (committed, skipped or failed): retire it and wake whoever waits."""
        with self._cond:
            self._queue.done(job, state)
            self._cond.notify_all()

    def _upload(self, job: Job) -> tuple[dict, float]:
        """Commit the job's file to the mirror (blob, then manifest); stops with _Closing once close() is called."""
        def still_open() -> None:
            if self._closed:
                raise _Closing()

        return commit_file(self.store, job.file, job.path, job.identity, job.step, job.names, still_open)

    def _on_failure(self, job: Job, e: BaseException, delay: float) -> None:
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

    def _on_commit(self, job: Job, manifest: dict, seconds: float) -> None:
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
            while self._queue.pending and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            newest = self._queue.newest
            return newest is None or newest.state == "committed"

    def status(self) -> dict[str, Any]:
        """Plain numbers for logs and TensorBoard: submitted (checkpoints submitted so far), committed_step (the
        highest step of the run on the mirror: committed by this process, or held when a resumed launch began; None
        before either), holds (that as words), lag_seconds (age of the newest submission not yet committed; 0 if
        none), pending, skipped, uploaded_bytes, upload_rate_bytes_per_second (the last upload's), last_error (None
        while uploads work), consecutive_failures, off (why this launch uploads nothing, or None)."""
        with self._cond:
            waiting = self._queue.waiting()
            lag = time.monotonic() - waiting[-1].submitted_at if waiting else 0.0
            return dict(submitted=self._seq, committed_step=self._committed_step, lag_seconds=lag, pending=len(waiting),
                        skipped=self._queue.skipped, uploaded_bytes=self._uploaded_bytes,
                        upload_rate_bytes_per_second=self._rate, last_error=self.off or self._last_error,
                        consecutive_failures=self._failing.count, holds=self._holds_text(), off=self.off)

    def _holds_text(self) -> str:
        """What the mirror holds of this run, as a message says it (under self._cond)."""
        if self._committed_step is not None:
            return f"step {self._committed_step}"
        return "no checkpoint of this run" if self._seen else "what it held at the start is not known (unreachable)"

    def close(self, timeout_seconds: float = 10.0) -> None:
        """Stop uploading (call wait() first to finish): an upload in progress is abandoned, pending ones dropped."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            dropped = [j for j in self._queue.pending if j is not self._queue.current]
            for job in dropped:
                self._queue.retire(job, "skipped")
            self._cond.notify_all()
        if dropped:
            log.warning("mirror: closed with %d checkpoint(s) not copied to %s (newest: step %d)", len(dropped),
                        self.store.redacted_url(), dropped[-1].step)
        if self._thread is not None:
            self._thread.join(timeout_seconds)
