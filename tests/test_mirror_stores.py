"""The mirror on the other stores it names, for real: gs:// against gcp-storage-emulator and az:// against Azurite
(Microsoft's Azure Storage emulator), both started by the tests (tests/store_emulators.py; the other_store fixture
runs every test once per store). The S3 tests (tests/test_mirror.py, tests/test_mirror_e2e.py) cover the failure
modes in depth; these check that the same code commits, retains, verifies and fetches back through gcsfs and adlfs,
and that a trainer run resumes from such a mirror into an empty folder."""

import logging
import shutil
import uuid

import pytest

import train_improved as T
from helpers import EXACT_SAVES, TINY_ARGS, launch, finish, read_metrics
from mirror import Mirror
from test_mirror import Checkpoints, resume_with
from test_mirror import base_state  # noqa: F401  (a fixture)

pytestmark = pytest.mark.xdist_group("other_stores")  # one emulator of each for the whole session


def test_the_mirror_commits_keeps_and_fetches_back_and_catches_a_damaged_copy(other_store, base_state, tmp_path,
                                                                               monkeypatch, caplog):
    for key, value in other_store.env.items():
        monkeypatch.setenv(key, value)
    url = other_store.url(f"run-{uuid.uuid4().hex[:8]}")
    mirror = Mirror(url, keep_last=1, kinds=T.CheckpointManager.kinds)
    try:
        mirror.check()
        ck = Checkpoints(tmp_path / "ck", base_state)
        for step, best in ((1, False), (2, True), (3, False)):
            mirror.submit(*ck.save(step, best=best))
            assert mirror.wait(60), mirror.status()
        # retention as on local disk: the newest (one rolling kept) and the newest best; step 1 is gone
        assert [c["step"] for c in mirror.remote_checkpoints()] == [3, 2]
        point = resume_with(T.CheckpointManager(tmp_path / "fresh"), "auto", url)
        entry = mirror.remote_checkpoints()[0]
        assert point.step == entry["step"] == 3 and point.path.name == "latest.pt"
        assert point.path.read_bytes() == ck.manager.rolling_path(3).read_bytes()
        # one flipped byte in the newest copy on the store: its sha256 catches it, and the one before it is used
        fs = other_store.filesystem()
        data = bytearray(fs.cat_file(entry["key"]))
        data[len(data) // 2] ^= 0xFF
        fs.pipe_file(entry["key"], bytes(data))
        with caplog.at_level(logging.INFO, logger="train"):
            point = resume_with(T.CheckpointManager(tmp_path / "fresh2"), "auto", url)
        assert point.step == 2 and "sha256 mismatch" in caplog.text
        assert T.CheckpointManager.load(point.path)["step"] == 2
    finally:
        mirror.close()


def test_a_run_mirrored_there_loses_its_folder_and_resumes_from_the_mirror_exactly(other_store, shard_dir, tmp_path):
    def args(name, *extra):
        return [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--eval_freq",
                "0", "--sample_freq", "0", "--checkpoint_freq", "3", "--no-tensorboard", "--max_steps", "8",
                "--checkpoint_dir", str(tmp_path / name / "ck"), "--log_dir", str(tmp_path / name / "logs"), *extra]

    url = other_store.url(f"run-{uuid.uuid4().hex[:8]}")
    for extra in (["--max_steps", "6"], ["--resume", "latest"]):  # the same run resumed from its own folder
        reference = launch(args("reference", *extra), nproc=None)
        assert finish(reference, 180) and reference.returncode == 0
    first = launch(args("run", "--mirror", url, "--max_steps", "6"), nproc=None, extra_env=other_store.env)
    out = finish(first, 180)
    assert first.returncode == 0 and "mirror: the last checkpoint (step 6) is on" in out, out[-3000:]
    shutil.rmtree(tmp_path / "run" / "ck")  # the machine is gone
    resumed = launch(args("run", "--mirror", url, "--resume", "latest"), nproc=None, extra_env=other_store.env)
    out = finish(resumed, 180)
    assert resumed.returncode == 0 and "resuming from the MIRROR's step 6" in out, out[-3000:]
    assert read_metrics(tmp_path / "run" / "logs")[0] == read_metrics(tmp_path / "reference" / "logs")[0]
    final = [T.CheckpointManager.load(tmp_path / name / "ck" / "latest.pt")["model"] for name in ("run", "reference")]
    assert all((final[0][k] == final[1][k]).all() for k in final[1])
