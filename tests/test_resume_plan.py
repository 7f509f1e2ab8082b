"""The resume plan as a table: one row a situation (every candidate described), the decision it must get.

The same rules stand in CHECKPOINTING_GUIDE.md ("Resuming: the rules"); the last tests check that every rule the plan
can answer with has a row here and a row there."""

import re
from pathlib import Path

import pytest

import resume_plan as R
from resume_plan import LocalFile, MirrorCopy, MirrorView, NodeCheckpoint, Situation

ROOT = Path(__file__).resolve().parents[1]
CK = Path("/runs/a/ck")


def ok(name, step, run="A", folder=CK, log_dir="logs-a"):
    return LocalFile(folder / name, step=step, run=run, log_dir=log_dir)


def bad(name, step=None, run=None):
    return LocalFile(CK / name, step=step, run=run, problem="checksum mismatch in data/3: the file is corrupted")


def later(name, step, run="A"):
    return LocalFile(CK / name, step=step, run=run, checked=False)


def copy(step, run="A", problem=None):
    return MirrorCopy(step=step, run=run, key=f"bucket/run/blobs/step_{step:06d}-0a1b2c.pt", problem=problem)


def mirror(*copies, error=None):
    return MirrorView("s3://bucket/run", tuple(copies), error)


def node(step, run="A", rank=1):
    return NodeCheckpoint(rank=rank, host="gpu-7", folder="ck", step=step, run=run)


VALID = (ok("latest.pt", 20), later("latest_backup.pt", 16), later("rolling_step_000020.pt", 20))
NEWEST_DAMAGED = (bad("latest.pt", 20, "A"), ok("latest_backup.pt", 16), later("rolling_step_000016.pt", 16))
ALL_DAMAGED = (bad("latest.pt"), bad("latest_backup.pt", 16, "A"))
TRUNCATED = (bad("latest.pt"), bad("rolling_step_000004.pt"))  # nothing readable: not even whose they were

