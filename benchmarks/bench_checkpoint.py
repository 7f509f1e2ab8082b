"""What checkpointing costs, measured side by side in one run (CPU by default; CUDA when --device cuda).

    python benchmarks/bench_checkpoint.py                      # ~51 M parameters on CPU (a ~610 MB checkpoint), ~5 min
    python benchmarks/bench_checkpoint.py --device cuda --preset gpt2 --batch_size 16 --block_size 1024

Reports four ratios (issue 4's targets on a 2-core CPU in brackets):
  1. blocked time per asynchronous save / a plain synchronous torch.save + fsync of the same state  [<= 0.05]
  2. training tokens/s saving every --save_every_seconds / tokens/s with checkpointing off          [>= 0.95]
  3. checkpoint write throughput / raw sequential write throughput of the same disk (same bytes, fsync) [>= 0.8]
  4. resume time (start to the end of the first step) / synchronous save time; peak extra host memory /
     checkpoint size
Training windows with and without a save alternate (A B A B ..., each --save_every_seconds long) so the machine's
noise hits both alike; the writes of ratio 3 alternate the same way.
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import train_improved as T  # noqa: E402


def rss_bytes(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def timed_write(path, data, mode):
    """Seconds to write `data` to `path` and fsync it: mode "wb" makes a new file, "r+b" overwrites one."""
    t0 = time.perf_counter()
    with open(path, mode) as f:
        f.write(data)
        f.truncate()
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=512)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--save_every_seconds", type=float, default=5.0, help="the save interval, and window length")
    p.add_argument("--pairs", type=int, default=24, help="pairs of training windows with and without a save")
    p.add_argument("--write_reps", type=int, default=7, help="timed writes of each kind for ratio 3")
    p.add_argument("--no_reuse", action="store_true",
                   help="write every checkpoint to a new file instead of overwriting the retired one (for an A/B)")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder in the cwd)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.no_reuse:
        T.CheckpointManager._keep_as_spare = lambda self, path: None
    work = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir or "."))
    B, block = args.batch_size, args.block_size
    if args.preset == "tiny":
        shape = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=block)
    else:
        shape = dict(block_size=block)
    data_dir = work / "data"
    data_dir.mkdir()
    np.save(data_dir / "bench_train_000001.npy",
            np.random.default_rng(0).integers(0, 50257, 4_000_000).astype(np.uint16))
    cfg = T.TrainConfig(preset=args.preset, **shape, batch_size=B, total_batch_size=B * block,
                        data_dir=str(data_dir), checkpoint_dir=str(work / "ck"), checkpoint_minutes=0)
    env = T.DistEnv(0, 0, 1, device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext

    def build():
        torch.manual_seed(0)
        model = T.GPT(cfg.gpt_config()).to(device)
        optimizer = T.configure_optimizer(model, cfg, device)
        loader = T.ShardedLoader(T.find_shards(str(data_dir), "train"), block, B * block, B, 0, 1, 0, device)
        return model, optimizer, loader

    def step_once(model, optimizer, loader, fence=lambda: None):
        T.train_step(model, optimizer, loader, env, 1e-4, 1.0, autocast, fence)
        loader.advance()
        if device.type == "cuda":
            torch.cuda.synchronize()

    model, optimizer, loader = build()
    for _ in range(3):
        step_once(model, optimizer, loader)

    def state(step):
        return T.build_state(T.TrainState(step=step, train_loss=1.0), raw_model=model, optimizer=optimizer,
                             loader=loader, cfg=cfg, rng_states=T.gather_rng_states(env), world_size=1)

    # 1b. plain synchronous torch.save + fsync of the same state (the baseline of ratios 1 and 4)
    sync_seconds = []
    for i in range(3):
        t0 = time.perf_counter()
        with open(work / "plain.pt", "wb") as f:
            torch.save(state(i), f)
            f.flush()
            os.fsync(f.fileno())
        sync_seconds.append(time.perf_counter() - t0)
    sync_save = statistics.median(sync_seconds)
    ckpt_bytes = (work / "plain.pt").stat().st_size
    # 3. our write path (training paused, snapshot already in host memory: CheckpointManager.save = disk-space
    # check, torch.save with its CRC-32s, fsync, renames, fsync of the folder, retention) against a raw sequential
    # write of the same bytes with fsync to a new file (as dd does), and, for reference, the same raw write over an
    # existing file; the three alternate, so the disk's noise hits them alike. Three untimed saves first: from the
    # third save on, each save overwrites the file retention retired (the steady state of a run)
    payload = (work / "plain.pt").read_bytes()
    (work / "plain.pt").unlink()
    (work / "inplace.bin").write_bytes(payload)
    snapshot = T.to_cpu_copy(state(0))
    for i in range(3):
        T.CheckpointManager(work / "iso", keep_last=1).save({**snapshot, "step": i})
    raw_seconds, inplace_seconds, ours_seconds = [], [], []
    for i in range(args.write_reps):
        raw_seconds.append(timed_write(work / f"raw{i % 2}.bin", payload, "wb"))
        inplace_seconds.append(timed_write(work / "inplace.bin", payload, "r+b"))
        t0 = time.perf_counter()
        T.CheckpointManager(work / "iso", keep_last=1).save({**snapshot, "step": 3 + i})
        ours_seconds.append(time.perf_counter() - t0)
    del payload, snapshot
    raw_throughput = ckpt_bytes / statistics.median(raw_seconds)
    inplace_throughput = ckpt_bytes / statistics.median(inplace_seconds)
    ours_throughput = (work / "iso" / "latest.pt").stat().st_size / statistics.median(ours_seconds)
    for p in list(work.glob("*.bin")) + list((work / "iso").iterdir()):
        p.unlink()

    # 2 and 1. training tokens/s in alternating windows of --save_every_seconds: each "save" window starts with an
    # asynchronous save and ends when the training step that crosses its end has finished and the save is on disk;
    # "off" windows have no save. Windows this short pair the machine's slow drifts (+-8% here) tightly, and no
    # save's cost can spill into an "off" window. The trainer's SavePolicy is fed every save's measured cost, as
    # in training, and says which interval it would choose at its default 2% budget.
    manager = T.CheckpointManager(work / "ck", keep_last=2)
    writer = T.CheckpointWriter(manager, asynchronous=True)
    policy = T.SavePolicy(T.TrainConfig(checkpoint_freq=0, checkpoint_minutes=args.save_every_seconds / 60,
                                        max_checkpoint_overhead=0.02))
    blocked, write_seconds, costs = [], [], []
    step = 0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak, to the current size
    t_end = time.perf_counter() + 2 * args.save_every_seconds
    while time.perf_counter() < t_end:  # training's own peak, before the writer's buffers exist
        step_once(model, optimizer, loader)
        step += 1
    peak_off = rss_bytes("VmHWM")
    windows = {"save": [0, 0.0], "off": [0, 0.0]}  # tokens, seconds
    pair_ratios = []
    for _ in range(args.pairs):
        tps = {}
        for kind in ("save", "off"):
            t0, tokens = time.perf_counter(), 0
            if kind == "save":
                writer.submit(state(step))
                policy.saved()
            while time.perf_counter() - t0 < args.save_every_seconds:
                busy, t_step = writer.busy, time.perf_counter()
                step_once(model, optimizer, loader, writer.fence)
                policy.observe_step(time.perf_counter() - t_step, busy)
                step, tokens = step + 1, tokens + B * block
            writer.wait()
            seconds = time.perf_counter() - t0
            windows[kind][0] += tokens
            windows[kind][1] += seconds
            tps[kind] = tokens / seconds
            while not writer.results.empty():
                r = writer.results.get()
                assert r["error"] is None, r["error"]
                blocked.append(writer.blocked_seconds)
                write_seconds.append(r["write_seconds"])
                costs.append(policy.record(writer.submit_seconds, r["write_seconds"]))
        pair_ratios.append(tps["save"] / tps["off"])
    peak_extra = rss_bytes("VmHWM") - peak_off
    ckpt_file = work / "ck" / "latest.pt"
    async_write_throughput = ckpt_file.stat().st_size / statistics.median(write_seconds)
    tokens_per_second = {kind: tokens / seconds for kind, (tokens, seconds) in windows.items()}

    # 4. resume: find and verify the checkpoint, load it, restore a fresh model, run the first step
    del model, optimizer, loader
    t0 = time.perf_counter()
    path = T.resolve_checkpoint(manager, "latest")
    ckpt = T.CheckpointManager.load(path, verify=False)
    model, optimizer, loader = build()
    T.restore_state(ckpt, raw_model=model, optimizer=optimizer, loader=loader, cfg=cfg, env=env)
    del ckpt
    step_once(model, optimizer, loader)
    resume_seconds = time.perf_counter() - t0

    n_params = model.num_parameters()
    print(f"model: {n_params / 1e6:.1f} M parameters, checkpoint {ckpt_bytes / 1e6:.0f} MB, device {device}, "
          f"{torch.get_num_threads()} threads, {B}x{block} tokens per step, dir {work}")
    print(f"plain torch.save + fsync: {sync_save:.3f} s (median of 3)")
    print(f"async saves: {len(blocked)}; blocked median {statistics.median(blocked) * 1000:.1f} ms "
          f"(max {max(blocked) * 1000:.1f} ms); background write median {statistics.median(write_seconds):.2f} s; "
          f"measured cost per save (blocked + slower steps) median {statistics.median(costs):.3f} s")
    q1, _, q3 = statistics.quantiles(pair_ratios, n=4)
    print(f"tokens/s: {tokens_per_second['save']:.0f} in the windows with a save every {args.save_every_seconds:g} s, "
          f"{tokens_per_second['off']:.0f} in the windows without ({args.pairs} pairs; per-pair ratio median "
          f"{statistics.median(pair_ratios):.3f}, quartiles {q1:.3f}-{q3:.3f})")
    print(f"1. blocked per async save / plain sync save      = {statistics.median(blocked) / sync_save:.4f}")
    print(f"2. tokens/s with checkpoints / without            = "
          f"{tokens_per_second['save'] / tokens_per_second['off']:.3f} (a save every {args.save_every_seconds:g} s); "
          f"at the default 2% budget the policy, fed these costs, saves every {policy.interval_seconds:.0f} s")
    print(f"3. checkpoint write throughput / raw write        = {ours_throughput / raw_throughput:.3f} "
          f"({ours_throughput / 1e9:.2f} vs {raw_throughput / 1e9:.2f} GB/s, medians of {args.write_reps}); against "
          f"a raw write over an existing file: {ours_throughput / inplace_throughput:.3f} "
          f"({inplace_throughput / 1e9:.2f} GB/s); the background write during training: "
          f"{async_write_throughput / 1e9:.2f} GB/s")
    print(f"4. resume time / sync save time                   = {resume_seconds / sync_save:.3f} "
          f"({resume_seconds:.2f} s vs {sync_save:.2f} s)")
    print(f"   peak extra host memory / checkpoint size       = {peak_extra / ckpt_bytes:.3f} "
          f"({peak_extra / 1e6:.0f} MB vs {ckpt_bytes / 1e6:.0f} MB)")
    for p in sorted(work.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    work.rmdir()


if __name__ == "__main__":
    main()
