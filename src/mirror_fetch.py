"""Fetching checkpoints back from the mirror (see mirror.py): one copy downloaded, checked against its manifest's
size and sha256 and by the local folder owner's own verification, then named by that owner (which copy: the
trainer's resume plan decides); and the committed copy of a local file, found by its content."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from mirror_store import CHUNK_BYTES, RemoteStore, one_line
from mirror_transfer import download

log = logging.getLogger("train")


def fetch(store: RemoteStore, entry: dict, target) -> Path | None:
    """Download the checkpoint `entry` (from remote_checkpoints) for `target`, the local folder's owner (the
    trainer's CheckpointManager): into target.incoming_path(), fsync'ed, checked against its manifest's size and
    sha256 (a short download is tried once more) and by target.load(path) (which raises, or returns False, for an
    invalid file), then named by target.adopt(path, names). Returns the adopted path, or None (the reason logged) if
    the copy is not usable. Raises as download() does."""
    tmp = target.incoming_path()
    try:
        problem = download(store, entry, tmp)
        if problem is not None and "bytes instead of" in problem:  # cut off on the way: once more before giving up
            log.warning("mirror: the download of step %d was short (%s); trying once more", entry["step"], problem)
            problem = download(store, entry, tmp)
        if problem is None:
            try:
                problem = "failed verification" if target.load(tmp) is False else None
            except Exception as e:
                problem = f"failed verification ({one_line(e)})"
        if problem is not None:
            log.error("mirror: the copy of step %d on %s (%s) is not usable: %s", entry["step"],
                      store.redacted_url(), store.relative(entry["key"]), problem)
            return None
        path = target.adopt(tmp, entry["names"])
        log.info("mirror: fetched step %d from %s (%.1f MB) into %s", entry["step"], store.redacted_url(),
                 entry["size"] / 1e6, path.parent)
        return path
    finally:
        tmp.unlink(missing_ok=True)


def find_copy_of(store: RemoteStore, local_path: Path) -> dict | None:
    """The committed checkpoint whose content is the local file's, byte for byte (its size, then the sha256 of its
    upload), or None. The file is read only if a committed checkpoint has its size."""
    size = Path(local_path).stat().st_size
    same_size = [c for c in store.remote_checkpoints() if c["size"] == size]
    if not same_size:
        return None
    digest = hashlib.sha256()
    with open(local_path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return next((c for c in same_size if c["sha256"] == digest.hexdigest()), None)
