"""CheckpointManager and the checkpoint's content: names, links, retention, checksums, fallback, kill -9 mid-write."""

import io
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import train_improved as T
from helpers import ROOT, start

CPU = torch.device("cpu")
ENV = T.DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)


def make_state(shard_dir, step=1, **cfg_overrides):
    """A real checkpoint state from a tiny model after one optimizer step."""
    cfg = T.TrainConfig(**{**dict(preset="tiny", n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=2,
                                  total_batch_size=256, data_dir=str(shard_dir)), **cfg_overrides})
    torch.manual_seed(0)
    model = T.GPT(cfg.gpt_config())
    optimizer = T.configure_optimizer(model, cfg, CPU)
    loader = T.ShardedLoader(T.find_shards(str(shard_dir), "train"), 32, 256, 2, 0, 1, 0, CPU)
    T.train_step(model, optimizer, loader, ENV, 1e-3, 1.0, __import__("contextlib").nullcontext)
    loader.advance()
    return T.build_state(T.TrainState(step=step, train_loss=5.0, elapsed_before_seconds=1.0), raw_model=model,
                         optimizer=optimizer, loader=loader, cfg=cfg, rng_states=T.gather_rng_states(ENV),
                         world_size=1)


def with_step(state, step):
    return {**state, "step": step}


def test_checkpoint_holds_everything_in_plain_types_and_loads_with_weights_only(tmp_path, shard_dir):
    state = make_state(shard_dir)
    manager = T.CheckpointManager(tmp_path / "ck")
    manager.save(state)
    loaded = torch.load(tmp_path / "ck" / "latest.pt", weights_only=True)
    for key in ("step epoch model optimizer train_loss val_loss best_val_loss rng_state dataloader_state args "
                "model_config world_size timestamp format_version").split():
        assert key in loaded, key
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in loaded["model"])
    assert set(loaded["rng_state"][0]) == {"python", "numpy", "torch", "cuda", "cuda_scope"}
    # the tied embedding is stored once: the file is about params + 2 Adam moments, not more
    params = sum(v.numel() for k, v in loaded["model"].items() if k != "lm_head.weight") * 4
    assert os.path.getsize(tmp_path / "ck" / "latest.pt") < 3 * params * 1.05
    assert loaded["model"]["lm_head.weight"].data_ptr() == loaded["model"]["transformer.wte.weight"].data_ptr()


def test_rng_state_round_trips():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = T.capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)
    T.restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_kinds_say_what_each_save_is_kept_for_by_its_names():
    """The one definition of what a name is kept for, which the mirror's retention and uploader use too."""
    kinds = T.CheckpointManager.kinds
    assert kinds(["rolling_step_000010.pt", "latest.pt"]) == {"rolling"}
    assert kinds(["rolling_step_000010.pt", "latest.pt", "best_model.pt"]) == {"rolling", "best"}
    assert kinds(["epoch_00002.pt"]) == {"epoch"}
    assert kinds(["best_model.pt"]) == {"best"}
    assert kinds(["epoch_00002.pt", "best_model.pt"]) == {"epoch", "best"}
    assert kinds(["latest.pt"]) == {"rolling"}  # a file with no lasting name counts as rolling
    assert kinds(["epoch_x.pt", "rolling_step_.pt", "epoch_\u00b2.pt"]) == {"rolling"}  # not numbered: not ours
    manager = T.CheckpointManager("ck")
    assert manager.lasting_name(["rolling_step_000010.pt", "latest.pt", "best_model.pt"]).name == "best_model.pt"
    assert manager.lasting_name(["epoch_00002.pt", "best_model.pt"]).name == "epoch_00002.pt"
    assert manager.lasting_name(["rolling_step_000010.pt", "latest.pt"]).name == "rolling_step_000010.pt"


