"""Surviving the loss of the machine, end to end: real torchrun runs that mirror their checkpoints to a real S3 server
(SeaweedFS on 127.0.0.1, see tests/s3_server.py) or to a plain folder, are killed, lose their local folder, and
continue from the mirror bit for bit; a damaged remote copy, a server that dies and comes back, a server that hangs."""

import os
import shutil
import signal
import uuid

import pytest

import list_checkpoints
import train_improved as T
from helpers import finish, kill_9_everything, last_step, launch, run, wait_for
from test_e2e_resume import STEPS, assert_same_run, data, reference, run_args  # noqa: F401 (fixtures)


# meant to run every S3 test on one pytest-xdist worker, so that the session starts one S3 server, not one per worker
# (an idle SeaweedFS takes about 6% of a core). pytest 9.2 makes pytest-xdist 3.8 ignore the group (pytest-xdist
# issue #1386): each worker then starts a server of its own (the fixture is per worker process). Correct either
# way: a test kills, pauses and restarts only its own worker's server.
pytestmark = pytest.mark.xdist_group("s3")


def s3_url(server):
    return f"s3://{server.bucket}/run-{uuid.uuid4().hex[:8]}"


def mirror_env(server):
    return server.env if server is not None else {}


def remote_checkpoints(server, url):
    """The checkpoints committed on the mirror (manifests whose blob is whole), newest first, listed through a new
    client (poll it every 0.25 s at most)."""
    from mirror import Mirror
    with pytest.MonkeyPatch.context() as mp:
        for k, v in mirror_env(server).items():
            mp.setenv(k, v)
        return Mirror(url).remote_checkpoints()


def committed(server, url):
    """The steps of remote_checkpoints(), newest first."""
    return [c["step"] for c in remote_checkpoints(server, url)]


