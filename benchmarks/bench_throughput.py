"""Training throughput: our train_step + ShardedLoader vs a plain nanoGPT-style loop, same model and batch.

    python benchmarks/bench_throughput.py [--n_layer 4 --n_embd 256 --block_size 256 --batch_size 4 --rounds 5]

Both loops run in this one process, alternating in rounds (A B A B ...), so machine noise hits both alike.
Reports tokens/s of each and the ratio ours / plain (>= 1.0 means we are at least as fast).
"""

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import train_improved as T  # noqa: E402


def plain_loop(model, optimizer, tokens, B, block, steps, start):
    """nanoGPT / build-nanogpt: sequential batches from one array, forward, backward, clip, step."""
    pos = start
    for _ in range(steps):
        buf = torch.from_numpy(tokens[pos:pos + B * block + 1].astype(np.int64))
        x, y = buf[:-1].view(B, block), buf[1:].view(B, block)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        pos += B * block
    return pos


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=5, help="steps per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    cpu = torch.device("cpu")
    B, block = args.batch_size, args.block_size
    with tempfile.TemporaryDirectory() as d:
        tokens = (np.random.default_rng(0).integers(0, 50257, 2_000_000)).astype(np.uint16)
        np.save(Path(d) / "bench_train_000001.npy", tokens)
        cfg = T.TrainConfig(preset="tiny", n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                            block_size=block, batch_size=B, total_batch_size=B * block, data_dir=d)
        env = T.DistEnv(0, 0, 1, cpu)
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            m = T.GPT(cfg.gpt_config())
            models.append((m, T.configure_optimizer(m, cfg, cpu)))
        loader = T.ShardedLoader(T.find_shards(d, "train"), block, B * block, B, 0, 1, 0, cpu)
        ours_tps, plain_tps, pos = [], [], 0
        # warm-up both once
        T.train_step(models[0][0], models[0][1], loader, env, 1e-4, 1.0, contextlib.nullcontext)
        pos = plain_loop(*models[1], tokens, B, block, 1, pos)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                T.train_step(models[0][0], models[0][1], loader, env, 1e-4, 1.0, contextlib.nullcontext)
                loader.advance()
            ours_tps.append(args.steps * B * block / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            pos = plain_loop(*models[1], tokens, B, block, args.steps, pos)
            plain_tps.append(args.steps * B * block / (time.perf_counter() - t0))
    ours, plain = statistics.median(ours_tps), statistics.median(plain_tps)
    print(f"model {args.n_layer}x{args.n_embd}, {B}x{block} tokens per step, fp32 CPU, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds of {args.steps} steps (medians)")
    print(f"ours  {ours:10.0f} tok/s")
    print(f"plain {plain:10.0f} tok/s")
    print(f"ratio ours/plain = {ours / plain:.3f}")


if __name__ == "__main__":
    main()
