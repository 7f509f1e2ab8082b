"""The checkpointing promises, end to end: real torchrun processes, real signals, real kill -9, real files.

A reference run trains 40 steps uninterrupted (2 ranks, dropout on). Every interrupted run must then reproduce
its per-step losses and its final weights bit for bit."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

import list_checkpoints
import train_improved as T
from helpers import (EXACT_SAVES, TINY_ARGS, alive, built_once, frozen, kill_9_everything, last_step, launch,
                     read_metrics, run, saved_on_stop, tensorboard_scalars, wait_for, workers, write_bin_shard)

STEPS = 40


def run_args(root, shard_dir, *extra):
    # 128 tokens a step, in windows of one sequence: with 2 ranks still 2 micro-steps each (gradient accumulation),
    # at half the compute of 2 sequences a window (the suite's time goes mostly into these runs)
    return [*TINY_ARGS, "--batch_size", "1", "--data_dir", str(shard_dir), "--total_batch_size", "128",
            "--max_steps", str(STEPS),
            "--dropout", "0.1", "--checkpoint_freq", "5", "--eval_freq", "10", "--log_freq", "10",
            "--checkpoint_dir", str(root / "ck"), "--log_dir", str(root / "logs"), *extra]


def final_weights(root):
    return torch.load(root / "ck" / "latest.pt", weights_only=True)["model"]


def assert_same_run(root, reference):
    # the raw history holds each step once, whatever kind of resume came between (no line of a lost step is left)
    raw = [json.loads(line) for line in (root / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in raw if "val_loss" in r] == list(range(10, STEPS + 1, 10))
    train, val = read_metrics(root / "logs")
    ref_train, ref_val = read_metrics(reference / "logs")
    assert sorted(train) == list(range(1, STEPS + 1))
    assert train == ref_train  # every step's loss, bit for bit (floats written in full)
    assert val == ref_val
    mine, ref = final_weights(root), final_weights(reference)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    # TensorBoard shows one unbroken curve: the steps redone after the interruption replaced the lost ones
    for tag in ("loss/train", "loss/val"):
        curve = tensorboard_scalars(root / "logs", tag)
        assert [s for s, _ in curve] == sorted({s for s, _ in curve})  # each step once, in order
        assert curve == tensorboard_scalars(reference / "logs", tag)
    assert [s for s, _ in tensorboard_scalars(root / "logs", "loss/train")] == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    def build(d):
        write_bin_shard(d / "syn_val_000000.bin", start=0, count=4000)
        # 40 steps of 128 tokens stay within one epoch and move from the first shard to the second halfway
        write_bin_shard(d / "syn_train_000001.bin", start=10_000, count=3000)
        write_bin_shard(d / "syn_train_000002.bin", start=20_000, count=2500)
    return built_once(tmp_path_factory, "data", build)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The uninterrupted run every resume is compared with: built once per session (read-only; copy to change)."""
    def build(root):
        result = run(run_args(root, data))
        assert result.returncode == 0, result.stdout[-3000:]
    return built_once(tmp_path_factory, "reference", build)


def interrupt(root, data, send, after_step=12):
    """Launch the run, let it pass `after_step`, then call send(proc). Returns the finished process's output.

    The whole job is frozen (SIGSTOP) while send() acts and thawed after, so the signal or kill lands a step or two
    after `after_step` however fast the machine is, never after the run's end."""
    proc = launch(run_args(root, data))
    wait_for(lambda: last_step(root / "logs") >= after_step, timeout=120, proc=proc)
    with frozen(proc):
        send(proc)
    out, _ = proc.communicate(timeout=120)
    return proc.returncode, out


