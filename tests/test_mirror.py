"""The checkpoint mirror (src/mirror.py) against a real S3 server (SeaweedFS on 127.0.0.1) and a local folder:
commit protocol, fetch with sha256 and CRC checks and fallback, remote retention, skip-to-newest when uploads fall
behind, a hung and a killed server, one-line errors, and no secret in any message."""

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

if os.environ.get("REQUIRE_S3_TESTS") != "1":  # CI: a missing fsspec is an error, not a skip
    pytest.importorskip("fsspec")

import train_improved as T  # noqa: E402
from helpers import ROOT, write_bin_shard  # noqa: E402
from mirror import Mirror, MirrorError  # noqa: E402
from mirror_upload import Uploader  # noqa: E402
from s3_server import ACCESS_KEY, READ_KEY, READ_SECRET, SECRET_KEY, free_ports  # noqa: E402
from test_checkpoint_manager import make_state, with_step  # noqa: E402

# meant to run every S3 test on one pytest-xdist worker, so that the session starts one S3 server, not one per worker
# (an idle SeaweedFS takes about 6% of a core). pytest 9.2 makes pytest-xdist 3.8 ignore the group (pytest-xdist
# issue #1386): each worker then starts a server of its own (the fixture is per worker process). Correct either
# way: a test kills, pauses and restarts only its own worker's server.
pytestmark = pytest.mark.xdist_group("s3")
FAILING = "MIRROR UPLOAD FAILING"
# short timeouts and backoff: a hung or dead server is noticed within seconds
QUICK = dict(timeout_seconds=1.0, retry_initial_seconds=0.1, retry_max_seconds=0.5,
             min_upload_rate_bytes_per_second=20e6)


@pytest.fixture(scope="module")
def base_state(tmp_path_factory):
    """A real checkpoint state of a tiny model (about 10 MB on disk): it passes CheckpointManager.load's checks."""
    shards = tmp_path_factory.mktemp("data")
    write_bin_shard(shards / "syn_val_000000.bin", start=0, count=4000)
    write_bin_shard(shards / "syn_train_000001.bin", start=10_000, count=6000)
    return make_state(shards)


@pytest.fixture
def train_log():
    """Every message logged to the trainer's logger during the test (formatted), at any level."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(f"{record.levelname} {record.getMessage()}")

    logger, handler = logging.getLogger("train"), Collect(logging.DEBUG)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def mirrors():
    """Make Mirror objects that are closed at the end of the test, whatever happens."""
    made = []

    def make(url, **kwargs):
        made.append(Mirror(url, **{"kinds": T.CheckpointManager.kinds, **kwargs}))
        return made[-1]

    yield make
    for m in made:
        m.close(timeout_seconds=5)


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 server, with its AWS_* variables set (and no others that could change what they mean)."""
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def fresh_url(server):
    """A prefix of its own in the server's bucket: the tests share one server."""
    return f"s3://{server.bucket}/run-{uuid.uuid4().hex[:8]}"


class Checkpoints:
    """A real checkpoint folder: save(step) writes a checkpoint with CheckpointManager and returns Mirror.submit's
    arguments (path, step, names, the folder's holder of files being uploaded), as the trainer passes them."""

    def __init__(self, directory: Path, state: dict, keep_last: int = 10):
        self.manager = T.CheckpointManager(directory, keep_last=keep_last)
        self.state = state

    def save(self, step, epoch=None, best=False):
        names = self.manager.save(with_step(self.state, step), epoch_completed=epoch, is_best=best)
        return self.manager.lasting_name(names), step, names, self.manager.held

    def sha256(self, step):
        return hashlib.sha256(self.manager.rolling_path(step).read_bytes()).hexdigest()


class Refusing(T.CheckpointManager):
    """A folder whose owner finds every fetched copy invalid."""

    @staticmethod
    def load(path, verify=True):
        return False


def until(condition, timeout_seconds=20.0, what="condition"):
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def resume_with(manager, resume, url):
    """What the trainer's rank 0 does at start: describe every candidate, plan, act."""
    return T.decide_and_act(T.describe(manager, dict(resume=resume, mirror=url)), manager, url)


def steps_on(mirror):
    return [c["step"] for c in mirror.remote_checkpoints()]


def test_importing_the_module_loads_neither_fsspec_nor_torch():
    code = "import sys, mirror; assert not {'fsspec', 's3fs', 'torch'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT / "src", check=True)


