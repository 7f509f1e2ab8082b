"""After a recovery the folder is healthy and the record complete: damaged files set aside, the user's best and epoch
models on storage of their own, every line in train.log, failed starts that leave nothing behind, clear output."""

import json
import os
import stat
import subprocess
import time

import pytest

import list_checkpoints
import train_improved as T
from helpers import EXACT_SAVES, ROOT, TINY_ARGS, finish, launch, run, trainer_env
from test_checkpoint_manager import make_state, with_step


def args_for(tmp_path, shard_dir, *extra):
    return [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128",
            "--checkpoint_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs"), "--sample_freq", "0",
            *extra]


def flip_a_byte_in_the_middle(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_damaged_latest_is_set_aside_and_never_becomes_the_backup(tmp_path, shard_dir):
    T.main(args_for(tmp_path, shard_dir, "--max_steps", "10", "--checkpoint_freq", "5", "--eval_freq", "4"))
    ck = tmp_path / "ck"
    flip_a_byte_in_the_middle(ck / "latest.pt")  # also rolling_step_000010.pt: one file, two names
    # the read-only tools fall back too, but leave the run's folder as it is
    path, _ = T.load_named(ck, "latest")
    assert path.name == "latest_backup.pt" and (ck / "latest.pt").exists()

    summary = T.main(args_for(tmp_path, shard_dir, "--resume", "latest", "--max_steps", "15", "--checkpoint_freq",
                              "5", "--eval_freq", "4"))
    assert summary["step"] == 15 and summary["exit_code"] == 0
    names = sorted(p.name for p in ck.iterdir())
    assert "latest.pt.corrupt" in names
    aside = ck / "latest.pt.corrupt"
    with pytest.raises(T.CheckpointInvalid):
        T.CheckpointManager.load(aside)
    manager = T.CheckpointManager(ck)
    for p in manager.all_checkpoints():  # no name resume, rotation or retention uses points at the damaged file
        assert not os.path.samefile(p, aside), p
        T.CheckpointManager.load(p)
    assert T.CheckpointManager.load(ck / "latest_backup.pt")["step"] > 8  # a save of the resumed run
    assert aside not in manager.fallback_order() and all(s != 10 or p.exists() for s, p in manager.rolling())
    assert list_checkpoints.main(["--checkpoint_dir", str(ck), "--verify"]) == 0

    # everything the resumed run said is in train.log, the messages from before its log file opened included
    log_text = (tmp_path / "logs" / "train.log").read_text()
    for line in ("latest.pt is not usable (checksum mismatch", "resuming from latest_backup.pt after skipping 1",
                 "set the damaged latest.pt (also named rolling_step_000010.pt) aside as latest.pt.corrupt",
                 "settings changed since the checkpoint (the new values apply): max_steps: 10 -> 15",
                 "the learning-rate schedule changed: the run now lasts 15 steps (it was planned for 10)"):
        assert line in log_text, line
    # held until the log file opened, then written first, in the order they were said
    assert log_text.index("is not usable") < log_text.index("set the damaged") < log_text.index("| resuming ")


def test_best_and_epoch_models_survive_a_bad_block_in_the_rolling_chain(tmp_path, shard_dir):
    manager = T.CheckpointManager(tmp_path / "ck")
    state = make_state(shard_dir)
    names = manager.save(with_step(state, 3), epoch_completed=1, is_best=True)
    assert names == ["rolling_step_000003.pt", "latest.pt", "epoch_00001.pt", "best_model.pt"]
    ck = tmp_path / "ck"
    inodes = {n: (ck / n).stat().st_ino for n in names}
    assert inodes["latest.pt"] == inodes["rolling_step_000003.pt"]
    assert len({inodes["latest.pt"], inodes["epoch_00001.pt"], inodes["best_model.pt"]}) == 3
    flip_a_byte_in_the_middle(ck / "latest.pt")
    with pytest.raises(T.CheckpointInvalid):
        T.CheckpointManager.load(ck / "rolling_step_000003.pt")
    for name in ("epoch_00001.pt", "best_model.pt"):  # written and verified like any other checkpoint
        assert T.CheckpointManager.load(ck / name)["step"] == 3
    assert T.load_named(ck, "best")[0].name == "best_model.pt"


def test_a_failed_start_leaves_no_folder_behind(tmp_path, shard_dir):
    for bad in (["--data_dir", str(tmp_path / "nowhere")], ["--preset", "gpt5"], ["--data_dir", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            T.main([*TINY_ARGS, "--checkpoint_dir", str(tmp_path / "new" / "ck"), "--log_dir",
                    str(tmp_path / "logs"), *bad])
        assert exit_info.value.code == 2
        assert not (tmp_path / "new").exists(), bad


def test_an_error_before_the_log_file_opens_still_reaches_an_existing_train_log(tmp_path, shard_dir, capsys):
    T.main(args_for(tmp_path, shard_dir, "--max_steps", "2", "--eval_freq", "0"))
    with pytest.raises(SystemExit):
        T.main(args_for(tmp_path, shard_dir, "--resume", "best"))
    assert "error: --resume best:" in capsys.readouterr().err
    assert "ERROR error: --resume best:" in (tmp_path / "logs" / "train.log").read_text()


def test_empty_data_error_names_the_folder_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        T.main([*TINY_ARGS, "--data_dir", str(tmp_path / "empty"), "--checkpoint_dir", str(tmp_path / "ck"),
                "--log_dir", str(tmp_path / "logs")])
    assert f"error: no training shards in {tmp_path / 'empty'}/" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ck").exists()  # found before anything is written


def test_list_checkpoints_marks_an_earlier_validation_loss_and_a_closed_pipe_is_quiet(tmp_path, shard_dir, capsys):
    T.main(args_for(tmp_path, shard_dir, "--max_steps", "6", "--checkpoint_freq", "5", "--eval_freq", "4"))
    capsys.readouterr()
    assert list_checkpoints.main(["--checkpoint_dir", str(tmp_path / "ck")]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    at_4 = f"{T.CheckpointManager.load(tmp_path / 'ck' / 'rolling_step_000004.pt')['val_loss']:.4f}"
    assert rows["rolling_step_000005.pt"][5] == f"{at_4}@4"  # saved at step 5, measured at step 4
    assert rows["rolling_step_000004.pt"][5] == at_4  # measured at its own step: no mark
    # `./list_checkpoints.sh | head -1`: the reader is gone before the listing is written
    env = {k: v for k, v in trainer_env().items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a real `| head`
    proc = subprocess.Popen([str(ROOT / "list_checkpoints.sh"), "--checkpoint_dir", str(tmp_path / "ck")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


def test_the_demo_samples_from_a_prompt_in_its_own_data(tmp_path, shard_dir):
    (shard_dir / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "sample_prompt": "import os\n\n\ndef "}))
    assert T.data_sample_prompt(str(shard_dir)) == "import os\n\n\ndef "
    assert T.data_sample_prompt(str(tmp_path)) == "Hello, I'm a language model,"  # no meta.json
    T.main(args_for(tmp_path, shard_dir, "--max_steps", "2", "--eval_freq", "0", "--sample_freq", "2",
                    "--sample_tokens", "2"))
    assert "| sample: 'import os\\n\\n\\ndef " in (tmp_path / "logs" / "train.log").read_text()


def test_a_schedule_change_on_resume_is_explained_once_under_torchrun(tmp_path, shard_dir):
    first = run(args_for(tmp_path, shard_dir, "--max_steps", "6", "--eval_freq", "0", "--checkpoint_freq", "3"))
    assert first.returncode == 0, first.stdout[-2000:]
    result = run(args_for(tmp_path, shard_dir, "--resume", "latest", "--max_steps", "8", "--eval_freq", "0"))
    assert result.returncode == 0, result.stdout[-2000:]
    out = result.stdout  # both ranks' stdout and stderr
    assert out.count("settings changed since the checkpoint") == 1
    assert out.count("the learning-rate schedule changed") == 1
    cfg = T.TrainConfig(**T.parse_flags(args_for(tmp_path, shard_dir)))
    before, after = T.lr_at(6, cfg, 6), T.lr_at(6, cfg, 8)
    assert f"the learning rate at the resumed step 6 is {after:.3e} instead of {before:.3e}" in out
    assert before != after


def test_torchrun_reports_our_one_line_error_as_the_root_cause(tmp_path, shard_dir):
    result = run(args_for(tmp_path, shard_dir, "--data_dir", str(tmp_path / "nowhere")))
    assert result.returncode == 1  # torchrun's code for a failed worker
    message = f"error: --data_dir {tmp_path / 'nowhere'} does not exist"
    assert sum(line.startswith(message) for line in result.stdout.splitlines()) == 1  # rank 0's own line
    assert f"traceback : {message}" in result.stdout  # in torchrun's report, instead of "To enable traceback"
    assert "To enable traceback" not in result.stdout


def test_the_exported_weights_have_the_same_file_mode_as_the_other_files(tmp_path, shard_dir):
    import export_hf
    export_hf.export(make_state(shard_dir), tmp_path / "hf", tokenizer=False)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_every_fallback_candidate_is_verified_before_use(tmp_path, shard_dir):
    """A damaged latest.pt and a damaged latest_backup.pt: each is checked (CRC-32 of every record) and skipped with
    its reason, and the run continues from the newest rolling checkpoint that passes, not from the damaged backup."""
    T.main(args_for(tmp_path, shard_dir, "--max_steps", "9", "--checkpoint_freq", "3", "--eval_freq", "0"))
    ck = tmp_path / "ck"
    assert [s for s, _ in T.CheckpointManager(ck).rolling()] == [3, 6, 9]
    flip_a_byte_in_the_middle(ck / "latest.pt")  # step 9 (also rolling_step_000009.pt)
    flip_a_byte_in_the_middle(ck / "latest_backup.pt")  # step 6 (also rolling_step_000006.pt)
    summary = T.main(args_for(tmp_path, shard_dir, "--resume", "latest", "--max_steps", "10", "--eval_freq", "0"))
    assert summary["exit_code"] == 0
    log_text = (tmp_path / "logs" / "train.log").read_text()
    for name in ("latest.pt", "latest_backup.pt", "rolling_step_000009.pt", "rolling_step_000006.pt"):
        assert f"{name} is not usable (checksum mismatch" in log_text, name
    assert "resuming from rolling_step_000003.pt after skipping 4 unusable checkpoint(s)" in log_text
    assert f"resumed from {ck / 'rolling_step_000003.pt'}: step 3," in log_text


def test_the_best_validation_loss_of_the_whole_run_survives_a_resume(tmp_path, shard_dir):
    """After a resume, the first evaluation is compared with the best loss of every launch before: a worse model
    (here made worse on purpose by a far too high learning rate) never replaces best_model.pt."""
    first = T.main(args_for(tmp_path, shard_dir, "--max_steps", "6", "--eval_freq", "3", "--checkpoint_freq", "0"))
    ck = tmp_path / "ck"
    best = T.CheckpointManager.load(ck / "best_model.pt")
    assert best["step"] == 6 and best["best_val_loss"] == first["best_val_loss"] == first["val_loss"]
    worse = T.main(args_for(tmp_path, shard_dir, "--resume", "latest", "--max_steps", "9", "--eval_freq", "3",
                            "--checkpoint_freq", "0", "--learning_rate", "0.5", "--min_lr", "0.5", "--grad_clip", "0"))
    assert worse["val_loss"] > first["best_val_loss"]  # the resumed run did get worse
    assert worse["best_val_loss"] == first["best_val_loss"]
    assert T.CheckpointManager.load(ck / "best_model.pt")["step"] == 6  # not overwritten by step 9
    assert T.CheckpointManager.load(ck / "latest.pt")["best_val_loss"] == first["best_val_loss"]
    log_text = (tmp_path / "logs" / "train.log").read_text()
    assert f"step       9 | val_loss {worse['val_loss']:.6f}\n" in log_text  # no "(best)"
    # the run's training time goes on from where the first launch left it (TrainState carries it)
    times = [json.loads(line)["time"] for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert len(times) == 9 and times == sorted(times)


def test_a_log_write_failing_on_rank_0_stops_every_rank_at_once_with_a_checkpoint(tmp_path, shard_dir):
    """Rank 0's metrics write of step 5 fails (an I/O error, injected): every rank stops at the next step boundary
    instead of waiting in a collective for rank 0, the checkpoint of that step is saved, the error is named once in
    train.log and in torchrun's report, and the run continues from there."""
    started = time.monotonic()
    proc = launch(args_for(tmp_path, shard_dir, "--max_steps", "100000", "--eval_freq", "0"),
                  extra_env={"TRAIN_IMPROVED_TEST_FAULT": "metrics:5"})
    out = finish(proc, 120)
    assert proc.returncode == 1, out[-3000:]  # torchrun's code for a failed worker: rank 0 exited 5
    assert time.monotonic() - started < 120
    log_text = (tmp_path / "logs" / "train.log").read_text()
    assert log_text.count("LOG WRITE FAILED: writing") == 1 and "Input/output error" in log_text
    assert "STOPPED at step 6 of 100000 because rank 0 could not write its logs" in log_text
    assert T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"] == 6
    assert "traceback : error: writing" in out and "exitcode  : 5" in out  # torchrun's report
    assert out.count("exitcode  :") == 1  # only rank 0 failed; the other stopped on its word
    resumed = run(args_for(tmp_path, shard_dir, "--resume", "latest", "--max_steps", "8", "--eval_freq", "0"))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout and ": step 6," in resumed.stdout


def test_a_crash_is_written_to_train_log_with_its_traceback(tmp_path, shard_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in evaluation")
    monkeypatch.setattr(T, "evaluate", broken)
    with pytest.raises(RuntimeError, match="a bug in evaluation"):
        T.main(args_for(tmp_path, shard_dir, "--max_steps", "6", "--eval_freq", "2"))
    log_text = (tmp_path / "logs" / "train.log").read_text()
    assert "ERROR CRASHED on rank 0" in log_text and "RuntimeError: a bug in evaluation" in log_text
    assert 'in evaluate_if_due' in log_text  # the traceback, not just the message