# (id, situation, expected): expected holds the rule, the action, and what the decision must name
CASES = [
    ("new run in an empty folder", Situation(None, CK), dict(rule="N1", action="new")),
    ("new run over checkpoints", Situation(None, CK, local=VALID), dict(rule="N2", action="refuse",
                                                                         says="already holds checkpoints")),
    ("new run over files set aside only", Situation(None, CK, set_aside=(CK / "latest.pt.corrupt",)),
     dict(rule="N2", action="refuse", says="latest.pt.corrupt")),
    # --resume latest / auto, no mirror
    ("local all valid", Situation("latest", CK, local=VALID),
     dict(rule="L1", action="resume", source="latest.pt", run="A", lineage="continue", seen=False)),
    ("local newest damaged: its backup, the damaged one set aside", Situation("auto", CK, local=NEWEST_DAMAGED),
     dict(rule="L1", action="resume", source="latest_backup.pt", run="A", aside=["latest.pt"])),
    ("local valid, an older name and the best model damaged: every damaged name set aside",
     Situation("auto", CK, local=(ok("latest.pt", 20), bad("latest_backup.pt", 16, "A"), ok("rolling_step_000020.pt", 20)),
               extra=(bad("best_model.pt", 12, "A"),)),
     dict(rule="L1", action="resume", source="latest.pt", aside=["latest_backup.pt", "best_model.pt"],
          says="; 2 other damaged checkpoint(s) set aside too (latest_backup.pt is not usable")),
    ("local all damaged, no mirror", Situation("auto", CK, local=ALL_DAMAGED),
     dict(rule="L2", action="refuse", says="nothing was changed", aside=[])),
    ("local none, auto", Situation("auto", CK), dict(rule="L3", action="new")),
    ("local none, latest", Situation("latest", CK), dict(rule="L4", action="refuse", says="no checkpoint in")),
    # the silent restart from step 0 (finding 1): all damaged, a mirror that holds nothing
    ("local all damaged, mirror none", Situation("auto", CK, local=TRUNCATED, mirror=mirror()),
     dict(rule="L2", action="refuse", says="every one is damaged")),
    ("local none, mirror none, auto", Situation("auto", CK, mirror=mirror()), dict(rule="L3", action="new")),
    ("local none, mirror none, latest", Situation("latest", CK, mirror=mirror()), dict(rule="L4", action="refuse")),
    # an unreachable mirror
    ("local valid, mirror unreachable", Situation("auto", CK, local=VALID, mirror=mirror(error="timed out")),
     dict(rule="U1", action="resume", source="latest.pt", run="A", seen=False, says="MIRROR UNAVAILABLE")),
    ("local all damaged, mirror unreachable",
     Situation("auto", CK, local=ALL_DAMAGED, mirror=mirror(error="timed out")),
     dict(rule="U2", action="refuse", says="nothing was changed")),
    ("local none, mirror unreachable, auto", Situation("auto", CK, mirror=mirror(error="timed out")),
     dict(rule="U2", action="refuse", says="never starts while the mirror may hold")),
    # the mirror holds this run
    ("local valid, mirror this run older", Situation("latest", CK, local=VALID, mirror=mirror(copy(16), copy(12))),
     dict(rule="R2", action="resume", source="latest.pt", holds=16, seen=True)),
    ("local valid, mirror this run the same step", Situation("latest", CK, local=VALID, mirror=mirror(copy(20))),
     dict(rule="R2", action="resume", source="latest.pt", holds=20)),
    ("local older than the mirror", Situation("auto", CK, local=NEWEST_DAMAGED, mirror=mirror(copy(24), copy(20))),
     dict(rule="R3", action="fetch", copy=24, fallback="latest_backup.pt", run="A", aside=["latest.pt"])),
    ("local all damaged, mirror this run valid", Situation("auto", CK, local=ALL_DAMAGED, mirror=mirror(copy(20))),
     dict(rule="R3", action="fetch", copy=20, fallback=None, run="A", aside=["latest.pt", "latest_backup.pt"])),
    # finding 7: the lookup uses the local checkpoint's run, not --run_id (None here), never another run's copy
    ("local valid older, mirror this run newer and another run newest",
     Situation("latest", CK, local=(ok("latest.pt", 16),), mirror=mirror(copy(30, "B"), copy(24, "A"), copy(8, None))),
     dict(rule="R3", action="fetch", copy=24, run="A")),
    ("local none, mirror only one run: the machine is gone", Situation("auto", CK, mirror=mirror(copy(20, "B"))),
     dict(rule="R3", action="fetch", copy=20, run="B")),
    ("local none, mirror several runs", Situation("auto", CK, mirror=mirror(copy(20, "A"), copy(10, "B"))),
     dict(rule="R1", action="refuse", says="several runs (run A (newest step 20); run B (newest step 10))")),
    ("local none, mirror several runs, --run_id", Situation("auto", CK, mirror=mirror(copy(20, "A"), copy(10, "B")),
                                                           run_id="B"),
     dict(rule="R3", action="fetch", copy=10, run="B")),
    ("local truncated, mirror several runs", Situation("auto", CK, local=TRUNCATED,
                                                        mirror=mirror(copy(20, "A"), copy(10, "B"))),
     dict(rule="R1", action="refuse", says="every one is damaged")),
    ("local all damaged, mirror this run all damaged",
     Situation("auto", CK, local=ALL_DAMAGED,
               mirror=mirror(copy(20, problem="x"), copy(16, problem="x"), copy(9, "B"))),
     dict(rule="R4", action="refuse", says="every copy of run A on the mirror s3://bucket/run failed its checks")),
    ("local all damaged, mirror only other runs", Situation("auto", CK, local=ALL_DAMAGED, mirror=mirror(copy(9, "B"))),
     dict(rule="L2", action="refuse", says="it holds checkpoints of run B only")),
    ("local valid, mirror only other runs", Situation("auto", CK, local=VALID, mirror=mirror(copy(30, "B"))),
     dict(rule="R2", action="resume", source="latest.pt", run="A", holds=None)),
    ("mirror newest copy found damaged: the one before, still newer than local",
     Situation("auto", CK, local=(ok("latest.pt", 12),), mirror=mirror(copy(20, problem="failed its checks"),
                                                                       copy(16))),
     dict(rule="R3", action="fetch", copy=16, fallback="latest.pt")),
    ("mirror copies found damaged down to the local step", Situation("auto", CK, local=(ok("latest.pt", 12),),
                                                                     mirror=mirror(copy(20, problem="x"), copy(12))),
     dict(rule="R2", action="resume", source="latest.pt", holds=12)),
    ("--run_id of another run", Situation("latest", CK, local=VALID, run_id="B"),
     dict(rule="I1", action="refuse", says="belong to run A, not --run_id B")),
    # other nodes (no shared storage)
    ("one node", Situation("auto", CK, local=VALID, nodes=()), dict(rule="L1", action="resume")),
    ("a blind node with a newer step of this run", Situation("auto", CK, local=VALID, mirror=mirror(copy(20)),
                                                             nodes=(node(24),)),
     dict(rule="M1", action="refuse", says="rank 1 (gpu-7) holds step 24 of this run in ck/, newer than step 20")),
    ("a blind node with a newer step than the mirror's", Situation("auto", CK, mirror=mirror(copy(20)),
                                                                   nodes=(node(24),)),
     dict(rule="M1", action="refuse", says="step 24")),
    ("a node with a checkpoint, no other anywhere", Situation("auto", CK, nodes=(node(8, "B"),)),
     dict(rule="M1", action="refuse", says="while this launch would start a new run")),
    ("a node with an older step", Situation("auto", CK, local=VALID, nodes=(node(8),)), dict(rule="L1")),
    # --resume a file by name or path
    ("path missing", Situation(str(CK / "nope.pt"), CK, local=VALID, named=LocalFile(CK / "nope.pt",
                                                                                     problem=R.MISSING)),
     dict(rule="P1", action="refuse", says="nope.pt does not exist; run ./list_checkpoints.sh --checkpoint_dir")),
    ("path damaged", Situation("best", CK, local=VALID, named=bad("best_model.pt", 12, "A")),
     dict(rule="P1", action="refuse", says="is not usable (checksum mismatch")),
    ("path in the folder, the newest", Situation(str(CK / "latest.pt"), CK, local=VALID, named=VALID[0]),
     dict(rule="P2", action="resume", source="latest.pt", run="A", lineage="continue")),
    ("path in the folder, no checkpoint name there", Situation(str(CK / "start.pt"), CK, named=ok("start.pt", 10)),
     dict(rule="P2", action="resume", source="start.pt", run="A", lineage="continue")),
    ("path in the folder, older: a rollback",
     Situation("latest_backup", CK, local=VALID, named=ok("latest_backup.pt", 16)),
     dict(rule="P3", action="resume", source="latest_backup.pt", run=None, lineage="rollback", parent="A@16")),
    ("path in the folder, the newest locally but older than the mirror",
     Situation(str(CK / "latest.pt"), CK, local=VALID, named=VALID[0], mirror=mirror(copy(24))),
     dict(rule="P3", lineage="rollback", parent="A@20")),
    ("path in another folder: a fork", Situation(str(CK / "latest_backup.pt"), Path("/runs/b/ck"),
                                                 named=ok("latest_backup.pt", 16), log_dir="logs-b"),
     dict(rule="F1", action="resume", source="latest_backup.pt", run=None, lineage="fork", parent="A@16",
          says="inherits neither its parent's --log_dir nor its --mirror")),
    ("a fork into a folder with checkpoints", Situation(str(CK / "latest.pt"), Path("/runs/b/ck"), named=VALID[0],
                                                        local=(ok("latest.pt", 4, "B", Path("/runs/b/ck")),),
                                                        log_dir="logs-b"),
     dict(rule="F2", action="refuse", says="needs a --checkpoint_dir of its own")),
    ("a fork that would inherit its parent's --log_dir", Situation(str(CK / "latest.pt"), Path("/runs/b/ck"),
                                                                   named=VALID[0]),
     dict(rule="F3", action="refuse", says="its parent's --log_dir (logs-a)")),
    ("a fork given its parent's --log_dir", Situation(str(CK / "latest.pt"), Path("/runs/b/ck"), named=VALID[0],
                                                      log_dir="logs-a"),
     dict(rule="F3", action="refuse")),
    ("a fork given a mirror that holds its parent's copies",
     Situation(str(CK / "latest.pt"), Path("/runs/b/ck"), named=VALID[0], log_dir="logs-b", mirror=mirror(copy(20))),
     dict(rule="F4", action="refuse", says="give the fork a --mirror URL of its own")),
    ("a fork given an empty mirror of its own", Situation(str(CK / "latest.pt"), Path("/runs/b/ck"), named=VALID[0],
                                                          log_dir="logs-b", mirror=mirror()),
     dict(rule="F1", action="resume")),
    ("a rollback naming another run with --run_id", Situation("latest_backup", CK, local=VALID,
                                                              named=ok("latest_backup.pt", 16), run_id="B"),
     dict(rule="I1", action="refuse")),
]


