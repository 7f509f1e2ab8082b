"""The shard readers and the ShardedLoader: formats, errors, rank independence, state, rollover, epochs."""

import numpy as np
import pytest
import torch

import train_improved as T
from helpers import write_bin_shard, write_npy_shard

CPU = torch.device("cpu")


def make_loader(shard_dir, world_size=1, rank=0, batch_size=2, total_batch_size=256, block_size=32, seed=7):
    return T.ShardedLoader(T.find_shards(str(shard_dir), "train"), block_size, total_batch_size, batch_size,
                           rank, world_size, seed, CPU)


def test_both_shard_formats_read_the_same_tokens(tmp_path):
    a = write_bin_shard(tmp_path / "a_train.bin", start=5, count=1000)
    b = write_npy_shard(tmp_path / "b_train.npy", start=5, count=1000)
    assert np.array_equal(T.load_shard(tmp_path / "a_train.bin"), a)
    assert np.array_equal(T.load_shard(tmp_path / "b_train.npy"), b)
    assert isinstance(T.load_shard(tmp_path / "a_train.bin"), np.memmap)  # mapped, not read whole
    assert T.load_shard(tmp_path / "b_train.npy").base is not None or isinstance(
        T.load_shard(tmp_path / "b_train.npy"), np.memmap)


def test_bad_shards_get_errors_that_say_what_to_do(tmp_path):
    bad_magic = tmp_path / "x_train.bin"
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (1234, 1, 10)
    bad_magic.write_bytes(header.tobytes() + np.zeros(10, np.uint16).tobytes())
    with pytest.raises(T.UserError, match="bad .bin header.*prepare_data"):
        T.load_shard(bad_magic)
    truncated = tmp_path / "y_train.bin"
    write_bin_shard(truncated, 0, 100)
    truncated.write_bytes(truncated.read_bytes()[:-3])  # odd size
    with pytest.raises(T.UserError, match="truncated or corrupt"):
        T.load_shard(truncated)
    tiny = tmp_path / "z_train.bin"
    tiny.write_bytes(b"abc")
    with pytest.raises(T.UserError, match="too small"):
        T.load_shard(tiny)
    wrong_dtype = tmp_path / "w_train.npy"
    np.save(wrong_dtype, np.arange(10, dtype=np.int64))
    with pytest.raises(T.UserError, match="uint16"):
        T.load_shard(wrong_dtype)
    garbage = tmp_path / "v_train.npy"
    garbage.write_bytes(b"not numpy at all")
    with pytest.raises(T.UserError, match="not a readable .npy"):
        T.load_shard(garbage)


def test_missing_data_and_impossible_batches_are_user_errors(tmp_path, shard_dir):
    with pytest.raises(T.UserError, match="does not exist; run src/prepare_data.py"):
        T.find_shards(str(tmp_path / "nope"), "train")
    with pytest.raises(T.UserError, match="no training shards"):
        T.ShardedLoader([], 32, 256, 2, 0, 1, 0, CPU)
    with pytest.raises(T.UserError, match="multiple of the block size"):
        make_loader(shard_dir, total_batch_size=250)
    with pytest.raises(T.UserError, match="does not divide into micro-batches"):
        make_loader(shard_dir, world_size=3, total_batch_size=256)
    with pytest.raises(T.UserError, match="fewer than one window"):
        make_loader(shard_dir, block_size=8192, total_batch_size=8192, batch_size=1)
    with pytest.raises(T.UserError, match="fewer than one step"):
        make_loader(shard_dir, total_batch_size=32 * 400)


