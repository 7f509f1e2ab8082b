"""Bounds that hold and words that are true: a console nobody reads, secrets in every form a URL can carry them, a
lock holder whose host name and pid repeat, start-up errors under two processes, bad input before anything is
written, and what the messages say (CHECKPOINTING_GUIDE.md: "No silent hang, no silent death", "Mirror off the
machine", "One run per checkpoint folder")."""

import os
import re
import shutil
import subprocess
import sys

import pytest

import train_improved as T
from helpers import EXACT_SAVES, ROOT, TINY_ARGS, TRAINER, finish, launch, run, start, trainer_env, write_bin_shard
from mirror import Mirror, MirrorError
from mirror_messages import redact_url, secrets_in


def args(tmp_path, shard_dir, *extra):
    return [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--eval_freq", "0",
            "--sample_freq", "0", "--checkpoint_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs"),
            *extra]


def test_a_console_nobody_reads_is_one_note_in_train_log_not_a_flood_on_stderr(tmp_path, shard_dir):
    """stdout is a pipe whose reader leaves after the first step line (as `| head` does): the run trains to its end,
    stderr gets nothing (Python's logging would print a '--- Logging error ---' traceback per record), and train.log
    says once that the console was given up."""
    proc = start([sys.executable, str(TRAINER), *args(tmp_path, shard_dir, "--max_steps", "30", "--log_freq", "1")],
                 stderr=subprocess.PIPE)
    for line in proc.stdout:
        if "| loss " in line:
            break
    proc.stdout.close()  # the reader is gone: the trainer's next write to stdout gets EPIPE
    assert proc.wait(timeout=180) == 0
    errors = proc.stderr.read()
    assert "Logging error" not in errors and "Traceback" not in errors and "BrokenPipe" not in errors, errors[-2000:]
    log_text = (tmp_path / "logs" / "train.log").read_text()
    assert log_text.count("can no longer be written (Broken pipe): the log goes on in train.log only") == 1
    assert "training finished at step 30" in log_text


SECRET_URLS = [  # (url, the secrets it carries, what it must show)
    ("s3://AKIAEXAMPLE:p@ss@bucket/prefix", ["p@ss", "AKIAEXAMPLE"], "s3://bucket/prefix"),
    ("s3://AKIAEXAMPLE:pa/ss+w0rd@bucket/prefix", ["pa/ss+w0rd", "ss+w0rd", "AKIAEXAMPLE"], "s3://bucket/prefix"),
    ("s3://AKIAEXAMPLE:p%40ss%2Bx@bucket/prefix", ["p@ss+x", "p%40ss%2Bx", "AKIAEXAMPLE"], "s3://bucket/prefix"),
    ("s3://AKIAEXAMPLE:a@b/c:d@bucket/prefix", ["a@b/c:d", "b/c:d", "c:d"], "s3://bucket/prefix"),
    ("az://container/run?sv=2024-05-04&ss=b&srt=co&sp=rwdl&sig=Abc%2BSASsecret%3D", ["Abc%2BSASsecret%3D"],
     "az://container/run?***"),
    ("https://host/bucket/run?X-Amz-Credential=AKIAQUERY&X-Amz-Signature=deadbeefsig", ["deadbeefsig", "AKIAQUERY"],
     "https://host/bucket/run?***"),
    ("gs://bucket/run?token=ya29.tokensecret", ["ya29.tokensecret"], "gs://bucket/run?***"),
]


@pytest.mark.parametrize("url,secrets,shown", SECRET_URLS)
def test_no_form_of_a_secret_in_a_url_is_ever_shown(url, secrets, shown):
    """The redactor reads the userinfo from the right ('@' in a password), keeps '/' and '+' in it, decodes %40, and
    drops the query (SAS tokens, signatures); every place the trainer writes a URL goes through it: the config line
    and the settings saved in every checkpoint (settings_without_secrets), the mirror's messages (redacted_url) and
    its store's own error text (RemoteStore.redact, which removes every string secrets_in lists)."""
    assert redact_url(url) == shown
    assert T.settings_without_secrets({"mirror": url, "log_dir": "logs"}) == {"mirror": shown, "log_dir": "logs"}
    hidden = secrets_in(url, {})
    error = f"request to {url} failed ({secrets[0]})"
    for s in hidden:
        error = error.replace(s, "***")
    said = [shown, error]
    if url.startswith("s3://"):  # the store itself (s3fs builds its client without a connection)
        store = Mirror(url).store
        said += [store.redacted_url(), store.explain(OSError(f"request to {url} failed ({secrets[0]})"), "list")]
    for secret in secrets:
        for text in said:
            assert secret not in text, (secret, text)


