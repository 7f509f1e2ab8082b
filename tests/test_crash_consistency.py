"""Crash consistency of CheckpointManager.save by prefix replay, the method of ALICE (Pillai et al., OSDI 2014) and
CrashMonkey (Mohan et al., OSDI 2018): record the file-system operations of one real save into a folder that
already holds earlier saves, rebuild the folder in a fresh directory as a crash after every prefix of those
operations would leave it, and check each rebuilt folder the way a resuming run would use it.

Two crash models:
- process crash (kill -9): every operation of the prefix happened and the page cache survives.
- power loss: file data not yet fsynced is lost (a new file is empty; a file overwritten in place holds the bytes
  of its last fsync), or kept; and the folder's entries (create, link, rename, unlink) changed since its last
  fsync may be lost. Journaling file systems (ext4, XFS) make metadata changes durable in the order they were
  made, so the folder holds the entries after some prefix of those changes: each one is replayed, from "every
  unsynced change reverted" to "all kept", with the unsynced data lost and with it kept.
The folder as it was before the recorded save counts as durable. A run of consecutive writes to one file is cut
after its first, middle and last write only (in between, only how much of that one file is written differs).
"""

import contextlib
import errno
import functools
import hashlib
import io
import itertools
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest

import train_improved as T
from test_checkpoint_manager import make_state, with_step

SMALL = dict(n_head=1, n_embd=2)  # a real checkpoint of about 1.2 MB: hundreds of rebuilt folders stay fast


@dataclass(frozen=True)
class Op:
    """One file-system operation in the checkpoint folder, as the recorded save made it."""

    kind: str  # create, write, truncate, fsync, link, rename, unlink, fsync_dir
    name: str = ""  # the entry it concerns (for link and rename: the new name)
    src: str = ""  # link and rename: the existing name
    file: int = -1  # the file it writes (our own numbering: names that share a file share its number)
    offset: int = 0  # write: where; truncate: the new length
    data: bytes = b""

    def __str__(self) -> str:
        if self.kind == "write":
            return f"write {len(self.data)} bytes at {self.offset} to {self.name}"
        if self.kind == "truncate":
            return f"truncate {self.name} to {self.offset} bytes"
        if self.kind in ("link", "rename"):
            return f"{self.kind} {self.src} -> {self.name}"
        return f"{self.kind} {self.name}".rstrip()


def read_folder(folder: Path) -> tuple[dict[str, int], dict[int, bytes]]:
    """The folder's names -> file number (hard links share one) and file number -> bytes."""
    entries, data, numbers = {}, {}, {}
    for name in sorted(os.listdir(folder)):
        st = os.lstat(folder / name)
        number = numbers.setdefault((st.st_dev, st.st_ino), len(numbers))
        entries[name] = number
        data[number] = (folder / name).read_bytes()
    return entries, data


