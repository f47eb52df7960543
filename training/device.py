"""Where training runs: the device named by ``--device``, the process group under ``torchrun``, bf16 autocast.

``auto`` is the first of cuda, mps, cpu that this machine has. Under ``torchrun`` with CUDA, process
``LOCAL_RANK`` trains on ``cuda:LOCAL_RANK`` and the processes talk over NCCL; on any other device over gloo.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["autocast", "check_device_name", "describe_device", "full_precision", "init_distributed", "resolve_device"]

_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is auto, cpu, mps, cuda or cuda:N (availability is not checked)."""
    if not _DEVICE_NAME.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """The device of this process for ``--device name``; ``ValueError`` when this machine does not have it.

    With several processes and CUDA, ``cuda`` (or ``auto``) means ``cuda:LOCAL_RANK``.
    """
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} is not available: this torch sees no CUDA GPU")
        count = torch.cuda.device_count()
        if _world_size() > 1:
            if name != "cuda":
                raise ValueError(f"under torchrun give --device cuda (process LOCAL_RANK uses cuda:LOCAL_RANK), "
                                 f"not {name!r}")
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        device = torch.device(name)
        index = device.index or 0
        if index >= count:
            raise ValueError(f"device {name!r} is not available: this machine has {count} CUDA GPU(s)")
        return device
    if name == "mps" and not _mps_available():
        raise ValueError("device 'mps' is not available: this torch has no usable Metal backend")
    return torch.device(name)


def init_distributed(device: torch.device) -> None:
    """Join the ``torchrun`` process group (NCCL on CUDA, gloo otherwise) when there are several processes."""
    if _world_size() <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bfloat16 on ``device`` when ``bf16``, else a context that changes nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Autocast off: what runs inside computes in the dtype of its inputs (float32 parameters stay float32)."""
    with torch.autocast(device_type, enabled=False):
        yield


def describe_device(device: torch.device) -> dict[str, Any]:
    """Provenance of the machine: the device, the GPU name on CUDA, the CPU architecture and count."""
    described: dict[str, Any] = {"device": str(device), "machine": f"{platform.machine()} {os.cpu_count()} cpus"}
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described
