"""Signal handling details and the shell helpers, with real signals, real processes and real files."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_improved as T
from helpers import (EXACT_SAVES, ROOT, TINY_ARGS, TRAINER, finish, last_step, launch, run, start, trainer_env,
                     wait_for)

STOPPER = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import train_improved as T
stop = T.StopSignal(repeat_window_seconds=1.0)
stop.install()
print("ready", flush=True)
while True:
    time.sleep(0.01)
    if stop.requested:
        print("requested", flush=True)
        stop.requested_seen = True
"""


def test_a_repeated_signal_is_ignored_but_a_deliberate_second_one_aborts():
    proc = start([sys.executable, "-c", STOPPER, str(ROOT / "src")], stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGINT)  # the same Ctrl+C delivered twice (terminal + torchrun forwarding)
    assert proc.stdout.readline().strip() == "requested"
    time.sleep(0.3)
    assert proc.poll() is None  # still running: the duplicate did not abort
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGINT)  # a deliberate second Ctrl+C
    assert proc.wait(timeout=10) == 128 + signal.SIGINT
    assert "aborting now" in proc.stderr.read()


def base_args(tmp_path, shard_dir, *extra):
    return [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--checkpoint_dir",
            str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs"), "--eval_freq", "4", "--checkpoint_freq",
            "4", *extra]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_single_process_stops_gracefully_and_exits_0(tmp_path, shard_dir, sig):
    proc = launch(base_args(tmp_path, shard_dir, "--max_steps", "1000"), nproc=None)
    wait_for(lambda: last_step(tmp_path / "logs") >= 3, timeout=60, proc=proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    stopped = last_step(tmp_path / "logs")
    assert torch.load(tmp_path / "ck" / "latest.pt", weights_only=True)["step"] == stopped
    assert f"Resume with:\n  python {TRAINER} --checkpoint_dir {tmp_path / 'ck'} --resume latest" in out


def test_list_checkpoints_shows_every_file_and_flags_damage(tmp_path, shard_dir):
    assert run(base_args(tmp_path, shard_dir, "--max_steps", "8"), nproc=None).returncode == 0
    listing = subprocess.run([str(ROOT / "list_checkpoints.sh"), "--checkpoint_dir", str(tmp_path / "ck")],
                             capture_output=True, text=True, env=trainer_env())
    assert listing.returncode == 0
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:] if ".pt" in line.split()[0]}
    assert set(rows) == {"latest.pt", "latest_backup.pt", "best_model.pt", "rolling_step_000004.pt",
                         "rolling_step_000008.pt"}
    assert rows["latest.pt"][2:4] == ["8", "0"] and rows["latest_backup.pt"][2] == "4"  # (column 1: the file)
    # which names share one file: latest with the newest rolling file, the backup with the one before; best apart
    file_of = {name: row[1] for name, row in rows.items()}
    assert file_of["latest.pt"] == file_of["rolling_step_000008.pt"] != file_of["best_model.pt"]
    assert file_of["latest_backup.pt"] == file_of["rolling_step_000004.pt"]
    assert len(set(file_of.values())) == 3 and "same file number are hard links to one file" in listing.stdout
    with open(tmp_path / "ck" / "rolling_step_000004.pt", "r+b") as f:  # flip bytes inside the tensor data
        f.seek(os.path.getsize(tmp_path / "ck" / "rolling_step_000004.pt") // 2)
        f.write(b"\x00\xff" * 32)
    quick = subprocess.run([str(ROOT / "list_checkpoints.sh"), "--checkpoint_dir", str(tmp_path / "ck")],
                           capture_output=True, text=True, env=trainer_env())
    assert quick.returncode == 0  # metadata only: the damage inside tensor bytes is not read
    verified = subprocess.run([str(ROOT / "list_checkpoints.sh"), "--checkpoint_dir", str(tmp_path / "ck"),
                               "--verify"], capture_output=True, text=True, env=trainer_env())
    assert verified.returncode == 1
    status = {line.split()[0]: line for line in verified.stdout.splitlines()[1:] if ".pt" in line.split()[0]}
    assert "INVALID: checksum mismatch" in status["rolling_step_000004.pt"]
    assert "INVALID" in status["latest_backup.pt"]  # the same file under its other name
    assert status["latest.pt"].endswith("valid")


def test_resume_training_sh_continues_the_run_with_its_saved_settings(tmp_path, shard_dir):
    first = run(base_args(tmp_path, shard_dir, "--max_steps", "6"))
    assert first.returncode == 0, first.stdout[-2000:]
    env = dict(trainer_env(), NGPU="2", CHECKPOINT_DIR=str(tmp_path / "ck"))
    proc = start([str(ROOT / "resume_training.sh"), "--max_steps", "8"], env=env)
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-4000:]
    assert ": step 6," in out and "max_steps: 6 -> 8" in out
    assert last_step(tmp_path / "logs") == 8  # the log dir, data dir and model came from the checkpoint