def test_an_upload_commits_blob_then_manifest_and_fetch_brings_it_back(s3, mirrors, base_state, tmp_path, train_log):
    mirror = mirrors(fresh_url(s3), part_bytes=5 << 20)  # ~10 MB checkpoints: two parts of a multipart upload
    assert mirror.wait(0) and mirror.status()["committed_step"] is None
    mirror.check()
    ck = Checkpoints(tmp_path / "ck", base_state)
    for step in (1, 2):
        mirror.submit(*ck.save(step))
    assert mirror.wait(30)
    status = mirror.status()
    sizes = [ck.manager.rolling_path(s).stat().st_size for s in (1, 2)]
    assert status["committed_step"] == 2 and status["pending"] == 0 and status["lag_seconds"] == 0
    assert status["skipped"] == 0 and status["uploaded_bytes"] == sum(sizes)
    assert status["upload_rate_bytes_per_second"] > 0
    assert status["last_error"] is None and status["consecutive_failures"] == 0
    assert not list(ck.manager.dir.glob(".tmp-held-*"))  # the files held for upload are released

    remote = mirror.remote_checkpoints()
    assert [c["step"] for c in remote] == [2, 1]
    assert remote[0]["names"] == ["rolling_step_000002.pt", "latest.pt"]
    assert remote[0]["sha256"] == ck.sha256(2) and remote[0]["size"] == sizes[1]
    fs = s3.filesystem()
    root = mirror.root
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(root)) == sorted(
        [c["key"].rsplit("/", 1)[-1] for c in remote] + [c["manifest_key"].rsplit("/", 1)[-1] for c in remote])
    manifest = json.loads(fs.cat_file(remote[0]["manifest_key"]))
    assert manifest["format"] == 1 and manifest["step"] == 2 and manifest["blob"] == remote[0]["key"][len(root) + 1:]
    assert manifest["blob"].startswith("blobs/step_000002-") and remote[0]["manifest_key"].startswith(
        f"{root}/manifests/step_000002-")
    assert sum("MB/s" in m for m in train_log) == 1  # the measured rate, once, after the first commit

    fresh = tmp_path / "fresh"
    point = resume_with(T.CheckpointManager(fresh), "auto", mirror.redacted_url())
    path = point.path
    assert path == fresh / "latest.pt" and point.step == 2
    assert path.read_bytes() == ck.manager.rolling_path(2).read_bytes()
    assert os.path.samefile(path, fresh / "rolling_step_000002.pt")  # the names resume uses, one file
    assert sorted(p.name for p in fresh.iterdir()) == ["latest.pt", "rolling_step_000002.pt"]  # no temporary left
    assert T.resolve_checkpoint(T.CheckpointManager(fresh), "latest") == path


