"""Issue 4: the background writer, the save policy and the disk-space guard."""

import pytest
import torch

import train_improved as T
from helpers import EXACT_SAVES, TINY_ARGS, read_metrics
from test_checkpoint_manager import make_state, with_step


def test_async_snapshot_is_the_state_at_submit_even_if_training_changes_it_after_the_fence(tmp_path, shard_dir):
    state = make_state(shard_dir)
    expected = T.to_cpu_copy(state)
    writer = T.CheckpointWriter(T.CheckpointManager(tmp_path / "ck"), asynchronous=True)
    writer.submit(state)
    writer.fence()  # the training loop calls this right before the optimizer step...
    for tensor in state["model"].values():
        tensor.add_(1.0)  # ...which then changes the weights while the file is still being written
    for s in state["optimizer"]["state"].values():
        s["exp_avg"].mul_(-1)
    writer.wait()
    result = writer.results.get_nowait()
    assert result["error"] is None and result["names"] == ["rolling_step_000001.pt", "latest.pt"]
    saved = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")
    assert all(torch.equal(saved["model"][k], expected["model"][k]) for k in expected["model"])
    assert all(torch.equal(saved["optimizer"]["state"][i]["exp_avg"], expected["optimizer"]["state"][i]["exp_avg"])
               for i in expected["optimizer"]["state"])
    assert saved["model"]["lm_head.weight"].data_ptr() == saved["model"]["transformer.wte.weight"].data_ptr()


def test_host_buffers_are_allocated_once_and_reused(tmp_path, shard_dir):
    state = make_state(shard_dir)
    writer = T.CheckpointWriter(T.CheckpointManager(tmp_path / "ck"), asynchronous=True)
    writer.submit(state)
    writer.wait()
    first = {k: v.data_ptr() for k, v in writer._buffers.items()}
    writer.submit(with_step(state, 2))
    writer.wait()
    assert {k: v.data_ptr() for k, v in writer._buffers.items()} == first
    assert T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"] == 2


def test_sync_and_async_writers_write_the_same_checkpoint(tmp_path, shard_dir):
    state = make_state(shard_dir)
    for mode in (True, False):
        writer = T.CheckpointWriter(T.CheckpointManager(tmp_path / str(mode)), asynchronous=mode)
        writer.submit(state)
        writer.wait()
    a = T.CheckpointManager.load(tmp_path / "True" / "latest.pt")
    b = T.CheckpointManager.load(tmp_path / "False" / "latest.pt")
    assert a.keys() == b.keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for i in a["optimizer"]["state"] for x, y in
               zip(a["optimizer"]["state"][i].values(), b["optimizer"]["state"][i].values()))


def test_a_failing_background_write_is_reported_not_raised(tmp_path, shard_dir, monkeypatch):
    writer = T.CheckpointWriter(T.CheckpointManager(tmp_path / "ck"), asynchronous=True)

    def broken(*a, **k):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(torch, "save", broken)
    writer.submit(make_state(shard_dir))
    writer.wait()
    assert "Input/output error" in writer.results.get_nowait()["error"]


def test_policy_stretches_the_interval_to_stay_within_the_budget(caplog):
    cfg = T.TrainConfig(checkpoint_freq=10, checkpoint_minutes=0, max_checkpoint_overhead=0.02)
    policy = T.SavePolicy(cfg)
    assert policy.periodic_due(10, writer_busy=False) and not policy.periodic_due(11, writer_busy=False)
    # steps take 0.1 s, and 0.2 s while a background write runs; a save blocks 0.04 s outside the steps.
    for _ in range(5):
        policy.observe_step(0.1, writer_was_busy=False)
    policy.observe_step(0.16, writer_was_busy=True)
    policy.saved()
    cost = policy.record(blocked_seconds=0.04, write_seconds=0.5)
    assert cost == pytest.approx(0.1)  # 0.04 blocked + 0.06 of slower steps
    # every 10 steps (1 s) would be 10% overhead; the budget allows 2%: 0.1 s / 0.02 = 5 s = 50 steps
    assert policy.interval_steps == 50
    assert "would exceed the 2.0% overhead budget" in caplog.text and "saving every 50 steps (5.0 s)" in caplog.text
    assert not policy.periodic_due(20, writer_busy=False)
    policy.last_save_time -= 10  # pretend 10 s passed
    assert policy.periodic_due(50, writer_busy=False)
    assert not policy.periodic_due(50, writer_busy=True)  # never two saves in flight
    assert "still being written" in caplog.text