@pytest.mark.parametrize("situation,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_plan_decides_each_situation_as_its_rule_says(situation, expected):
    decision = R.plan(situation)
    assert (decision.rule, decision.action) == (expected["rule"], expected.get("action", decision.action)), \
        decision.message
    if "source" in expected:
        assert decision.local.path.name == expected["source"]
    if "copy" in expected:
        assert decision.copy.step == expected["copy"] and decision.copy.run == expected.get("run", decision.copy.run)
    if "fallback" in expected:
        assert (decision.local.path.name if decision.local else None) == expected["fallback"]
    for key, field in (("run", "run"), ("lineage", "lineage"), ("parent", "parent"), ("holds", "mirror_holds"),
                       ("seen", "mirror_seen")):
        if key in expected:
            assert getattr(decision, field) == expected[key], (key, decision)
    if "aside" in expected:
        assert [p.name for p in decision.set_aside] == expected["aside"]
    if decision.action == "refuse":
        assert not decision.set_aside  # a refusal changes nothing
    assert expected.get("says", "") in decision.message


def test_a_copy_found_damaged_when_fetched_is_marked_and_the_plan_made_again():
    situation = Situation("auto", CK, local=(ok("latest.pt", 12),), mirror=mirror(copy(20), copy(16)))
    first = R.plan(situation)
    assert (first.rule, first.copy.step) == ("R3", 20)
    second = R.plan(R.marked_damaged(situation, first.copy, "failed its checks"))
    assert (second.rule, second.copy.step) == ("R3", 16)
    third = R.plan(R.marked_damaged(R.marked_damaged(situation, first.copy, "x"), second.copy, "x"))
    assert (third.rule, third.local.path.name) == ("R2", "latest.pt")


def rules_the_plan_answers() -> set[str]:
    source = (ROOT / "src" / "resume_plan.py").read_text()
    return set(re.findall(r'"([A-Z]\d)"', source))


def test_every_rule_of_the_plan_has_a_row_in_this_table():
    assert rules_the_plan_answers() == {c[2]["rule"] for c in CASES}


def test_the_guide_states_the_same_rules():
    guide = (ROOT / "CHECKPOINTING_GUIDE.md").read_text()
    section = guide.partition("### Resuming: the rules")[2].partition("**Lineage.**")[0]
    rows = re.findall(r"^\| ([A-Z]\d) \|", section, re.M)
    assert len(rows) == len(set(rows))
    acting = {"A1", "A2", "A3"}  # what the acting code does when a fetch or a rename fails: see test_resume_acts
    assert set(rows) == rules_the_plan_answers() | acting
