"""GPU-only paths: bf16 autocast, torch.compile, the pinned-memory side-stream snapshot, deterministic resume.
Skipped without CUDA; run them on a GPU machine with `python -m pytest -q tests/test_cuda.py`."""

import pytest
import torch

import train_improved as T
from helpers import TINY_ARGS, read_metrics, run, tensorboard_scalars

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
    def args(root, *more):
        return [*TINY_ARGS, "--data_dir", str(shard_dir), "--total_batch_size", "128", "--dropout", "0.1",
                "--device", "cuda", "--deterministic", "--checkpoint_freq", "5", "--eval_freq", "5",
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
    assert result.stdout.count("| sample: \"Hello, I'm a language model,") + \
        result.stdout.count("| sample: 'Hello, I'm a language model,") == 2
