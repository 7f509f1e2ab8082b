"""What a best or epoch checkpoint's own file costs: a save that also writes best_model.pt against a plain save.

    python benchmarks/bench_best_copy.py            # ~51 M parameters (a ~610 MB checkpoint), about a minute

best_model.pt and epoch_NNNNN.pt are durable copies of the new latest.pt (read back from the page cache, written with
early writeback, fsync'ed), not hard links into the rolling chain. Saves with and without the copy alternate
(A B A B ...) so the machine's noise hits both alike; the medians and their ratio are printed. All of it runs in the
background writer during training; the extra time is write time, not time the training loop is blocked.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import train_improved as T  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n_layer", type=int, default=8)
    p.add_argument("--n_embd", type=int, default=512)
    p.add_argument("--reps", type=int, default=5, help="timed saves of each kind")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder in the cwd)")
    args = p.parse_args()
    cfg = T.GPTConfig(n_layer=args.n_layer, n_head=8, n_embd=args.n_embd, block_size=128)
    torch.manual_seed(0)
    model = T.GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    state = dict(format_version=T.CHECKPOINT_FORMAT_VERSION, step=0, model=model.state_dict(),
                 optimizer=optimizer.state_dict())
    with tempfile.TemporaryDirectory(dir=args.dir or ".") as d:
        manager = T.CheckpointManager(Path(d) / "ck", keep_last=2)
        manager.save(T.to_cpu_copy(state))  # warm up: the spare file exists from here on, as in a long run
        manager.save(T.to_cpu_copy(state))
        timings = {"plain": [], "with best_model.pt": []}
        for rep in range(args.reps):
            for kind, is_best in (("plain", False), ("with best_model.pt", True)):
                snapshot = T.to_cpu_copy({**state, "step": len(timings["plain"]) * 2 + is_best + 10})
                t0 = time.perf_counter()
                manager.save(snapshot, is_best=is_best)
                timings[kind].append(time.perf_counter() - t0)
        size = (Path(d) / "ck" / "latest.pt").stat().st_size
    plain, best = (statistics.median(timings[k]) for k in ("plain", "with best_model.pt"))
    print(f"checkpoint {size / 1e6:.0f} MB, {args.reps} saves of each kind, medians:")
    print(f"  plain save (rolling + latest):       {plain:.2f} s")
    print(f"  save that also writes best_model.pt: {best:.2f} s  (+{best - plain:.2f} s, x{best / plain:.2f})")


if __name__ == "__main__":
    main()