def test_names_links_backup_epoch_best_and_retention(tmp_path, shard_dir):
    manager = T.CheckpointManager(tmp_path / "ck", keep_last=3)
    base = make_state(shard_dir)
    for step in range(1, 8):
        names = manager.save(with_step(base, step), epoch_completed=1 if step == 2 else None, is_best=step == 4)
        assert names[:2] == [f"rolling_step_{step:06d}.pt", "latest.pt"]
    ck = tmp_path / "ck"
    # (step 7 overwrote the file retired with rolling 3; pruning rolling 4 then retired its file as the spare)
    assert sorted(p.name for p in ck.iterdir()) == [".tmp-spare.pt", "best_model.pt", "epoch_00001.pt", "latest.pt",
                                                    "latest_backup.pt", "rolling_step_000005.pt",
                                                    "rolling_step_000006.pt", "rolling_step_000007.pt"]
    step_of = {p.name: T.CheckpointManager.load(p)["step"] for p in ck.iterdir()}
    # the user's best and epoch models have a file of their own: a bad block in the rolling chain cannot take them
    assert (ck / "best_model.pt").stat().st_nlink == 1 and (ck / "epoch_00001.pt").stat().st_nlink == 1
    assert step_of["latest.pt"] == 7 and step_of["latest_backup.pt"] == 6
    assert step_of["epoch_00001.pt"] == 2 and step_of["best_model.pt"] == 4
    # identical contents are written once: names of the same step share one file
    assert os.path.samefile(ck / "latest.pt", ck / "rolling_step_000007.pt")
    assert os.path.samefile(ck / "latest_backup.pt", ck / "rolling_step_000006.pt")


def test_the_next_save_overwrites_the_retired_file_but_never_one_a_checkpoint_name_uses(tmp_path, shard_dir):
    """Retention keeps the file it retires as .tmp-spare.pt, and the next save overwrites that file in place (as
    PostgreSQL recycles WAL segments) instead of allocating a new one."""
    ck = tmp_path / "ck"
    manager = T.CheckpointManager(ck, keep_last=2)
    base = make_state(shard_dir)
    big = {**base, "padding": torch.randn(50_000)}
    for step in (1, 2, 3):
        manager.save(with_step(big, step))
    spare = ck / T.CheckpointManager.SPARE
    retired = spare.stat()
    assert retired.st_nlink == 1  # the pruned rolling_step_000001.pt: no checkpoint name uses it any more
    # 2 MB free: too little for a new file of this checkpoint (~10 MB), enough to overwrite the spare in place
    manager.guard.free_bytes = lambda: 2 << 20
    manager.save(with_step(base, 4))
    del manager.guard.free_bytes
    written = (ck / "rolling_step_000004.pt").stat()
    assert written.st_ino == retired.st_ino  # overwritten in place...
    assert written.st_size < retired.st_size  # ...and cut to the new checkpoint's size
    loaded = T.CheckpointManager.load(ck / "latest.pt")  # every checksum verified
    assert loaded["step"] == 4 and "padding" not in loaded
    assert torch.equal(loaded["model"]["transformer.h.0.mlp.c_fc.weight"], base["model"]["transformer.h.0.mlp.c_fc.weight"])
    # as if killed between naming the spare and removing the retired name: the spare still shares its file with
    # latest_backup.pt (step 3), so the next save must write a new file and leave that one alone
    spare.unlink()
    os.link(ck / "latest_backup.pt", spare)
    step3_inode = spare.stat().st_ino
    manager.save(with_step(base, 5))
    assert (ck / "rolling_step_000005.pt").stat().st_ino != step3_inode
    assert spare.stat().st_ino == step3_inode  # retired now (pruned), so it is the spare for the save after
    assert T.CheckpointManager.load(spare)["step"] == 3  # step 3's file, retired only now, is intact
    for p in manager.all_checkpoints():
        T.CheckpointManager.load(p)
    manager.clean_stale_temporaries()
    assert not spare.exists()