def test_a_userinfo_ends_at_the_last_at_sign_and_a_path_may_hold_one():
    assert redact_url("s3://bucket/run@2/x") == "s3://bucket/run@2/x"  # no credentials: left alone
    assert redact_url("/mnt/backup/run@2") == "/mnt/backup/run@2"
    assert T.redact_url("s3://KEY:s3cr@t@bucket/p") == "s3://bucket/p"


def test_the_mirrors_own_error_text_is_redacted(tmp_path, monkeypatch):
    """A store whose error echoes the URL it was given (as an fsspec backend may, an Azure SAS or ?sig= in it): the
    one-line error at start holds none of it."""
    url = "s3://KEYKEYKEY:SECRETPASS@bucket/run?sig=SECRETSIGNATURE"
    mirror = Mirror(url)
    monkeypatch.setattr(mirror.store.fs, "pipe_file", lambda *a, **k: (_ for _ in ()).throw(
        PermissionError(f"AccessDenied for {url} (KEYKEYKEY, SECRETPASS)")))
    with pytest.raises(MirrorError) as e:
        mirror.check()
    text = str(e.value)
    assert "could not write a probe object" in text and "no permission" in text
    for secret in ("SECRETPASS", "SECRETSIGNATURE", "KEYKEYKEY"):
        assert secret not in text, text


def test_a_reused_hostname_and_pid_is_not_a_live_lock_holder():
    """In containers a rescheduled pod keeps its hostname and pid 1 (or a low pid) repeats: a lock file that names
    this host and a live pid, but another boot or another start of that pid, names a holder that is gone (the lock
    is then waited for, as a crashed NFS client's, instead of refused at once). The holder's own record matches."""
    host, me = T.socket.gethostname(), os.getpid()
    mine = T.process_identity(me)
    assert mine and re.fullmatch(r"[0-9a-f-]{36}/\d+", mine)
    boot, ticks = mine.split("/")
    alive = T.FolderLock._holder_alive
    assert alive(f"host {host}, pid {me}, started 2026-12-06 10:00:00, process {mine}")
    assert not alive(f"host {host}, pid {me}, started 2026-12-06 10:00:00, process {boot}/{int(ticks) + 1}")
    assert not alive(f"host {host}, pid 1, started 2026-12-06 10:00:00, process {boot}/999999999")
    assert not alive(f"host {host}, pid {me}, started 2026-12-06 10:00:00, process 00000000-0000-0000-0000-"
                     f"000000000000/{ticks}")  # another boot (or another machine's kernel)
    assert not alive(f"host another-{host}, pid {me}, started 2026-12-06 10:00:00, process {mine}")
    assert alive(f"host {host}, pid {me}, started 2026-12-06 10:00:00")  # a lock file from before: the pid alone


def test_the_lock_file_records_what_tells_its_holder_apart(tmp_path):
    lock = T.FolderLock(tmp_path / "ck")
    lock.acquire()
    try:
        holder = (tmp_path / "ck" / ".lock").read_text()
        assert f", process {T.process_identity(os.getpid())}" in holder
    finally:
        lock.release()


@pytest.mark.parametrize("case", ["folder in use", "resume latest on an empty folder", "a bad resume file",
                                  "a mirror that fails its check"])
def test_a_start_up_error_found_on_rank_0_is_one_line_under_two_processes(tmp_path, shard_dir, case):
    """Rank 0 alone finds these; the other rank learns of them through the broadcast and stops with it: exactly one
    `error:` line, no worker's traceback, and no rank left waiting in a collective."""
    extra, says = {
        "folder in use": ([], "is in use by another run"),
        "resume latest on an empty folder": (["--resume", "latest"], "no checkpoint in"),
        "a bad resume file": (["--resume", str(tmp_path / "notes.pt")], "is not usable"),
        "a mirror that fails its check": (["--mirror", "/dev/null/mirror"], "could not create the folder"),
    }[case]
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    (tmp_path / "ck").mkdir()
    lock = T.FolderLock(tmp_path / "ck")
    if case == "folder in use":
        lock.acquire()  # this process holds it: a live holder on this machine
    try:
        proc = launch(args(tmp_path, shard_dir, "--max_steps", "2", *extra))
        out = finish(proc, 120)
    finally:
        lock.release()
    assert proc.returncode != 0
    ours = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and says in ours[0], out[-3000:]
    assert "CRASHED" not in out and "[rank 1]" not in out, out[-3000:]


