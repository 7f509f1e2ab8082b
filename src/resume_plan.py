"""Where a launch starts: one pure decision over every candidate, then the trainer acts on it.

    situation = Situation(resume="auto", folder=Path("checkpoints"), local=(...), mirror=MirrorView(...), ...)
    decision = plan(situation)      # reads nothing, writes nothing: a function of the description
    decision.action                 # "new" | "resume" | "fetch" | "refuse"; decision.message says why

The trainer (train_improved.py, section 10) describes every candidate first: each local checkpoint name with its
verification result (in --resume latest's fallback order, verified until the first valid one), what the folder
set aside earlier, the file --resume names, the mirror's committed copies by run (or why it cannot be read), and
the other nodes' newest checkpoints newer than this folder's. Only then does it act, and only as the plan says: it
sets damaged files aside, fetches one mirror copy, names it, or refuses. A mirror copy that fails its checks when
fetched is marked damaged in the description and the plan is made again.

Each decision names its rule: the same table stands in CHECKPOINTING_GUIDE.md ("Resuming: the rules") and in
tests/test_resume_plan.py, so a user, a reviewer and a test read one rule.

Lineage: a launch continues its run (same run id) when it resumes the run's newest valid checkpoint, wherever that
is (the folder, its backup after damage, the mirror). A resume from an older checkpoint than the run's newest, in
the same folder, is a rollback: a new run whose parent is `run@step`, the later checkpoints set aside. A resume from
a file of another folder is a fork: a new run with its parent recorded, which inherits nothing its parent writes
to (its --log_dir, its --mirror).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class LocalFile:
    """One checkpoint file of this machine, as described before anything is decided."""

    path: Path
    step: int | None = None  # None: its metadata does not read (truncated, not a checkpoint)
    run: str | None = None  # the run that wrote it (None: unknown, or written before runs had an identity)
    problem: str | None = None  # why it failed verification; None when valid, or when not checked
    checked: bool = True  # verified (problem holds the verdict); False: read no further than its metadata
    log_dir: str | None = None  # the --log_dir its run wrote to

    @property
    def valid(self) -> bool:
        """Verified, and every checksum matched."""
        return self.checked and self.problem is None

    @property
    def damaged(self) -> bool:
        """Verified, and found unusable."""
        return self.checked and self.problem is not None


@dataclass(frozen=True)
class MirrorCopy:
    """One committed copy on the mirror."""

    step: int
    run: str | None
    key: str  # the blob's name on the mirror
    problem: str | None = None  # set once a fetch found it unusable
    entry: dict | None = field(default=None, compare=False, repr=False)  # the mirror's own record, for the fetch


@dataclass(frozen=True)
class MirrorView:
    """What --mirror holds, listed once at start; or why it could not be read."""

    url: str  # without credentials
    copies: tuple[MirrorCopy, ...] = ()  # committed, newest first
    error: str | None = None  # the mirror cannot be read: why


@dataclass(frozen=True)
class NodeCheckpoint:
    """Another node's newest valid checkpoint, newer than the newest valid one of rank 0's folder."""

    rank: int  # the node's first global rank
    host: str
    folder: str
    step: int
    run: str | None


@dataclass(frozen=True)
class Situation:
    """Everything a launch can start from, and what the user asked for."""

    resume: str | None  # --resume: None, latest, auto, latest_backup, best, or a path
    folder: Path  # --checkpoint_dir
    local: tuple[LocalFile, ...] = ()  # the folder's checkpoint names, in --resume latest's fallback order
    extra: tuple[LocalFile, ...] = ()  # names taken only when asked for by name (best_model.pt), verified too
    set_aside: tuple[Path, ...] = ()  # files set aside earlier (*.corrupt, *.abandoned): kept, never resumed from
    named: LocalFile | None = None  # the file --resume names (latest_backup, best, a path; problem MISSING if none)
    mirror: MirrorView | None = None  # None: no --mirror given
    nodes: tuple[NodeCheckpoint, ...] = ()
    run_id: str | None = None  # --run_id
    log_dir: str | None = None  # --log_dir, when given


@dataclass(frozen=True)
class Plan:
    """Where the launch starts, and why: `message` is one line that says what was found and, for a refusal, what to
    do."""

    rule: str  # the row of the rules table
    action: str  # new, resume (from `local`), fetch (`copy`, then resume from it), refuse
    message: str
    local: LocalFile | None = None  # resume: this file; fetch: the local fallback if the fetch cannot be written
    copy: MirrorCopy | None = None
    run: str | None = None  # the run this launch continues; None: a new identity (new run, rollback, fork)
    parent: str | None = None  # rollback or fork: "run@step" it branches from
    lineage: str = "continue"  # continue, rollback (same folder, an older step), fork (another folder), new
    set_aside: tuple[Path, ...] = ()  # damaged files to set aside before the start
    mirror_holds: int | None = None  # the newest step of this run on the mirror (None: none)
    mirror_seen: bool = True  # False: the mirror could not be read, so what it holds of this run is not known


CONTINUING = ("latest", "auto")
MISSING = "does not exist"  # the problem of a named file that is not there


def plan(s: Situation) -> Plan:
    """The one decision: where this launch starts (see the module's docstring and the guide's rules table)."""
    if s.resume is None:
        return _new(s)
    if s.resume in CONTINUING:
        return _continue(s)
    return _named(s)


def _names(files) -> str:
    shown = [Path(f.path if isinstance(f, LocalFile) else f).name for f in files]
    return ", ".join(shown[:3]) + (f" and {len(shown) - 3} more" if len(shown) > 3 else "")


def _problems(files) -> str:
    return "; ".join(f"{f.path.name} is not usable ({f.problem})" for f in files)


def _run(run: str | None) -> str:
    return f"run {run}" if run else "a run without an identity"


def _new(s: Situation) -> Plan:
    held = [f.path for f in s.local] + list(s.set_aside)
    if held:
        return Plan("N2", "refuse", f"{s.folder}/ already holds checkpoints ({_names(held)}): continue that run with "
                                    "--resume latest, or start a new one with another --checkpoint_dir")
    return Plan("N1", "new", "new run", lineage="new")


def _continue(s: Situation) -> Plan:
    """--resume latest / auto: the run's newest valid checkpoint, from the folder, the mirror or another node."""
    valid = next((f for f in s.local if f.valid), None)
    damaged = tuple(f for f in s.local if f.damaged)
    aside = tuple(f.path for f in (*damaged, *s.extra) if f.damaged)
    run = valid.run if valid else (next((f.run for f in damaged if f.run), None) or s.run_id)
    if s.run_id and run and run != s.run_id:
        return Plan("I1", "refuse", f"the checkpoints in {s.folder}/ belong to run {run}, not --run_id {s.run_id}: "
                                    "drop --run_id, or point --checkpoint_dir at that run's folder")
    skipped = _skipped(s, valid)
    if s.mirror is None:
        if valid:
            return _resume_local(s, "L1", valid, f"resuming from {valid.path.name}{skipped} (step {valid.step} in "
                                 f"{s.folder}/)", aside,
                                 mirror_seen=False)  # a --mirror the run inherits is not looked at before the start
        return _nothing(s, damaged, "")
    if s.mirror.error:
        if valid:
            return _resume_local(s, "U1", valid, f"MIRROR UNAVAILABLE: {s.mirror.error}. Resuming from the local "
                                 f"checkpoint {valid.path} (step {valid.step}){skipped}; the mirror may hold a newer "
                                 "one: this launch uploads to it only once it has seen that it does not", aside,
                                 mirror_seen=False)
        return Plan("U2", "refuse", f"the mirror cannot be read ({s.mirror.error}) and {s.folder}/ has no valid "
                                    f"checkpoint{_found(s, damaged)}: nothing was changed. Fix the mirror or its "
                                    "credentials and launch again (a new run never starts while the mirror may hold "
                                    "this run's checkpoints)")
    copies = s.mirror.copies
    if run is None and not valid:
        runs = list(dict.fromkeys(c.run for c in copies))
        if len(runs) > 1:
            listing = "; ".join(f"{_run(r)} (newest step {next(c.step for c in copies if c.run == r)})" for r in runs)
            return Plan("R1", "refuse", f"{s.folder}/ has no valid checkpoint{_found(s, damaged)} and the mirror "
                                        f"{s.mirror.url} holds checkpoints of several runs ({listing}): choose one "
                                        "with --run_id ID")
        run = runs[0] if runs else None
    mine = [c for c in copies if c.run == run]
    usable = [c for c in mine if c.problem is None]
    if valid and (not usable or usable[0].step <= valid.step):
        holds = "nothing" if not usable else f"step {usable[0].step}, nothing newer"
        return _resume_local(s, "R2", valid, f"resuming from the local checkpoint {valid.path} (step {valid.step}; the "
                             f"mirror holds {holds} of {_run(run)}){skipped}", aside,
                             holds=usable[0].step if usable else None)
    if usable:
        copy = usable[0]
        where = (f"the mirror holds a newer checkpoint of {_run(run)} than {s.folder}/ (step {valid.step})" if valid
                 else f"no valid local checkpoint in {s.folder}/")
        return _check_nodes(s, Plan("R3", "fetch", f"{where}: resuming from the MIRROR's step {copy.step} "
                                                   f"({s.mirror.url}), downloaded and verified{skipped}", local=valid,
                                    copy=copy, run=run, set_aside=aside, mirror_holds=copy.step), copy.step)
    if mine:
        steps = ", ".join(str(c.step) for c in mine)
        return Plan("R4", "refuse", f"every copy of {_run(run)} on the mirror {s.mirror.url} failed its checks (steps "
                                    f"{steps}) and {s.folder}/ has no valid checkpoint{_found(s, damaged)}: nothing "
                                    "was changed. Restore a copy of the folder or of the mirror")
    others = sorted({_run(c.run) for c in copies})
    return _nothing(s, damaged, f" nor on the mirror {s.mirror.url}"
                                + (f" (it holds checkpoints of {', '.join(others)} only)" if others else ""))


