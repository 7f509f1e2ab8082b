"""Moving bytes to and from the mirror (see mirror.py): a checkpoint file up as one blob (S3: one PUT or a multipart
upload with parts sent side by side, each request with a deadline; any other fsspec filesystem: a stream), a small
object in one piece, and a blob down, checked against its manifest's size and sha256."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import BinaryIO, Callable

from mirror_store import CHUNK_BYTES, MANIFEST_FORMAT, MirrorError, RemoteStore, one_line


class LocalFileError(Exception):
    """A local file could not be read (an upload: not retried, the submission is dropped) or written (a fetch)."""


def fsync_dir(path: Path) -> None:
    """Make the renames in a folder durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(store: RemoteStore, file: BinaryIO, path: Path, identity: tuple[int, int, int, int], step: int,
                names: list[str], before_read: Callable[[], None]) -> tuple[dict, float]:
    """Upload an open checkpoint file as blobs/step_N-<id>.pt while hashing it (one read), check that the local file
    did not change meanwhile (identity: st_dev, st_ino, st_size, st_mtime_ns at submit) and that the mirror holds
    every byte, then write its manifest, which commits it. Returns (manifest, upload seconds). before_read() is
    called before each read and may raise to abandon the upload. Raises on any failure (LocalFileError: the local
    file)."""
    stem = f"step_{step:06d}-{uuid.uuid4().hex[:12]}"
    blob_rel, manifest_rel = f"blobs/{stem}.pt", f"manifests/{stem}.json"
    blob = store.key(blob_rel)
    digest, t0 = hashlib.sha256(), time.monotonic()

    def read(nbytes: int) -> bytes:  # the next nbytes (fewer only at the end), hashed on the way
        before_read()
        try:
            data = file.read(nbytes)  # a regular file returns all nbytes at once: one buffer, no copies
        except OSError as e:
            raise LocalFileError(f"cannot read {path}: {one_line(e)}") from None
        digest.update(data)
        return data

    try:
        file.seek(0)
    except OSError as e:
        raise LocalFileError(f"cannot read {path}: {one_line(e)}") from None
    size = put_blob(store, blob, read)
    seconds = time.monotonic() - t0
    st = os.fstat(file.fileno())
    if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != identity or size != st.st_size:
        with contextlib.suppress(Exception):
            store.fs.rm_file(blob)
        raise LocalFileError(f"{path} was overwritten before it could be uploaded")
    store.fs.invalidate_cache(blob)
    remote_size = store.fs.info(blob)["size"]
    if remote_size != size:
        raise OSError(f"the mirror holds {remote_size} bytes of {blob_rel}, {size} were sent")
    manifest = dict(format=MANIFEST_FORMAT, step=step, names=names, size=size, sha256=digest.hexdigest(),
                    blob=blob_rel, run=store.run_id, parent=store.parent,
                    written_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="microseconds"))
    write_small(store, store.key(manifest_rel), json.dumps(manifest, indent=1).encode())
    store.manifests[store.key(manifest_rel)] = manifest
    return manifest, seconds


def put_blob(store: RemoteStore, blob: str, read: Callable[[int], bytes]) -> int:
    """Write the bytes read(n) hands out, until it returns b"", to the object `blob`; returns their count. Raises on
    any failure (what read raises included), leaving no partial object behind where the store allows."""
    return (_put_s3 if store.s3 else _put_stream)(store, blob, read)


