"""TrainConfig validation, the generated command line, and the learning-rate schedule."""

import pytest

import train_improved as T


def test_help_documents_every_flag_the_issue_lists(capsys):
    with pytest.raises(SystemExit):
        T.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("data_dir preset n_layer n_head n_embd block_size dropout batch_size total_batch_size "
                 "learning_rate min_lr warmup_steps weight_decay grad_clip num_epochs max_steps eval_freq "
                 "val_steps seed device dtype compile log_dir checkpoint_dir checkpoint_freq keep_last resume").split():
        assert f"--{flag}" in text
    assert "--no-compile" in text  # booleans as --x/--no-x


def test_help_from_the_command_line_exits_0_without_a_traceback():
    import subprocess
    import sys
    from helpers import TRAINER, trainer_env
    result = subprocess.run([sys.executable, str(TRAINER), "--help"], capture_output=True, text=True,
                            env=trainer_env(), timeout=120)
    assert result.returncode == 0 and "--max_unsaved_minutes" in result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_only_given_flags_are_reported():
    assert T.parse_flags(["--learning_rate", "1e-3", "--compile"]) == {"learning_rate": 1e-3, "compile": True}
    assert T.parse_flags([]) == {}


def test_preset_overrides():
    cfg = T.TrainConfig(preset="tiny", n_layer=2, block_size=64, dropout=0.1)
    shape = cfg.gpt_config()
    assert (shape.n_layer, shape.n_head, shape.n_embd, shape.block_size, shape.dropout) == (2, 4, 128, 64, 0.1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(preset="gpt5"), "unknown --preset"),
    (dict(preset="tiny", n_head=3), "divisible by n_head"),
    (dict(batch_size=0), "--batch_size must be a positive number of sequences or auto"),
    (dict(min_lr=1.0, learning_rate=0.1), "--min_lr"),
    (dict(checkpoint_minutes=-1.0), "--checkpoint_minutes"),
    (dict(max_checkpoint_overhead=0.0), "--max_checkpoint_overhead"),
    (dict(dropout=1.0), "dropout"),
    (dict(max_steps=0), "--max_steps"),
])
def test_impossible_settings_are_rejected_with_the_fix(kwargs, message):
    with pytest.raises(T.UserError, match=message):
        T.TrainConfig(**kwargs)


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = T.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [T.lr_at(s, cfg, total_steps=110) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # rising during warmup
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway through the cosine
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))  # never rising after warmup
    assert lrs[110] == lrs[119] == pytest.approx(0.1)


def test_resume_config_inherits_checkpoint_settings_and_refuses_architecture_changes(caplog):
    saved = T.TrainConfig(preset="tiny", n_layer=2, learning_rate=1e-3, eval_freq=7)
    ckpt = T.ResumePoint(path=None, step=0, args=vars(saved).copy(), model_config=vars(saved.gpt_config()).copy(),
                         world_size=1)
    cfg = T.resolve_config({"resume": "latest"}, ckpt)
    assert (cfg.n_layer, cfg.learning_rate, cfg.eval_freq) == (2, 1e-3, 7)
    cfg = T.resolve_config({"resume": "latest", "learning_rate": 5e-4}, ckpt)
    assert cfg.learning_rate == 5e-4
    assert "learning_rate: 0.001 -> 0.0005" in caplog.text
    with pytest.raises(T.UserError, match="n_layer=2 but the flags ask for 3"):
        T.resolve_config({"resume": "latest", "n_layer": 3}, ckpt)
    with pytest.raises(T.UserError, match="architecture comes from the checkpoint"):
        T.resolve_config({"resume": "latest", "preset": "gpt2"}, ckpt)