def interrupted_once(tmp_path_factory, data, name, send, after_step, dest):
    """A run interrupted by interrupt(..., send, after_step) once per session, copied into dest (hard links and
    all, with `cp -a`) for a test to continue: several tests start from the same kind of stop without each paying
    for a run of its own. Returns the interrupted launch's (exit code, output)."""
    def build(root):
        code, out = interrupt(root, data, send, after_step)
        (root / "interrupted.json").write_text(json.dumps(dict(code=code, out=out)))
    source = built_once(tmp_path_factory, name, build)
    for part in ("ck", "logs"):
        subprocess.run(["cp", "-a", str(source / part), str(dest / part)], check=True)
    record = json.loads((source / "interrupted.json").read_text())
    return record["code"], record["out"].replace(str(source), str(dest))


def killed_at_17(tmp_path_factory, data, dest):
    return interrupted_once(tmp_path_factory, data, "killed_at_17", kill_9_everything, 17, dest)


def ctrl_c_at_12(tmp_path_factory, data, dest):
    return interrupted_once(tmp_path_factory, data, "ctrl_c_at_12", lambda p: os.killpg(p.pid, signal.SIGINT), 12,
                            dest)


def resume(root, data, *extra, nproc=2):
    result = run(run_args(root, data, "--resume", "latest", *extra), nproc=nproc)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def test_kill_9_of_every_process_then_resume_is_bit_exact(tmp_path_factory, tmp_path, data, reference):
    code, _ = killed_at_17(tmp_path_factory, data, tmp_path)
    assert code == -signal.SIGKILL
    killed_at = last_step(tmp_path / "logs")
    saved = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"]
    assert 5 <= saved <= killed_at < STEPS
    out = resume(tmp_path, data)
    assert f"resumed from {tmp_path / 'ck' / 'latest.pt'}: step {saved}," in out
    assert_same_run(tmp_path, reference)


def test_torchrun_restarts_after_a_worker_is_killed_and_the_run_ends_bit_exact(tmp_path, data, reference):
    """The recommended long-run command: torchrun --max-restarts with --resume auto. No human steps in."""
    proc = launch(run_args(tmp_path, data, "--resume", "auto"), launcher_args=("--max-restarts=1",),
                  extra_env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    wait_for(lambda: last_step(tmp_path / "logs") >= 17, timeout=120, proc=proc)
    logged_before_the_kill = last_step(tmp_path / "logs")
    os.kill(workers(proc)[-1], signal.SIGKILL)  # one rank dies (an OOM kill, a segfault...)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "torchrun restart 1 after a worker failure: resumed at step " in out
    restart = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
               if '"restart"' in line]
    assert len(restart) == 1 and restart[0]["restart"] == 1
    # the worker died after step 17: the restart resumed from a save of step 5 or later and counted what it redid
    assert restart[0]["resumed_from_step"] >= 5 and restart[0]["resumed_from_step"] % 5 == 0
    lost, resumed = restart[0]["lost_steps"], restart[0]["resumed_from_step"]
    assert lost >= logged_before_the_kill - resumed  # at least what was logged after that save, maybe a step more
    if lost:
        assert f"{lost} step(s) of work lost (steps {resumed + 1}-{resumed + lost} are redone)" in out
    assert_same_run(tmp_path, reference)


def test_ctrl_c_saves_at_the_step_boundary_and_resume_is_bit_exact(tmp_path_factory, tmp_path, data, reference):
    # a terminal's Ctrl+C goes to its foreground process group: torchrun, which forwards it to the workers
    code, out = ctrl_c_at_12(tmp_path_factory, data, tmp_path)
    stopped = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"]
    assert stopped == last_step(tmp_path / "logs") < STEPS  # the checkpoint is of the very step it stopped at
    assert saved_on_stop(out, stopped)
    assert f"stopped cleanly at step {stopped} of {STEPS}, checkpoint saved. Resume with:" in out
    # (torchrun starts the workers in sessions of their own: the Ctrl+C reaches them once, forwarded by torchrun)
    assert "--resume latest" in out and "second SIGINT" not in out
    # torchrun's own SignalException report follows our last line; that line says so, in plain words
    assert "torchrun may print a SignalException traceback after this and exit 1" in out
    assert code == 1 and "SignalException" in out  # torchrun's exit code after Ctrl+C, as README says
    resume(tmp_path, data)
    assert_same_run(tmp_path, reference)


