"""benchmarks/gpu_check.sh --smoke: the GPU check's every code path on CPU with a tiny model, so that the script
a GPU machine runs is known to work before one is lent. About a minute on 2 cores. Item 6 (FP8) runs nothing on
CPU; its GPU-only machinery (compile side by side, pause, measure one at a time) is tested with a stand-in trainer."""

import os
import re
import sys
import time

from helpers import ROOT, finish, start

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402  (only the standard library at import)


def test_gpu_check_smoke_runs_every_item_and_the_kill_9_resume_is_bit_exact(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)  # the script would otherwise use the machine's python3
    proc = start(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)], env=env)
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-4000:]
    table = (tmp_path / "gpu_check_results.md").read_text()
    assert table in out  # printed at the end, too
    rows = {int(m[1]): (m[2], m[3]) for m in re.finditer(r"^\| (\d)\. [^|]*\| (.*) \| .* \| (\w+) \|$", table, re.M)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for number in (1, 2, 3, 5, 6):  # GPU-only: run on CPU where they can, and say so
        result_text, status = rows[number]
        assert status == "skip" and result_text.startswith("skipped (no GPU)"), rows[number]
    assert "error" not in rows[2][0] + rows[3][0]  # the CPU runs behind these rows worked
    assert "no GPU" in rows[6][0] and "accepts the item's 5 command lines" in rows[6][0]
    assert not (tmp_path / "runs" / "fp8_gpt2").exists()  # item 6 started nothing
    result_text, status = rows[4]
    assert status == "pass", result_text
    assert "losses match (60/60 steps bit-equal)" in result_text and "weights match" in result_text
    # the bulky files are gone; each run's metrics stay
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob("runs/*/ck"))
    assert (tmp_path / "runs" / "saving" / "logs" / "metrics.jsonl").exists()


# Writes one metrics.jsonl step record every 20 ms, the first one late (as if compiling), and never ends by itself.
STAND_IN_TRAINER = """
import json, sys, time
log_dir = sys.argv[sys.argv.index("--log_dir") + 1]
with open(log_dir + "/metrics.jsonl", "a", buffering=1) as f:
    step = 0
    while True:
        time.sleep(0.3 if step == 0 else 0.02)
        step += 1
        f.write(json.dumps(dict(step=step, loss=1.0, tokens=step, time=time.time(), step_ms=20.0,
                                tokens_per_second=1000.0 + step)) + "\\n")
"""


def test_runs_compile_side_by_side_pause_and_are_measured_one_at_a_time(tmp_path):
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN_TRAINER)
    runs = [gpu_check.TrainerRun(tmp_path, name, dict(os.environ), program=stand_in) for name in ("a", "b")]
    for run in runs:
        run.logs.mkdir(parents=True)
        run.start(run.dir_flags())
    pause = gpu_check.PauseWhenCompiled(runs, step=2)
    try:
        assert pause.wait(time.monotonic() + 30) == {}
        paused_at = [run.last_step() for run in runs]
        assert all(step >= 2 for step in paused_at)
        time.sleep(0.3)
        assert [run.last_step() for run in runs] == paused_at  # paused: no step since
        steps = gpu_check.measure_alone(runs[0], 5, time.monotonic() + 30)
        first = paused_at[0] + gpu_check.FP8_SKIPPED_AFTER_RESUME + 1
        assert [r["step"] for r in steps] == list(range(first, first + 5))
        assert runs[0].proc.poll() is not None  # killed once measured
        assert runs[1].proc.poll() is None and runs[1].last_step() == paused_at[1]  # still paused, untouched
    finally:
        pause.close()
        for run in runs:
            run.kill()


def test_gpu_check_only_runs_the_items_asked_for_and_those_they_need(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = start(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--only", "5", "--out",
                  str(tmp_path)], env=env)
    out = finish(proc, 180)
    assert proc.returncode == 0, out[-4000:]
    table = (tmp_path / "gpu_check_results.md").read_text()
    rows = sorted(int(m[1]) for m in re.finditer(r"^\| (\d)\. ", table, re.M))
    assert rows == [2, 5] and "(items 2, 5 only)" in table  # item 5 reads item 2's memory curves
    assert not (tmp_path / "runs" / "saving").exists()  # item 3 did not run
