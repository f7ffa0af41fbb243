"""GPU catalogue: the figures a plan needs (dense bf16 peak, memory, NVLink), by name.

Peaks are NVIDIA's dense (no 2:4 sparsity) bf16 Tensor Core figures for the SXM parts.
Memory is in GiB (2**30 bytes), the unit ``torch.cuda.mem_get_info`` and the plan's
``*_gb`` fields use; the marketed "80GB" parts have 80 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    name: str
    bf16_tflops: float
    """Dense bf16 peak, TFLOP/s."""
    memory_gib: float
    nvlink_gbps: float
    """NVLink bandwidth per GPU, GB/s (all links, both directions)."""
    hbm_gbps: float
    """Memory bandwidth, GB/s."""
    network_gbps: float = 25.0
    """Inter-node bandwidth per GPU, GB/s one direction: one 200 Gb/s HDR InfiniBand NIC per GPU
    (DGX A100 / HGX A800 layout) by default, 400 Gb/s NDR (50 GB/s) for Hopper. An assumption."""

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12


GPUS: dict[str, GPUSpec] = {}


def register_gpu(spec: GPUSpec, *aliases: str) -> GPUSpec:
    for key in (spec.name, *aliases):
        if key.lower() in GPUS:
            raise ValueError(f"GPU {key!r} registered twice")
        GPUS[key.lower()] = spec
    return spec


# A800: the A100 with NVLink cut to 400 GB/s (export variant); same compute and HBM.
register_gpu(GPUSpec("A800-80GB", bf16_tflops=312.0, memory_gib=80.0, nvlink_gbps=400.0, hbm_gbps=2039.0), "a800")
register_gpu(GPUSpec("A100-80GB", bf16_tflops=312.0, memory_gib=80.0, nvlink_gbps=600.0, hbm_gbps=2039.0), "a100")
register_gpu(GPUSpec("H100-80GB", bf16_tflops=989.0, memory_gib=80.0, nvlink_gbps=900.0, hbm_gbps=3350.0,
                     network_gbps=50.0), "h100")
register_gpu(GPUSpec("H200", bf16_tflops=989.0, memory_gib=141.0, nvlink_gbps=900.0, hbm_gbps=4800.0,
                     network_gbps=50.0), "h200-141gb")


def get_gpu(name: str) -> GPUSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        names = sorted({g.name for g in GPUS.values()})
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(names)} (or their short names "
                         f"a800, a100, h100, h200)") from None


#: substring of ``torch.cuda.get_device_name()`` -> catalogue key, most specific first
DEVICE_NAMES = (("H200", "h200"), ("H100", "h100"), ("A800", "a800"), ("A100", "a100"))


def gpu_from_device_name(device_name: str) -> GPUSpec | None:
    """The catalogue entry of a CUDA device name (``"NVIDIA H200"`` -> H200), ``None`` if unknown."""
    for needle, key in DEVICE_NAMES:
        if needle in device_name:
            return get_gpu(key)
    return None
