"""Signal handling details and the shell helpers, with real signals, real processes and real files."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_improved as T
from helpers import (EXACT_SAVES, alive, ROOT, TINY_ARGS, TRAINER, finish, last_step, launch, run, start, trainer_env,
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


def test_a_signal_is_still_a_graceful_stop_when_stderr_is_a_pipe_nobody_reads():
    """The handler records the stop before it says so, and saying so cannot raise: with stderr a pipe whose reader
    is gone (a CI runner or ssh session that died), a SIGTERM is still a stop request, not a crash."""
    read_end, write_end = os.pipe()
    proc = start([sys.executable, "-c", STOPPER, str(ROOT / "src")], stderr=write_end)
    os.close(write_end)
    os.close(read_end)  # nobody reads the worker's stderr any more: its writes fail with EPIPE
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.stdout.readline().strip() == "requested"
    time.sleep(0.3)
    assert proc.poll() is None  # still running, the stop recorded: it did not die on the failed write


ORPHAN = """
import os, pathlib, subprocess, sys, time
# the launcher: starts the worker with its stderr to a pipe only this process reads, then dies with the pipe once the
# worker watches it
outcome = pathlib.Path(sys.argv[3])
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], stderr=subprocess.PIPE,
                          stdout=subprocess.DEVNULL, start_new_session=True)
print(worker.pid, flush=True)
while not outcome.exists():
    time.sleep(0.05)
"""
WATCHED = """
import pathlib, sys, time
sys.path.insert(0, sys.argv[1])
import train_improved as T
outcome = pathlib.Path(sys.argv[2])
stop = T.StopSignal()
stop.watch_launcher(interval_seconds=0.2)
outcome.write_text("watching")
deadline = time.monotonic() + 60
while not stop.requested and time.monotonic() < deadline:
    time.sleep(0.05)
outcome.write_text("stop requested" if stop.requested else "never requested")
"""


def test_a_worker_whose_launcher_died_with_its_stderr_still_stops(tmp_path):
    """The launcher dies together with whatever read the worker's stderr: the watcher notices the re-parenting,
    records the stop request, and its failed attempt to say so (EPIPE) does not kill it."""
    outcome = tmp_path / "outcome"
    launcher = start([sys.executable, "-c", ORPHAN, WATCHED, str(ROOT / "src"), str(outcome)])
    worker_pid = int(launcher.stdout.readline())
    assert finish(launcher, 30) == "" and launcher.returncode == 0
    wait_for(lambda: outcome.read_text() != "watching", timeout=30)
    assert outcome.read_text() == "stop requested"
    wait_for(lambda: not alive(worker_pid), timeout=30)  # and it ended on its own


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
    """No NGPU given: the script resumes on the run's own number of processes (2, read from its checkpoint), with
    every setting from the checkpoint. On another number (4) an inherited --batch_size that no longer splits a step
    exactly gives way to the largest that does, said once. A user error under torchrun's restarts is said once and
    not retried."""
    first = run(base_args(tmp_path, shard_dir, "--max_steps", "6"))
    assert first.returncode == 0, first.stdout[-2000:]
    env = dict(trainer_env(), CHECKPOINT_DIR=str(tmp_path / "ck"), PYTHON=sys.executable)
    proc = start([str(ROOT / "resume_training.sh"), "--max_steps", "8"], env=env)
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-4000:]
    assert ": step 6," in out and "max_steps: 6 -> 8" in out and "| world size 2 |" in out
    assert last_step(tmp_path / "logs") == 8  # the log dir, data dir and model came from the checkpoint

    proc = start([str(ROOT / "resume_training.sh"), "--max_steps", "10"], env=dict(env, NGPU="4"))
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-4000:]
    assert out.count("resuming on 4 processes: --batch_size 2 does not split the 4 sequences of a step") == 1
    assert "using --batch_size 1, the largest that does (the same tokens per step, 1 accumulation steps)" in out
    assert last_step(tmp_path / "logs") == 10

    started = time.monotonic()
    proc = start([str(ROOT / "resume_training.sh"), "--n_layer", "3"], env=dict(env, MAX_RESTARTS="3"))
    out = finish(proc, 240)
    assert proc.returncode != 0 and time.monotonic() - started < 120
    assert out.count("error: the checkpoint's model has n_layer=2 but the flags ask for 3") == 1, out[-4000:]
    assert "torchrun is stopped rather than restarted" in out
    assert "SIGTERM received" not in out  # the launcher's SIGTERM back is no graceful stop to announce


def test_samples_need_no_network_and_no_tokenizer_cache(tmp_path, shard_dir):
    """No cached vocabulary, and a network that accepts the connection but never answers (a proxy on 127.0.0.1 that
    never reads): the tokenizer is built from the installed vocabulary files, so nothing waits for a download and
    the text samples are there."""
    import socket
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel accepts connections into the backlog; nobody ever reads or answers
    proxy = f"http://127.0.0.1:{silent.getsockname()[1]}"
    empty_cache = tmp_path / "no-tiktoken-cache"
    empty_cache.mkdir()
    try:
        proc = launch(base_args(tmp_path, shard_dir, "--max_steps", "4", "--sample_freq", "2"),
                      extra_env={"TIKTOKEN_CACHE_DIR": str(empty_cache), "HTTPS_PROXY": proxy, "HTTP_PROXY": proxy,
                                 "https_proxy": proxy, "http_proxy": proxy},
                      unset_env=("NO_PROXY", "no_proxy"))
        out = finish(proc, 150)
    finally:
        silent.close()
    assert proc.returncode == 0, out[-3000:]
    assert "text samples are off" not in out and out.count("| sample: ") == 2
    assert last_step(tmp_path / "logs") == 4 and not list(empty_cache.iterdir())
