"""Helpers for the tests: synthetic shards and a runner for real torchrun / python trainer processes."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "src" / "train_improved.py"

# A model small enough that a step takes milliseconds on one CPU core, with the real GPT-2 vocabulary.
TINY_ARGS = ["--preset", "tiny", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
             "--batch_size", "2", "--warmup_steps", "3", "--learning_rate", "3e-3", "--min_lr", "3e-4",
             "--val_steps", "2", "--seed", "7", "--checkpoint_minutes", "0", "--no-compile"]


# Saves exactly when due (no background writer that may still be busy, no overhead budget to stretch the
# interval): for tests that assert which checkpoint files exist.
EXACT_SAVES = ["--no-async_checkpoint", "--max_checkpoint_overhead", "1"]


def consecutive_tokens(start: int, count: int) -> np.ndarray:
    return (np.arange(start, start + count) % 50000).astype(np.uint16)


def write_bin_shard(path: Path, start: int, count: int) -> np.ndarray:
    """An llm.c .bin shard holding start, start+1, ... (mod 50000)."""
    tokens = consecutive_tokens(start, count)
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, count)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())
    return tokens


def write_npy_shard(path: Path, start: int, count: int) -> np.ndarray:
    tokens = consecutive_tokens(start, count)
    np.save(path, tokens)
    return tokens


def skip_unless_required(reason: str, variable: str) -> None:
    """A real component a test needs is missing: skip with the reason, or fail where `variable`=1 says the
    component must be there (CI sets it, so that a missing install is a failure, not a quiet skip)."""
    import pytest
    if os.environ.get(variable) == "1":
        pytest.fail(f"{reason}; {variable}=1 requires them")
    pytest.skip(reason)


def trainer_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


# Every process a test starts through start() carries this variable, with a value of its own job's, in its
# environment; so does everything it starts in turn (torchrun's workers, in sessions of their own, and orphans
# re-parented away from the launcher), which is how end_job() finds them all.
JOB_TAG = "TRAIN_IMPROVED_TEST_JOB"
_jobs: list[tuple[subprocess.Popen, str]] = []


def start(cmd: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None,
          stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """Start a test's job: its own process group (a test can signal or kill -9 the whole job like a terminal would),
    stdout and stderr merged into one text pipe (or stderr=subprocess.PIPE: a pipe of its own), and registered so
    that end_all_jobs() leaves nothing running after the test, whatever the test did."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, cwd=cwd, env={**(env or trainer_env()), JOB_TAG: tag}, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, start_new_session=True)
    _jobs.append((proc, tag))
    return proc


def launch(args: list[str], nproc: int | None = 2, launcher_args: tuple[str, ...] = (),
           extra_env: dict[str, str] | None = None, unset_env: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start the trainer under torchrun (nproc processes) or as a plain python process (nproc=None), with extra_env
    set and the variables unset_env names removed."""
    if nproc is None:
        cmd = [sys.executable, str(TRAINER), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *launcher_args, str(TRAINER), *args]
    env = {k: v for k, v in {**trainer_env(), **(extra_env or {})}.items() if k not in unset_env}
    return start(cmd, env=env)


def _job_tag(proc: subprocess.Popen) -> str | None:
    return next((tag for p, tag in _jobs if p is proc), None)


def job_processes(tag: str) -> list[int]:
    """The live (not zombie) processes of the job tagged `tag`."""
    marker = f"{JOB_TAG}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
            except OSError:
                continue
            if alive(int(entry)):
                found.append(int(entry))
    return found


def end_job(proc: subprocess.Popen) -> str:
    """kill -9 every process of proc's job that is still alive (its workers too, wherever they were re-parented)
    and return the job's remaining output. Never blocks for long: a test that fails must not hang the suite."""
    tag = _job_tag(proc)
    deadline = time.monotonic() + 30
    while True:
        pids = job_processes(tag) if tag else []
        if proc.poll() is None:
            pids.append(proc.pid)
        if not pids or time.monotonic() > deadline:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    try:
        out, _ = proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):  # ValueError: its output was read already
        out = ""
    return out or ""


