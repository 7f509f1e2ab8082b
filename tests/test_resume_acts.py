"""The resume plan, end to end: real trainer processes on real folders, mirrors and small disks, one test per way a
launch used to go wrong when a checkpoint could come from more than one place (CHECKPOINTING_GUIDE.md, "Resuming:
the rules"): it decides before it touches anything, never starts a run over while the run has a checkpoint
anywhere, gives a fork an identity of its own, never overwrites another node's newer checkpoint, turns a full disk
during a fetch into one line, uploads the bytes each mirror copy is labelled with, and says what the mirror holds."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_improved as T
from helpers import EXACT_SAVES, ROOT, TINY_ARGS, built_once, finish, frozen, launch, run, wait_for, write_bin_shard
from test_disk_full import mount_tmpfs
from test_mirror_e2e import committed, s3_url
from test_multinode import free_port, launch_node

STEPS = 9  # run A: saved every 3 steps, so its folder and its mirror hold steps 3, 6 and 9


def args(root, data, *extra, log_dir=True):
    logs = ["--log_dir", str(root / "logs")] if log_dir else []
    return [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(data), "--total_batch_size", "128", "--checkpoint_freq", "3",
            "--eval_freq", "0", "--sample_freq", "0", "--no-tensorboard", "--checkpoint_dir", str(root / "ck"),
            *logs, *extra]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """Run A: 9 steps in one process, its checkpoints mirrored to a plain folder. Built once per session (read-only:
    a test copies what it changes, and always gives its own --mirror, since the run's saved one is this folder's)."""
    def build(root):
        data = root / "data"
        data.mkdir()
        write_bin_shard(data / "syn_val_000000.bin", start=0, count=4000)
        write_bin_shard(data / "syn_train_000001.bin", start=10_000, count=6000)
        result = run(args(root, data, "--max_steps", str(STEPS), "--mirror", str(root / "mirror")), nproc=None)
        assert result.returncode == 0, result.stdout[-3000:]
    return built_once(tmp_path_factory, "resume-acts-run-a", build)


def copy_run(run_a, dest, parts=("ck", "logs", "mirror")):
    dest.mkdir(parents=True, exist_ok=True)
    for part in parts:
        subprocess.run(["cp", "-a", str(run_a / part), str(dest / part)], check=True)  # hard links kept
    return dest


def run_id(path):
    return T.CheckpointManager.load(path, verify=False)["args"]["run_id"]


def contents(root):
    """Every file under root but the folder lock (which names its latest holder), by relative path: its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != T.FolderLock.NAME}


