"""Disk full, read-only, failed final saves: on real small filesystems (tmpfs mounted by the test, as root).

Progress beats history: while the folder holds two checkpoints the run keeps saving, giving up older files in a
stated order; when it cannot save at all it stops (exit 4) instead of training on with nothing to come back to, and
it never calls a run finished without its final checkpoint. Without root (no mount) these tests skip with the reason;
.ci/run, which runs as root, sets REQUIRE_REAL_FILESYSTEM_TESTS=1 so that a skip there fails instead."""

import os
import re
import subprocess
import time

import pytest

import list_checkpoints
import train_improved as T
from helpers import EXACT_SAVES, TINY_ARGS, launch, run, wait_for


def mount_tmpfs(path, size_bytes):
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        reason = f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount failed'}); run as root"
        if os.environ.get("REQUIRE_REAL_FILESYSTEM_TESTS"):
            pytest.fail(reason)
        pytest.skip(reason)


def remount(path, options):
    for _ in range(100):  # a file open for writing makes a remount read-only fail with EBUSY for that instant
        if subprocess.run(["mount", "-o", f"remount,{options}", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"could not remount {path} {options}")


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(n): a fresh tmpfs that holds n checkpoints of the test model; unmounted afterwards."""
    mounts = []

    def make(checkpoints):
        path = tmp_path / f"disk{len(mounts)}"
        mount_tmpfs(path, int(checkpoints * checkpoint_bytes(tmp_path)))
        mounts.append(path)
        return path

    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


_size = {}


def checkpoint_bytes(tmp_path):
    """The real size of one checkpoint of the test model (measured once)."""
    if "bytes" not in _size:
        from helpers import write_bin_shard
        d = tmp_path / "measure"
        (d / "data").mkdir(parents=True)
        write_bin_shard(d / "data" / "m_train_000001.bin", start=0, count=3000)
        T.main([*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(d / "data"), "--total_batch_size", "128", "--max_steps",
                "1", "--eval_freq", "0", "--sample_freq", "0", "--checkpoint_dir", str(d / "ck"), "--log_dir",
                str(d / "logs"), "--no-tensorboard"])
        _size["bytes"] = (d / "ck" / "latest.pt").stat().st_size
    return _size["bytes"]


def args_for(tmp_path, shard_dir, ck, *extra):
    return [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--eval_freq", "0",
            "--sample_freq", "0", "--checkpoint_freq", "3", "--checkpoint_dir", str(ck), "--log_dir",
            str(tmp_path / "logs"), *extra]


def assert_every_name_verifies(ck):
    names = T.CheckpointManager(ck).all_checkpoints()
    assert names and list_checkpoints.main(["--checkpoint_dir", str(ck), "--verify"]) == 0
    return {p.name: T.CheckpointManager.load(p)["step"] for p in names}


def test_room_for_two_and_a_half_checkpoints_gives_up_the_backup_and_saves_to_the_end(tmp_path, shard_dir,
                                                                                     small_disk):
    ck = small_disk(2.5) / "ck"
    summary = T.main(args_for(tmp_path, shard_dir, ck, "--max_steps", "12"))
    assert summary["exit_code"] == 0 and summary["unsaved_steps"] == 0
    steps = assert_every_name_verifies(ck)
    assert steps["latest.pt"] == 12 and steps["latest_backup.pt"] == 9  # between saves, a backup again
    log_text = (tmp_path / "logs" / "train.log").read_text()
    assert "CHECKPOINT SAVE FAILED" not in log_text and "training finished at step 12" in log_text
    # steps 9 and 12 each gave up the backup; it is said once, loudly, with the sizes and the free space
    warnings = [line for line in log_text.splitlines() if "DISK NEARLY FULL" in line]
    assert len(warnings) == 1, warnings
    assert "gave up latest_backup.pt + rolling_step_000003.pt (" in warnings[0] and "MB free now" in warnings[0]


def test_room_for_one_and_a_half_stops_within_the_limit_and_resumes_once_there_is_space(tmp_path, shard_dir,
                                                                                       small_disk):
    disk = small_disk(1.5)
    ck = disk / "ck"
    result = run(args_for(tmp_path, shard_dir, ck, "--max_steps", "30", "--max_unsaved_minutes", "0.0001"),
                 nproc=None)
    out = result.stdout
    assert result.returncode == 4, out[-3000:]  # documented: the run's newest steps could not be saved
    assert "CHECKPOINT SAVE FAILED at step 6 (periodic): InsufficientDiskSpace" in out
    assert "STOPPING: no checkpoint could be saved for" in out and "| UNSAVED 4 steps (saves failing)" in out
    last = out.rstrip().splitlines()
    assert "NOT SAVED: the run stopped at step 7 but its checkpoint could not be written" in last[-2]
    assert "The newest checkpoint on disk is step 3: 4 step(s) of training are not saved" in last[-2]
    assert last[-1].strip().endswith(f"--checkpoint_dir {ck} --resume latest")
    assert assert_every_name_verifies(ck) == {"latest.pt": 3, "rolling_step_000003.pt": 3}  # intact
    # the user makes room for 2.5 checkpoints: the resumed run must give up (and so free) the very file it resumed
    # from, which it may no longer hold open through a memory map
    remount(disk, f"size={int(2.5 * checkpoint_bytes(tmp_path))}")
    resumed = run(args_for(tmp_path, shard_dir, ck, "--resume", "latest", "--max_steps", "12"), nproc=None)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert ": step 3," in resumed.stdout and assert_every_name_verifies(ck)["latest.pt"] == 12


def test_a_folder_that_turns_read_only_stops_the_run_and_loses_nothing(tmp_path, shard_dir, small_disk):
    disk = small_disk(8)
    ck = disk / "ck"
    proc = launch(args_for(tmp_path, shard_dir, ck, "--max_steps", "100000", "--checkpoint_freq", "2",
                           "--max_unsaved_minutes", "0.0001"), nproc=None)
    wait_for(lambda: (ck / "rolling_step_000004.pt").exists(), timeout=120, proc=proc)
    remount(disk, "ro")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 4, out[-3000:]
    assert "Read-only file system" in out and "STOPPING: no checkpoint could be saved" in out
    assert "NOT SAVED: the run stopped at step" in out.rstrip().splitlines()[-2]
    steps = assert_every_name_verifies(ck)
    assert steps["latest.pt"] >= 4 and steps["latest.pt"] == max(steps.values())
    remount(disk, "rw")
    resumed = run(args_for(tmp_path, shard_dir, ck, "--resume", "latest", "--max_steps",
                           str(steps["latest.pt"] + 2)), nproc=None)
    assert resumed.returncode == 0, resumed.stdout[-3000:]


@pytest.mark.xdist_group("s3")  # it kills and restarts the session's S3 server
def test_a_mirror_down_through_many_best_saves_never_fills_the_disk_and_the_newest_goes_up_first(
        tmp_path, shard_dir, small_disk, s3_server):
    """Issue 21.3: the S3 server is down while nearly every evaluation saves a new best on a disk that holds six
    checkpoints. What the mirror holds back stays bounded (a newer best supersedes a pending one), so the run trains
    to the end without a failed save; once the server is back, the newest checkpoint reaches the mirror, and of the
    saves made during the outage only what was newest is uploaded (and the one upload under way at that moment)."""
    from test_mirror_e2e import committed, s3_url
    ck = small_disk(6) / "ck"
    url = s3_url(s3_server)
    proc = launch(args_for(tmp_path, shard_dir, ck, "--max_steps", "60", "--checkpoint_freq", "1000", "--eval_freq",
                           "2", "--mirror", url, "--mirror_wait_seconds", "180", "--max_unsaved_minutes", "0.0001"),
                  nproc=None, extra_env=s3_server.env)
    log = tmp_path / "logs" / "train.log"
    try:
        wait_for(lambda: log.exists() and "mirror: step 2 committed" in log.read_text(), timeout=120, proc=proc)
        s3_server.kill()
        down_at = T.CheckpointManager.load(ck / "latest.pt")["step"]
        # the last save is reported (and submitted) before the final wait for the mirror: bring the server back then
        wait_for(lambda: "checkpoint step 60 (" in log.read_text(), timeout=300, proc=proc)
    finally:
        s3_server.restart()
    out = proc.communicate(timeout=300)[0]
    text = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "CHECKPOINT SAVE FAILED" not in text and "mirror: the last checkpoint (step 60) is on" in text
    bests = [int(s) for s in re.findall(r"checkpoint step (\d+) \([^)]*best val", text) if int(s) > down_at]
    assert len(bests) >= 7, bests  # a full checkpoint each: more than the disk holds, were they all held back
    after = sorted(step for step in committed(s3_server, url) if step > down_at)
    assert {max(bests), 60} <= set(after), (after, bests)  # the newest best and the newest
    # nothing older, but the one upload under way when the server came back (an attempt in progress is never cut off
    # for a newer one: that could starve every upload), which is then the first commit after the outage
    older = sorted(set(after) - {max(bests), 60})
    assert len(older) <= 1 and all(f"mirror recovered: step {s} committed" in text for s in older), (after, bests)
    assert not list(ck.glob(".tmp-held-*"))
