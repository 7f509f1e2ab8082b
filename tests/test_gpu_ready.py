"""The GPU path's defects, tested at the level CPU allows (the rest is in tests/test_cuda.py and
benchmarks/gpu_check.sh): the rank's own CUDA generator, settings that come back on resume, the device's AdamW
implementation after loading, the GPU found by UUID for NVML, the peak table, metrics kept open, one collective."""

import json
import types

import pytest
import torch

import train_improved as T
from helpers import EXACT_SAVES, TINY_ARGS
from test_checkpoint_manager import make_state

CPU = torch.device("cpu")


def test_a_rank_restores_its_own_cuda_generator_from_new_and_old_checkpoints():
    mine = torch.tensor([1], dtype=torch.uint8)
    assert T.own_cuda_rng_state({"cuda": [mine], "cuda_scope": "own device"}, device_index=3) is mine
    # written before: one state per visible GPU; the rank's own is the one at its device index...
    every_gpu = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    assert T.own_cuda_rng_state({"cuda": every_gpu}, device_index=2) is every_gpu[2]
    # ...and a rank that now sees fewer GPUs (8-GPU box to 4, 1x4 resumed as 2x2) no longer fails with IndexError
    assert T.own_cuda_rng_state({"cuda": every_gpu[:2]}, device_index=3) is None
    assert T.own_cuda_rng_state({"cuda": []}, device_index=0) is None  # a CPU checkpoint resumed on GPU
    state = T.capture_rng_state(CPU)
    assert state["cuda"] == [] and state["cuda_scope"] == "own device"
    T.restore_rng_state(state, CPU)


def test_compile_and_every_numerics_setting_come_back_on_resume():
    saved = T.TrainConfig(preset="tiny", compile=True, deterministic=True, dtype="bfloat16")
    ckpt = T.ResumePoint(path=None, step=0, args=vars(saved).copy(), model_config=vars(saved.gpt_config()).copy(),
                         world_size=1)
    cfg = T.resolve_config({"resume": "latest"}, ckpt)
    assert (cfg.compile, cfg.deterministic, cfg.dtype) == (True, True, "bfloat16")
    assert T.resolve_config({"resume": "latest", "compile": False}, ckpt).compile is False  # --no-compile wins
    assert T.LAUNCH_FIELDS == ("resume", "checkpoint_dir", "device")


def test_after_loading_a_cpu_checkpoint_the_optimizer_uses_the_devices_implementation(shard_dir):
    state = make_state(shard_dir)  # written by a CPU run: fused=False in its param groups
    assert all(not g["fused"] for g in state["optimizer"]["param_groups"])
    cfg = T.TrainConfig(preset="tiny", n_layer=1, n_head=2, n_embd=16, block_size=32)
    model = T.GPT(cfg.gpt_config())
    model.load_state_dict(state["model"])
    optimizer = T.configure_optimizer(model, cfg, CPU)
    optimizer.load_state_dict(state["optimizer"])
    assert not any(g["fused"] for g in optimizer.param_groups)  # what load_state_dict restores: the bug
    # on a GPU the fused kernel is re-applied, with its step counters on the parameters' device (CPU fused AdamW
    # exists too, so the switch runs here for real)
    T.apply_optimizer_settings(optimizer, cfg, torch.device("cuda"))
    assert all(g["fused"] and g["foreach"] is None for g in optimizer.param_groups)
    steps = [s["step"] for s in optimizer.state.values()]
    assert steps and all(s.dtype == torch.float32 and s.device == CPU for s in steps)
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    T.apply_optimizer_settings(optimizer, cfg, CPU)  # and back: a GPU checkpoint resumed on CPU
    assert not any(g["fused"] for g in optimizer.param_groups)


