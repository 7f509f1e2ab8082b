"""List the checkpoints of a run: ./list_checkpoints.sh [--verify] [--checkpoint_dir D | --mirror URL].

    ./list_checkpoints.sh                         # checkpoints/, metadata only (fast, even for multi-GB files)
    ./list_checkpoints.sh --verify                # also check each file's checksums (reads every byte)
    ./list_checkpoints.sh --mirror s3://bucket/run --verify   # what the mirror holds, each copy downloaded and checked

One row per checkpoint. Exits 1 if any name resume could use is invalid (damaged files already set aside are listed
but not counted), 2 if the mirror cannot be read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

try:
    import train_improved as T
except ModuleNotFoundError as e:  # run outside the project's environment: say how to get into it
    sys.exit(f"error: {e.name} is not installed for {sys.executable}; activate the project's environment first "
             "(. .venv/bin/activate), or set PYTHON to its python")


def main(argv: list[str] | None = None) -> int:
    """./list_checkpoints.sh: one row per checkpoint, from metadata only unless --verify is given. Exits 1 if any
    name resume could use is invalid; damaged files already set aside are listed but not counted."""
    parser = argparse.ArgumentParser(prog="list_checkpoints.sh", description="List the checkpoints of a run.")
    parser.add_argument("--checkpoint_dir", default="checkpoints")
    parser.add_argument("--verify", action="store_true", help="also check every file's checksums (reads it all)")
    parser.add_argument("--mirror", help="list the checkpoints on this mirror (the trainer's --mirror URL) instead")
    parser.add_argument("--world_size", action="store_true", help="print only the number of processes the newest "
                        "readable checkpoint was trained on (resume_training.sh uses it); exit 1 if there is none")
    args = parser.parse_args(argv)
    try:
        if args.world_size:
            return _print_world_size(T.CheckpointManager(args.checkpoint_dir))
        if args.mirror:
            code = _list_mirror(args.mirror, args.verify)
        else:
            code = _list_checkpoints(T.CheckpointManager(args.checkpoint_dir), args.checkpoint_dir, args.verify)
        sys.stdout.flush()  # inside the try: a pipe closed early fails here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `./list_checkpoints.sh | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit stays quiet
        return 0


def _print_world_size(manager: T.CheckpointManager) -> int:
    """The world size of the first checkpoint in --resume latest's order whose metadata reads (not verified: the
    resume does that)."""
    readable = next((f for f in manager.describe("none") if f.step is not None), None)
    if readable is None:
        return 1
    print(manager.load(readable.path, verify=False)["world_size"])
    return 0


def _list_mirror(url: str, verify: bool) -> int:
    """The committed checkpoints on a mirror, newest first; with verify, each one downloaded into a temporary folder
    and checked against the mirror's size and sha256 and our CRC-32s."""
    from mirror import Mirror, MirrorError
    try:
        mirror = Mirror(url)
        remote = mirror.remote_checkpoints()
    except (MirrorError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not remote:
        print(f"no checkpoints on {mirror.redacted_url()}")
        return 0
    print(f"{'step':>8} {'run':>12} {'size':>9} {'written':>20}  names -> status")
    newest = remote[0]
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for entry in remote:
            status = "committed"
            if verify:
                problem = mirror.download(entry, Path(tmp) / "check.pt")
                if problem is None:
                    try:
                        T.CheckpointManager.load(Path(tmp) / "check.pt")
                    except T.CheckpointInvalid as e:
                        problem = str(e)
                status = "valid" if problem is None else f"INVALID: {problem}"
                bad += problem is not None
            parent = f" (branched from {entry['parent']})" if entry.get("parent") else ""
            print(f"{entry['step']:>8} {entry['run'] or '-':>12} {entry['size'] / 2**20:>8.1f}M {entry['written_at'][:19]:>20}  "
                  f"{', '.join(mirror_names(entry, newest))} -> {status}{parent}")
    return 1 if bad else 0


def mirror_names(entry: dict, newest: dict) -> list[str]:
    """The names a mirrored checkpoint has now: those it was uploaded with, but latest.pt only for the newest (each
    upload carried latest.pt, which a later one took over). (With several runs on one URL, the newest of all.)"""
    names = [n for n in entry["names"] if n != T.CheckpointManager.LATEST]
    return names + [T.CheckpointManager.LATEST] if entry is newest else names


def _list_checkpoints(manager: T.CheckpointManager, folder: str, verify: bool) -> int:
    """One row per local checkpoint name (and per damaged file set aside); 1 if a usable name is invalid."""
    paths = manager.all_checkpoints()
    aside = manager.set_aside_files()
    if not paths and not aside:
        print(f"no checkpoints in {folder}/")
        return 0
    file_ids: dict[tuple[int, int], int] = {}  # (device, inode) -> a small number per file, in order of appearance
    print(f"{'name':<28} {'file':>4} {'step':>8} {'epoch':>5} {'train_loss':>10} {'val_loss':>14} {'size':>9} "
          f"{'age':>8}  status")
    bad, earlier_val, runs = 0, False, {}
    for p in paths + aside:
        st = p.stat()
        file_id = file_ids.setdefault((st.st_dev, st.st_ino), len(file_ids) + 1)
        size, age = f"{st.st_size / 2**20:.1f}M", T.format_age(time.time() - st.st_mtime)
        try:
            s = manager.load(p, verify=verify)
            status = "valid" if verify else "readable"
            val = T.fmt_loss(s["val_loss"])
            val_step = s.get("val_step")  # absent in checkpoints written before it was recorded
            if s["val_loss"] is not None and val_step is not None and val_step != s["step"]:
                val, earlier_val = f"{val}@{val_step}", True
            row = (s["step"], s["epoch"], T.fmt_loss(s["train_loss"]), val)
            if p in paths:
                runs.setdefault(s["args"].get("run_id"), s.get("parent"))
        except T.CheckpointInvalid as e:
            bad += p in paths
            status, row = f"INVALID: {e}", ("-", "-", "-", "-")
        if p in aside:
            status = f"SET ASIDE, never used ({status})"
        print(f"{p.name:<28} {file_id:>4} {row[0]:>8} {row[1]:>5} {row[2]:>10} {row[3]:>14} {size:>9} {age:>8}  "
              f"{status}")
    for run, parent in runs.items():  # the lineage: which run wrote these, and the run it branched from
        print(f"run {run or '(none recorded)'}" + (f", branched from {parent}" if parent else ""))
    if len(file_ids) < len(paths) + len(aside):
        print("names with the same file number are hard links to one file (one copy on disk, shared by its names)")
    if earlier_val:
        print("val_loss@N: the validation loss of the evaluation at step N, the last one before that checkpoint")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