def end_all_jobs() -> None:
    """After each test (an autouse fixture): no process a test started outlives it."""
    while _jobs:
        proc, _ = _jobs[-1]
        end_job(proc)  # a job that has ended costs one look at /proc
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        _jobs.pop()


def finish(proc: subprocess.Popen, timeout: float) -> str:
    """proc's output once its whole job has ended; past `timeout`, the job is killed and this raises."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job did not end within {timeout}s:\n{end_job(proc)[-4000:]}") from None
    return out


def run(args: list[str], nproc: int | None = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the trainer to completion and return its result (stdout and stderr merged)."""
    proc = launch(args, nproc)
    out = finish(proc, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


def read_metrics(log_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, val loss by step) from metrics.jsonl."""
    train, val = {}, {}
    for line in (log_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            val[record["step"]] = record["val_loss"]
        elif "loss" in record:  # checkpoint records carry neither
            train[record["step"]] = record["loss"]
    return train, val


def tensorboard_scalars(log_dir: Path, tag: str, run_dir: Path | None = None) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard curve of the run logging to log_dir (or in run_dir), read back from the event
    files the way TensorBoard reads them (several files in order, events a restarted run purged left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from train_improved import tensorboard_run_dir
    acc = EventAccumulator(str(run_dir or tensorboard_run_dir(str(log_dir))), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.05) -> None:
    """Poll until predicate() is true; fail early if proc exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            code = proc.returncode  # its workers may still be running: end_job() ends them and reads the output
            raise AssertionError(f"process exited ({code}) before the condition held:\n{end_job(proc)[-4000:]}")
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def last_step(log_dir: Path) -> int:
    """The newest training step in a (possibly running) run's metrics.jsonl. Only whole lines count: a reader can
    see the first part of a line the trainer is writing (one that crosses a page of the file)."""
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    whole = path.read_text().split("\n")[:-1]
    steps = [json.loads(line)["step"] for line in whole if '"loss"' in line]
    return max(steps, default=0)


def descendants(pid: int) -> list[int]:
    """All live descendant process ids of pid (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def frozen(proc: subprocess.Popen):
    """The whole job stopped (SIGSTOP) inside the block and continued after it, even if the block fails: a signal
    sent meanwhile lands a step or two later however fast the machine is."""
    job = [proc.pid, *descendants(proc.pid)]
    for pid in job:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in job:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def workers(proc: subprocess.Popen) -> list[int]:
    """The trainer processes torchrun started, in start order (local rank 0 first)."""
    found = []
    for pid in descendants(proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"train_improved" in f.read():
                    found.append(pid)
        except OSError:
            pass
    return sorted(found)


def kill_9_everything(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and every process under it, at the same instant as far as the OS allows."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30
    for pid in pids[1:]:  # wait until the orphans are really gone
        while alive(pid):
            assert time.monotonic() < deadline, f"process {pid} outlived kill -9 by 30 s"
            time.sleep(0.01)


def alive(pid: int) -> bool:
    """Whether pid runs (a zombie or a vanished process does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that build(folder) fills once per test session, for every pytest-xdist worker: the first to ask
    builds it (the others wait on a lock), later ones reuse it. For expensive read-only fixtures, such as the
    uninterrupted reference runs that many test files compare with: a test that must change one works on a copy."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers of this session
    folder, done = base / f"built-once-{name}", base / f"built-once-{name}.done"
    failed = base / f"built-once-{name}.failed"
    with open(base / f"built-once-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if failed.exists():  # fail fast: a build that failed (or hung) once would cost every test its time again
            raise AssertionError(f"building {name!r} failed earlier in this session:\n{failed.read_text()}")
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException as e:
                failed.write_text(f"{type(e).__name__}: {str(e)[-3000:]}")
                raise
            done.touch()
    return folder


def saved_on_stop(out: str, step: int) -> bool:
    """Whether the log says step `step` was saved because of a stop: "checkpoint step 15 (stop signal)", or with
    the other reasons due at the same step listed first ("(periodic, stop signal)")."""
    return re.search(rf"checkpoint step {step} \((?:[a-z ]+, )*stop signal[,)]", out) is not None