def test_resuming_on_another_world_size_restores_the_optimizer_state_exactly(shard_dir):
    """A GPU died: 2 ranks continue a 1-rank checkpoint. The AdamW step counts and moments come back bit for bit."""
    state = make_state(shard_dir)
    cfg = T.TrainConfig(**state["args"])
    model = T.GPT(cfg.gpt_config())
    optimizer = T.configure_optimizer(model, cfg, CPU)
    loader = T.ShardedLoader(T.find_shards(str(shard_dir), "train"), 32, 256, 2, 0, 2, 0, CPU)
    env = T.DistEnv(rank=0, local_rank=0, world_size=2, device=CPU)
    T.restore_state(state, raw_model=model, optimizer=optimizer, loader=loader, cfg=cfg, env=env)
    saved, restored = state["optimizer"]["state"], optimizer.state_dict()["state"]
    assert saved.keys() == restored.keys() and len(saved) > 0
    for i in saved:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[i][key], restored[i][key]), (i, key)


def test_nvml_finds_the_gpu_by_uuid_then_pci_bus_id_never_by_cuda_index():
    props = types.SimpleNamespace(uuid="5a8f2c1e-0000-1111-2222-333344445555", pci_domain_id=0, pci_bus_id=0x3B,
                                  pci_device_id=0)
    assert T.nvml_device_keys(props) == [("nvmlDeviceGetHandleByUUID", "GPU-5a8f2c1e-0000-1111-2222-333344445555"),
                                         ("nvmlDeviceGetHandleByPciBusId", "00000000:3B:00.0")]
    props.uuid = "GPU-abc"
    assert T.nvml_device_keys(props)[0] == ("nvmlDeviceGetHandleByUUID", "GPU-abc")


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 NVL", 835.0), ("NVIDIA H200 NVL", 835.0),
                                       ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA B200", 2250.0)])
def test_peak_tflops_tell_the_nvl_and_pcie_parts_from_sxm(name, peak):
    assert next(t for key, t in T.DeviceStats.PEAK_TFLOPS if key in name) == peak


def test_metrics_are_written_through_one_open_file_a_whole_line_at_a_time(tmp_path, monkeypatch):
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    metrics = T.MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in range(1, 4):
        metrics.write(step=step, loss=1.0)
        # each record is in the file as soon as it is written (a kill -9 loses nothing already logged)
        assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == step
    assert opened.count(tmp_path / "metrics.jsonl") == 1
    metrics.close()


def test_a_metrics_line_cut_short_by_a_crash_never_stops_the_resume(tmp_path, caplog):
    """A host crash or power loss can leave the last line half written, or zeros: the resume drops it and goes on
    (it used to stop on a JSONDecodeError, every restart again)."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps(dict(step=s, loss=1.0 / s)) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + "\n" + lines[2].replace("3", "4")[:20] + "\0\0\0")
    metrics = T.MetricsLog(path, enabled=True)
    assert metrics.truncate_after(2) == 3
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
    assert "dropped 1 unreadable line(s)" in caplog.text


def test_the_loops_votes_ride_the_steps_own_reduction(shard_dir):
    cfg = T.TrainConfig(preset="tiny", n_layer=1, n_head=2, n_embd=16, block_size=32, batch_size=2,
                        total_batch_size=64)
    model = T.GPT(cfg.gpt_config())
    optimizer = T.configure_optimizer(model, cfg, CPU)
    loader = T.ShardedLoader(T.find_shards(str(shard_dir), "train"), 32, 64, 2, 0, 1, 0, CPU)
    env = T.DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)
    asked = []
    *_, votes = T.train_step(model, optimizer, loader, env, 1e-3, 1.0, __import__("contextlib").nullcontext,
                             votes=lambda: asked.append(1) or (True, False, 1))
    assert votes == [True, False, True] and asked == [1]


def test_deterministic_mode_does_not_nan_fill_every_allocation(tmp_path, shard_dir):
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    try:
        T.main([*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--max_steps",
                "1", "--eval_freq", "0", "--sample_freq", "0", "--deterministic", "--checkpoint_dir",
                str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs")])
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]
    assert json.loads((tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
