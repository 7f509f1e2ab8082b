"""What waits for the mirror (see mirror.py): the submitted checkpoint files not yet uploaded, and which goes next.

What waits is bounded, however long the mirror is down: a newer submission supersedes every waiting one that holds
only rolling names, and a newer best supersedes a waiting best; only epoch checkpoints (which the local folder keeps
anyway) are never superseded. So at most the newest submission, the newest best and the epoch files wait. The newest
goes first; right after it, the oldest that waited behind it, so that saves faster than uploads never starve an
epoch or best file. No thread and no lock here: the uploader (mirror_upload.py) calls it under its own lock."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol


class Holder(Protocol):
    """The owner of the folder a submitted file is in (the trainer's CheckpointManager): it keeps the file's content
    on disk until let go, and may ask for it back when it needs the space."""

    def hold(self, path: Path, release: Callable[[], bool]) -> Any:
        """Keep the content of `path` (None if it cannot); release() is called if the space is needed and says
        whether the file was given up."""

    def let_go(self, held: Any) -> None:
        """The content is no longer needed."""


@dataclass
class Job:
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

    def superseded_by(self, newer: Job) -> bool:
        """A newer submission makes this one not worth uploading: it holds only rolling names, or it is a best and
        the newer one is a best too. An epoch checkpoint is never superseded."""
        return not self.epoch and (not self.best or newer.best)


class UploadQueue:
    """The jobs submitted and not yet retired, oldest first; the one being uploaded stays in it until it is done."""

    def __init__(self):
        self.pending: list[Job] = []
        self.current: Job | None = None  # being uploaded
        self.newest: Job | None = None  # the last submitted, whatever became of it
        self.skipped = 0
        self._took_newest = False  # the current job was the newest when taken
        self._owe_older = False  # the oldest goes next: it waited through an upload of the newest

    def add(self, job: Job) -> None:
        """Queue the newest submission; every waiting job it supersedes is retired as skipped (bounded: the one
        being uploaded goes on)."""
        for old in [j for j in self.pending if j is not self.current and j.superseded_by(job)]:
            self.retire(old, "skipped")
        self.pending.append(job)
        self.newest = job

    def take(self) -> Job:
        """The next job to upload, made current: the newest submission; but right after committing a newest one
        that older ones waited behind, the oldest (an epoch or best file), so that it is never starved."""
        newest, oldest = self.pending[-1], self.pending[0]
        job = newest
        if self._owe_older and oldest is not newest:
            self._owe_older, job = False, oldest
        self._took_newest = job is newest
        self.current = job
        return job

    def attempt_failed(self, job: Job) -> None:
        """The current job's attempt failed: it waits for a retry, unless a job submitted since supersedes it (then
        it is retired as skipped: not worth a retry)."""
        self.current = None
        if any(j.seq > job.seq and job.superseded_by(j) for j in self.pending):
            self.retire(job, "skipped")

    def done(self, job: Job, state: str) -> None:
        """The current job's upload ended: committed, skipped (closing, or superseded) or failed."""
        if state == "committed":
            self._owe_older = self._took_newest and self.pending[0] is not job
        self.current = None
        self.retire(job, state)

    def retire(self, job: Job, state: str) -> None:
        """Drop a job from the queue, close its file, let its holder go of it, count it if skipped."""
        job.state = state
        if job in self.pending:
            self.pending.remove(job)
        if state == "skipped":
            self.skipped += 1
        with contextlib.suppress(OSError):
            job.file.close()
        if job.held is not None:
            held, job.held = job.held, None
            job.holder.let_go(held)  # the holder's own lock only: it never calls into us while holding it

    def waiting(self) -> list[Job]:
        """The jobs not uploaded yet (not the one committed and being retained)."""
        return [j for j in self.pending if j.state == "pending"]