@pytest.mark.parametrize("extra,says", [
    (["--data_dir", "nowhere"], "error: --data_dir nowhere does not exist; run src/prepare_data.py first"),
    (["--max_steps", "8o"], "error: argument --max_steps: invalid int value: '8o' (python src/train_improved.py "
                            "--help lists every flag)"),
    (["--batch_size", "atuo"], "error: argument --batch_size: expected a number of sequences or auto, not 'atuo'"),
])
def test_a_bad_input_is_one_line_and_nothing_is_written(tmp_path, shard_dir, extra, says):
    result = run(args(tmp_path, shard_dir, *extra), nproc=None)
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [result.stdout.strip().splitlines()[-1]]  # one line, nothing else
    assert result.stdout.startswith(says), result.stdout
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ck").exists()


def test_batch_size_auto_says_why_it_took_less_than_16_on_cpu(tmp_path, shard_dir):
    """A step of 4 sequences over 2 ranks: 2 each, so auto takes 2, and says why (the README demo: 8)."""
    result = run(args(tmp_path, shard_dir, "--batch_size", "auto", "--max_steps", "1"))
    assert result.returncode == 0, result.stdout[-3000:]
    assert ("batch_size auto: 2 sequences per micro-step on CPU: 16 at most on CPU, and 2 is the largest that splits "
            "a step's 4 sequences over 2 rank(s) exactly") in result.stdout


def test_a_resume_from_the_mirror_brings_back_every_name_the_copy_held(tmp_path):
    """The run's last save was a new best, so its copy on the mirror holds best_model.pt too: after the folder is lost,
    a resume from the mirror brings back latest.pt, the rolling name and best_model.pt (a file of its own), and the
    tools that read the best model work on that folder."""
    data = tmp_path / "data"  # validation tokens that training improves on: step 4 is a new best
    data.mkdir()
    write_bin_shard(data / "syn_val_000000.bin", start=10_000, count=2000)
    write_bin_shard(data / "syn_train_000001.bin", start=10_000, count=6000)
    common = ["--eval_freq", "2", "--checkpoint_freq", "2", "--learning_rate", "1e-2", "--mirror",
              str(tmp_path / "mirror")]
    first = run(args(tmp_path, data, "--max_steps", "4", *common), nproc=None)
    assert first.returncode == 0 and "checkpoint step 4 (periodic, best val, final)" in first.stdout, first.stdout
    shutil.rmtree(tmp_path / "ck")
    again = run(args(tmp_path, data, "--max_steps", "4", "--resume", "auto", *common), nproc=None)
    assert again.returncode == 0 and "resuming from the MIRROR's step 4" in again.stdout, again.stdout[-3000:]
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.glob("*.pt")) == ["best_model.pt", "latest.pt", "rolling_step_000004.pt"]
    assert not os.path.samefile(ck / "best_model.pt", ck / "latest.pt")  # the user's file: storage of its own
    sample = subprocess.run([sys.executable, str(ROOT / "src" / "sample.py"), "--checkpoint_dir", str(ck),
                             "--checkpoint", "best", "--max_new_tokens", "4", "--device", "cpu"],
                            capture_output=True, text=True, env=trainer_env(), cwd=ROOT)
    assert sample.returncode == 0, sample.stderr[-2000:]
    missing = subprocess.run([sys.executable, str(ROOT / "src" / "sample.py"), "--checkpoint_dir", str(ck),
                              "--checkpoint", str(ck / "nope.pt")], capture_output=True, text=True,
                             env=trainer_env(), cwd=ROOT)
    assert f"run ./list_checkpoints.sh --checkpoint_dir {ck} to see what there is" in missing.stderr
