"""Issue 24 at the level CPU allows: --compile on by default where it helps (CUDA) and announced, --batch_size auto
(the largest micro-batch that fits, probed with the real model and optimizer; on CPU through a test hook that makes
allocations above a size raise torch's out-of-memory error, as a full GPU does), and what FP8 is expected to give.
The GPU figures themselves come from benchmarks/gpu_check.sh."""

import json

import pytest
import torch

import train_improved as T
from helpers import EXACT_SAVES, TINY_ARGS, launch, finish

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
LOGITS_BYTES = 32 * 50304 * 4  # one sequence's logits in the tiny test model (block 32, padded vocabulary, float32)
OOM_ABOVE = "TRAIN_IMPROVED_TEST_OOM_ABOVE_BYTES"


def args(tmp_path, shard_dir, name, *extra):
    return [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "512", "--dropout", "0.1",
            "--eval_freq", "0", "--sample_freq", "0", "--checkpoint_freq", "4", "--no-tensorboard",
            "--checkpoint_dir", str(tmp_path / name / "ck"), "--log_dir", str(tmp_path / name / "logs"),
            "--batch_size", "auto", *extra]


def log_of(tmp_path, name):
    return (tmp_path / name / "logs" / "train.log").read_text()


def losses(tmp_path, name):
    lines = (tmp_path / name / "logs" / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def test_compile_is_on_by_default_on_cuda_off_on_cpu_and_no_compile_opts_out():
    auto = T.TrainConfig()
    assert auto.compile is None and T.compiles(auto, CUDA) and not T.compiles(auto, CPU)
    assert not T.compiles(T.TrainConfig(**T.parse_flags(["--no-compile"])), CUDA)
    assert T.compiles(T.TrainConfig(**T.parse_flags(["--compile"])), CPU)
    help_text = " ".join(T.build_parser().format_help().split())
    assert "torch.compile the model (auto: on CUDA, where it is faster; off on CPU, where it only adds compile " \
           "time) (default: auto)" in help_text
    # a run started with the default stays "auto" in its checkpoint: resumed on a GPU it compiles, on CPU it does not
    saved = T.TrainConfig(preset="tiny")
    point = T.ResumePoint(path=None, step=0, args=vars(saved).copy(), model_config=vars(saved.gpt_config()).copy(),
                          world_size=1)
    assert T.resolve_config({"resume": "latest"}, point).compile is None


def test_a_compiled_run_says_it_is_compiling_and_then_how_long_the_first_step_took(tmp_path, shard_dir, monkeypatch):
    compiled = []
    monkeypatch.setattr(T.torch, "compile", lambda model: compiled.append(model) or model)  # the messages, not inductor
    T.main(args(tmp_path, shard_dir, "run", "--max_steps", "2", "--compile"))
    text = log_of(tmp_path, "run")
    assert len(compiled) == 1
    assert "compiling the model with torch.compile (--compile): the first step and the first evaluation wait" in text
    assert text.index("compiling the model") < text.index("compiled: the first step took") < text.index("step       2/")
    T.main(args(tmp_path, shard_dir, "plain", "--max_steps", "2"))  # CPU, default: not compiled, nothing said
    assert len(compiled) == 1 and "compiling" not in log_of(tmp_path, "plain")


def test_batch_size_auto_picks_the_largest_micro_batch_that_fits_and_learns_the_same(tmp_path, shard_dir,
                                                                                      monkeypatch):
    """16 sequences a step; a 'GPU' on which more than 4 sequences' logits do not fit: auto picks 4 (the largest
    divisor of 16 that fits), keeps the 512 tokens per step by accumulating 4 micro-steps, and trains exactly as
    --batch_size 4 does: the probe leaves the weights, gradients and random streams (dropout 0.1) untouched."""
    monkeypatch.setenv(OOM_ABOVE, str(int(4.5 * LOGITS_BYTES)))
    T.main(args(tmp_path, shard_dir, "auto", "--max_steps", "6", "--batch_size", "auto"))
    text = log_of(tmp_path, "auto")
    assert "batch_size auto: 4 sequences per micro-step, the largest that fits (of the 16 per rank in a step" in text
    assert "512 tokens per step = 4 sequences x 32 tokens x 1 ranks x 4 accumulation steps" in text
    monkeypatch.delenv(OOM_ABOVE)
    T.main(args(tmp_path, shard_dir, "fixed", "--max_steps", "6", "--batch_size", "4"))
    assert losses(tmp_path, "auto") == losses(tmp_path, "fixed") and len(losses(tmp_path, "auto")) == 6
    saved = T.CheckpointManager.load(tmp_path / "auto" / "ck" / "latest.pt")
    assert saved["args"]["batch_size"] == "auto" and saved["micro_batch"] == {"size": 4, "device": "cpu"}


def test_auto_on_resume_keeps_the_checkpoints_choice_on_the_same_device_and_continues_bit_exact(tmp_path, shard_dir,
                                                                                                 monkeypatch):
    """Resumed where 8 sequences would fit too, a run keeps the 4 its checkpoint chose on the same device model and
    world size (another accumulation order would change the losses): it continues exactly as a run that said
    --batch_size 4 throughout."""
    for name, batch in (("auto", "auto"), ("fixed", "4")):
        monkeypatch.setenv(OOM_ABOVE, str(int(4.5 * LOGITS_BYTES)))
        T.main(args(tmp_path, shard_dir, name, "--max_steps", "4", "--batch_size", batch))
        monkeypatch.setenv(OOM_ABOVE, str(int(8.5 * LOGITS_BYTES)))
        T.main(args(tmp_path, shard_dir, name, "--max_steps", "8", "--resume", "latest"))
    text = log_of(tmp_path, "auto")
    assert "batch_size auto: 4 sequences per micro-step, the checkpoint's choice on this GPU model, which still fits" \
        in text
    assert losses(tmp_path, "auto") == losses(tmp_path, "fixed") and len(losses(tmp_path, "auto")) == 8
    # a new run on that larger 'GPU' takes 8
    T.main(args(tmp_path, shard_dir, "larger", "--max_steps", "1"))
    assert "batch_size auto: 8 sequences per micro-step, the largest that fits" in log_of(tmp_path, "larger")


def test_auto_on_cpu_without_a_probe_and_a_model_that_never_fits_is_one_clear_line(tmp_path, shard_dir):
    T.main(args(tmp_path, shard_dir, "cpu", "--max_steps", "1", "--total_batch_size", "128"))
    assert "batch_size auto: 4 sequences per micro-step on CPU" in log_of(tmp_path, "cpu")  # 16, capped by the step
    proc = launch(args(tmp_path, shard_dir, "none", "--max_steps", "1"), nproc=None,
                  extra_env={OOM_ABOVE: str(LOGITS_BYTES // 2)})
    out = finish(proc, 120)
    assert proc.returncode == 2, out[-2000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: the model does not fit on cpu even one sequence at a time") and "--preset" in last


def test_fp8_says_at_start_when_it_is_expected_to_be_slower_from_what_was_measured():
    fp8 = pytest.importorskip("fp8")
    hopper = fp8.outlook((9, 0), 768, "tensorwise")
    assert hopper.startswith("--fp8 is expected to be SLOWER than bf16 here") and "0.89x at n_embd 768" in hopper
    assert "0.93x at n_embd 1600" in fp8.outlook((9, 0), 1600, "tensorwise")
    # wider than anything measured, another recipe, another GPU: said to be unmeasured, never guessed
    for capability, width, recipe in (((9, 0), 2048, "tensorwise"), ((9, 0), 768, "rowwise"), ((8, 9), 768,
                                                                                               "tensorwise")):
        assert "was not measured on a GPU of compute capability" in fp8.outlook(capability, width, recipe)
    assert "MXFP8" in fp8.outlook((10, 0), 768, "tensorwise")


def test_without_a_c_compiler_the_default_runs_uncompiled_and_says_why(monkeypatch, caplog):
    """torch.compile's GPU kernels (Triton) need a C compiler: on a machine without one the default (auto) does not
    crash the first step, it trains uncompiled and says so; an explicit --compile is left to fail as asked."""
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(T.shutil, "which", lambda name: None)
    monkeypatch.setattr(T.torch, "compile", lambda m: ("compiled", m))
    with caplog.at_level("WARNING", logger="train"):
        assert T.compile_if_wanted(model, T.TrainConfig(), CUDA) is model
    assert "not compiling the model: torch.compile's GPU kernels (Triton) need a C compiler" in caplog.text
    assert T.compile_if_wanted(model, T.TrainConfig(compile=True), CUDA) == ("compiled", model)
    monkeypatch.setattr(T.shutil, "which", lambda name: "/usr/bin/" + name)
    assert T.compile_if_wanted(model, T.TrainConfig(), CUDA) == ("compiled", model)