def windows_of_one_step(shard_dir, world_size):
    """The (first token of every window) each rank reads in the current step, over all micro-steps."""
    seen = []
    for rank in range(world_size):
        loader = make_loader(shard_dir, world_size=world_size, rank=rank, batch_size=8 // world_size)
        loader.advance()  # look at step 2, not just the first
        for micro_step in range(loader.grad_accum_steps):
            x, y = loader.micro_batch(micro_step)
            assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
            seen += x[:, 0].tolist()
    return seen


def test_a_step_reads_the_same_windows_for_world_sizes_1_2_and_4(shard_dir):
    one, two, four = (windows_of_one_step(shard_dir, w) for w in (1, 2, 4))
    assert len(one) == 8 and len(set(one)) == 8
    assert sorted(one) == sorted(two) == sorted(four)
    assert one != sorted(one)  # windows are shuffled, not sequential


def test_windows_are_contiguous_token_runs(shard_dir):
    loader = make_loader(shard_dir)
    x, y = loader.micro_batch(0)
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        full = row_x + row_y[-1:]
        assert full == list(range(full[0], full[0] + 33))  # consecutive integers: one unbroken window
        assert (full[0] - 10_000) % 32 == 0 or (full[0] - 20_000) % 32 == 0  # aligned to the block size


def test_an_epoch_covers_every_window_once_and_rolls_over_shards(shard_dir):
    loader = make_loader(shard_dir)
    windows = (6000 - 1) // 32 + (5000 - 1) // 32
    assert loader.num_windows == windows and loader.steps_per_epoch == windows // 8
    starts, epoch_ends = [], []
    for step in range(1, loader.steps_per_epoch * 2 + 1):
        for micro_step in range(loader.grad_accum_steps):
            starts += loader.micro_batch(micro_step)[0][:, 0].tolist()
        if loader.advance():
            epoch_ends.append(step)
    assert epoch_ends == [loader.steps_per_epoch, 2 * loader.steps_per_epoch]
    assert loader.epoch == 2 and loader.position == 0
    first, second = starts[:len(starts) // 2], starts[len(starts) // 2:]
    assert len(set(first)) == len(first) == loader.steps_per_epoch * 8  # no window twice in an epoch
    assert {s >= 20_000 for s in first} == {True, False}  # both shards visited
    assert first != second  # a new order every epoch
    # the tail that cannot fill a step (343 - 42 * 8 = 7 windows) is dropped, a different tail each epoch
    all_windows = {s for s in first + second}
    assert len(all_windows) <= windows and len(set(second)) == len(second) == len(first)
    assert windows - len(first) == 7


def test_state_round_trips_and_is_plain_ints_independent_of_rank_and_world_size(shard_dir):
    a = make_loader(shard_dir)
    for _ in range(30):  # past the first shard
        a.advance()
    state = a.state_dict()
    assert all(type(v) is int for v in state.values())
    b = make_loader(shard_dir, world_size=2, rank=1, batch_size=2, total_batch_size=256)
    for _ in range(30):
        b.advance()
    assert b.state_dict() == state
    c = make_loader(shard_dir)
    c.load_state_dict(state)
    assert c.state_dict() == state
    assert torch.equal(c.micro_batch(0)[0], a.micro_batch(0)[0])


def test_order_depends_on_seed(shard_dir):
    a, b = make_loader(shard_dir, seed=1), make_loader(shard_dir, seed=2)
    assert not torch.equal(a.micro_batch(0)[0], b.micro_batch(0)[0])
    assert torch.equal(a.micro_batch(0)[0], make_loader(shard_dir, seed=1).micro_batch(0)[0])


def test_changed_data_is_refused_on_resume(shard_dir):
    state = make_loader(shard_dir).state_dict()
    write_bin_shard(shard_dir / "syn_train_000003.bin", 30_000, 3000)
    with pytest.raises(T.UserError, match="training data differs"):
        make_loader(shard_dir).load_state_dict(state)


def test_val_loader_is_fixed_and_split_over_ranks(shard_dir):
    shards = T.find_shards(str(shard_dir), "val")
    r0 = T.ValLoader(shards, 32, 2, 0, 2, CPU)
    r1 = T.ValLoader(shards, 32, 2, 1, 2, CPU)
    assert r0.batch(0)[0][:, 0].tolist() == [0, 32] and r1.batch(0)[0][:, 0].tolist() == [64, 96]
    assert torch.equal(r0.batch(3)[0], T.ValLoader(shards, 32, 2, 0, 2, CPU).batch(3)[0])
