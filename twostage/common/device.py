"""One rule for turning a device name into a torch.device, and one for naming the hardware behind it."""

from __future__ import annotations

import platform

import torch

from twostage.common.errors import UserError


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" is the first CUDA device when one is visible, else the CPU; anything else as given.

    Asking for CUDA on a machine without it is a user error, not a crash deep inside a kernel.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but no CUDA device is visible; use cpu (or auto)")
    return device


def device_name(device: torch.device) -> str:
    """The hardware a device is: the GPU's name, or the CPU's (what run records and protocols say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


__all__ = ["resolve_device", "device_name"]
