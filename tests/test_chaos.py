"""The seeded fault campaign of tests/chaos.py, on a fixed set of seeds: together they inject every fault kind at
least once (kill -9 of the job, of one worker, of torchrun; SIGTERM, SIGINT, SIGUSR1; a write stuck past
--max_save_minutes; a full disk; an S3 server that hangs, dies, restarts; truncated, flipped and deleted checkpoint
files; a lost folder; another world size; a fork into a new folder), each followed by the user's recovery, and every
invariant is checked after each recovery and at the end; and a schedule written by hand for a damaged name behind
the one a resume takes and the two forks that must be refused. About 15 trainer launches (2 to 3 minutes on 2 cores).

A failure names each violation with the command line that replays its schedule:
    python tests/chaos.py --replay '{"seed":...}'
Longer campaigns: python tests/chaos.py --minutes 60 --seed 1 (see tests/chaos.py)."""

import os
import warnings

import pytest

import chaos

# found with chaos.generate(): the cheapest set of seeds (1 + its ending faults + its forks launches each) whose
# schedules together draw every kind, all at max_steps 40 (one reference run)
SEEDS = (10, 2547, 3731)
# and one schedule written by hand for what those seeds do not draw: a damaged name after the valid one the resume
# takes (latest_backup.pt, after a stop at step 14: every name must verify after the recovery), and the two forks
# that would share what their parent writes to (its --log_dir; its mirror), which must be refused having written
# nothing
TARGETED = ('{"seed":9001,"max_steps":40,"nproc":2,"faults":[["sigterm",{"after":10}],'
            '["flip_byte",{"pick":0.2,"frac":0.5}],'
            '["fork",{"pick":0.0,"steps":2,"log":"inherit","mirror":"none","nproc":1}],'
            '["fork",{"pick":0.0,"steps":2,"log":"own","mirror":"same","nproc":1}]]}')


def test_the_seeds_draw_every_fault_kind():
    drawn = {f.kind for seed in SEEDS for f in chaos.generate(seed).faults}
    assert drawn == set(chaos.KINDS), sorted(set(chaos.KINDS) - drawn)
    assert any(f.get("mid_save") for seed in SEEDS for f in chaos.generate(seed).faults)  # a kill mid-write too


def test_a_schedule_prints_and_parses_back_to_itself():
    for schedule in [*(chaos.generate(seed) for seed in SEEDS), chaos.Schedule.parse(TARGETED)]:
        again = chaos.Schedule.parse(schedule.to_string())
        assert again.to_string() == schedule.to_string() and again.seed == schedule.seed
    with pytest.raises(ValueError, match="between launches"):
        chaos.Schedule.parse('{"seed":1,"max_steps":40,"faults":[["truncate",{"pick":0.5}]]}')


@pytest.mark.xdist_group("s3")  # it kills, pauses and restarts the session's S3 server
@pytest.mark.timeout(900)  # about 15 launches: 2.5 minutes on 2 idle cores, 3 times that with 3 other suites running
def test_seeded_fault_campaign(tmp_path, s3_server):
    campaign = chaos.Campaign(tmp_path, server=s3_server)
    try:
        for schedule in [*(chaos.generate(seed) for seed in SEEDS), chaos.Schedule.parse(TARGETED)]:
            campaign.run(schedule)
    finally:
        campaign.close()
    report = campaign.report()
    print(report)
    assert not campaign.violations, f"{len(campaign.violations)} violation(s):\n{report}"
    skipped = campaign.skipped
    if skipped:  # disk_full needs a tmpfs (root); CI sets REQUIRE_REAL_FILESYSTEM_TESTS=1, where that is a failure
        reasons = "; ".join(f"{k}: {why}" for k, why in skipped.items())
        if os.environ.get("REQUIRE_REAL_FILESYSTEM_TESTS") == "1":
            pytest.fail(f"fault kinds skipped ({reasons}); REQUIRE_REAL_FILESYSTEM_TESTS=1 requires them")
        warnings.warn(f"fault kinds skipped: {reasons}")
    flip, *forks = campaign.results[-1].records[1:]  # the hand-written schedule hit what it was written for
    assert flip.note.startswith("latest_backup.pt") and all(f.note.endswith(": refused") for f in forks), report
    counts = campaign.injected_counts()
    missing = sorted(k for k, n in counts.items() if n == 0 and k not in skipped)
    assert not missing, f"fault kinds never injected: {missing}\n{report}"