def test_early_writeback_hands_each_chunk_to_the_disk_as_it_is_written(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(T.EarlyWriteback, "sync_file_range", staticmethod(lambda *args: calls.append(args)))
    state = {"w": torch.randn(1_000_000)}  # 4 MB
    with open(tmp_path / "a.pt", "wb") as f:
        torch.save(state, T.EarlyWriteback(f, chunk=1 << 20))
    plain = io.BytesIO()
    torch.save(state, plain)
    assert (tmp_path / "a.pt").read_bytes() == plain.getvalue()  # the bytes are torch.save's own
    assert len(calls) >= 3 and all(flags == T.EarlyWriteback.SYNC_FILE_RANGE_WRITE for *_, flags in calls)
    offsets = [(offset, n) for _, offset, n, _ in calls]
    assert offsets[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(offsets, offsets[1:]))  # in order, no gap
    assert all(n >= 1 << 20 for _, n in offsets)


def test_copies_where_hard_links_fail(tmp_path, shard_dir, monkeypatch):
    def no_links(src, dst):
        raise OSError("links not supported here")
    monkeypatch.setattr(os, "link", no_links)
    manager = T.CheckpointManager(tmp_path / "ck")
    manager.save(make_state(shard_dir), is_best=True)
    assert not os.path.samefile(tmp_path / "ck" / "latest.pt", tmp_path / "ck" / "best_model.pt")
    assert T.CheckpointManager.load(tmp_path / "ck" / "best_model.pt")["step"] == 1


def test_corruption_and_truncation_are_detected(tmp_path, shard_dir):
    manager = T.CheckpointManager(tmp_path / "ck")
    manager.save(make_state(shard_dir))
    path = tmp_path / "ck" / "latest.pt"
    data = bytearray(path.read_bytes())
    T.CheckpointManager.load(path)
    i = data.find(b"data/0") + 200  # inside the first tensor's bytes
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    T.CheckpointManager.load(flipped, verify=False)  # the damage is inside tensor bytes: metadata still loads...
    with pytest.raises(T.CheckpointInvalid, match="checksum mismatch in .*data/0: the file is corrupted"):
        T.CheckpointManager.load(flipped)  # ...and the checksum finds it
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(T.CheckpointInvalid, match="truncated"):
        T.CheckpointManager.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(T.CheckpointInvalid, match="not a checkpoint written by train_improved.py"):
        T.CheckpointManager.load(foreign)


def test_loading_never_runs_code_from_the_file(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "x": Payload()}, evil)
    with pytest.raises(T.CheckpointInvalid, match="unreadable"):
        T.CheckpointManager.load(evil)
    assert not (tmp_path / "pwned").exists()


def test_resolve_falls_back_in_order(tmp_path, shard_dir, caplog):
    manager = T.CheckpointManager(tmp_path / "ck", keep_last=10)
    base = make_state(shard_dir)
    manager.save(with_step(base, 1), epoch_completed=1)
    for step in (2, 3, 4):
        manager.save(with_step(base, step))
    ck = tmp_path / "ck"
    assert T.resolve_checkpoint(manager, "latest") == ck / "latest.pt"
    (ck / "latest.pt").write_bytes(b"garbage")  # in place: rolling_step_000004.pt is the same file, hit too
    assert T.resolve_checkpoint(manager, "latest") == ck / "latest_backup.pt"
    assert "latest.pt is not usable (truncated, or not a checkpoint" in caplog.text
    (ck / "latest_backup.pt").unlink()
    assert T.resolve_checkpoint(manager, "latest") == ck / "rolling_step_000003.pt"
    for p in ck.glob("rolling_*"):  # replaced by cut-off copies (new files: epoch_00001.pt keeps its own)
        (tmp_path / "cut").write_bytes(p.read_bytes()[:-10])
        os.replace(tmp_path / "cut", p)
    assert T.resolve_checkpoint(manager, "auto") == ck / "epoch_00001.pt"
    (ck / "epoch_00001.pt").unlink()
    with pytest.raises(T.UserError, match="no valid checkpoint"):
        T.resolve_checkpoint(manager, "latest")
    assert sorted(p.name for p in ck.iterdir())[:2] == ["latest.pt", "rolling_step_000001.pt"]  # nothing deleted


def test_resolve_errors_for_named_and_missing_checkpoints(tmp_path, shard_dir):
    manager = T.CheckpointManager(tmp_path / "ck")
    assert T.resolve_checkpoint(manager, "auto") is None
    with pytest.raises(T.UserError, match="no checkpoint in"):
        T.resolve_checkpoint(manager, "latest")
    with pytest.raises(T.UserError, match="does not exist"):
        T.resolve_checkpoint(manager, str(tmp_path / "nope.pt"))
    with pytest.raises(T.UserError, match="does not exist"):
        T.resolve_checkpoint(manager, "best")
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello")
    with pytest.raises(T.UserError, match="is not usable"):
        T.resolve_checkpoint(manager, str(not_ckpt))