def one_line_error(result, says):
    assert result.returncode == 2, result.stdout[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("error: ") and says in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stdout and "| loss" not in result.stdout  # refused before any training


def dead_s3(tmp_path):
    """An S3 mirror nobody answers: credentials present, the endpoint a closed local port."""
    return dict(AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s", AWS_EC2_METADATA_DISABLED="true",
                AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")


def test_every_local_checkpoint_damaged_is_refused_whatever_the_mirror_and_nothing_is_renamed(tmp_path, run_a):
    """Finding 1: every local file truncated, and a mirror that holds nothing, cannot be read, or holds only this
    run's damaged copies: the launch refuses with one line and leaves every file as it was (no *.corrupt, no fresh
    start from step 0). With the mirror's good copies back it resumes from the newest, the damaged files set aside."""
    copy_run(run_a, tmp_path)
    ck, data = tmp_path / "ck", run_a / "data"
    for p in ck.iterdir():
        if p.name.endswith(".pt"):
            with open(p, "r+b") as f:
                f.truncate(4096)
    before = contents(ck)
    (tmp_path / "empty").mkdir()
    for extra, env, says in ((["--mirror", str(tmp_path / "empty")], {},
                              "(every one is damaged: latest.pt is not usable"),
                             ([], {}, "no valid checkpoint in"),
                             (["--mirror", "s3://bucket/run"], dead_s3(tmp_path), "the mirror cannot be read")):
        proc = launch(args(tmp_path, data, "--resume", "auto", "--max_steps", "12", *extra), nproc=None,
                      extra_env=env)
        out = finish(proc, 240)
        one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out), says)
        assert contents(ck) == before  # nothing renamed, nothing deleted
    good = contents(tmp_path / "mirror")
    for blob in (tmp_path / "mirror" / "blobs").iterdir():  # the mirror holds only this run's damaged copies
        data_bytes = bytearray(blob.read_bytes())
        data_bytes[len(data_bytes) // 2] ^= 0xFF
        blob.write_bytes(bytes(data_bytes))
    result = run(args(tmp_path, data, "--resume", "auto", "--max_steps", "12", "--mirror", str(tmp_path / "mirror")),
                 nproc=None)
    one_line_error(result, f"every copy of run {run_id(run_a / 'ck' / 'latest.pt')} on the mirror")
    assert contents(ck) == before
    for name, content in good.items():
        (tmp_path / "mirror" / name).write_bytes(content)
    result = run(args(tmp_path, data, "--resume", "auto", "--max_steps", "12", "--mirror", str(tmp_path / "mirror")),
                 nproc=None)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "resuming from the MIRROR's step 9" in result.stdout and "after skipping 5 unusable" in result.stdout
    assert sorted(p.name for p in ck.glob("*.corrupt")) == ["latest.pt.corrupt", "latest_backup.pt.corrupt",
                                                           "rolling_step_000003.pt.corrupt"]
    assert T.CheckpointManager.load(ck / "latest.pt")["step"] == 12


def test_a_fork_is_a_new_run_that_leaves_its_parents_files_mirror_and_logs_untouched(tmp_path, run_a):
    """Finding 2: run A resumed from its latest_backup.pt into another folder is a new run, branched from A at step
    6: its own identity and parent in its checkpoints, no --mirror inherited, and A's folder, mirror copies and logs
    byte for byte as they were. A fork that would write into A's logs or mirror is refused."""
    parent = copy_run(run_a, tmp_path / "a")
    before = {part: contents(parent / part) for part in ("ck", "logs", "mirror")}
    data, fork = run_a / "data", tmp_path / "b"
    start = ["--resume", str(parent / "ck" / "latest_backup.pt"), "--max_steps", "12"]
    one_line_error(run(args(fork, data, *start, log_dir=False), nproc=None),
                   f"must not write into its parent's --log_dir ({run_a / 'logs'})")
    one_line_error(run(args(fork, data, *start, "--mirror", str(parent / "mirror")), nproc=None),
                   "give the fork a --mirror URL of its own")
    assert not (fork / "ck" / "latest.pt").exists()
    result = run(args(fork, data, *start), nproc=None)
    assert result.returncode == 0, result.stdout[-3000:]
    a = run_id(parent / "ck" / "latest.pt")
    assert f"a fork, which continues as a new run branched from run {a} at step 6" in result.stdout
    state = T.CheckpointManager.load(fork / "ck" / "latest.pt")
    assert state["args"]["run_id"] != a and state["parent"] == f"{a}@6" and state["args"]["mirror"] is None
    assert f"(branched from {a}@6)" in result.stdout and "step(s) of work lost" not in result.stdout
    assert {part: contents(parent / part) for part in ("ck", "logs", "mirror")} == before
    listing = subprocess.run([sys.executable, str(ROOT / "src" / "list_checkpoints.py"), "--checkpoint_dir",
                              str(fork / "ck")], capture_output=True, text=True, cwd=ROOT)
    assert f"run {state['args']['run_id']}, branched from {a}@6" in listing.stdout, listing.stdout


def test_a_node_with_a_newer_checkpoint_than_rank_0s_choice_is_named_and_never_overwritten(tmp_path, run_a):
    """Finding 3: two nodes without shared storage. Node 1 held rank 0 in an earlier job and has step 9, whose upload
    never finished (the mirror holds up to step 6); node 0's folder holds step 6. The launch refuses on every rank,
    naming node 1's step, and node 1's folder is left as it was."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    copy_run(run_a, node1, ("ck",))
    (node0 / "ck").mkdir(parents=True)
    shutil.copyfile(run_a / "ck" / "rolling_step_000006.pt", node0 / "ck" / "rolling_step_000006.pt")
    os.link(node0 / "ck" / "rolling_step_000006.pt", node0 / "ck" / "latest.pt")
    copy_run(run_a, tmp_path, ("mirror",))
    for manifest in (tmp_path / "mirror" / "manifests").iterdir():
        if json.loads(manifest.read_text())["step"] == 9:
            manifest.unlink()  # its upload never finished
    before = contents(node1)
    node_args = [*args(Path("."), run_a / "data", "--resume", "latest", "--max_steps", "12", "--mirror",
                       str(tmp_path / "mirror"))]
    port = free_port()
    nodes = [launch_node(node_args, port, rank, cwd=where) for rank, where in enumerate((node0, node1))]
    outs = [finish(n, 240) for n in nodes]
    assert all(n.returncode != 0 for n in nodes)
    assert "error: the node of rank 1" in outs[0] and "holds step 9 of this run in ck/, newer than step 6" in outs[0]
    assert "CRASHED" not in outs[0] + outs[1]  # one line from our side (torchrun adds its own report)
    assert contents(node1) == before


def test_a_full_disk_while_fetching_is_one_line_and_falls_back_to_the_local_checkpoint(tmp_path, run_a):
    """Finding 4: the mirror's step 9 does not fit on the disk of the checkpoint folder. With a valid older local
    checkpoint the launch resumes from it, saying why, the space needed and free; without one it refuses with that
    line. No traceback either way."""
    size = (run_a / "ck" / "latest.pt").stat().st_size
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk, int(1.5 * size))
    try:
        copy_run(run_a, tmp_path, ("mirror",))
        (disk / "ck").mkdir()
        shutil.copyfile(run_a / "ck" / "rolling_step_000006.pt", disk / "ck" / "latest.pt")
        result = run(args(disk, run_a / "data", "--resume", "auto", "--max_steps", "6", "--mirror",
                          str(tmp_path / "mirror"), "--log_dir", str(tmp_path / "logs")), nproc=None)
        assert result.returncode == 0, result.stdout[-3000:]
        assert f"cannot write the mirror's step 9 into {disk / 'ck'}/ (No space left on device): it needs " \
               f"{T.format_bytes(size)}," in result.stdout
        assert f"resuming from the local checkpoint {disk / 'ck' / 'latest.pt'} (step 6) instead" in result.stdout
        assert "Traceback" not in result.stdout and not list((disk / "ck").glob(".tmp-*"))
        (disk / "ck" / "latest.pt").unlink()  # nothing local to fall back to
        (disk / "filler").write_bytes(b"\0" * (size // 2))
        result = run(args(disk, run_a / "data", "--resume", "auto", "--max_steps", "12", "--mirror",
                          str(tmp_path / "mirror"), "--log_dir", str(tmp_path / "logs")), nproc=None)
        one_line_error(result, f"cannot write the mirror's step 9 into {disk / 'ck'}/ (No space left on device)")
        assert "are free" in result.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


class RecordingMirror:
    """The mirror seam as the Checkpointer calls it, reading what each submitted file holds when it is submitted (the
    uploader opens it then)."""

    def __init__(self):
        self.submitted = []

    def submit(self, path, step, names, holder):
        self.submitted.append((step, torch.load(path, weights_only=True, map_location="cpu")["step"]))

    def status(self):
        return dict(off=None, consecutive_failures=0, lag_seconds=0.0, committed_step=None)

    def finish(self, saved_step, wait_seconds):
        return True


def test_each_mirror_copy_holds_the_step_it_is_labelled_with(tmp_path, shard_dir):
    """Finding 5: two best saves reported together (as at a run's end, when the first one's write ended during the
    second save): each is handed to the mirror as the bytes written for its own step, not as best_model.pt, which the
    second save has taken over by the time of the report."""
    cfg = T.TrainConfig(preset="tiny", n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=2,
                        total_batch_size=64, data_dir=str(shard_dir), checkpoint_dir=str(tmp_path / "ck"),
                        async_checkpoint=False, tensorboard=False)
    env = T.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    model = T.GPT(cfg.gpt_config())
    optimizer = T.configure_optimizer(model, cfg, env.device)
    loader = T.ShardedLoader(T.find_shards(str(shard_dir), "train"), 32, 64, 2, 0, 1, 0, env.device)
    state, mirror = T.TrainState(), RecordingMirror()
    checkpointer = T.Checkpointer(cfg, env, state, raw_model=model, optimizer=optimizer, loader=loader,
                                  metrics=T.MetricsLog(tmp_path / "metrics.jsonl", False),
                                  tb=T.TensorBoardLog(tmp_path, False, 0), mirror=mirror)
    for step in (3, 4):  # two new bests, saved one after the other, reported together
        state.step = step
        checkpointer.save(["best val"], None, True)
    assert T.CheckpointManager.load(tmp_path / "ck" / "best_model.pt")["step"] == 4
    checkpointer.report()
    assert mirror.submitted == [(3, 3), (4, 4)]
    assert not list((tmp_path / "ck").glob(".tmp-held-*"))  # the writer's holds were handed over and let go


@pytest.mark.xdist_group("s3")
def test_after_a_resume_a_failing_mirror_is_said_to_hold_the_runs_earlier_copies(tmp_path, run_a, s3_server):
    """Finding 6: a run continues with an S3 mirror that held its step 6 at the start and dies right after: the end
    says the mirror holds step 6, never "step None" (the step line's MIRROR FAILING says the same: test_mirror.py)."""
    url = s3_url(s3_server)
    data = run_a / "data"
    proc = launch(args(tmp_path, data, "--max_steps", "6", "--mirror", url), nproc=None, extra_env=s3_server.env)
    assert finish(proc, 240) and proc.returncode == 0 and committed(s3_server, url)[0] == 6
    proc = launch(args(tmp_path, data, "--resume", "latest", "--max_steps", "9", "--mirror", url,
                       "--mirror_wait_seconds", "1", "--log_freq", "1"), nproc=None, extra_env=s3_server.env)
    try:
        wait_for(lambda: (tmp_path / "logs" / "train.log").exists() and
                 "resumed from" in (tmp_path / "logs" / "train.log").read_text(), timeout=120, proc=proc)
        with frozen(proc):
            s3_server.kill()
        out = finish(proc, 240)
    finally:
        s3_server.restart()
    assert proc.returncode == 0, out[-3000:]
    assert "MIRROR BEHIND: the last checkpoint (step 9) did not reach" in out and "(the mirror holds step 6;" in out
    assert "step None" not in out


def test_resume_takes_the_mirrors_newer_copy_of_the_local_checkpoints_own_run(tmp_path, run_a):
    """Finding 7: the folder's newest valid checkpoint is step 6 (step 9's names are gone), the mirror holds step 9
    of the same run, and no --run_id is given: the launch looks for the local checkpoint's run on the mirror and
    takes step 9, keeping the run's identity."""
    copy_run(run_a, tmp_path)
    ck = tmp_path / "ck"
    for name in ("latest.pt", "rolling_step_000009.pt"):
        (ck / name).unlink()
    result = run(args(tmp_path, run_a / "data", "--resume", "latest", "--max_steps", "10", "--mirror",
                      str(tmp_path / "mirror")), nproc=None)
    assert result.returncode == 0, result.stdout[-3000:]
    a = run_id(run_a / "ck" / "latest.pt")
    assert f"the mirror holds a newer checkpoint of run {a} than {ck}/ (step 6): resuming from the MIRROR's step 9" \
        in result.stdout
    assert run_id(ck / "latest.pt") == a and T.CheckpointManager.load(ck / "latest.pt")["step"] == 10


def test_a_folder_that_refuses_the_set_aside_is_one_line(tmp_path, run_a, monkeypatch):
    """A3: the damaged latest.pt cannot be renamed (a folder turned read-only under the launch): a UserError that
    names the folder and says what to do, not a traceback; the plan had changed nothing before."""
    copy_run(run_a, tmp_path, ("ck",))
    ck = tmp_path / "ck"
    with open(ck / "latest.pt", "r+b") as f:
        f.truncate(4096)
    manager = T.CheckpointManager(ck)

    def read_only(damaged):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(manager, "set_aside", read_only)
    with pytest.raises(T.UserError, match=f"cannot set the damaged or later checkpoints in {ck}/ aside "
                                          r"\(Read-only file system\): the run could not save there either"):
        T.decide_and_act(T.describe(manager, dict(resume="latest")), manager, None)


def test_after_a_resume_every_name_a_later_resume_could_pick_verifies(tmp_path, run_a):
    """Found by the fault campaign (tests/chaos.py, seed 108): a flipped byte in latest_backup.pt (and the rolling
    file it shares) while latest.pt is valid. The resume from latest.pt verifies every name, not only until the first
    valid one, and sets the damaged one aside too, so that list_checkpoints --verify passes after the recovery."""
    copy_run(run_a, tmp_path)
    ck = tmp_path / "ck"
    with open(ck / "latest_backup.pt", "r+b") as f:
        f.seek(f.seek(0, 2) // 2)
        f.write(b"\xde\xad\xbe\xef" * 16)
    result = run(args(tmp_path, run_a / "data", "--resume", "latest", "--max_steps", "9", "--mirror",
                      str(tmp_path / "mirror")), nproc=None)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "; 2 other damaged checkpoint(s) set aside too (latest_backup.pt is not usable" in result.stdout
    assert f"resumed from {ck / 'latest.pt'}: step 9," in result.stdout
    assert (ck / "latest_backup.pt.corrupt").exists() and not (ck / "rolling_step_000006.pt").exists()
    listing = subprocess.run([sys.executable, str(ROOT / "src" / "list_checkpoints.py"), "--checkpoint_dir", str(ck),
                              "--verify"], capture_output=True, text=True, cwd=ROOT)
    assert listing.returncode == 0, listing.stdout