def _skipped(s: Situation, valid: LocalFile | None) -> str:
    """What a resume from `valid` sets aside, as the message says it: the damaged names it fell back past, and those
    found damaged after it (a resume verifies every name, so that every name a later resume could pick verifies)."""
    before = s.local[:s.local.index(valid)] if valid else s.local
    later = [f for f in (*s.local, *s.extra) if f.damaged and f not in before]
    said = "" if not any(f.damaged for f in before) else (
        f" after skipping {sum(f.damaged for f in before)} unusable checkpoint(s), falling back past each and "
        f"setting it aside ({_problems([f for f in before if f.damaged])})")
    return said + ("" if not later else f"; {len(later)} other damaged checkpoint(s) set aside too "
                                       f"({_problems(later)})")


def _found(s: Situation, damaged: tuple[LocalFile, ...]) -> str:
    if damaged:
        return f" (every one is damaged: {_problems(damaged)})"
    return " (only files set aside earlier)" if s.set_aside else ""


def _nothing(s: Situation, damaged: tuple[LocalFile, ...], mirror: str) -> Plan:
    """No valid checkpoint anywhere: a new run only for auto on a folder without a single checkpoint file."""
    if s.local or s.set_aside:
        return Plan("L2", "refuse", f"no valid checkpoint in {s.folder}/{_found(s, damaged)}{mirror}: nothing was "
                                    "changed. Restore a copy of the folder (or give --mirror URL if the run had one), "
                                    "or start a new run in another --checkpoint_dir")
    if s.resume == "auto":
        return _check_nodes(s, Plan("L3", "new", f"--resume auto: no checkpoint in {s.folder}/{mirror}, starting a "
                                                 "new run", lineage="new"), -1)
    return Plan("L4", "refuse", f"--resume latest: no checkpoint in {s.folder}/{mirror}; start without --resume, or "
                                "point --checkpoint_dir at the run's checkpoint folder")