def test_a_failed_save_leaves_the_previous_checkpoints_intact(tmp_path, shard_dir, monkeypatch):
    manager = T.CheckpointManager(tmp_path / "ck")
    base = make_state(shard_dir)
    manager.save(with_step(base, 1))
    manager.save(with_step(base, 2))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        manager.save(with_step(base, 3))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "latest.pt", "latest_backup.pt", "rolling_step_000001.pt", "rolling_step_000002.pt"]
    assert T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"] == 2


WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import train_improved as T
manager = T.CheckpointManager(sys.argv[2], keep_last=3)
big = {"w": torch.randn(4_000_000)}
step = 0
while True:
    step += 1
    manager.save(dict(format_version=1, step=step, model=big, epoch=0, train_loss=0.0, val_loss=None))
    print(step, flush=True)
"""


def test_kill_9_at_any_instant_of_writing_leaves_a_valid_recent_checkpoint(tmp_path):
    """A real writer process saving 16 MB checkpoints in a loop is SIGKILLed at many different instants."""
    ck = tmp_path / "ck"
    rng = random.Random(0)
    for trial in range(8):
        proc = start([sys.executable, "-c", WRITER, str(ROOT / "src"), str(ck)], stderr=subprocess.DEVNULL)
        completed = [int(proc.stdout.readline())]  # at least one save finished
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        completed += [int(line) for line in proc.stdout.read().split()]
        proc.wait()
        manager = T.CheckpointManager(ck)
        resumed = T.resolve_checkpoint(manager, "latest")
        assert resumed == ck / "latest.pt"  # latest is always complete, even mid-write
        step = T.CheckpointManager.load(resumed)["step"]
        assert step >= completed[-1]  # nothing acknowledged as saved is lost
        for p in manager.all_checkpoints():
            T.CheckpointManager.load(p)  # every name is a complete, valid file
        manager.clean_stale_temporaries()
        assert not list(ck.glob(".tmp-*"))
        manager.dir.rename(tmp_path / f"done{trial}")


def test_optimizer_settings_changed_on_resume_are_what_the_resumed_steps_use(tmp_path, shard_dir):
    """resolve_config warns "the new values apply" for a changed --weight_decay or --learning_rate: after the saved
    optimizer state is loaded (which brings the saved group settings back), the resumed step must really use them."""
    saved = make_state(shard_dir)  # weight_decay 0.1, learning_rate 6e-4
    manager = T.CheckpointManager(tmp_path / "ck")
    manager.save(saved)
    point = T.ResumePoint.read(tmp_path / "ck" / "latest.pt")

    def one_resumed_step(**flags):
        cfg = T.resolve_config({"resume": "latest", **flags}, point)
        model = T.GPT(T.GPTConfig(**point.model_config))
        optimizer = T.configure_optimizer(model, cfg, CPU)
        loader = T.ShardedLoader(T.find_shards(str(shard_dir), "train"), 32, 256, 2, 0, 1, 0, CPU)
        state = T.restore_state(T.CheckpointManager.load(point.path), raw_model=model, optimizer=optimizer,
                                loader=loader, cfg=cfg, env=ENV)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        lr = T.lr_at(state.step, cfg, total_steps=100)
        T.train_step(model, optimizer, loader, ENV, lr, cfg.grad_clip, __import__("contextlib").nullcontext)
        groups = [(g["lr"], g["weight_decay"], g["betas"]) for g in optimizer.param_groups]
        return cfg, before, dict(model.named_parameters()), groups, lr

    cfg_same, before, same, groups_same, lr_same = one_resumed_step()
    cfg_new, _, changed, groups_new, lr_new = one_resumed_step(weight_decay=0.0, learning_rate=3e-3, min_lr=3e-4)
    assert (cfg_same.weight_decay, cfg_new.weight_decay) == (0.1, 0.0)
    assert groups_same == [(lr_same, 0.1, (0.9, 0.95)), (lr_same, 0.0, (0.9, 0.95))]
    assert groups_new == [(lr_new, 0.0, (0.9, 0.95)), (lr_new, 0.0, (0.9, 0.95))]  # the new values, not the saved
    assert lr_new == T.lr_at(1, cfg_new, 100) != lr_same  # the new learning rate's schedule at the resumed step
    # AdamW decays a 2-D weight by lr * weight_decay * w before its Adam update: with the new weight decay (0) the
    # step must differ from the same step without decay only by the Adam update's learning rate, never by a decay
    name = "transformer.h.0.mlp.c_fc.weight"
    adam_same = same[name].detach() - before[name] * (1 - lr_same * 0.1)
    adam_new = changed[name].detach() - before[name]
    assert torch.allclose(adam_new, adam_same * (lr_new / lr_same), rtol=1e-3, atol=1e-8)


def test_a_best_copy_that_does_not_fit_still_counts_the_save_and_says_so(tmp_path, shard_dir, caplog):
    """Room for the checkpoint, none for its best_model.pt copy: the save is done (rolling and latest written, no
    error reported), and the missing copy is said."""
    manager = T.CheckpointManager(tmp_path / "ck")
    room = iter([1 << 40])  # the first question (the checkpoint itself) finds room; every later one none
    manager.guard.free_bytes = lambda: next(room, 0)
    writer = T.CheckpointWriter(manager, asynchronous=False)
    writer.submit(with_step(make_state(shard_dir), 4), is_best=True)
    result = writer.results.get_nowait()
    assert result["error"] is None and result["names"] == ["rolling_step_000004.pt", "latest.pt"]
    assert not (tmp_path / "ck" / "best_model.pt").exists()
    assert T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"] == 4
    assert "best_model.pt NOT WRITTEN at step 4: not enough free space" in caplog.text
    assert "latest.pt holds this step" in caplog.text


def nfs_like_flock(real_flock):
    """Linux's flock on an NFS mount: a POSIX lock on the whole file, which needs a descriptor open for writing."""
    import fcntl

    def flock(fd, operation):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(9, "Bad file descriptor")
        return real_flock(fd, operation)
    return flock