def test_a_blob_without_a_whole_manifest_is_never_listed_or_fetched(s3, mirrors, base_state, tmp_path):
    mirror = mirrors(fresh_url(s3))
    ck = Checkpoints(tmp_path / "ck", base_state)
    mirror.submit(*ck.save(1))
    assert mirror.wait(30)
    fs, root = s3.filesystem(), mirror.root
    data = ck.manager.rolling_path(1).read_bytes()
    # an upload cut off before its manifest; and one whose manifest names a blob that is not whole
    fs.pipe_file(f"{root}/blobs/step_000009-0123456789ab.pt", data[:len(data) // 2])
    fs.pipe_file(f"{root}/blobs/step_000008-0123456789ab.pt", data[:len(data) // 2])
    fs.pipe_file(f"{root}/manifests/step_000008-0123456789ab.json", json.dumps(dict(
        format=1, step=8, names=["rolling_step_000008.pt", "latest.pt"], size=len(data),
        sha256=hashlib.sha256(data).hexdigest(), blob="blobs/step_000008-0123456789ab.pt",
        written_at="2030-01-01T00:00:00.000000+00:00")).encode())
    # a manifest this code does not understand (a later format): ignored, and never deleted
    fs.pipe_file(f"{root}/manifests/step_000099-0123456789ab.json", b'{"format": 2, "step": 99}')
    assert steps_on(mirror) == [1]
    point = resume_with(T.CheckpointManager(tmp_path / "fresh"), "auto", mirror.redacted_url())
    assert point.step == 1 and T.CheckpointManager.load(point.path)["step"] == 1
    # the next commit's retention sees the manifest that is not committed (and its blob) for the first time: a
    # listing can lag behind a write, so it is only remembered; a later scan (here 0 s later) removes both
    mirror.store.orphan_grace_seconds = 0
    mirror.submit(*ck.save(2))
    assert mirror.wait(30)
    fs.invalidate_cache()
    assert fs.exists(f"{root}/manifests/step_000008-0123456789ab.json")
    mirror.store.retain(keep_last=10)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/manifests/step_000008-0123456789ab.json")
    assert not fs.exists(f"{root}/blobs/step_000008-0123456789ab.pt")
    assert fs.exists(f"{root}/manifests/step_000099-0123456789ab.json")
    assert steps_on(mirror) == [2, 1]


def test_fetch_checks_sha256_and_crc_and_falls_back_to_an_older_commit(s3, mirrors, base_state, tmp_path, train_log):
    mirror = mirrors(fresh_url(s3))
    ck = Checkpoints(tmp_path / "ck", base_state)
    for step in (1, 2):
        mirror.submit(*ck.save(step))
        assert mirror.wait(30)  # one at a time: nothing is skipped
    # step 3: a file damaged before it was submitted, so its sha256 matches but its CRC-32 checks fail
    _, _, names, _ = ck.save(3)
    damaged = tmp_path / "damaged" / "rolling_step_000003.pt"
    damaged.parent.mkdir()
    data = bytearray(ck.manager.rolling_path(3).read_bytes())
    i = data.find(b"data/0") + 200  # inside the first tensor's bytes
    data[i] ^= 0xFF
    damaged.write_bytes(data)
    mirror.submit(damaged, 3, names)
    assert mirror.wait(30) and steps_on(mirror) == [3, 2, 1]
    # step 2: one flipped byte in the blob on the server
    fs = s3.filesystem()
    key = mirror.remote_checkpoints()[1]["key"]
    blob = bytearray(fs.cat_file(key))
    blob[len(blob) // 2] ^= 0x01
    fs.pipe_file(key, bytes(blob))

    point = resume_with(T.CheckpointManager(tmp_path / "fresh"), "auto", mirror.redacted_url())
    assert point.step == 1 and T.CheckpointManager.load(point.path)["step"] == 1
    said = "\n".join(train_log)
    assert "step 3" in said and "failed verification (CheckpointInvalid: checksum mismatch" in said
    assert "step 2" in said and "sha256 mismatch" in said
    assert "deciding again without step 3's copy" in said and "deciding again without step 2's copy" in said
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["latest.pt", "rolling_step_000001.pt"]
    # nothing valid at all: a refusal that says so, and nothing in the folder
    with pytest.raises(T.UserError, match="every copy of a run without an identity on the mirror .* failed its "
                                          r"checks \(steps 3, 2, 1\)"):
        resume_with(Refusing(tmp_path / "none"), "auto", mirror.redacted_url())
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())


def test_remote_retention_keeps_last_n_rolling_every_epoch_the_newest_best_and_always_the_newest(
        s3, mirrors, base_state, tmp_path):
    mirror = mirrors(fresh_url(s3), keep_last=2)
    ck = Checkpoints(tmp_path / "ck", base_state, keep_last=2)
    plan = {2: dict(epoch=1), 3: dict(best=True), 4: dict(best=True), 5: dict(epoch=2)}
    for step in range(1, 8):
        mirror.submit(*ck.save(step, **plan.get(step, {})))
        assert mirror.wait(30)  # one at a time: nothing is skipped
    assert steps_on(mirror) == [7, 6, 5, 4, 2]  # rolling 7 6, epochs 5 2, newest best 4
    fs = s3.filesystem()
    assert len(fs.ls(f"{mirror.root}/blobs")) == len(fs.ls(f"{mirror.root}/manifests")) == 5
    assert mirror.status()["skipped"] == 0

    # keep_last=0 keeps no rolling checkpoint, but never the newest one: resume needs it
    mirror = mirrors(fresh_url(s3), keep_last=0)
    for step in (8, 9):
        mirror.submit(*ck.save(step))
        assert mirror.wait(30)
    assert steps_on(mirror) == [9]


def test_the_mirror_keeps_copies_by_what_the_folders_owner_says_each_name_is_kept_for(
        mirrors, base_state, tmp_path):
    """Checkpoint names are defined once, by the manager: the mirror's retention asks its kinds() and parses none."""
    ck = Checkpoints(tmp_path / "ck", base_state)
    as_epochs = mirrors(str(tmp_path / "as-epochs"), keep_last=1, kinds=lambda names: frozenset({"epoch"}))
    for step in (1, 2, 3):
        as_epochs.submit(*ck.save(step))
        assert as_epochs.wait(30)
    assert steps_on(as_epochs) == [3, 2, 1]  # every one an epoch checkpoint, by the owner's word: all kept
    as_rolling = mirrors(str(tmp_path / "as-rolling"), keep_last=1, kinds=lambda names: frozenset({"rolling"}))
    for step in (4, 5, 6):
        as_rolling.submit(*ck.save(step, epoch=1 if step == 4 else None))
        assert as_rolling.wait(30)
    assert steps_on(as_rolling) == [6]  # an epoch file name, but the owner says rolling
    reader = Mirror(str(tmp_path / "as-epochs"))  # reading needs no kinds; uploading does
    assert steps_on(reader) == [3, 2, 1]
    with pytest.raises(TypeError, match="kinds"):
        reader.submit(*ck.save(7))


def test_uploads_that_fall_behind_skip_to_the_newest(s3, mirrors, base_state, tmp_path, train_log):
    mirror = mirrors(fresh_url(s3), **QUICK)
    ck = Checkpoints(tmp_path / "ck", base_state, keep_last=1)  # local retention prunes while uploads wait
    mirror.submit(*ck.save(1))
    assert mirror.wait(30)
    s3.pause()  # a hung server: connections are accepted, nothing answers
    sha256 = {}
    try:
        for step in (2, 3, 4, 5, 6):
            mirror.submit(*ck.save(step, epoch=1 if step == 3 else None, best=step == 5))
            sha256[step] = ck.sha256(step)
        until(lambda: mirror.status()["consecutive_failures"] >= 1, what="a timed-out upload")
        status = mirror.status()
        assert status["pending"] >= 2 and status["lag_seconds"] > 0 and status["committed_step"] == 1
        assert "Timeout" in status["last_error"] or "timeout" in status["last_error"]
        # the submitted rolling_step_000003.pt was pruned locally, and its blocks were not reused for a later save:
        # the folder's owner holds on to it for the mirror (a hard link, .tmp-held-N.pt) until it is uploaded
        assert not ck.manager.rolling_path(3).exists() and list(ck.manager.dir.glob(".tmp-held-*"))
    finally:
        s3.resume()
    assert mirror.wait(60)
    status = mirror.status()
    # rolling 2 and 4 were overtaken; the epoch checkpoint 3 and the best 5 are always uploaded, and the newest, 6
    assert status["skipped"] == 2 and status["committed_step"] == 6 and status["pending"] == 0
    remote = mirror.remote_checkpoints()
    assert [c["step"] for c in remote] == [6, 5, 3, 1]
    assert [c["sha256"] for c in remote[:3]] == [sha256[6], sha256[5], sha256[3]]  # what was submitted, byte for byte
    assert not list(ck.manager.dir.glob(".tmp-held-*"))
    assert sum(FAILING in m for m in train_log) == 1 and sum("mirror recovered" in m for m in train_log) == 1


def test_an_outage_holds_back_only_the_newest_and_the_newest_best(s3, mirrors, base_state, tmp_path, train_log):
    """Issue 21.3: however many saves an outage lasts, what waits for the mirror (and is held on disk for it) is
    bounded: a newer best supersedes a pending best, a newer save a pending rolling one; epoch files are never
    superseded. Once the server answers, the newest goes up first."""
    mirror = mirrors(fresh_url(s3), timeout_seconds=60.0)  # the upload in flight hangs through the whole outage
    ck = Checkpoints(tmp_path / "ck", base_state, keep_last=1)
    s3.pause()
    try:
        mirror.submit(*ck.save(1))
        until(lambda: mirror.status()["lag_seconds"] > 0.5, what="the upload of step 1 to hang")
        for step in range(2, 12):  # every save a new best; step 4 also ends an epoch
            mirror.submit(*ck.save(step, best=True, epoch=1 if step == 4 else None))
        # the one in flight when the server hung (step 1), the epoch file, the newest best: nothing more waits
        status = mirror.status()
        assert status["pending"] == 3 and status["skipped"] == 8, status
        assert len(list(ck.manager.dir.glob(".tmp-held-*"))) == 3
    finally:
        s3.resume()
    assert mirror.wait(120)
    remote = {c["step"]: c for c in mirror.remote_checkpoints()}
    assert sorted(remote) == [1, 4, 11]  # (retention keeps the newest, the epoch file and the newest best)
    assert remote[11]["written_at"] < remote[4]["written_at"]  # the newest went up before the older epoch file
    assert not list(ck.manager.dir.glob(".tmp-held-*"))


def test_the_disk_guard_takes_back_a_file_held_only_for_the_mirror_before_any_checkpoint(s3, mirrors, base_state,
                                                                                         tmp_path, train_log):
    """The files held for uploads are uploaded through their most lasting name (epoch, else best_model.pt), so they
    cost no disk while that name lasts. One that outlived its names counts as space the guard can take back: a
    waiting best whose best_model.pt a newer best just replaced, before that newer one reached the mirror. It goes
    before any older checkpoint and its upload is given up; the file being uploaded keeps its own; the newest best
    still goes up."""
    mirror = mirrors(fresh_url(s3), timeout_seconds=60.0)  # the upload in flight hangs through the whole test
    ck = Checkpoints(tmp_path / "ck", base_state, keep_last=2)
    s3.pause()
    try:
        mirror.submit(*ck.save(1))  # in flight, hung: .tmp-held-1.pt (rolling_step_000001.pt, pruned below)
        until(lambda: mirror.status()["lag_seconds"] > 0.5, what="the upload of step 1 to hang")
        path, *rest = ck.save(2, best=True)
        assert path.name == "best_model.pt"  # the lasting name of a best save
        mirror.submit(path, *rest)  # waits: .tmp-held-2.pt, a second name of best_model.pt's file
        waiting, in_flight = ck.manager.dir / ".tmp-held-2.pt", ck.manager.dir / ".tmp-held-1.pt"
        assert waiting.stat().st_nlink == 2 and waiting.samefile(ck.manager.dir / "best_model.pt")
        newer_best = ck.save(3, best=True)  # written; the loop has not handed it to the mirror yet
        assert waiting.stat().st_nlink == 1 and in_flight.stat().st_nlink == 1  # both held for the mirror only now
        rolling_before = sorted(p.name for p in ck.manager.dir.glob("rolling_step_*"))
        ck.manager.guard.free_bytes = lambda: 10 ** 12 if not waiting.exists() else 0
        ck.manager.guard.make_room(1 << 20, step=4)
        assert not waiting.exists() and in_flight.exists()  # given back at once; the upload being read keeps its own
        assert sorted(p.name for p in ck.manager.dir.glob("rolling_step_*")) == rolling_before  # nothing else went
        assert any("DISK NEARLY FULL: gave up .tmp-held-2.pt (" in m for m in train_log)
        assert any("step 2 will not be copied off the machine" in m for m in train_log)
        mirror.submit(*newer_best)
    finally:
        s3.resume()
    assert mirror.wait(120)
    assert 3 in steps_on(mirror) and 2 not in steps_on(mirror)
    assert not list(ck.manager.dir.glob(".tmp-held-*"))


def test_closing_while_an_upload_is_failing_lets_go_of_every_held_file(s3, mirrors, base_state, tmp_path,
                                                                        train_log):
    """close() during an upload that then fails (a hung server's timeout): the job is finished anyway, its file
    closed and its hold let go, not left pending with a .tmp-held link until the next start."""
    mirror = mirrors(fresh_url(s3), **QUICK)
    ck = Checkpoints(tmp_path / "ck", base_state)
    s3.pause()
    try:
        mirror.submit(*ck.save(1))
        until(lambda: mirror.status()["lag_seconds"] > 0.5, what="the upload of step 1 to hang")
        assert list(ck.manager.dir.glob(".tmp-held-*"))
        mirror.close(timeout_seconds=30)  # the attempt times out after about 3.5 s (QUICK), then the thread ends
        assert not mirror.uploader._thread.is_alive()
        assert not list(ck.manager.dir.glob(".tmp-held-*")) and mirror.status()["pending"] == 0
    finally:
        s3.resume()


def test_a_killed_server_records_errors_then_the_mirror_catches_up(s3, mirrors, base_state, tmp_path, train_log):
    mirror = mirrors(fresh_url(s3), **QUICK)
    ck = Checkpoints(tmp_path / "ck", base_state)
    mirror.submit(*ck.save(1))
    assert mirror.wait(30)
    s3.kill()
    try:
        mirror.submit(*ck.save(2))
        until(lambda: mirror.status()["consecutive_failures"] >= 2, what="two failed attempts")
        status = mirror.status()
        assert status["committed_step"] == 1 and status["pending"] == 1 and status["last_error"]
        assert not mirror.wait(0.5)
    finally:
        s3.restart()
    assert mirror.wait(60)
    status = mirror.status()
    assert status["committed_step"] == 2 and status["consecutive_failures"] == 0 and status["last_error"] is None
    assert steps_on(mirror) == [2, 1]
    failing = [m for m in train_log if FAILING in m]
    assert len(failing) == 1 and failing[0].startswith("ERROR") and "step 2" in failing[0]  # once per 5 minutes
    recovered = [m for m in train_log if "mirror recovered" in m]
    assert len(recovered) == 1 and "step 2" in recovered[0]


@pytest.mark.parametrize("scheme", ["path", "file://"])
def test_a_local_folder_mirror_commits_and_fetches_the_same_way(scheme, mirrors, base_state, tmp_path):
    folder = tmp_path / "mirror"
    mirror = mirrors(str(folder) if scheme == "path" else f"file://{folder}", keep_last=1)
    mirror.check()  # creates the folder
    ck = Checkpoints(tmp_path / "ck", base_state)
    for step in (1, 2, 3):
        mirror.submit(*ck.save(step, epoch=1 if step == 1 else None))
        assert mirror.wait(30)
    assert steps_on(mirror) == [3, 1]
    assert sorted(p.name.split("-")[0] for p in (folder / "blobs").iterdir()) == ["step_000001", "step_000003"]
    assert sorted(p.name.split("-")[0] for p in (folder / "manifests").iterdir()) == ["step_000001", "step_000003"]
    # a cut-off upload: a blob with no manifest
    (folder / "blobs" / "step_000004-0123456789ab.pt").write_bytes(b"PK\x03\x04 half")
    point = resume_with(T.CheckpointManager(tmp_path / "fresh"), "auto", mirror.redacted_url())
    assert point.step == 3 and point.path.read_bytes() == ck.manager.rolling_path(3).read_bytes()
    assert mirror.remote_checkpoints()[1]["names"] == ["rolling_step_000001.pt", "latest.pt", "epoch_00001.pt"]


def test_a_newer_checkpoint_is_tried_at_once_after_a_failure_not_after_the_backoff(mirrors, base_state, tmp_path,
                                                                                    monkeypatch):
    """A failed upload backs off (here 600 s) before its retry; a checkpoint submitted meanwhile, even while the
    failing attempt was still going on (a graceful stop's checkpoint, which gets --mirror_wait_seconds to reach the
    mirror), is uploaded at once."""
    mirror = mirrors(str(tmp_path / "mirror"), retry_initial_seconds=600, retry_max_seconds=600)
    mirror.check()
    ck = Checkpoints(tmp_path / "ck", base_state)
    upload, attempting, submitted = Uploader._upload, threading.Event(), threading.Event()

    def step_1_fails(self, job):
        if job.step == 1:
            attempting.set()
            submitted.wait(30)
            raise OSError("the mirror's disk is gone")
        return upload(self, job)
    monkeypatch.setattr(Uploader, "_upload", step_1_fails)
    mirror.submit(*ck.save(1))
    assert attempting.wait(30)
    mirror.submit(*ck.save(2))  # while step 1's attempt is still going on
    submitted.set()
    assert mirror.wait(30)  # not 600 s
    assert steps_on(mirror) == [2] and mirror.status()["consecutive_failures"] == 0


def test_check_is_one_line_on_a_missing_bucket_without_permission_or_unreachable(s3, mirrors, monkeypatch, tmp_path):
    errors = {}
    with pytest.raises(MirrorError) as e:
        mirrors(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run").check()
    errors["missing"] = str(e.value)
    with pytest.raises(MirrorError) as e:
        mirrors(fresh_url(s3), storage_options=dict(key=READ_KEY, secret=READ_SECRET)).check()  # may read, not write
    errors["read-only"] = str(e.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    unreachable = mirrors(fresh_url(s3), timeout_seconds=2)
    with pytest.raises(MirrorError) as e:
        unreachable.check()
    errors["unreachable"] = str(e.value)
    with pytest.raises(MirrorError) as e:  # a mirror that cannot be read is an error, never "nothing valid there"
        unreachable.remote_checkpoints()
    errors["fetch unreachable"] = str(e.value)
    assert all("\n" not in message for message in errors.values()), errors
    assert "does not exist: create it, or fix --mirror" in errors["missing"]
    assert "no permission: check the credentials" in errors["read-only"]
    assert "unreachable" in errors["unreachable"] and "AWS_ENDPOINT_URL" in errors["unreachable"]
    assert "could not list the checkpoints" in errors["fetch unreachable"]


def test_credentials_in_the_url_never_show_in_messages(s3, mirrors, base_state, tmp_path, monkeypatch, train_log):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    prefix = fresh_url(s3).removeprefix("s3://")
    wrong_key, wrong_secret = "AKIAWRONGKEY0000", "wr0ng/secret+value"
    bad = mirrors(f"s3://{wrong_key}:{wrong_secret}@{prefix}", **QUICK)
    assert bad.redacted_url() == f"s3://{prefix}"
    with pytest.raises(MirrorError) as e:
        bad.check()
    assert "no permission" in str(e.value)
    ck = Checkpoints(tmp_path / "ck", base_state)
    bad.submit(*ck.save(1))
    until(lambda: bad.status()["consecutive_failures"] >= 2, what="failed uploads")
    bad.close()
    # the right credentials in the URL are used (no AWS_* credentials in the environment now)
    good = mirrors(f"s3://{ACCESS_KEY}:{SECRET_KEY}@{prefix}")
    good.check()
    good.submit(*ck.save(2))
    assert good.wait(30) and steps_on(good) == [2]
    said = [str(e.value), bad.status()["last_error"], bad.redacted_url(), good.redacted_url(), *train_log]
    assert any(FAILING in m for m in said)
    for secret in (wrong_secret, wrong_key, SECRET_KEY, ACCESS_KEY):
        assert not [m for m in said if secret in m], secret


# resume: local and mirrored checkpoints both count, and nodes without shared storage ------------------------------
def mirrored_run(tmp_path, base_state, steps):
    """A plain-folder mirror holding a run's checkpoints of `steps` (saved and uploaded in order)."""
    url = str(tmp_path / "mirror")
    mirror = Mirror(url, kinds=T.CheckpointManager.kinds)
    mirror.check()
    run = Checkpoints(tmp_path / "run", base_state)
    for step in steps:
        mirror.submit(*run.save(step))
        assert mirror.wait(30)
    mirror.close()
    return url, run


def test_resume_takes_the_mirror_when_it_is_newer_than_the_local_folder(base_state, tmp_path, train_log):
    url, run = mirrored_run(tmp_path, base_state, (5, 8))
    local = Checkpoints(tmp_path / "ck", base_state)  # this machine's disk holds an older state of the run
    local.save(5)
    path = resume_with(local.manager, "latest", url).path
    assert T.CheckpointManager.load(path)["step"] == 8 and path == local.manager.dir / "latest.pt"
    assert path.read_bytes() == run.manager.rolling_path(8).read_bytes()
    assert any("the mirror holds a newer checkpoint of" in m and "(step 5): resuming from the MIRROR's step 8" in m
               for m in train_log)
    # the same step on the mirror as here: the local file stays (nothing downloaded over it)
    inode = (local.manager.dir / "latest.pt").stat().st_ino
    assert resume_with(local.manager, "latest", url).path == local.manager.dir / "latest.pt"
    assert (local.manager.dir / "latest.pt").stat().st_ino == inode
    assert any("(step 8; the mirror holds step 8, nothing newer" in m for m in train_log)
    # nothing newer on the mirror: the local file, and the mirror is only read (no probe object written)
    local.save(9)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "mirror").rglob("*"))
    assert resume_with(local.manager, "auto", url).path == local.manager.dir / "latest.pt"
    assert T.CheckpointManager.load(local.manager.dir / "latest.pt")["step"] == 9
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "mirror").rglob("*")) == before
    assert any("(step 9; the mirror holds step 8, nothing newer" in m for m in train_log)


def test_a_node_that_cannot_see_rank_0s_checkpoint_gets_the_mirrors_copy_of_it(base_state, tmp_path, train_log):
    url, run = mirrored_run(tmp_path, base_state, (5, 8))
    path = run.manager.dir / "latest.pt"  # rank 0's checkpoint (step 8), on its own disk only
    same, fingerprint, entry = T.checkpoint_for_every_node(run.manager, path, url, blind=[1])
    assert same == path and fingerprint == T.checkpoint_fingerprint(path) and entry["step"] == 8
    assert any("rank(s) 1 cannot see" in m and "their node(s) fetch it from the mirror" in m for m in train_log)
    node = T.CheckpointManager(tmp_path / "node1" / "ck")  # what that node's first rank then does
    fetched = Mirror(url).fetch(entry, node)
    assert T.checkpoint_fingerprint(fetched) == fingerprint and fetched.read_bytes() == path.read_bytes()
    # a different checkpoint under the same name is not the same file, whatever its name
    assert T.checkpoint_fingerprint(run.manager.rolling_path(5)) != fingerprint


def test_when_the_mirror_lacks_rank_0s_checkpoint_rank_0_uploads_it_and_no_node_rolls_back(base_state, tmp_path,
                                                                                          train_log, monkeypatch):
    """Rank 0's newest checkpoint was never mirrored (the run died before its upload ended), and another node cannot
    see it: rank 0 uploads it now, so that every node resumes from rank 0's step, never from the mirror's older
    newest. If that upload fails, every rank stops with one line and nothing is changed anywhere."""
    url, run = mirrored_run(tmp_path, base_state, (5,))
    run.save(8)  # saved after the mirror's last upload
    path = run.manager.dir / "latest.pt"
    upload = Uploader._upload

    def failing(self, job):
        raise OSError("the mirror's disk is gone")
    monkeypatch.setattr(Uploader, "_upload", failing)
    with pytest.raises(T.UserError, match=r"does not hold it, and uploading it failed within 1 s \(OSError: the "
                                          r"mirror's disk is gone\).*No node was changed"):
        T.checkpoint_for_every_node(run.manager, path, url, blind=[2, 3], wait_seconds=1)
    assert T.CheckpointManager.load(path)["step"] == 8  # rank 0's newer file, untouched
    monkeypatch.setattr(Uploader, "_upload", upload)
    chosen, fingerprint, entry = T.checkpoint_for_every_node(run.manager, path, url, blind=[2, 3], run_id="run-a")
    assert chosen == path and entry["step"] == 8 and fingerprint == T.checkpoint_fingerprint(path)
    assert entry["run"] == "run-a"  # the run's own copy: its resume and retention see it
    assert any("rank(s) 2, 3 cannot see" in m and "does not hold it yet: uploading it now" in m for m in train_log)
    assert sorted(c["step"] for c in Mirror(url).remote_checkpoints()) == [5, 8]  # retention kept the older one
    node = T.CheckpointManager(tmp_path / "node2" / "ck")  # what that node's first rank then does
    fetched = Mirror(url).fetch(entry, node)
    assert T.checkpoint_fingerprint(fetched) == fingerprint and T.CheckpointManager.load(fetched)["step"] == 8
    with pytest.raises(T.UserError, match="storage every node shares, or give --mirror"):
        T.checkpoint_for_every_node(run.manager, path, None, blind=[1])


def test_a_node_fetches_only_into_a_folder_no_other_run_holds_and_leaves_no_temporaries(base_state, tmp_path):
    url, run = mirrored_run(tmp_path, base_state, (5,))
    entry = Mirror(url).remote_checkpoints()[0]
    env = T.DistEnv(rank=2, local_rank=0, world_size=4, device=T.torch.device("cpu"))
    node = T.CheckpointManager(tmp_path / "node2" / "ck")
    other = T.FolderLock(node.dir)
    other.acquire()  # another run uses this node's folder
    try:
        problem = T.fetch_for_this_node(env, node, entry, url)
    finally:
        other.release()
    assert "rank 2 could not fetch step 5" in problem and "in use by another run" in problem
    assert not (node.dir / "latest.pt").exists()
    (node.dir / ".tmp-fetch-deadhost-123.pt").write_bytes(b"a fetch killed half way")
    assert T.fetch_for_this_node(env, node, entry, url) is None
    assert T.CheckpointManager.load(node.dir / "latest.pt")["step"] == 5
    assert sorted(p.name for p in node.dir.iterdir()) == [".lock", "latest.pt", "rolling_step_000005.pt"]


def test_a_lagging_listing_never_deletes_a_committed_copy(mirrors, base_state, tmp_path):
    """A listing that does not show the newest blob yet (an eventually consistent store, a listing cache): its
    manifest looks broken and, on the next scan, its blob orphaned. Neither is deleted: retention waits until two
    scans some time apart agree. A blob that really is orphaned (a cut-off upload) still goes then."""
    mirror = mirrors(str(tmp_path / "mirror"))
    ck = Checkpoints(tmp_path / "ck", base_state)
    for step in (1, 2):
        mirror.submit(*ck.save(step))
        assert mirror.wait(30)
    store = mirror.store
    newest_blob = next(c["key"] for c in mirror.remote_checkpoints() if c["step"] == 2)
    cut_off = f"{store.root}/blobs/step_000001-0123456789ab.pt"  # an upload of step 1 cut off before its manifest
    store.fs.pipe_file(cut_off, b"half a checkpoint")
    listing = store.objects_under

    def stale(relative):  # the listing of blobs lags: step 2's blob is not in it yet
        found = listing(relative)
        return {k: v for k, v in found.items() if k != newest_blob} if relative == "blobs" else found
    store.objects_under = stale
    store.retain(keep_last=10)  # step 2's manifest looks broken here
    store.objects_under = listing
    store.retain(keep_last=10)  # and a moment later (within the grace time) nothing is deleted
    assert steps_on(mirror) == [2, 1] and store.fs.exists(cut_off)
    store.orphan_grace_seconds = 0  # as if the grace time had passed since the first scan
    store.retain(keep_last=10)
    assert steps_on(mirror) == [2, 1]  # every committed copy stays, the newest included
    assert not store.fs.exists(cut_off)  # the real orphan, seen on two scans, goes
    point = resume_with(T.CheckpointManager(tmp_path / "fresh"), "auto", mirror.redacted_url())
    assert point.step == 2 and point.path.read_bytes() == ck.manager.rolling_path(2).read_bytes()


def test_a_short_download_is_tried_again_before_falling_back(mirrors, base_state, tmp_path, train_log, monkeypatch):
    mirror = mirrors(str(tmp_path / "mirror"))
    ck = Checkpoints(tmp_path / "ck", base_state)
    mirror.submit(*ck.save(1))
    assert mirror.wait(30)
    import mirror_transfer
    real, calls = mirror_transfer.download, []

    def cut_off_once(store, entry, tmp):  # the first transfer ends early (a dropped connection)
        calls.append(entry["step"])
        problem = real(store, entry, tmp)
        return f"{entry['size'] // 2} bytes instead of the manifest's {entry['size']}" if len(calls) == 1 else problem
    monkeypatch.setattr(__import__("mirror_fetch"), "download", cut_off_once)
    point = resume_with(T.CheckpointManager(tmp_path / "fresh"), "auto", mirror.redacted_url())
    assert point.step == 1 and calls == [1, 1]
    assert any("the download of step 1 was short" in m and "trying once more" in m for m in train_log)


def test_a_launch_that_resumed_older_than_the_mirrors_newest_copy_of_its_run_uploads_nothing(mirrors, base_state,
                                                                                              tmp_path, train_log):
    """A resumed launch that could not see the mirror at its start (or could not fetch its newer copy) took an older
    local checkpoint. Before its first upload it looks: the mirror holds a newer step of the run, so this launch
    uploads nothing (two histories would be mixed under one run), says so once, and every status says what the mirror
    holds. A launch that saw the mirror hold nothing newer uploads as usual."""
    url = str(tmp_path / "mirror")
    ck = Checkpoints(tmp_path / "ck", base_state)
    earlier = mirrors(url, run_id="run-a")
    earlier.check()
    earlier.submit(*ck.save(9))
    assert earlier.wait(30)
    before = sorted(p.name for p in (tmp_path / "mirror" / "blobs").iterdir())
    behind = mirrors(url, run_id="run-a")
    behind.resumed(6, None, known=False)  # the mirror was unreachable when this launch began at step 6
    assert behind.status()["holds"] == "what it held at the start is not known (unreachable)"
    behind.submit(*ck.save(7))
    until(lambda: behind.status()["off"] is not None, what="the look before the first upload")
    assert behind.wait(5) is False and sorted(p.name for p in (tmp_path / "mirror" / "blobs").iterdir()) == before
    status = behind.status()
    assert "it holds step 9 of this run, newer than step 6 this launch resumed from" in status["off"]
    assert status["holds"] == "step 9" and status["last_error"] == status["off"]
    behind.submit(*ck.save(8))  # nothing more is queued, nor said again
    assert sum("MIRROR OFF" in m for m in train_log) == 1
    assert not list(ck.manager.dir.glob(".tmp-held-*"))
    known = mirrors(url, run_id="run-a")
    known.resumed(9, 9)  # the plan saw step 9 there, and the launch starts from it
    assert known.status()["holds"] == "step 9"
    known.submit(*ck.save(10))
    assert known.wait(30) and steps_on(known)[0] == 10


def test_a_failing_mirror_after_a_resume_says_what_it_holds(mirrors, base_state, tmp_path, monkeypatch):
    """The step line's MIRROR FAILING names the step the mirror held when the launch began, not 'step None'."""
    mirror = mirrors(str(tmp_path / "mirror"), run_id="run-a", retry_initial_seconds=600)
    mirror.resumed(6, 6)
    monkeypatch.setattr(Uploader, "_upload", lambda self, job: (_ for _ in ()).throw(OSError("the disk is gone")))
    mirror.submit(*Checkpoints(tmp_path / "ck", base_state).save(7))
    until(lambda: mirror.status()["consecutive_failures"] >= 1, what="a failed attempt")
    checkpointer = type("C", (), {"mirror": mirror, "failing": None, "state": T.TrainState(step=7)})()
    note = T.Checkpointer.step_note(checkpointer)
    assert "MIRROR FAILING (1 attempts; it holds step 6; OSError: the disk is gone)" in note
