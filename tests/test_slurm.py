"""slurm/train.sbatch without SLURM: stub scontrol/srun, real bash, real torchrun, real signals."""

import os
import shutil
import signal
import subprocess

from helpers import ROOT, frozen, last_step, saved_on_stop, start, trainer_env, wait_for
from test_e2e_resume import assert_same_run, data, reference, run_args  # noqa: F401 (fixtures)
from test_multinode import free_port

SCRIPT = ROOT / "slurm" / "train.sbatch"


def make_stubs(bin_dir, requeue_log):
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1" = show ]; then echo 127.0.0.1; else echo "$@" >> {requeue_log}; fi\n')
    (bin_dir / "srun").write_text(  # drop srun's own options, run the task in place
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)


def allocation(tmp_path, data):
    env = dict(trainer_env(), PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="4242", NGPU="2", RDZV_PORT=str(free_port()),
               MIRROR=str(tmp_path / "mirror"))
    return start(["bash", str(SCRIPT), *run_args(tmp_path, data)], env=env)


def test_sbatch_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_time_limit_signal_saves_requeues_and_the_next_allocation_continues_bit_exact(tmp_path, data, reference):
    make_stubs(tmp_path / "bin", tmp_path / "requeue.log")
    first = allocation(tmp_path, data)
    wait_for(lambda: last_step(tmp_path / "logs") >= 12, timeout=120, proc=first)
    with frozen(first):  # the signal lands well before the run's end, however fast the machine
        os.kill(first.pid, signal.SIGUSR1)  # what --signal=B:USR1@300 does: signal the batch script
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out[-3000:]
    stopped = last_step(tmp_path / "logs")
    assert "SIGUSR1 received" in out, "\n".join(l for l in out.splitlines() if "INFO step" not in l)[-2500:]
    assert saved_on_stop(out, stopped)
    assert "requeueing job 4242" in out and (tmp_path / "requeue.log").read_text() == "requeue 4242\n"
    assert f"mirror: the last checkpoint (step {stopped}) is on {tmp_path / 'mirror'}" in out
    # the requeued job lands on another node, without the local folder: same command, it continues from the mirror
    shutil.rmtree(tmp_path / "ck")
    second = allocation(tmp_path, data)
    out, _ = second.communicate(timeout=240)
    assert second.returncode == 0, out[-3000:]
    assert f"resuming from the MIRROR's step {stopped}" in out
    assert f"resumed from {tmp_path / 'ck' / 'latest.pt'}: step {stopped}," in out
    assert_same_run(tmp_path, reference)