def test_the_folder_lock_works_where_flock_needs_a_writable_descriptor(tmp_path, monkeypatch):
    import fcntl
    monkeypatch.setattr(fcntl, "flock", nfs_like_flock(fcntl.flock))
    lock = T.FolderLock(tmp_path / "ck")
    lock.acquire()  # on NFS, a descriptor open read-only would fail here with EBADF
    assert f"pid {os.getpid()}, started " in (tmp_path / "ck" / ".lock").read_text()
    second = T.FolderLock(tmp_path / "ck", stale_wait_seconds=60)
    started = time.monotonic()
    with pytest.raises(T.FolderInUse, match="in use by another run"):
        second.acquire()  # the holder is this live process: refused at once, no waiting
    assert time.monotonic() - started < 5
    lock.release()


def test_a_file_system_without_locks_is_a_clear_error_that_leaves_nothing_behind(tmp_path, monkeypatch):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")  # ENOLCK: an NFS mount with nolock and no lock daemon
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(T.UserError, match=r"cannot lock .*\.lock \(No locks available\): the file system refuses "
                                          r"file locks \(an NFS mount with nolock"):
        T.FolderLock(tmp_path / "new" / "ck").acquire()
    assert not (tmp_path / "new").exists()


def test_a_lock_kept_for_a_dead_holder_is_waited_for_with_a_bound(tmp_path, monkeypatch, caplog):
    """After a crash, an NFS server keeps the dead client's lock for its grace period: a restart waits for it (the
    holder named in the file is no live process here), up to stale_wait_seconds, then refuses."""
    import fcntl
    import socket
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no process has any more
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".lock").write_text(f"host {socket.gethostname()}, pid {dead.pid}, started 2026-12-01 03:00:00\n")
    refusals = iter(range(3))  # the server lets go after three more tries

    def server_keeps_the_lock(fd, operation):
        if next(refusals, None) is not None:
            raise BlockingIOError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(fcntl, "flock", server_keeps_the_lock)
    lock = T.FolderLock(tmp_path / "ck", stale_wait_seconds=30, poll_seconds=0.01)
    lock.acquire()
    assert "which is not a live process on this machine: waiting up to 30 s" in caplog.text
    assert f"pid {os.getpid()}" in (tmp_path / "ck" / ".lock").read_text()
    lock.release()
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(BlockingIOError(11, "busy")))
    (tmp_path / "ck" / ".lock").write_text("host elsewhere, pid 1, started 2026-12-01 03:00:00\n")
    with pytest.raises(T.FolderInUse, match=r"\(host elsewhere, pid 1, .*\) \(still held after waiting 0 s\)"):
        T.FolderLock(tmp_path / "ck", stale_wait_seconds=0.2, poll_seconds=0.01).acquire()