def test_policy_waits_for_a_slow_write_and_saves_by_time():
    cfg = T.TrainConfig(checkpoint_freq=0, checkpoint_minutes=0.5, max_checkpoint_overhead=0.02)
    policy = T.SavePolicy(cfg)
    assert not policy.periodic_due(1, writer_busy=False)
    policy.last_save_time -= 31
    assert policy.periodic_due(2, writer_busy=False)
    policy.saved()
    policy.record(blocked_seconds=0.01, write_seconds=45.0)
    policy.last_save_time -= 31
    assert not policy.periodic_due(3, writer_busy=False)  # the write takes 45 s: 30 s would overlap
    policy.last_save_time -= 15
    assert policy.periodic_due(4, writer_busy=False)


def test_make_room_prunes_the_oldest_unshared_rolling_files_then_refuses(tmp_path, shard_dir, monkeypatch, caplog):
    manager = T.CheckpointManager(tmp_path / "ck", keep_last=10)
    base = make_state(shard_dir)
    for step in range(1, 6):
        manager.save(with_step(base, step), epoch_completed=1 if step == 1 else None)
    size = (tmp_path / "ck" / "latest.pt").stat().st_size
    free = {"bytes": size}  # room for less than one more checkpoint
    monkeypatch.setattr(manager, "free_bytes", lambda: free["bytes"])
    manager.make_room(size)  # rolling 1 is also epoch_00001 (shared): kept; rolling 2 is deleted
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "rolling_step_000002.pt" not in names and "rolling_step_000001.pt" in names
    assert "deleted rolling_step_000002.pt" in caplog.text
    free["bytes"] = 0
    with pytest.raises(T.InsufficientDiskSpace, match="this save is skipped"):
        manager.make_room(size)
    left = sorted(p.name for p in (tmp_path / "ck").iterdir())
    # never latest, latest_backup (rolling 5 and 4), the epoch file, nor the newest rolling file
    for name in ("latest.pt", "latest_backup.pt", "epoch_00001.pt", "rolling_step_000005.pt",
                 "rolling_step_000004.pt"):
        assert name in left
    for p in (tmp_path / "ck").iterdir():
        T.CheckpointManager.load(p)


def test_a_full_disk_skips_saves_but_never_stops_training_or_costs_a_checkpoint(tmp_path, shard_dir, monkeypatch):
    calls = {"n": 0}

    def free_bytes(self):
        calls["n"] += 1
        return 10**12 if calls["n"] <= 2 else 0  # the disk fills up after two saves
    monkeypatch.setattr(T.CheckpointManager, "free_bytes", free_bytes)
    args = [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--max_steps", "12",
            "--checkpoint_freq", "3", "--eval_freq", "0", "--checkpoint_dir", str(tmp_path / "ck"),
            "--log_dir", str(tmp_path / "logs")]
    summary = T.main(args)
    log_text = (tmp_path / "logs" / "train.log").read_text()
    assert summary["step"] == 12
    assert log_text.count("CHECKPOINT SAVE FAILED") == 2  # step 9, and step 12 (periodic and final in one save)
    assert "not enough free space" in log_text
    latest = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")
    assert latest["step"] == 6 and T.CheckpointManager.load(tmp_path / "ck" / "latest_backup.pt")["step"] == 3
    assert sorted(read_metrics(tmp_path / "logs")[0]) == list(range(1, 13))


def test_saves_by_wall_clock_time(tmp_path, shard_dir):
    args = [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128",
            "--max_steps", "30", "--checkpoint_freq", "0", "--checkpoint_minutes", "0.005", "--eval_freq", "0",
            "--checkpoint_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs")]
    T.main(args)
    # 0.3 s apart, in a run of several seconds
    assert (tmp_path / "logs" / "train.log").read_text().count("(periodic)") >= 2