def kill_lose_the_disk_and_continue_from_the_mirror(tmp_path, data, reference, url, server, damage_newest=False):
    """A mirrored 2-process run is killed once the mirror holds two checkpoints, its folder deleted, and a new run
    continues from the mirror: from the newest copy, or with damage_newest (one flipped byte in the newest remote
    copy) from the one before it, saying why. Either way it ends bit for bit as the uninterrupted run."""
    env = mirror_env(server)
    proc = launch(run_args(tmp_path, data, "--mirror", url), extra_env=env)
    wait_for(lambda: last_step(tmp_path / "logs") >= 17 and len(committed(server, url)) >= 2, timeout=180, proc=proc,
             interval=0.25)
    kill_9_everything(proc)  # the machine is gone...
    proc.communicate(timeout=60)
    newest, previous = remote_checkpoints(server, url)[:2]
    if damage_newest:
        fs = server.filesystem()
        blob = bytearray(fs.cat_file(newest["key"]))
        blob[len(blob) // 2] ^= 0xFF
        fs.pipe_file(newest["key"], bytes(blob))
    shutil.rmtree(tmp_path / "ck")  # ...with its disk
    proc = launch(run_args(tmp_path, data, "--resume", "auto", "--mirror", url), extra_env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    used = previous if damage_newest else newest
    if damage_newest:
        assert f"the copy of step {newest['step']}" in out and "sha256 mismatch" in out
        assert "trying the next older" in out
    assert f"resuming from the MIRROR's step {used['step']}" in out
    assert f"resumed from {tmp_path / 'ck' / 'latest.pt'}: step {used['step']}," in out
    assert_same_run(tmp_path, reference)
    assert f"mirror: the last checkpoint (step {STEPS}) is on" in out
    return out


def test_s3_mirror_kill_the_run_delete_the_folder_and_a_damaged_newest_copy_falls_back_bit_exact(tmp_path, data,
                                                                                                  reference,
                                                                                                  s3_server):
    url = s3_url(s3_server)
    out = kill_lose_the_disk_and_continue_from_the_mirror(tmp_path, data, reference, url, s3_server,
                                                           damage_newest=True)
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in out  # no secret in any log line


def test_plain_folder_mirror_kill_the_run_delete_the_folder_and_continue_bit_exact(tmp_path, data, reference):
    kill_lose_the_disk_and_continue_from_the_mirror(tmp_path, data, reference, str(tmp_path / "second-disk"), None)


def start_a_long_mirrored_run(tmp_path, data, server):
    """A run that saves every 5 steps and mirrors to S3, once its first checkpoint is committed there."""
    url = s3_url(server)
    args = run_args(tmp_path, data, "--mirror", url, "--max_steps", "100000", "--max_checkpoint_overhead", "1")
    proc = launch(args, extra_env=server.env)
    wait_for(lambda: committed(server, url), timeout=180, proc=proc, interval=0.25)
    return proc, url


def test_the_s3_server_dies_and_comes_back_training_never_stops_and_the_mirror_catches_up(tmp_path, data,
                                                                                          s3_server):
    proc, url = start_a_long_mirrored_run(tmp_path, data, s3_server)
    try:
        s3_server.kill()
        down_at = last_step(tmp_path / "logs")
        wait_for(lambda: last_step(tmp_path / "logs") >= down_at + 15, timeout=180, proc=proc)  # trains on
    finally:
        s3_server.restart()
    local = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"]
    wait_for(lambda: committed(s3_server, url)[0] >= local, timeout=180, proc=proc, interval=0.25)  # caught up
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert "MIRROR" in out and "mirror recovered" in out
    assert "MIRROR FAILING (" in out  # the step line said so meanwhile
    stopped = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"]
    assert f"mirror: the last checkpoint (step {stopped}) is on" in out
    assert committed(s3_server, url)[0] == stopped


def test_a_hung_s3_server_never_holds_training_and_the_uploader_skips_to_the_newest(tmp_path, data, s3_server):
    """Training must not wait for a mirror that hangs (SIGSTOP): the steps go on, saves go on, and when the server
    answers again only the newest of the checkpoints that piled up is uploaded. (Throughput with a stalled mirror is
    measured in benchmarks/bench_mirror.py, not asserted here.)"""
    proc, url = start_a_long_mirrored_run(tmp_path, data, s3_server)
    try:
        s3_server.pause()
        hung_at = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"]
        wait_for(lambda: T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"] >= hung_at + 20,
                 timeout=180, proc=proc)  # four more local saves while the mirror hangs
    finally:
        s3_server.resume()
    piled_up = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"]
    wait_for(lambda: committed(s3_server, url)[0] >= piled_up, timeout=240, proc=proc, interval=0.25)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode in (0, 1), out[-3000:]  # torchrun's own code after a signal
    steps = sorted(committed(s3_server, url))
    skipped = [s for s in range(hung_at + 5, piled_up, 5) if s not in steps]
    assert skipped, (steps, hung_at, piled_up)  # older ones that piled up were skipped, not uploaded late


def test_a_mirror_that_cannot_be_used_is_a_one_line_error_before_training(tmp_path, data, s3_server):
    proc = launch(run_args(tmp_path, data, "--mirror", f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/x"), nproc=None,
                  extra_env=s3_server.env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: mirror s3://no-such-bucket-") and "does not exist" in last
    assert "step " not in out and not (tmp_path / "ck").exists()


def test_list_checkpoints_lists_the_mirror_and_verifies_it(tmp_path, data, capsys):
    url = str(tmp_path / "second-disk")
    result = run(run_args(tmp_path, data, "--mirror", url, "--max_steps", "10"), nproc=None)
    assert result.returncode == 0, result.stdout[-3000:]
    assert list_checkpoints.main(["--mirror", url, "--verify"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:] if line.split()[0].isdigit()}
    assert sorted(int(s) for s in rows) == [5, 10] and all(line.endswith("valid") for line in rows.values())
    # the names each copy has now: latest.pt only on the newest
    assert rows["10"].endswith("latest.pt -> valid") and "rolling_step_000005.pt" in rows["5"]
    assert "best_model.pt" in rows["10"]  # the trainer hands the mirror every name of the save (best kept, never skipped)
    assert "latest.pt" not in rows["5"]
    blob = next((tmp_path / "second-disk" / "blobs").glob("step_000010-*.pt"))
    damaged = bytearray(blob.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blob.write_bytes(bytes(damaged))
    assert list_checkpoints.main(["--mirror", url, "--verify"]) == 1
    assert "INVALID: sha256 mismatch" in capsys.readouterr().out


def test_credentials_in_the_mirror_url_never_reach_a_log_line(tmp_path, data, s3_server):
    """--mirror s3://KEY:SECRET@bucket/prefix, with a secret holding '/' and '+' as AWS secrets do and '@' as
    passwords may (raw, and later percent-encoded as %40), and no credentials in the environment: the run uploads
    with them, and neither the secret, any part of it, nor the key appears in what it prints or in train.log (the
    trainer's config line and the mirror's own messages both redact)."""
    from s3_server import REGION, URL_KEY, URL_SECRET
    url = f"s3://{URL_KEY}:{URL_SECRET}@{s3_server.bucket}/run-{uuid.uuid4().hex[:8]}"
    proc = launch(run_args(tmp_path, data, "--mirror", url, "--max_steps", "6"),
                  extra_env={"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": REGION},
                  unset_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))  # the URL's only
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-3000:]
    assert "mirror: the last checkpoint (step 6) is on s3://" in out  # the URL's credentials did work
    assert committed(s3_server, url.replace(f"{URL_KEY}:{URL_SECRET}@", ""))[0] == 6
    said = out + (tmp_path / "logs" / "train.log").read_text()
    # and the tails: what a cut at the first '/' or the first '@' would leave
    secrets = (URL_SECRET, URL_KEY, URL_SECRET.partition("/")[2], URL_SECRET.partition("@")[2])
    for secret in secrets:
        assert secret not in said, secret
    assert '"mirror": "s3://' + s3_server.bucket in said  # the config line names the mirror, redacted
    # nor in any byte the run wrote: checkpoints (their saved settings), metrics, TensorBoard events, every object
    # on the bucket
    written = {str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    fs = s3_server.filesystem()
    prefix = url.rpartition("@")[2]
    written |= {key: fs.cat_file(key) for key in fs.find(prefix)}
    assert any(name.endswith("latest.pt") for name in written) and any("/blobs/" in name for name in written)
    assert any("tfevents" in name for name in written) and any(name.endswith("metrics.jsonl") for name in written)
    for name, content in written.items():
        for secret in secrets:
            assert secret.encode() not in content, (name, secret)
    # and a resume that does not give the URL again is told why its credentials are missing
    again = launch(run_args(tmp_path, data, "--resume", "latest", "--max_steps", "7", "--mirror_wait_seconds", "1"),
                   extra_env={"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": REGION},
                   unset_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    out = finish(again, 240)
    assert again.returncode == 0, out[-3000:]
    assert "the run's --mirror URL carried credentials, which are never stored: give --mirror again" in out
    # given again with them (the '@' percent-encoded now), the URL is no change of settings (the saved one has none:
    # they compare as shown); --mirror_wait_seconds given again too: the launch before saved 1 s, too short to count
    # on an upload's end on a busy machine
    from urllib.parse import quote
    encoded = url.replace(URL_SECRET, quote(URL_SECRET, safe="/+"))
    assert "%40" in encoded
    again = launch(run_args(tmp_path, data, "--resume", "latest", "--max_steps", "8", "--mirror", encoded,
                            "--mirror_wait_seconds", "120"),
                   extra_env={"AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_DEFAULT_REGION": REGION},
                   unset_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    out = finish(again, 240)
    assert again.returncode == 0, out[-3000:]
    assert "mirror:" not in out.partition("settings changed since the checkpoint")[2].partition("\n")[0]
    assert "mirror: the last checkpoint (step 8) is on" in out
    assert not [s for s in (*secrets, quote(URL_SECRET, safe="/+")) if s in out]


def test_a_resumed_run_with_nothing_new_to_save_finds_its_checkpoint_on_the_mirror(tmp_path, data):
    url = str(tmp_path / "second-disk")
    first = run(run_args(tmp_path, data, "--mirror", url, "--max_steps", "10"), nproc=None)
    assert first.returncode == 0, first.stdout[-3000:]
    again = run(run_args(tmp_path, data, "--resume", "latest", "--max_steps", "10"), nproc=None)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "MIRROR BEHIND" not in again.stdout
    assert "mirror: the last checkpoint (step 10) is on" in again.stdout


def test_a_mirror_outage_never_blocks_a_restart_that_has_a_valid_local_checkpoint(tmp_path, data):
    """The mirror is unreachable (nothing listens at its endpoint) when the run restarts: with a valid latest.pt it
    resumes from it, warns, trains on and retries the uploads; only a resume that needs the mirror (an empty folder)
    stops, with one line."""
    first = run(run_args(tmp_path, data, "--max_steps", "6"), nproc=None)
    assert first.returncode == 0, first.stdout[-3000:]
    dead = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "any", "AWS_SECRET_ACCESS_KEY": "any"}
    args = ("--resume", "latest", "--mirror", "s3://test-bucket/outage", "--mirror_wait_seconds", "1")
    proc = launch(run_args(tmp_path, data, *args, "--max_steps", "8"), nproc=None, extra_env=dead)
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-3000:]
    assert "MIRROR UNAVAILABLE: mirror s3://test-bucket/outage: could not list the checkpoints" in out
    assert f"resumed from {tmp_path / 'ck' / 'latest.pt'}: step 6," in out
    assert "MIRROR UNAVAILABLE at start" in out and "training finished at step 8" in out
    assert "MIRROR BEHIND: the last checkpoint (step 8)" in out  # said, not fatal
    shutil.rmtree(tmp_path / "ck")
    proc = launch(run_args(tmp_path, data, *args, "--max_steps", "10"), nproc=None, extra_env=dead)
    out = finish(proc, 240)
    assert proc.returncode == 2, out[-3000:]
    assert "error: the mirror cannot be read (mirror s3://test-bucket/outage: could not list the checkpoints" in out
    assert "nothing was changed" in out and "Traceback" not in out


def test_read_only_credentials_can_resume_from_the_mirror(tmp_path, data, s3_server):
    """Resuming only reads the mirror: with credentials that may read and list but not write, a run whose folder
    is gone fetches its checkpoint and trains on; its uploads fail, which is said and never fatal."""
    from s3_server import READ_KEY, READ_SECRET
    url = s3_url(s3_server)
    proc = launch(run_args(tmp_path, data, "--max_steps", "6", "--mirror", url), nproc=None, extra_env=s3_server.env)
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-3000:]
    shutil.rmtree(tmp_path / "ck")
    reader = dict(s3_server.env, AWS_ACCESS_KEY_ID=READ_KEY, AWS_SECRET_ACCESS_KEY=READ_SECRET)
    proc = launch(run_args(tmp_path, data, "--resume", "latest", "--mirror", url, "--max_steps", "8",
                           "--mirror_wait_seconds", "1"), nproc=None, extra_env=reader)
    out = finish(proc, 240)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from the MIRROR's step 6" in out and "MIRROR UNAVAILABLE at start" in out
    assert "training finished at step 8" in out


def test_each_run_on_a_mirror_url_keeps_to_its_own_checkpoints(tmp_path, data):
    """Run identity: a new run is refused on a URL that holds another run's checkpoints; resuming into an empty folder
    from a URL that holds several runs lists them and asks for one; the chosen run resumes from its own newest copy
    and its retention never touches the other run's; a resume from an older checkpoint continues as a new run, which
    never takes the abandoned later copies."""
    url, other_url = tmp_path / "mirror", tmp_path / "other-mirror"
    a = run(run_args(tmp_path / "a", data, "--mirror", str(url), "--max_steps", "10", "--keep_last", "1"), nproc=None)
    assert a.returncode == 0, a.stdout[-3000:]
    run_a = T.CheckpointManager.load(tmp_path / "a" / "ck" / "latest.pt")["args"]["run_id"]
    b = run(run_args(tmp_path / "b", data, "--mirror", str(url), "--max_steps", "4"), nproc=None)
    assert b.returncode == 2 and f"already holds checkpoints of another run (run {run_a}, newest step 10)" in b.stdout
    b = run(run_args(tmp_path / "b", data, "--mirror", str(other_url), "--max_steps", "4", "--seed", "2"), nproc=None)
    assert b.returncode == 0, b.stdout[-3000:]
    run_b = T.CheckpointManager.load(tmp_path / "b" / "ck" / "latest.pt")["args"]["run_id"]
    assert run_b != run_a
    shutil.copytree(other_url, url, dirs_exist_ok=True)  # two runs on one URL (as before runs had identities)
    shutil.rmtree(tmp_path / "a" / "ck")  # run A's machine is gone
    resume = ("--resume", "latest", "--mirror", str(url), "--max_steps", "14")
    asked = run(run_args(tmp_path / "a", data, *resume), nproc=None)
    assert asked.returncode == 2 and "holds checkpoints of several runs" in asked.stdout
    assert f"run {run_a} (newest step 10" in asked.stdout and f"run {run_b} (newest step 4" in asked.stdout
    chosen = run(run_args(tmp_path / "a", data, *resume, "--run_id", run_a), nproc=None)
    assert chosen.returncode == 0, chosen.stdout[-3000:]
    assert "resuming from the MIRROR's step 10" in chosen.stdout
    from mirror import Mirror
    runs = Mirror(str(url)).runs()
    assert runs[run_a]["step"] == 14 and runs[run_b]["step"] == 4  # A's retention (keep 1) left B's copy alone
    # back to step 10 by hand (e.g. after a divergence): a new run from there; its next resume stays on its branch
    assert T.CheckpointManager.load(tmp_path / "a" / "ck" / "latest_backup.pt")["step"] == 10
    back = run(run_args(tmp_path / "a", data, "--resume", "latest_backup", "--max_steps", "12"), nproc=None)
    assert back.returncode == 0, back.stdout[-3000:]
    assert "this continues as run " in back.stdout and f"branched from run {run_a}@10" in back.stdout
    assert f"rolled back to step 10: the records of steps 11-14 (run {run_a}, left behind" in back.stdout
    # the abandoned later checkpoints are set aside: the new branch's own files are kept and mirrored
    names = sorted(p.name for p in (tmp_path / "a" / "ck").iterdir())
    assert "rolling_step_000014.pt.abandoned" in names and "rolling_step_000014.pt" not in names
    assert "rolling_step_000012.pt" in names and "MIRROR BEHIND" not in back.stdout
    again = run(run_args(tmp_path / "a", data, "--resume", "latest", "--max_steps", "13", "--mirror", str(url)),
                nproc=None)
    assert again.returncode == 0, again.stdout[-3000:]
    assert ": step 12," in again.stdout and "MIRROR's step 14" not in again.stdout
