"""Permission to use AMX tiles: Linux hands a process AMX tile state only when it asks for it.

The first tile instruction of a process that has not asked (with `arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)`) is killed by SIGILL, which no Python handler catches. So the runtime asks once,
before an AMX artifact is chosen or loaded; where the kernel refuses (a CPU without AMX, a kernel older
than 5.16, a hypervisor that hides the tile state), the artifact is refused with `AmxUnavailableError`,
and `auto` falls back to another artifact or to torch. The permission holds for every thread of the
process, so asking from the thread that loads the artifact covers TVM's worker threads.
"""

from __future__ import annotations

import ctypes
import os
import platform
from functools import cache
from pathlib import Path

from .errors import BackendUnavailableError

SYS_ARCH_PRCTL = 158
"""arch_prctl's system call number on x86-64."""
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
CPUINFO = Path("/proc/cpuinfo")
AMX_FLAGS = ("amx_tile", "amx_bf16")


class AmxUnavailableError(BackendUnavailableError):
    """This process may not run AMX instructions; says why."""


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    return frozenset(flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()[2:])


def host_has_amx(cpuinfo: Path = CPUINFO) -> bool:
    """Whether the kernel reports AMX tiles with bf16 on this CPU (flags amx_tile and amx_bf16)."""
    return all(flag in cpu_flags(cpuinfo) for flag in AMX_FLAGS)


def request_tile_permission() -> None:
    """Ask Linux for AMX tile state for this process (a no-op once granted; asking again is harmless).

    Raises AmxUnavailableError, naming the reason, where the request is refused or cannot be made."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise AmxUnavailableError(f"AMX needs Linux on x86-64; this is {platform.system()} on {platform.machine()}",
                                  param="backend")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0:
        return
    errno = ctypes.get_errno()
    cpu = "this CPU has AMX" if host_has_amx() else "this CPU reports no AMX (no amx_tile/amx_bf16 in /proc/cpuinfo)"
    raise AmxUnavailableError(
        f"Linux refused AMX tile state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): "
        f"{os.strerror(errno) or f'errno {errno}'}); {cpu}. AMX artifacts cannot run in this process: use "
        f"fp32 artifacts or ones built with --precision bf16 for a target without AMX", param="backend")


@cache
def amx_refusal() -> str | None:
    """Why this process cannot run AMX kernels, or None once the permission is granted (asked once)."""
    try:
        request_tile_permission()
    except AmxUnavailableError as exc:
        return exc.message
    return None


def require_amx() -> None:
    """Raise AmxUnavailableError unless this process holds AMX tile permission (asking for it the first time)."""
    reason = amx_refusal()
    if reason is not None:
        raise AmxUnavailableError(reason, param="backend")