def _resume_local(s: Situation, rule: str, valid: LocalFile, message: str, aside: tuple[Path, ...],
                  holds: int | None = None, mirror_seen: bool = True) -> Plan:
    decision = Plan(rule, "resume", message, local=valid, run=valid.run or s.run_id, set_aside=aside,
                    mirror_holds=holds, mirror_seen=mirror_seen)
    return _check_nodes(s, decision, valid.step)


def _check_nodes(s: Situation, decision: Plan, step: int) -> Plan:
    """Another node's newer checkpoint is never overwritten by rank 0's older choice: the launch is refused."""
    newer = [n for n in s.nodes if n.step > step]
    if not newer:
        return decision
    n = newer[0]
    whose = "this run" if decision.run and n.run == decision.run else _run(n.run)
    chosen = f"newer than step {step}, which this launch would start from" if step >= 0 else \
        "while this launch would start a new run"
    return Plan("M1", "refuse", f"the node of rank {n.rank} ({n.host}) holds step {n.step} of {whose} in {n.folder}/, "
                                f"{chosen}: nothing was changed. Copy that node's checkpoint folder to the node of "
                                "rank 0 (or launch with that node first), or move its checkpoints away if they are "
                                "not wanted")


def _named(s: Situation) -> Plan:
    """--resume latest_backup / best / a path: that file; a rollback or a fork when it is not the run's newest."""
    f, flag = s.named, f"--resume {s.resume}"
    if f.problem == MISSING:
        return Plan("P1", "refuse", f"{flag}: {f.path} does not exist; run ./list_checkpoints.sh --checkpoint_dir "
                                    f"{s.folder} to see what there is")
    if not f.valid:
        return Plan("P1", "refuse", f"{flag}: {f.path} is not usable ({f.problem}); try --resume latest, which "
                                    "falls back to the newest valid checkpoint")
    if os.path.realpath(f.path.parent) != os.path.realpath(s.folder):
        return _fork(s, f)
    if s.run_id and f.run and f.run != s.run_id:
        return Plan("I1", "refuse", f"{f.path} belongs to run {f.run}, not --run_id {s.run_id}: drop --run_id")
    damaged = tuple(g.path for g in (*s.local, *s.extra) if g.damaged)
    on_mirror = [c.step for c in (s.mirror.copies if s.mirror else ()) if c.run == f.run and c.problem is None]
    newest = max([g.step for g in s.local if g.valid] + on_mirror, default=None)
    if newest is None or f.step >= newest:
        return Plan("P2", "resume", f"resuming from {f.path} (step {f.step}, the run's newest)", local=f,
                    run=f.run or s.run_id, set_aside=damaged, mirror_holds=max(on_mirror, default=None),
                    mirror_seen=bool(s.mirror and not s.mirror.error))
    return Plan("P3", "resume", f"resuming from {f.path} (step {f.step}), older than the run's newest (step {newest}): "
                                f"a rollback, which continues as a new run branched from {_run(f.run)} at step "
                                f"{f.step}; the later checkpoints in {s.folder}/ are set aside, never deleted",
                local=f, parent=f"{f.run or 'unnamed'}@{f.step}", lineage="rollback", set_aside=damaged)


