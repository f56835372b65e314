"""Where a pipeline runs: the CPU, or a CUDA GPU when torch sees one, and the artifact target key of each.

One device per pipeline: its torch networks live there, every tensor of a generation is made there, and only
artifacts built for that device's target are selected (a CUDA library for the GPU's architecture on a GPU;
a CPU library whose instruction sets this CPU has on the CPU), since the compiled backends take the
torch tensors in place (DLPack) rather than copying them between devices.
"""

from __future__ import annotations

from functools import cache

import torch

from .errors import InvalidRequestError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: the first CUDA GPU when torch sees one, else the CPU; `cuda` without a GPU is an error naming
    the flag."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise InvalidRequestError(f"device must be one of {', '.join(DEVICE_CHOICES)} or cuda:N (got {name!r})",
                                  param="device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError(f"{name}: torch sees no CUDA GPU here (a CPU-only torch build, or no "
                                  "driver); use --device cpu", param="device")
    return torch.device(name)


def cuda_target_key(device: torch.device) -> str:
    """The artifact target key of a CUDA GPU (`cuda-sm_90` for an H100/H200), as `sdaot compile --target cuda`
    files its builds for that GPU."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"cuda-sm_{major}{minor}"


@cache
def host_target_key() -> str | None:
    """The artifact target key of this machine's CPU, or None when TVM cannot be imported."""
    try:
        from .targets import resolve_target, target_key

        return target_key(resolve_target("cpu"))
    except ImportError:
        return None


def device_target_key(device: torch.device) -> str | None:
    """The artifact target key of `device`, or None when TVM cannot be imported (for the CPU)."""
    return cuda_target_key(device) if device.type == "cuda" else host_target_key()