class Recorder:
    """Lets the file-system calls CheckpointManager makes happen for real and notes those in one folder."""

    def __init__(self, folder: Path, hard_links: bool = True):
        self.folder = folder.resolve()
        self.hard_links = hard_links
        self.entries, self.initial_data = read_folder(folder)
        self.initial_entries = dict(self.entries)
        self.files = {(os.lstat(folder / n).st_dev, os.lstat(folder / n).st_ino): i for n, i in self.entries.items()}
        self.next_file = len(self.initial_data)
        self.ops: list[Op] = []

    def name_in_folder(self, path) -> str | None:
        path = Path(os.fsdecode(path)).absolute()
        return path.name if path.parent.resolve() == self.folder else None

    @contextlib.contextmanager
    def recording(self, monkeypatch):
        """Patch os and the script's open() to record while the block runs."""
        real = dict(replace=os.replace, rename=os.rename, link=os.link, unlink=os.unlink, fsync=os.fsync)
        real_open = open

        def moved(kind):
            def move(src, dst, *args, **kwargs):
                old, new = self.name_in_folder(src), self.name_in_folder(dst)
                assert (old is None) == (new is None), f"{kind} {src} -> {dst} crosses the folder: not modelled"
                real[kind](src, dst, *args, **kwargs)
                if new is not None:
                    self.entries[new] = self.entries.pop(old)
                    self.ops.append(Op("rename", name=new, src=old))
            return move

        def link(src, dst, *args, **kwargs):
            if not self.hard_links:
                no_links()
            real["link"](src, dst, *args, **kwargs)
            old, new = self.name_in_folder(src), self.name_in_folder(dst)
            if new is not None:
                assert old is not None, f"link {src} -> {dst} crosses the folder: not modelled"
                self.entries[new] = self.entries[old]
                self.ops.append(Op("link", name=new, src=old))

        def unlink(path, *args, **kwargs):
            real["unlink"](path, *args, **kwargs)
            name = self.name_in_folder(path)
            if name is not None:
                del self.entries[name]
                self.ops.append(Op("unlink", name=name))

        def fsync(fd):
            real["fsync"](fd)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode) and os.path.samestat(st, os.stat(self.folder)):
                self.ops.append(Op("fsync_dir"))
            elif (st.st_dev, st.st_ino) in self.files:
                number = self.files[(st.st_dev, st.st_ino)]
                names = [n for n, i in self.entries.items() if i == number]
                self.ops.append(Op("fsync", name=names[0] if names else "", file=number))

        def recording_open(file, mode="r", *args, **kwargs):
            name = self.name_in_folder(file) if isinstance(file, (str, bytes, os.PathLike)) else None
            if name is None or not any(c in mode for c in "wax+"):
                return real_open(file, mode, *args, **kwargs)
            assert "a" not in mode and "b" in mode, f"open({file}, {mode!r}) is not modelled"
            f = real_open(file, mode, buffering=0)  # unbuffered: every write reaches the page cache at once
            if name in self.entries and "w" in mode:
                self.ops.append(Op("truncate", name=name, file=self.entries[name], offset=0))
            elif name not in self.entries:
                self.entries[name] = self.next_file
                self.next_file += 1
                self.ops.append(Op("create", name=name, file=self.entries[name]))
            st = os.fstat(f.fileno())
            self.files[(st.st_dev, st.st_ino)] = self.entries[name]
            return RecordedFile(f, name, self.entries[name], self.ops)

        with monkeypatch.context() as m:
            for kind in ("replace", "rename"):
                m.setattr(os, kind, moved(kind))
            m.setattr(os, "link", link)
            m.setattr(os, "unlink", unlink)
            m.setattr(os, "remove", unlink)
            m.setattr(os, "fsync", fsync)
            m.setattr(T, "open", recording_open, raising=False)
            yield


class RecordedFile(io.RawIOBase):
    """A file opened for writing in the folder: writes and truncations happen and are recorded."""

    def __init__(self, f, name: str, number: int, ops: list[Op]):
        self.f, self.name, self.number, self.ops = f, name, number, ops

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        offset, done = self.f.tell(), 0
        while done < len(view):
            done += self.f.write(view[done:])
        self.ops.append(Op("write", name=self.name, file=self.number, offset=offset, data=bytes(view)))
        return len(view)

    def truncate(self, size=None) -> int:
        size = self.f.truncate(size)
        self.ops.append(Op("truncate", name=self.name, file=self.number, offset=size))
        return size

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        self.f.close()
        super().close()