def _fork(s: Situation, f: LocalFile) -> Plan:
    """A file of another folder: a new run with its parent recorded, sharing nothing its parent writes to."""
    held = [g.path for g in s.local] + list(s.set_aside)
    if held:
        return Plan("F2", "refuse", f"--checkpoint_dir {s.folder} already holds checkpoints ({_names(held)}): resuming "
                                    f"{f.path} from another folder starts a new run (a fork of {_run(f.run)}), which "
                                    "needs a --checkpoint_dir of its own")
    if s.log_dir is None or (f.log_dir is not None and os.path.realpath(s.log_dir) == os.path.realpath(f.log_dir)):
        return Plan("F3", "refuse", f"resuming {f.path} into {s.folder}/ is a fork of {_run(f.run)}: a new run, which "
                                    f"must not write into its parent's --log_dir ({f.log_dir}): give it its own, "
                                    "e.g. --log_dir logs-fork")
    if s.mirror is not None and s.mirror.copies:
        runs = ", ".join(sorted({_run(c.run) for c in s.mirror.copies}))
        return Plan("F4", "refuse", f"the fork of {_run(f.run)} into {s.folder}/ is a new run, and the mirror "
                                    f"{s.mirror.url} already holds checkpoints of {runs}: give the fork a --mirror URL "
                                    "of its own (or none)")
    return Plan("F1", "resume", f"resuming {f.path} (step {f.step}) into {s.folder}/: a fork, which continues as a new "
                                f"run branched from {_run(f.run)} at step {f.step}; it inherits neither its parent's "
                                "--log_dir nor its --mirror (give it one of its own with --mirror URL)", local=f,
                parent=f"{f.run or 'unnamed'}@{f.step}", lineage="fork")


def marked_damaged(s: Situation, copy: MirrorCopy, problem: str) -> Situation:
    """The description after a fetch found `copy` unusable (the plan is then made again)."""
    copies = tuple(replace(c, problem=problem) if c == copy else c for c in s.mirror.copies)
    return replace(s, mirror=replace(s.mirror, copies=copies))
