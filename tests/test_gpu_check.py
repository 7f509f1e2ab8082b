"""benchmarks/gpu_check.sh --smoke: the GPU check's every code path on CPU with a tiny model, so that the script
a GPU machine runs is known to work before one is lent. About a minute on 2 cores."""

import os
import re
import subprocess
import sys

from helpers import ROOT


def test_gpu_check_smoke_runs_every_item_and_the_kill_9_resume_is_bit_exact(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)  # the script would otherwise use the machine's python3
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    table = (tmp_path / "gpu_check_results.md").read_text()
    assert table in result.stdout  # printed at the end, too
    rows = {int(m[1]): (m[2], m[3]) for m in re.finditer(r"^\| (\d)\. [^|]*\| (.*) \| .* \| (\w+) \|$", table, re.M)}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    for number in (1, 2, 3, 5):  # GPU-only: run on CPU where they can, and say so
        result_text, status = rows[number]
        assert status == "skip" and result_text.startswith("skipped (no GPU)"), rows[number]
    assert "error" not in rows[2][0] + rows[3][0]  # the CPU runs behind these rows worked
    result_text, status = rows[4]
    assert status == "pass", result_text
    assert "losses match (60/60 steps bit-equal)" in result_text and "weights match" in result_text
    # the bulky files are gone; each run's metrics stay
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob("runs/*/ck"))
    assert (tmp_path / "runs" / "saving" / "logs" / "metrics.jsonl").exists()
