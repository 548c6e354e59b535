"""Checking the requested devices against the machine before Lightning starts processes."""

from __future__ import annotations

import os

import torch


def check_devices(accelerator: str, devices, prefix: str = "trainer") -> int:
    """The number of devices (processes on this node) asked for; an error naming the setting to change
    when the machine cannot give them.

    `devices` as Lightning takes it: a count, -1 / "auto" (all), or a list of indices. A CPU
    "device" is a process; more processes than cores would only slow every one of them down.
    """
    gpus = torch.cuda.device_count()
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ValueError(f"{prefix}.accelerator={accelerator} but this machine has no CUDA GPU: "
                         f"use {prefix}=cpu (or {prefix}.accelerator=cpu)")
    kind = "gpu" if accelerator in ("gpu", "cuda") or (accelerator == "auto" and gpus) else "cpu"
    available = gpus if kind == "gpu" else os.cpu_count() or 1
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        wanted = max(int(d) for d in devices) + 1 if kind == "gpu" else len(devices)
    elif isinstance(devices, int) and devices > 0:
        wanted = devices
    else:  # -1 / "auto": whatever there is
        return available if kind == "gpu" else 1
    if wanted > available:
        what = "CUDA GPU(s)" if kind == "gpu" else "CPU cores (a CPU device is one process)"
        found = "" if gpus or kind == "gpu" else "no CUDA GPU and "
        raise ValueError(f"{prefix}.devices={devices} but this machine has {found}{available} {what}: "
                         f"set {prefix}.devices to at most {available} (or -1 for all)")
    return len(devices) if isinstance(devices, (list, tuple)) else wanted
