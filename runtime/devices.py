"""Where a pipeline runs: the CPU, or a CUDA GPU when torch sees one (its artifact target key: `targets`).

One device per pipeline: its torch networks live there, every tensor of a generation is made there, and only
artifacts built for that device's target are selected (a CUDA library for the GPU's architecture on a GPU;
a CPU library whose instruction sets this CPU has on the CPU), since the compiled backends take the
torch tensors in place (DLPack) rather than copying them between devices.
"""

from __future__ import annotations

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
