"""Device selection and per-device capabilities (the only module that spells device names)."""
from __future__ import annotations

import contextlib
import os

import torch


def default_device(local_rank: int | None = None) -> torch.device:
    """The accelerator of this process if there is one, else the CPU.

    ``KEYETRON_DEVICE`` overrides the choice (e.g. ``cpu`` to force CPU on a GPU host).
    """
    forced = os.environ.get("KEYETRON_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        index = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", index % torch.cuda.device_count())
    return torch.device("cpu")


def is_accelerator(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def supports_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return False  # CPU bf16 autocast works but is slow and changes numerics; tests run fp32/fp64 on CPU.


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """bf16/fp16 autocast on devices that support it; a no-op context otherwise (or when dtype is None)."""
    device = torch.device(device)
    if dtype is None or dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | str) -> str:
    """The marketing name of an accelerator (for the peak-FLOPs table), or "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def distributed_backend(device: torch.device | str) -> str:
    """The collective backend for this device: NCCL on CUDA GPUs, gloo on CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def set_current_device(device: torch.device | str) -> None:
    """Make ``device`` this process's current accelerator (before creating NCCL groups)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
