"""Several machines, simulated on this one: two torchrun launchers joined by c10d rendezvous on 127.0.0.1."""

import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import train_improved as T
from helpers import ROOT, TRAINER, alive, kill_9_everything, last_step, saved_on_stop, start, wait_for, workers
from test_e2e_resume import STEPS, assert_same_run, data, reference, resume, run_args  # noqa: F401 (fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_node(args, port, node_rank, cwd=ROOT):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=multinode-test",
           f"--node_rank={node_rank}", str(TRAINER), *args]
    return start(cmd, cwd=cwd)


def test_two_nodes_train_stop_on_one_signal_and_resume_on_two_nodes_or_one_bit_exact(tmp_path, data, reference):
    port = free_port()
    nodes = [launch_node(run_args(tmp_path, data), port, rank) for rank in (0, 1)]
    try:
        wait_for(lambda: last_step(tmp_path / "logs") >= 12, timeout=180, proc=nodes[0])
        node0_worker = workers(nodes[0])
        os.kill(nodes[1].pid, signal.SIGTERM)  # the scheduler signals one machine only
        out1 = nodes[1].communicate(timeout=120)[0]
        # node 0's worker learns of the stop through the per-step all-reduce, saves (global rank 0 writes) and
        # exits by itself. Its torchrun then waits up to 300 s in its exit barrier for the signalled agent, which
        # left through its signal handler: that launcher's work is done, so end it.
        wait_for(lambda: not any(alive(pid) for pid in node0_worker), timeout=120)
        kill_9_everything(nodes[0])
        out0 = nodes[0].communicate(timeout=60)[0]
    finally:
        for n in nodes:
            if n.poll() is None:
                kill_9_everything(n)
    assert "world size 2" in out0 and "SIGTERM received" not in out0  # node 0 was never signalled itself
    assert "exitcode" not in out1, out1[-3000:]  # node 1's worker exited 0 after its signal
    stopped = last_step(tmp_path / "logs")
    assert saved_on_stop(out0, stopped)  # global rank 0 wrote it, at the agreed step
    info = "\n".join(line for line in out0.splitlines() if "INFO" in line)
    assert f"stopped cleanly at step {stopped} of 40, checkpoint saved. Resume with:\n  torchrun --nnodes=2" in out0, \
        info[-1500:]
    assert stopped < 40
    # the same stopped run, continued twice: on two machines again, and on one machine with two processes
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "ck", again / "ck")
    shutil.copytree(tmp_path / "logs", again / "logs")
    port = free_port()
    nodes = [launch_node(run_args(again, data, "--resume", "latest"), port, rank) for rank in (0, 1)]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs[0][-3000:]
    assert f"resumed from {again / 'ck' / 'latest.pt'}: step {stopped}," in outs[0]
    assert_same_run(again, reference)
    resume(tmp_path, data)  # one machine, two processes: same world size, so still bit-exact
    assert_same_run(tmp_path, reference)


def test_nodes_without_shared_storage_each_fetch_the_checkpoint_from_the_mirror_and_resume_bit_exact(tmp_path, data,
                                                                                                   reference):
    """Two machines with local disks only: the same command line (relative --checkpoint_dir) in a different folder
    each. Node 0 holds the run's newest checkpoint before its end (the reference run, rewound there) and so does the
    mirror; node 1's disk is empty. Node 1 fetches that checkpoint from the mirror and the run continues exactly."""
    from mirror import Mirror
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    shutil.copytree(reference / "logs", node0 / "logs")
    ck = node0 / "ck"
    ck.mkdir()
    saved, here = T.CheckpointManager(reference / "ck"), T.CheckpointManager(ck)
    # which steps were saved was up to the save policy: the two newest before the end
    older, step = [s for s, _ in saved.rolling() if s < STEPS][-2:]
    for s in (older, step):
        shutil.copyfile(saved.rolling_path(s), here.rolling_path(s))
    os.link(here.rolling_path(step), ck / "latest.pt")
    mirror_url = str(tmp_path / "mirror")
    mirror = Mirror(mirror_url, kinds=T.CheckpointManager.kinds)
    mirror.check()
    for s in (older, step):
        mirror.submit(here.rolling_path(s), s, [here.rolling_path(s).name])
        assert mirror.wait(30)
    mirror.close()
    node1.mkdir()
    args = run_args(Path("."), data, "--resume", "latest", "--mirror", mirror_url)
    port = free_port()
    nodes = [launch_node(args, port, rank, cwd=where) for rank, where in enumerate((node0, node1))]
    outs = [n.communicate(timeout=240)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs[0][-3000:] + outs[1][-3000:]
    assert f"rank(s) 1 cannot see ck/latest.pt (step {step}) (no storage every node shares): their node(s) fetch " \
           "it from the mirror" in outs[0]
    assert f"every rank holds step {step} now" in outs[0] and f"resumed from ck/latest.pt: step {step}," in outs[0]
    assert_same_run(node0, reference)
    # node 1's disk got exactly the checkpoint its rank needed, and nothing else but the lock its fetch held there
    assert (node1 / "ck" / "latest.pt").read_bytes() == saved.rolling_path(step).read_bytes()
    assert sorted(p.name for p in node1.rglob("*")) == [".lock", "ck", "latest.pt", saved.rolling_path(step).name]
