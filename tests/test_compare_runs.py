"""src/compare_runs.py: the verdict's numbers on synthetic metrics.jsonl files with known answers and on two real
trainer runs, the PNG, and one-line errors (exit 2) for bad inputs."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

import compare_runs  # noqa: E402
from helpers import ROOT, launch  # noqa: E402


def write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def train_record(step: int, tokens_per_step: int, loss: float, rate: float) -> dict:
    return dict(step=step, epoch=0.1 * step, loss=loss, lr=1e-3, grad_norm=1.0, tokens=step * tokens_per_step,
                time=0.5 * step, step_ms=10.0, tokens_per_second=rate)


@pytest.fixture
def synthetic_runs(tmp_path):
    """Three runs whose verdict is known by hand.

    base:      100 tokens/step, steps 1-10, tokens/s 100, 200, ..., 1000 (median 550); val at steps 2, 4, 6, 8, 9, 10.
               It was resumed after a crash: steps 5-6 and the evaluation at step 6 appear twice, the first time
               with values that must be ignored; checkpoint, restart and sample records carry no loss.
    candidate: 100 tokens/step, steps 1-10, tokens/s 800 (one 10: median 800); val at steps 2, 4, 6, 8, 10.
               Both cover 1,000 tokens; the last 20% is 800-1,000 tokens: evaluations at 800 and 1,000 in both
               (900 only in base). Gaps there: 3.5 - 3.25 = +0.25 and 3.5 - 3.0 = +0.5, mean +0.375.
    big_batch: 200 tokens/step, steps 1-5, tokens/s 1000 ... 1800 (median 1400); val at steps 2, 4, 5 = 400, 800,
               1,000 tokens, compared with base at the same tokens: 3.0 - 3.25 = -0.25 at 800, 3.0 - 3.0 = 0.0 at
               1,000 (the last), mean -0.125."""
    base_val = {2: 4.0, 4: 3.75, 6: 3.5, 8: 3.25, 9: 3.125, 10: 3.0}
    base = [train_record(s, 100, 5.0 - 0.25 * s, 100.0 * s) for s in range(1, 7)]
    base += [dict(step=s, val_loss=base_val[s]) for s in (2, 4)]
    base += [dict(step=6, val_loss=99.0), dict(step=4, checkpoint_blocked_seconds=0.01, checkpoint_cost_seconds=0.01)]
    base += [dict(step=4, restart=1, lost_steps=2), dict(step=4, sample="def f():")]
    base += [train_record(s, 100, 5.0 - 0.25 * s, 100.0 * s) for s in range(5, 11)]  # the resumed run
    base += [dict(step=s, val_loss=base_val[s]) for s in (6, 8, 9, 10)]
    candidate_val = {2: 4.0, 4: 3.875, 6: 3.75, 8: 3.5, 10: 3.5}
    candidate = [train_record(s, 100, 5.0 - 0.2 * s, 10.0 if s == 1 else 800.0) for s in range(1, 11)]
    candidate += [dict(step=s, val_loss=v) for s, v in candidate_val.items()]
    big_val = {2: 3.75, 4: 3.0, 5: 3.0}
    big = [train_record(s, 200, 5.0 - 0.4 * s, 800.0 + 200 * s) for s in range(1, 6)]
    big += [dict(step=s, val_loss=v) for s, v in big_val.items()]
    return [write_run(tmp_path / "base", base), write_run(tmp_path / "candidate", candidate),
            write_run(tmp_path / "big_batch", big)]


def test_verdict_numbers_are_the_hand_computed_ones(synthetic_runs, tmp_path, capsys):
    out = tmp_path / "compare.png"
    result = compare_runs.main([*map(str, synthetic_runs), "--out", str(out), "--smooth", "3"])
    assert result["reference"] == "base"
    assert result["median_tokens_per_second"] == {"base": 550.0, "candidate": 800.0, "big_batch": 1400.0}
    candidate, big = result["gaps"]["candidate"], result["gaps"]["big_batch"]
    assert (candidate["last_step"], candidate["last_tokens"], candidate["last_gap"]) == (10, 1000, 0.5)
    assert (candidate["mean_gap"], candidate["mean_gap_evals"], candidate["window_tokens"]) == (0.375, 2, (800, 1000))
    assert (big["last_step"], big["last_tokens"], big["last_gap"]) == (10, 1000, 0.0)
    assert (big["mean_gap"], big["mean_gap_evals"]) == (-0.125, 2)

    printed = capsys.readouterr().out
    assert "base: 10 steps, 1,000 tokens, median 550 tokens/s (reference)" in printed
    assert "candidate: 10 steps, 1,000 tokens, median 800 tokens/s (1.45x base)" in printed
    assert "val loss at step 10 (1,000 tokens): 3.5000 vs 3.0000, gap +0.5000 (candidate - base): candidate is " \
           "0.5000 above (worse than) base" in printed
    assert "big_batch is 0.1250 below (better than) base" in printed  # its mean gap, -0.125
    assert "(800-1,000 tokens, 2 evaluation(s)): +0.3750" in printed

    from PIL import Image
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (1200, 450)


def test_smoothing_is_a_trailing_moving_average():
    assert compare_runs.smoothed([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert compare_runs.smoothed([1.0, 2.0, 3.0], 1) == [1.0, 2.0, 3.0]


def test_runs_without_a_common_evaluation(tmp_path, capsys):
    a = write_run(tmp_path / "a", [train_record(1, 10, 4.0, 5.0), dict(step=1, val_loss=4.5)])
    b = write_run(tmp_path / "b", [train_record(1, 10, 4.0, 5.0), train_record(2, 10, 3.9, 7.0)])
    result = compare_runs.main([str(a), str(b), "--out", str(tmp_path / "p.png")])
    assert result["gaps"]["b"]["last_gap"] is None and result["gaps"]["b"]["mean_gap"] is None
    assert result["median_tokens_per_second"] == {"a": 5.0, "b": 6.0}
    assert "no evaluation at the same tokens as a" in capsys.readouterr().out


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    good = write_run(tmp_path / "good", [train_record(1, 10, 4.0, 5.0)])
    no_metrics = tmp_path / "empty"
    no_metrics.mkdir()
    no_training = write_run(tmp_path / "evals_only", [dict(step=5, val_loss=4.0),
                                                      dict(step=5, checkpoint_cost_seconds=1.0)])
    return [([str(good), str(tmp_path / "missing")], "is not a folder"),
            ([str(good), str(no_metrics)], "has no metrics.jsonl"),
            ([str(no_training), str(good)], "has no training records"),
            ([str(good), "--smooth", "0"], "--smooth must be 1 or more")]


def test_bad_inputs_are_one_line_errors_with_exit_2(tmp_path, capsys):
    for argv, message in bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as e:
            compare_runs.main([*argv, "--out", str(tmp_path / "never.png")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "never.png").exists()


def test_command_line_exit_code(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "src" / "compare_runs.py"), str(tmp_path / "nowhere")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere'} is not a folder; pass the log folders "
                                               "(the trainer's --log_dir) of the runs"]


def test_two_real_trainer_runs(shard_dir, tmp_path):
    """Two short runs of the trainer (different learning rates), then the verdict from their metrics.jsonl."""
    base = ["--preset", "tiny", "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32",
            "--batch_size", "2", "--total_batch_size", "128", "--max_steps", "20", "--eval_freq", "5",
            "--val_steps", "2", "--sample_freq", "0", "--data_dir", str(shard_dir)]
    runs = {"slow_lr": [], "fast_lr": ["--learning_rate", "3e-3", "--warmup_steps", "3"]}
    procs = {name: launch([*base, *extra, "--checkpoint_dir", str(tmp_path / name / "ck"),
                           "--log_dir", str(tmp_path / name / "logs")], nproc=None) for name, extra in runs.items()}
    for name, proc in procs.items():  # both at once: two cores
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-3000:]
    a, b = (tmp_path / name / "logs" for name in runs)
    result = compare_runs.main([str(a), str(b), "--out", str(tmp_path / "compare.png")])

    def read(folder):
        train, val = {}, {}
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "val_loss" in record:
                val[record["step"]] = record["val_loss"]
            elif "loss" in record:
                train[record["step"]] = record
        return train, val

    (train_a, val_a), (train_b, val_b) = read(a), read(b)
    assert sorted(val_a) == sorted(val_b) == [5, 10, 15, 20]
    assert train_a[20]["tokens"] == 20 * 128
    names = [str(a), str(b)]  # both folders are called "logs": the runs are named by their paths
    gap = result["gaps"][names[1]]
    assert (gap["last_step"], gap["last_tokens"], gap["last_gap"]) == (20, 2560, val_b[20] - val_a[20])
    assert gap["window_tokens"] == (2048, 2560) and gap["mean_gap_evals"] == 1  # only step 20 (2,560 tokens)
    assert gap["mean_gap"] == val_b[20] - val_a[20]
    assert result["median_tokens_per_second"] == {
        names[0]: statistics.median(r["tokens_per_second"] for r in train_a.values()),
        names[1]: statistics.median(r["tokens_per_second"] for r in train_b.values())}
    assert val_b[20] != val_a[20]  # the runs differ, so the gap is a real number
