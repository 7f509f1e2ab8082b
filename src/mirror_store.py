"""The mirror's remote side (see mirror.py): one fsspec filesystem under a root URL, the names of its objects, the
manifests, what is committed, retention, and the start-up probe. Credentials are redacted from every message
(mirror_messages.py). Neither thread nor queue here: the uploader (mirror_upload.py) and the fetch (mirror_fetch.py)
use it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from typing import Any, Callable

from mirror_messages import MirrorError, one_line, redact_url, secrets_in, split_userinfo, what_to_do

log = logging.getLogger("train")

MANIFEST_FORMAT = 1
CHUNK_BYTES = 8 << 20  # read and hash a file in pieces of this size: never a second copy in memory
Kinds = Callable[[list[str]], frozenset[str]]  # a checkpoint's names -> what retention keeps it for (see Mirror)
STEM = re.compile(r"step_(\d+)-([0-9a-f]+)")
S3_PROTOCOLS = ("s3", "s3a")


class RemoteStore:
    """The objects under one fsspec URL: blobs/ (checkpoint files) and manifests/ (what makes a blob committed).

    A listing may lag behind a write (an eventually consistent store, a listing cache): a manifest whose blob is not
    listed yet looks broken, and that blob, once listed, looks orphaned. So retention deletes a broken manifest or an
    orphaned blob only once two of its scans, at least orphan_grace_seconds apart, both saw it so."""

    orphan_grace_seconds = 60.0

    def __init__(self, url: str, *, run_id: str | None = None, parent: str | None = None, kinds: Kinds | None = None,
                 timeout_seconds: float = 60.0, part_bytes: int = 64 << 20, parallel_parts: int = 4,
                 min_upload_rate_bytes_per_second: float = 1e6, storage_options: dict[str, Any] | None = None):
        """See Mirror: the URL, the run whose checkpoints this store writes and keeps, what each checkpoint name is
        kept for, how long a request may take."""
        self.run_id, self.parent, self.kinds = run_id, parent, kinds
        if part_bytes < 5 << 20:
            raise MirrorError(f"the mirror's part size must be at least 5 MiB (S3's smallest part), not {part_bytes}")
        self.timeout_seconds = timeout_seconds
        self.min_upload_rate_bytes_per_second = min_upload_rate_bytes_per_second
        self.part_bytes = part_bytes
        self.parallel_parts = max(1, parallel_parts)
        clean_url, user, secret = split_userinfo(url)
        protocol = clean_url.partition("://")[0] if "://" in clean_url else "file"
        options = dict(storage_options or {})
        self.secrets = secrets_in(url, options)
        self.url = clean_url if protocol in S3_PROTOCOLS else url
        self.shown_url = redact_url(url)
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

            self.fs, root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **options)
        except ImportError as e:
            raise MirrorError(f"--mirror {self.redacted_url()}: {self.redact(str(e))} (for s3:// pip install s3fs, "
                              "gs:// gcsfs, az:// adlfs)") from None
        except (ValueError, TypeError, KeyError) as e:
            raise MirrorError(f"--mirror {self.redacted_url()} is not a usable fsspec URL "
                              f"({self.redact(one_line(e))}); use s3://bucket/prefix or a local path") from None
        if protocol in S3_PROTOCOLS:
            self.fs.retries = 1  # s3fs's own retry loop on top of botocore's would multiply the wait on a dead server
        from fsspec.implementations.local import LocalFileSystem

        self.local = isinstance(self.fs, LocalFileSystem)
        self.s3 = protocol in S3_PROTOCOLS and hasattr(self.fs, "_call_s3")
        self.root = root.rstrip("/")
        if not self.root:
            raise MirrorError(f"--mirror {self.redacted_url()} names no bucket or folder; use s3://bucket/prefix")
        self.manifests: dict[str, dict | None] = {}  # manifest key -> parsed content (manifests never change)
        self.suspects: dict[str, float] = {}  # key -> when a scan first saw it broken or orphaned (time.monotonic)

    def redacted_url(self) -> str:
        """The URL without user:secret@, for logs and messages."""
        return self.shown_url

    def redact(self, text: str) -> str:
        """`text` with every secret replaced by ***."""
        for s in self.secrets:
            text = text.replace(s, "***")
        return text

    def key(self, relative: str) -> str:
        """The full key (path on the filesystem) of `relative` under the root."""
        return f"{self.root}/{relative}"

    def relative(self, key: str) -> str:
        """Inverse of key()."""
        return key[len(self.root) + 1:] if key.startswith(self.root + "/") else key

    def check(self) -> None:
        """Write, list, read back and delete a small probe object; raise a one-line MirrorError if any step fails."""
        probe = self.key(f".probe-{uuid.uuid4().hex[:12]}")
        action = "create the folder"
        try:
            if self.local:
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
            raise MirrorError(self.explain(e, action)) from None
        endpoint = self.fs.__dict__.get("endpoint_url") or ""
        log.info("mirror: %s%s can be written, listed, read and deleted; checkpoints will be copied there",
                 self.redacted_url(), f" (endpoint {split_userinfo(endpoint)[0]})" if endpoint else "")

    def explain(self, e: BaseException, action: str) -> str:
        """One line without secrets: what failed at the mirror, and what to do about it."""
        cause = self.redact(one_line(e))
        return f"mirror {self.redacted_url()}: could not {action} ({cause}); {what_to_do(e, self.local)}"

    def objects_under(self, relative: str) -> dict[str, int]:
        """{full key: size} of the objects directly under root/relative ({} if there are none)."""
        path = self.key(relative)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/"): e.get("size") for e in entries if e.get("type") != "directory"}

    def manifest(self, key: str) -> dict | None:
        """The manifest at `key`, or None if it is not one this code understands (another format, unparseable):
        such a manifest is ignored, and never deleted."""
        if key not in self.manifests:
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
                log.warning("mirror: ignoring %s on %s: not a format-%d manifest", self.relative(key),
                            self.redacted_url(), MANIFEST_FORMAT)
            self.manifests[key] = m if ok else None
        return self.manifests[key]

    def scan(self) -> tuple[list[dict], list[str], dict[str, int], bool]:
        """(committed checkpoints newest first, keys of our manifests whose blob is missing or not whole,
        {blob key: size}, whether every manifest was understood)."""
        blobs = self.objects_under("blobs")
        committed, broken, understood = [], [], True
        for key in sorted(self.objects_under("manifests")):
            if not key.endswith(".json"):
                continue
            m = self.manifest(key)
            if m is None:
                understood = False
                continue
            blob = self.key(m["blob"])
            if blobs.get(blob) != m["size"]:
                broken.append(key)  # its blob is missing or not whole: not committed
                continue
            committed.append(dict(step=m["step"], names=list(m["names"]), size=m["size"], sha256=m["sha256"],
                                  key=blob, manifest_key=key, written_at=m.get("written_at", ""), run=m.get("run"),
                                  parent=m.get("parent")))
        committed.sort(key=lambda c: (c["step"], c["written_at"]), reverse=True)
        return committed, broken, blobs, understood

    def remote_checkpoints(self) -> list[dict]:
        """Committed checkpoints on the mirror, newest first: dict(step, names, size, sha256, key, manifest_key,
        written_at, run, parent); key is the blob's path on the mirror's filesystem; run is the identity of the run
        that wrote it (None for copies from before runs had one), parent the run it branched from ("run@step"; None
        for a run that did not). A one-line MirrorError if it cannot be read."""
        try:
            return self.scan()[0]
        except Exception as e:
            raise MirrorError(self.explain(e, "list the checkpoints")) from None

    def retain(self, keep_last: int) -> None:
        """Delete, of this store's run's copies only, what local retention would: all but the newest keep_last
        rolling checkpoints, every epoch one and the newest best one, never the newest committed one; then its
        manifests that are not committed and blobs no manifest names (left by cut-off uploads) older than its newest
        commit, once two scans apart saw them so. Manifest first, then blob. What each copy is kept for comes from
        the names its manifest holds, through `kinds` (the folder owner's definition of its names)."""
        if self.kinds is None:
            raise TypeError("this mirror was opened without kinds=, for reading only: it cannot apply retention")
        committed, broken, blobs, understood = self.scan()
        everyone = committed
        committed = [c for c in committed if c["run"] == self.run_id]  # another run's copies are never touched
        broken = [k for k in broken if (self.manifests.get(k) or {}).get("run") == self.run_id]
        if not committed:
            return
        keep = {committed[0]["manifest_key"]}
        kinds = {c["manifest_key"]: self.kinds(c["names"]) for c in committed}  # the folder's owner names them
        rolling = [c for c in committed if "rolling" in kinds[c["manifest_key"]]]
        keep |= {c["manifest_key"] for c in rolling[:keep_last]}
        keep |= {c["manifest_key"] for c in committed if "epoch" in kinds[c["manifest_key"]]}
        keep |= {c["manifest_key"] for c in [c for c in committed if "best" in kinds[c["manifest_key"]]][:1]}
        kept_blobs = {c["key"] for c in everyone if c["manifest_key"] in keep or c["run"] != self.run_id}
        named = {self.key(m["blob"]) for m in list(self.manifests.values()) if m is not None}
        newest_step = committed[0]["step"]
        orphans = [blob for blob in blobs if blob not in named and blob not in kept_blobs
                   and (found := STEM.fullmatch(blob.rsplit("/", 1)[-1].removesuffix(".pt")))
                   and int(found.group(1)) < newest_step] if understood else []
        # (a blob may belong to a manifest this code cannot read: without understanding every one, no blob goes)
        confirmed = self.confirmed_suspects(broken + orphans)
        for key in [c["manifest_key"] for c in committed if c["manifest_key"] not in keep] + \
                [k for k in broken if k in confirmed]:
            m = self.manifests.get(key)
            self.fs.rm_file(key)
            self.manifests.pop(key, None)
            if m is not None and self.key(m["blob"]) in blobs and self.key(m["blob"]) not in kept_blobs:
                self.fs.rm_file(self.key(m["blob"]))
        for blob in orphans:
            if blob in confirmed:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(blob)

    def confirmed_suspects(self, suspects: list[str]) -> set[str]:
        """Of the keys this scan finds broken or orphaned, those an earlier scan at least orphan_grace_seconds ago
        found so too; the others are remembered (and keys no longer suspect forgotten)."""
        now = time.monotonic()
        self.suspects = {key: self.suspects.get(key, now) for key in suspects}
        return {key for key, since in self.suspects.items() if since < now and now - since >= self.orphan_grace_seconds}
