"""GPU numbers for the training curves (the trainer's StepReporter): an MFU estimate, memory in use, and where
nvidia-ml-py is installed, utilization. Everything is None on CPU. A part of its own: it needs nothing of the trainer,
and nvidia-ml-py (pynvml) only where it is installed."""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("train")


class DeviceStats:
    """GPU numbers for the curves: an MFU estimate, memory in use and, where nvidia-ml-py is installed,
    utilization. Everything is None on CPU."""

    # dense bf16 tensor-core peaks from the vendor datasheets, TFLOP/s per GPU; --peak_tflops covers the rest
    # (the first key the GPU's name contains wins: the NVL and PCIe variants before the SXM parts)
    PEAK_TFLOPS = (("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
                   ("B200", 2250.0), ("A100", 312.0))

    def __init__(self, device: torch.device, peak_tflops: float, flops_per_token: float):
        self.device, self.flops_per_token = device, flops_per_token
        self.peak_flops = peak_tflops * 1e12 if peak_tflops else None
        self.nvml_handle = None
        if device.type != "cuda":
            return
        name = torch.cuda.get_device_name(device)
        if self.peak_flops is None:
            known = next((tflops for key, tflops in self.PEAK_TFLOPS if key in name), None)
            self.peak_flops = known * 1e12 if known else None
            if known is None:
                log.info("no peak TFLOP/s known for %s: pass --peak_tflops to get an MFU estimate", name)
        try:
            import pynvml  # the nvidia-ml-py package
            pynvml.nvmlInit()
        except Exception:  # not installed, or no NVML on this machine: utilization is simply not logged
            return
        # NVML numbers every GPU of the machine, CUDA only the visible ones (CUDA_VISIBLE_DEVICES=4,5,6,7 makes
        # GPU 4 CUDA's device 0): find our GPU by its UUID, else its PCI bus id, never by the CUDA index
        for lookup, key in nvml_device_keys(torch.cuda.get_device_properties(device)):
            try:
                self.nvml_handle = getattr(pynvml, lookup)(key)
                break
            except Exception:
                continue

    def mfu(self, tokens_per_second: float, world_size: int) -> float | None:
        """Model FLOPs utilization: achieved training FLOP/s per GPU over its peak (PaLM appendix B)."""
        if self.peak_flops is None:
            return None
        return self.flops_per_token * tokens_per_second / world_size / self.peak_flops

    def memory_gb(self) -> float | None:
        """Peak GPU memory allocated so far, in GB (None on CPU)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 1e9

    def utilization(self) -> float | None:
        """GPU utilization in percent from NVML (None where unavailable)."""
        if self.nvml_handle is None:
            return None
        import pynvml
        return float(pynvml.nvmlDeviceGetUtilizationRates(self.nvml_handle).gpu)


def nvml_device_keys(props: Any) -> list[tuple[str, str]]:
    """(pynvml lookup function, key) pairs that name the GPU whose torch properties are `props`, best first: its UUID
    as NVML writes it (GPU-...), then its PCI bus id (domain:bus:device.function)."""
    keys = []
    uuid = str(getattr(props, "uuid", "") or "")
    if uuid:
        keys.append(("nvmlDeviceGetHandleByUUID", uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"))
    if all(hasattr(props, f"pci_{part}_id") for part in ("domain", "bus", "device")):
        keys.append(("nvmlDeviceGetHandleByPciBusId",
                     f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"))
    return keys