def _put_s3(store: RemoteStore, blob: str, read: Callable[[int], bytes]) -> int:
    """S3: one PUT, or a multipart upload of part_bytes parts with up to parallel_parts of them in flight at once
    (read, and hashed, in order; sent side by side), each call with a deadline. botocore's timeouts cover connecting
    and waiting for an answer but not sending: a hung server that accepts the connection and never reads would
    block a send forever, so every call is cancelled after timeout_seconds plus its bytes at
    min_upload_rate_bytes_per_second."""
    bucket, key, _ = store.fs.split_path(blob)

    def start(method: str, nbytes: int = 0, **kwargs) -> tuple[concurrent.futures.Future, str, float]:
        # room for botocore's two attempts and its backoff between them, then the bytes at the slowest rate
        deadline = 2 * store.timeout_seconds + 1 + nbytes / store.min_upload_rate_bytes_per_second
        call = asyncio.wait_for(store.fs._call_s3(method, Bucket=bucket, Key=key, **kwargs), deadline)
        return asyncio.run_coroutine_threadsafe(call, store.fs.loop), method, deadline

    def answer(started: tuple[concurrent.futures.Future, str, float]):
        future, method, deadline = started
        try:
            return future.result()
        except (asyncio.TimeoutError, TimeoutError):
            raise TimeoutError(f"{method} got no answer within {deadline:.3g} s") from None

    part = read(store.part_bytes)
    size = len(part)
    if size < store.part_bytes:
        answer(start("put_object", size, Body=part))
        return size
    upload_id = answer(start("create_multipart_upload"))["UploadId"]
    in_flight: collections.deque = collections.deque()  # (part number, started call), oldest first
    parts: list[dict] = []

    def settle_until(at_most: int) -> None:  # the oldest first: parts stay in order, the memory held bounded
        while len(in_flight) > at_most:
            done, started = in_flight.popleft()
            parts.append(dict(PartNumber=done, ETag=answer(started)["ETag"]))

    try:
        while part:
            number = len(parts) + len(in_flight) + 1
            in_flight.append((number, start("upload_part", len(part), UploadId=upload_id, PartNumber=number,
                                            Body=part)))
            settle_until(store.parallel_parts - 1)
            part = read(store.part_bytes) if len(part) == store.part_bytes else b""
            size += len(part)
        settle_until(0)
        answer(start("complete_multipart_upload", UploadId=upload_id, MultipartUpload=dict(Parts=parts)))
    except BaseException:
        for _, (future, _, _) in in_flight:
            future.cancel()
        # the cancels take effect on the loop: a part still being sent could land after the abort (S3 keeps it then)
        concurrent.futures.wait([future for _, (future, _, _) in in_flight], timeout=store.timeout_seconds)
        with contextlib.suppress(Exception):  # else the parts wait on the server for its lifecycle rules
            answer(start("abort_multipart_upload", UploadId=upload_id))
        raise
    return size


def _put_stream(store: RemoteStore, blob: str, read: Callable[[int], bytes]) -> int:
    """Any other fsspec filesystem: write through fs.open in CHUNK_BYTES pieces (a local one fsync'ed)."""
    if store.local:
        store.fs.makedirs(store.key("blobs"), exist_ok=True)
        store.fs.makedirs(store.key("manifests"), exist_ok=True)
    size = 0
    out = store.fs.open(blob, "wb", block_size=store.part_bytes)
    try:
        while chunk := read(CHUNK_BYTES):
            out.write(chunk)
            size += len(chunk)
        if store.local:
            out.flush()
            os.fsync(out.fileno())
        out.close()
    except BaseException:
        with contextlib.suppress(Exception):
            if store.local:
                out.close()
            else:
                out.discard()
                out.closed = True  # AbstractBufferedFile: close() (or garbage collection) would commit it
        with contextlib.suppress(Exception):
            store.fs.rm_file(blob)
        raise
    return size


def write_small(store: RemoteStore, key: str, data: bytes) -> None:
    """Write a small object in one piece (a local file: temporary name, fsync, rename, fsync the folder)."""
    if not store.local:
        store.fs.pipe_file(key, data)
        return
    path = Path(key)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def download(store: RemoteStore, entry: dict, tmp: Path) -> str | None:
    """Copy the blob of `entry` (from remote_checkpoints) to tmp, fsync'ed, and check its size and sha256: None
    if it matches, else the problem. Raises MirrorError if the mirror cannot be read, OSError for the disk."""
    digest, size = hashlib.sha256(), 0
    with open(tmp, "wb") as dst:
        try:
            with store.fs.open(entry["key"], "rb", block_size=store.part_bytes) as src:
                while chunk := src.read(CHUNK_BYTES):
                    digest.update(chunk)
                    try:
                        dst.write(chunk)
                    except OSError as e:  # the local disk, not the mirror: raised as it is, below
                        raise LocalFileError(e) from None
                    size += len(chunk)
        except FileNotFoundError:
            return "its blob disappeared"
        except LocalFileError as e:
            raise e.args[0] from None
        except Exception as e:
            raise MirrorError(store.explain(e, f"download step {entry['step']}")) from None
        dst.flush()
        os.fsync(dst.fileno())
    if size != entry["size"]:
        return f"{size} bytes instead of the manifest's {entry['size']}"
    if digest.hexdigest() != entry["sha256"]:
        return "sha256 mismatch: the copy on the mirror is damaged"
    return None
