"""What the numbers were measured on: a benchmark figure without its machine means little."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import psutil


def describe(path: Path) -> dict:
    """CPU, cores, memory, the disk holding ``path``, GPU (if any) and kernel."""
    return {"cpu": _cpu_model(), "cores": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "disk": _disk(path), "gpu": _gpus(), "kernel": platform.release()}


def one_line(info: dict) -> str:
    disk = info.get("disk") or {}
    disk_text = (f"{disk.get('fstype', '?')} on {disk.get('device', '?')}"
                 f" ({'rotational' if disk.get('rotational') else 'SSD/virtual'}, {disk.get('free_gib', '?')} GiB free)")
    gpu = ", ".join(info.get("gpu") or []) or "no GPU"
    return (f"{info.get('cpu')}, {info.get('cores')} cores, {info.get('memory_gib')} GiB RAM, "
            f"disk {disk_text}, {gpu}, Linux {info.get('kernel')}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _disk(path: Path) -> dict:
    path = path.resolve()
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and (best is None or len(part.mountpoint) > len(best.mountpoint)):
            best = part
    usage = shutil.disk_usage(path)
    info = {"free_gib": round(usage.free / 2**30), "size_gib": round(usage.total / 2**30)}
    if best is not None:
        info.update(device=best.device, fstype=best.fstype, mountpoint=best.mountpoint)
        rotational = _rotational(best.device)
        if rotational is not None:
            info["rotational"] = rotational
    return info


def _rotational(device: str) -> bool | None:
    name = Path(device).name
    for candidate in (name, name.rstrip("0123456789").removesuffix("p") if name.startswith("nvme") else name.rstrip("0123456789")):
        flag = Path("/sys/block") / candidate / "queue" / "rotational"
        if flag.is_file():
            return flag.read_text().strip() == "1"
    return None


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def cuda_info(device: str = "cuda") -> dict | None:
    """The CUDA device as torch sees it (name, memory, compute capability, torch's CUDA) plus
    the driver and PCIe link from nvidia-smi where it runs; None without a usable GPU.
    A host-to-device figure depends on the link as much as on the GPU, so both are named."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
    except Exception:  # a broken driver is "no usable GPU" here; the caller says so
        return None
    info = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "torch_cuda": torch.version.cuda, "device_count": torch.cuda.device_count()}
    if shutil.which("nvidia-smi"):
        fields = "driver_version,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current"
        try:
            out = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader", "-i",
                                  str(dev.index or 0)], capture_output=True, text=True, timeout=20).stdout
            values = [v.strip() for v in out.strip().split(",")]
            if len(values) == 4:
                info.update(driver=values[0], pcie_gen=values[1], pcie_gen_max=values[2], pcie_width=values[3])
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info