def test_sigterm_to_torchrun_alone_stops_all_ranks_and_resume_is_bit_exact(tmp_path, data, reference):
    code, out = interrupt(tmp_path, data, lambda p: os.kill(p.pid, signal.SIGTERM))
    stopped = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"]
    assert stopped == last_step(tmp_path / "logs")
    assert "SIGTERM received" in out and "exitcode" not in out  # no worker failed: both exited 0
    resume(tmp_path, data)
    assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_damaged_latest_falls_back_to_the_backup_and_still_ends_bit_exact(tmp_path_factory, tmp_path, data, reference,
                                                                          damage):
    killed_at_17(tmp_path_factory, data, tmp_path)
    latest = tmp_path / "ck" / "latest.pt"
    backup_step = T.CheckpointManager.load(tmp_path / "ck" / "latest_backup.pt")["step"]
    with open(latest, "r+b") as f:  # damage the file in place, as a failing disk would
        if damage == "corrupt":
            f.seek(os.path.getsize(latest) // 2)
            f.write(b"\xde\xad\xbe\xef" * 64)
        else:
            f.truncate(os.path.getsize(latest) // 3)
    out = resume(tmp_path, data)
    assert "latest.pt is not usable" in out and "falling back" in out
    assert f"resumed from {tmp_path / 'ck' / 'latest_backup.pt'}: step {backup_step}," in out
    assert_same_run(tmp_path, reference)
    # the damaged file was set aside, never rotated into latest_backup.pt: every name resume uses verifies
    ck = tmp_path / "ck"
    assert (ck / "latest.pt.corrupt").exists() and "set the damaged latest.pt" in out
    assert list_checkpoints.main(["--checkpoint_dir", str(ck), "--verify"]) == 0
    for p in T.CheckpointManager(ck).all_checkpoints():
        assert not os.path.samefile(p, ck / "latest.pt.corrupt")


def test_synchronous_saving_gives_the_same_run(tmp_path, data, reference):
    result = run(run_args(tmp_path, data, "--no-async_checkpoint"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert_same_run(tmp_path, reference)


def test_retention_across_two_epochs(tmp_path, data):
    # 512 tokens per step = 16 windows: 171 // 16 = 10 steps per epoch
    args = [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(data), "--total_batch_size", "512", "--num_epochs", "2",
            "--checkpoint_freq", "4", "--keep_last", "3", "--eval_freq", "0",
            "--checkpoint_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs")]
    result = run(args)
    assert result.returncode == 0, result.stdout[-3000:]
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == [
        ".lock",  # the run's lock on the folder (one run per folder)
        ".tmp-spare.pt",  # the file retired last (rolling 10), for the next save to overwrite
        "epoch_00001.pt", "epoch_00002.pt", "latest.pt", "latest_backup.pt",
        "rolling_step_000012.pt", "rolling_step_000016.pt", "rolling_step_000020.pt"]
    assert ck / ".tmp-spare.pt" not in T.CheckpointManager(ck).all_checkpoints()
    assert T.CheckpointManager.load(ck / ".tmp-spare.pt")["step"] == 10
    files = [p for p in ck.iterdir() if p.suffix == ".pt"]
    step = {p.name: T.CheckpointManager.load(p)["step"] for p in files}
    assert step["epoch_00001.pt"] == 10 and step["epoch_00002.pt"] == 20 == step["latest.pt"]
    assert step["latest_backup.pt"] == 16
    assert T.CheckpointManager.load(ck / "epoch_00001.pt")["epoch"] == 1
    for p in files:  # every file loads without running code from it
        assert torch.load(p, weights_only=True)["format_version"] == 1


def test_starting_again_without_resume_refuses_to_touch_the_checkpoints(tmp_path, data, reference):
    shutil.copytree(reference / "ck", tmp_path / "ck")
    ck = tmp_path / "ck"
    def checkpoints():  # (the .lock file names whoever launched last)
        return {p.name: p.stat().st_mtime_ns for p in ck.iterdir() if p.name != ".lock"}
    before = checkpoints()
    result = run(run_args(tmp_path, data), nproc=None)
    assert result.returncode == 2
    assert "already holds checkpoints" in result.stdout and "--resume latest" in result.stdout
    assert "Traceback" not in result.stdout
    assert checkpoints() == before


def test_resume_on_another_world_size_continues_the_same_token_stream(tmp_path_factory, tmp_path, data, reference):
    ctrl_c_at_12(tmp_path_factory, data, tmp_path)
    out = resume(tmp_path, data, nproc=None)  # a GPU died: one process instead of two
    assert "resuming a 2-process checkpoint on 1 processes" in out and "bit for bit" in out
    mine = torch.load(tmp_path / "ck" / "latest.pt", weights_only=True)
    ref = torch.load(reference / "ck" / "latest.pt", weights_only=True)
    assert mine["step"] == STEPS and mine["dataloader_state"] == ref["dataloader_state"]
    train, _ = read_metrics(tmp_path / "logs")
    ref_train, _ = read_metrics(reference / "logs")
    assert sorted(train) == list(range(1, STEPS + 1))
    # same data, same schedule, the AdamW moments carried over: close, not identical (other dropout masks on one
    # process; measured gaps 0.0017 to 0.0040 over four stops at steps 13 and 14; with the moments reset 0.012). The
    # exact check of the carried-over state is test_gpu_ready's test_resuming_on_another_world_size_restores_...
    assert abs(train[STEPS] - ref_train[STEPS]) < 0.008, (train[STEPS], ref_train[STEPS])


def test_resume_auto_starts_fresh_then_continues(tmp_path, data):
    args = run_args(tmp_path, data, "--resume", "auto")
    args[args.index("--max_steps") + 1] = "6"
    first = run(args, nproc=None)
    assert first.returncode == 0 and "no checkpoint" in first.stdout
    args[args.index("--max_steps") + 1] = "9"
    second = run(args, nproc=None)
    assert second.returncode == 0 and "resumed from" in second.stdout and ": step 6," in second.stdout
    assert "max_steps: 6 -> 9" in second.stdout  # changed settings are listed
    assert last_step(tmp_path / "logs") == 9


@pytest.mark.parametrize("make_path,extra,message", [
    (lambda ck: ck / "nothing_here.pt", [], "does not exist"),
    (lambda ck: ck, [], "is not usable"),  # a directory
    (lambda ck: ck / "notes.pt", [], "not usable (truncated, or not a checkpoint"),
    (lambda ck: ck / "latest.pt", ["--n_layer", "3"], "n_layer=2 but the flags ask for 3"),
])
def test_bad_resume_targets_are_one_line_errors(tmp_path, data, reference, make_path, extra, message):
    shutil.copytree(reference / "ck", tmp_path / "ck")
    (tmp_path / "ck" / "notes.pt").write_text("not a checkpoint")
    result = run(run_args(tmp_path, data, "--resume", str(make_path(tmp_path / "ck")), *extra), nproc=None)
    assert result.returncode == 2, result.stdout[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith("error: ") and message in result.stdout
    assert "Traceback" not in result.stdout


def test_empty_checkpoint_dir_with_resume_latest_is_a_one_line_error(tmp_path, data):
    (tmp_path / "ck").mkdir()
    result = run(run_args(tmp_path, data, "--resume", "latest"), nproc=None)
    assert result.returncode == 2 and "no checkpoint in" in result.stdout and "Traceback" not in result.stdout


def test_a_second_launch_on_a_folder_in_use_exits_2_and_the_first_run_ends_bit_exact(tmp_path, data, reference):
    proc = launch(run_args(tmp_path, data))
    wait_for(lambda: last_step(tmp_path / "logs") >= 3, timeout=120, proc=proc)
    log_before = (tmp_path / "logs" / "train.log").read_text()
    t0 = time.monotonic()
    second = run(run_args(tmp_path, data, "--resume", "latest"), nproc=None)
    assert second.returncode == 2 and time.monotonic() - t0 < 30
    line = second.stdout.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'ck'}/ is in use by another run (host ") and f", pid " in line
    assert "started 20" in line and "use another --checkpoint_dir" in line
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "is in use" not in (tmp_path / "logs" / "train.log").read_text()[len(log_before):]  # its log untouched
    assert_same_run(tmp_path, reference)


def test_workers_stop_together_save_and_exit_when_torchrun_is_killed(tmp_path, data, reference):
    proc = launch(run_args(tmp_path, data))
    wait_for(lambda: last_step(tmp_path / "logs") >= 12, timeout=120, proc=proc)
    pids = workers(proc)
    assert len(pids) == 2
    os.kill(proc.pid, signal.SIGKILL)  # torchrun alone: kill -9, the OOM killer

    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=60)
    out, _ = proc.communicate(timeout=30)
    assert "the launcher (pid " in out and "is gone: stopping at the next step boundary" in out
    stopped = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"]
    assert stopped == last_step(tmp_path / "logs") < STEPS  # both ranks stopped at that step, and it was saved
    assert saved_on_stop(out, stopped)
    resume(tmp_path, data)
    assert_same_run(tmp_path, reference)


@pytest.fixture(scope="module")
def reference_4_ranks(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("reference4")
    result = run(run_args(root, data), nproc=4)
    assert result.returncode == 0, result.stdout[-3000:]
    return root


def test_four_ranks_kill_9_then_resume_is_bit_exact(tmp_path, data, reference_4_ranks):
    """With more than two ranks the order of a gradient all-reduce depends on DDP's bucket layout, which DDP
    rebuilds after its first iteration: exact only because the resumed run settles its buckets first."""
    proc = launch(run_args(tmp_path, data), nproc=4)
    wait_for(lambda: last_step(tmp_path / "logs") >= 12, timeout=180, proc=proc)
    kill_9_everything(proc)
    proc.communicate(timeout=60)
    saved = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"]
    assert 5 <= saved < STEPS and saved % 5 == 0
    resume(tmp_path, data, nproc=4)
    assert_same_run(tmp_path, reference_4_ranks)


def test_kill_9_while_the_background_writer_is_mid_write_then_resume_is_bit_exact(tmp_path, data, reference):
    """Made deterministic: the write of step 10's checkpoint is held 1 MB into its file (a test-only hook of the
    trainer), and the whole run is killed while the background writer is there."""
    proc = launch(run_args(tmp_path, data, "--max_checkpoint_overhead", "1"),
                  extra_env={"TRAIN_IMPROVED_TEST_WRITE_PAUSE": "10:120"})
    ck = tmp_path / "ck"

    def mid_write():
        for p in ck.glob(".tmp-000010-*.pt"):
            with contextlib.suppress(FileNotFoundError):
                if p.stat().st_size >= 1 << 20:
                    return True
        return False
    wait_for(mid_write, timeout=120, proc=proc)
    kill_9_everything(proc)
    proc.communicate(timeout=60)
    assert T.CheckpointManager.load(ck / "latest.pt")["step"] == 5  # the write in flight never took a name
    out = resume(tmp_path, data)
    assert f"resumed from {ck / 'latest.pt'}: step 5," in out
    assert not list(ck.glob(".tmp-0*"))  # the half-written file was cleaned up
    assert_same_run(tmp_path, reference)