def crash_points(ops: list[Op]) -> list[int]:
    """The prefix lengths to replay: every one, except that a run of writes to one file is cut after its first,
    middle and last write only."""
    points = [0]
    runs = itertools.groupby(range(len(ops)), key=lambda k: ("write", ops[k].file) if ops[k].kind == "write" else k)
    for _, run in runs:
        run = list(run)
        points += sorted({run[0] + 1, run[len(run) // 2] + 1, run[-1] + 1})
    return points


def crash_states(initial_entries: dict[str, int], initial_data: dict[int, bytes], ops: list[Op]):
    """Yield (k, where, crash model, entries, data) for the folder as a crash after the first k of `ops` leaves it;
    k == len(ops) is a crash after the save returned."""
    entries = dict(initial_entries)
    data = {i: bytearray(b) for i, b in initial_data.items()}
    durable = dict(initial_data)  # file number -> bytes of its last fsync (the folder before the save is durable)
    unsynced = [dict(entries)]  # the folder's entries at its last fsync, then after each change since
    now = dict(initial_data)  # file number -> its bytes now, a new object only when they changed
    points = set(crash_points(ops))
    for k in range(len(ops) + 1):
        if k in points:
            where = f"crash after {k}/{len(ops)} ops" + (f" (last: {ops[k - 1]})" if k else " (before the first)")
            now = {i: now[i] if i in now and now[i] == b else bytes(b) for i, b in data.items()}
            lost = {i: durable.get(i, b"") for i in data}
            yield k, where, "process crash", dict(entries), now
            for kept, folder in enumerate(unsynced):
                reverted = len(unsynced) - 1 - kept
                for label, contents in (("unsynced data lost", lost), ("unsynced data kept", now)):
                    yield k, where, f"power loss ({reverted} unsynced folder changes reverted, {label})", folder, \
                        contents
        if k == len(ops):
            break
        op = ops[k]
        if op.kind == "create":
            entries[op.name] = op.file
            data[op.file] = bytearray()
        elif op.kind == "write":
            buf = data[op.file]
            buf.extend(bytes(max(0, op.offset - len(buf))))
            buf[op.offset:op.offset + len(op.data)] = op.data
        elif op.kind == "truncate":
            buf = data[op.file]
            del buf[op.offset:]
            buf.extend(bytes(op.offset - len(buf)))
        elif op.kind == "fsync":
            durable[op.file] = bytes(data[op.file])
        elif op.kind == "link":
            entries[op.name] = entries[op.src]
        elif op.kind == "rename":
            entries[op.name] = entries.pop(op.src)
        elif op.kind == "unlink":
            del entries[op.name]
        if op.kind == "fsync_dir":
            unsynced = [dict(entries)]
        elif op.kind in ("create", "link", "rename", "unlink"):
            unsynced.append(dict(entries))


def digest(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=16).hexdigest()


def is_checkpoint_name(name: str) -> bool:
    return name.endswith(".pt") and not name.startswith(".tmp-")


def rebuild(folder: Path, entries: dict[str, int], data: dict[int, bytes]) -> None:
    """Write the crash state into an empty folder; names that share a file number become hard links."""
    folder.mkdir()
    first: dict[int, Path] = {}
    for name, number in sorted(entries.items()):
        if number in first:
            os.link(first[number], folder / name)
        else:
            (folder / name).write_bytes(data[number])
            first[number] = folder / name


def problems_after_crash(folder: Path, before: dict[str, str], new: str, oldest_step: int,
                         saved_names: list[str]) -> list[str]:
    """What is wrong with the rebuilt folder. `before` maps each checkpoint name to the digest of its bytes before
    the save, `new` is the digest of the saved file, oldest_step the oldest step --resume latest may give, and
    saved_names the names the save reported (once it returned: each must hold the new file)."""
    names = {p.name: digest(p.read_bytes()) for p in folder.iterdir() if is_checkpoint_name(p.name)}
    found = []
    # a save may change no name until its new file is complete: a crash before that changes nothing (with room on
    # the disk; when it is short, make_room gives up old files first, on purpose)
    if new not in names.values():
        changed = sorted(n for n in set(names) | set(before) if names.get(n) != before.get(n))
        if changed:
            found.append(f"{', '.join(changed)} changed although the new checkpoint is not complete under any name")
    lost = [n for n in saved_names if names.get(n) != new]
    if lost:
        found.append(f"the save returned, yet {', '.join(lost)} lost the saved checkpoint")
    manager = T.CheckpointManager(folder)
    try:
        resumed = T.resolve_checkpoint(manager, "latest")
        step = T.CheckpointManager.load(resumed)["step"]
        if step < oldest_step:
            found.append(f"--resume latest gives {resumed.name} at step {step}, older than step {oldest_step}")
    except (T.UserError, T.CheckpointInvalid) as e:
        found.append(f"--resume latest fails: {e}")
        resumed = None
    # latest.pt itself is always a complete, recent checkpoint: never a moment without it
    latest = folder / T.CheckpointManager.LATEST
    if resumed != latest:  # (else resolve verified it and its step was checked above)
        try:
            step = T.CheckpointManager.load(latest)["step"]
            if step < oldest_step:
                found.append(f"latest.pt holds step {step}, older than step {oldest_step}")
        except T.CheckpointInvalid as e:
            found.append(f"latest.pt is not usable: {e}")
    manager.clean_stale_temporaries()
    left = sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))
    if left:
        found.append(f"clean_stale_temporaries left {', '.join(left)}")
    after = {p.name: digest(p.read_bytes()) for p in folder.iterdir() if is_checkpoint_name(p.name)}
    if after != names:
        found.append(f"clean_stale_temporaries changed checkpoint names: {sorted(set(names) ^ set(after))}")
    return found


@dataclass(frozen=True)
class Scenario:
    """A folder built by earlier saves, then the save that is recorded."""

    name: str
    keep_last: int
    earlier: tuple  # (step, epoch_completed, is_best) of each earlier save
    recorded: tuple  # (step, epoch_completed, is_best) of the recorded save
    spare_before: bool = False  # the recorded save finds a retired file to overwrite in place
    hard_links: bool = True


SCENARIOS = [
    Scenario("plain", keep_last=10, earlier=((1, None, False), (2, None, False)), recorded=(3, None, False)),
    Scenario("overwrites_the_spare_and_prunes", keep_last=2,
             earlier=((1, None, False), (2, None, False), (3, None, False), (4, None, False)),
             recorded=(5, None, False), spare_before=True),
    Scenario("writes_epoch_and_best_copies", keep_last=10, earlier=((1, None, True), (2, 1, False)),
             recorded=(3, 2, True)),
    Scenario("without_hard_links", keep_last=2, earlier=((1, None, False), (2, None, True), (3, None, False)),
             recorded=(4, 1, False), hard_links=False),
]


def no_links(*args, **kwargs):
    raise OSError(errno.EPERM, "this file system has no hard links")


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_a_crash_after_any_prefix_of_a_save_leaves_a_complete_recent_latest(scenario, tmp_path, shard_dir,
                                                                              monkeypatch):
    """After a crash at any point of a save, in either crash model: latest.pt is a complete checkpoint, --resume
    latest gives a verified checkpoint at least as recent as the save before (as the recorded save, once it
    returned, and then every name it reported holds its file), no name changed before the new file was complete,
    and clean_stale_temporaries removes every .tmp-* file and nothing else."""
    ck = tmp_path / "ck"
    base = make_state(shard_dir, **SMALL)
    with monkeypatch.context() as m:
        if not scenario.hard_links:
            m.setattr(os, "link", no_links)
        manager = T.CheckpointManager(ck, keep_last=scenario.keep_last)
        for step, epoch_completed, is_best in scenario.earlier:
            manager.save(with_step(base, step), epoch_completed=epoch_completed, is_best=is_best)
    assert (ck / T.CheckpointManager.SPARE).exists() == scenario.spare_before, "the scenario no longer sets up its name"
    previous_step = scenario.earlier[-1][0]
    recorder = Recorder(ck, hard_links=scenario.hard_links)
    step, epoch_completed, is_best = scenario.recorded
    with recorder.recording(monkeypatch):
        saved_names = manager.save(with_step(base, step), epoch_completed=epoch_completed, is_best=is_best)
    states = list(crash_states(recorder.initial_entries, recorder.initial_data, recorder.ops))
    assert_recorded_everything(states, ck)

    new = digest((ck / T.CheckpointManager.LATEST).read_bytes())
    before = {n: digest(recorder.initial_data[i]) for n, i in recorder.initial_entries.items() if is_checkpoint_name(n)}
    failures, checked = [], 0
    for returned, where, folder_state in distinct_folders(states, len(recorder.ops)):
        folder = tmp_path / f"crash{checked}"
        rebuild(folder, *folder_state)
        problems = problems_after_crash(folder, before, new, oldest_step=step if returned else previous_step,
                                        saved_names=saved_names if returned else [])
        failures += [f"{where}: {p}" for p in problems]
        shutil.rmtree(folder)
        checked += 1
    listing = "\n".join(f"  {k + 1:3d} {op}" for k, op in enumerate(recorder.ops)
                        if op.kind != "write" or k == 0 or recorder.ops[k - 1].kind != "write")
    assert not failures, (f"{len(failures)} problems in {checked} distinct crash states:\n"
                          + "\n".join(failures[:12]) + ("\n..." if len(failures) > 12 else "")
                          + f"\nthe save's operations (a run of writes shown by its first):\n{listing}")


def distinct_folders(states, n_ops: int):
    """Yield (the save had returned, where, (entries, data)) once for each distinct folder among the crash states,
    with where the first prefix and crash model that leave it (the checks' verdict is the same for the others)."""
    digest_of = functools.cache(digest)  # crash states share the bytes of files that did not change
    seen = set()
    for k, where, model, entries, data in states:
        key = (k == n_ops, tuple(sorted((n, tuple(sorted(m for m in entries if entries[m] == i)), digest_of(data[i]))
                                        for n, i in entries.items())))
        if key not in seen:
            seen.add(key)
            yield k == n_ops, f"{where}, {model}", (entries, data)


def assert_recorded_everything(states, folder: Path) -> None:
    """The recorder saw every change: replaying all of it gives the folder the save really left."""
    *_, entries, data = [s for s in states if s[2] == "process crash"][-1]
    real_entries, real_data = read_folder(folder)

    def links(entries):
        return sorted(sorted(n for n in entries if entries[n] == i) for i in set(entries.values()))
    assert links(entries) == links(real_entries), "the recorder missed a rename, link or unlink"
    assert {n: data[i] for n, i in entries.items()} == {n: real_data[i] for n, i in real_entries.items()}, \
        "the recorder missed a write"


def test_a_save_that_fails_mid_write_changes_no_name(tmp_path, shard_dir, monkeypatch):
    """The disk fills up 64 KiB into the new file: save raises, and every checkpoint name still holds the bytes it
    held; in particular latest_backup.pt still holds the step before latest.pt's, not latest's own."""
    ck = tmp_path / "ck"
    manager = T.CheckpointManager(ck, keep_last=2)
    base = make_state(shard_dir, **SMALL)
    for step in (1, 2, 3, 4):
        manager.save(with_step(base, step))
    before = {p.name: p.read_bytes() for p in ck.iterdir() if is_checkpoint_name(p.name)}

    class FillsUp:
        """The checkpoint file on a disk that fills up 64 KiB into it."""

        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written >= 64 << 10:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)
    init = T.EarlyWriteback.__init__
    monkeypatch.setattr(T.EarlyWriteback, "__init__", lambda self, f, **kw: init(self, FillsUp(f), **kw))
    # the disk's own error, not what torch's zip writer makes of it ("unexpected pos ...")
    with pytest.raises(OSError, match="No space left on device"):
        manager.save(with_step(base, 5))
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in ck.iterdir() if is_checkpoint_name(p.name)}
    changed = sorted(n for n in set(before) | set(after) if after.get(n) != before.get(n))
    assert not changed, f"the save failed, yet {', '.join(changed)} changed"
    assert T.CheckpointManager.load(ck / "latest.pt")["step"] == 4
    assert T.CheckpointManager.load(ck / "latest_backup.pt")["step"] == 3
    assert manager.save(with_step(base, 5))[:2] == ["rolling_step_000005.pt", "latest.pt"]  # nothing in the way
