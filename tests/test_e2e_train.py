"""The trainer as users run it: real torchrun processes, real files, one-line errors."""

import json

import pytest
import torch

import train_improved as T
from helpers import EXACT_SAVES, TINY_ARGS, read_metrics, run


def args_for(tmp_path, shard_dir, *extra):
    return [*TINY_ARGS, "--data_dir", str(shard_dir), "--total_batch_size", "256", "--checkpoint_dir",
            str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs"), *extra]


def test_two_process_torchrun_run_trains_logs_and_checkpoints(tmp_path, shard_dir):
    result = run(args_for(tmp_path, shard_dir, "--max_steps", "12", "--eval_freq", "6", "--checkpoint_freq", "5",
                          "--learning_rate", "1e-2", *EXACT_SAVES))
    assert result.returncode == 0, result.stdout[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 13))
    for x in steps:
        assert {"step", "epoch", "loss", "lr", "tokens", "time", "grad_norm"} <= set(x)
        assert x["tokens"] == x["step"] * 256
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.01  # it learns (slowly: 50k distinct tokens, 12 steps)
    assert [x["step"] for x in lines if "val_loss" in x] == [6, 12]
    log_text = (tmp_path / "logs" / "train.log").read_text()
    assert log_text.count("| loss ") == 12 and "eta" in log_text
    assert "step      12/12 | epoch 0.286 | loss " in result.stdout  # the fixed, greppable step line
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    # (the step-6 best_model.pt, a file of its own, was retired when step 12 became best: the next save's spare)
    assert names == [".lock", ".tmp-spare.pt", "best_model.pt", "latest.pt", "latest_backup.pt", "rolling_step_000005.pt",
                     "rolling_step_000006.pt", "rolling_step_000010.pt", "rolling_step_000012.pt"]


def test_main_runs_in_process_and_returns_a_summary(tmp_path, shard_dir):
    summary = T.main(args_for(tmp_path, shard_dir, "--max_steps", "3", "--total_batch_size", "128",
                              "--eval_freq", "3"))
    assert summary["step"] == 3 and summary["stopped"] is False and summary["val_loss"] > 0
    assert torch.load(tmp_path / "ck" / "latest.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("extra,message", [
    (["--data_dir", "/nonexistent"], "does not exist; run src/prepare_data.py first"),
    (["--total_batch_size", "300"], "must be a multiple of the block size"),
    (["--total_batch_size", "96"], "does not divide into micro-batches"),
    (["--block_size", "8192", "--batch_size", "1", "--total_batch_size", "8192"], "fewer than one window"),
    (["--preset", "gpt5"], "unknown --preset 'gpt5'; choose one of tiny, gpt2"),
    (["--resume", "latest"], "no checkpoint in"),
    (["--resume", "/nonexistent/ck.pt"], "does not exist"),
    (["--checkpoint_dir", "/dev/null/ck"], "is not writable"),
])
def test_bad_input_is_a_one_line_error(tmp_path, shard_dir, extra, message):
    result = run(args_for(tmp_path, shard_dir, "--max_steps", "2", *extra), nproc=None)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines()[-1].startswith("error: ")
    assert message in result.stdout and "Traceback" not in result.stdout


def test_empty_data_dir_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run([*TINY_ARGS, "--data_dir", str(tmp_path / "empty"), "--checkpoint_dir", str(tmp_path / "ck"),
                  "--log_dir", str(tmp_path / "logs")], nproc=None)
    assert result.returncode == 2 and "no training shards" in result.stdout and "Traceback" not in result.stdout
