"""What a CPU target offers the hand-written kernels: vector width, register file, caches, matrix extensions.

Every schedule in this package sizes its register blocks and cache tiles from this profile, never from
one machine's numbers: a block of 16-lane accumulators that fits AVX-512's 32 registers spills on an
AVX2 core (8 lanes, 16 registers).
The instruction set comes from the TVM target (LLVM's feature list for its `mcpu`/`mattr`), so an AVX2
build made on an AVX-512 machine is scheduled for AVX2. Cache sizes are not part of a target: they are
read from this machine when the target's CPU is this machine's, and are typical sizes otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

TYPICAL_L1_BYTES = 32 * 1024
TYPICAL_L2_BYTES = 512 * 1024
SYSFS_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


@dataclass(frozen=True)
class CpuProfile:
    """The facts of one CPU target that kernel schedules are derived from."""

    cpu: str
    lanes: int
    vector_registers: int
    fma_units: int
    l1_bytes: int
    l2_bytes: int
    avx512_bf16: bool = False
    amx: bool = False
    amx_bf16: bool = False
    neon: bool = False

    @property
    def isa(self) -> str:
        """A short name of the vector instruction set: avx512, avx2, neon or sse."""
        if self.neon:
            return "neon"
        return {16: "avx512", 8: "avx2"}.get(self.lanes, "sse")

    @property
    def accumulators(self) -> int:
        """Vector accumulators one register block may hold: all registers but four, left for the operands being
        loaded and broadcast, and at most 16 (on a 3x3 convolution more accumulators ran faster, on AVX2 and
        AVX-512 alike: benchmarks/HISTORY.md)."""
        return min(self.vector_registers - 4, 16)

    def describe(self) -> str:
        """One line for logs and benchmark headers."""
        extras = [name for name, present in (("avx512_bf16", self.avx512_bf16), ("amx", self.amx)) if present]
        return (f"{self.cpu} ({self.isa}: {self.lanes} fp32 lanes, {self.vector_registers} vector registers, "
                f"L1 {self.l1_bytes // 1024} KiB, L2 {self.l2_bytes // 1024} KiB"
                + (f", {', '.join(extras)}" if extras else "") + ")")


def cpu_profile(target: Any) -> CpuProfile:
    """The profile of an LLVM (CPU) target, from the features LLVM enables for it."""
    from tvm.target import codegen

    cpu = str(target.attrs.get("mcpu", "") or "generic")
    features = set(codegen.llvm_get_cpu_features(target))
    return _profile(cpu, frozenset(features), _is_host_cpu(cpu))


@cache
def _profile(cpu: str, features: frozenset[str], host: bool) -> CpuProfile:
    neon = "neon" in features or "asimd" in features
    if "avx512f" in features:
        lanes, registers = 16, 32
    elif "avx" in features or "avx2" in features:
        lanes, registers = 8, 16
    elif neon:
        lanes, registers = 4, 32
    else:
        lanes, registers = 4, 16
    l1, l2 = _host_caches() if host else (TYPICAL_L1_BYTES, TYPICAL_L2_BYTES)
    return CpuProfile(cpu=cpu, lanes=lanes, vector_registers=registers,
                      fma_units=2 if "fma" in features or neon else 1, l1_bytes=l1, l2_bytes=l2,
                      avx512_bf16="avx512bf16" in features, amx="amx-tile" in features,
                      amx_bf16="amx-bf16" in features, neon=neon)


def _is_host_cpu(cpu: str) -> bool:
    from tvm.target import codegen

    return cpu == codegen.llvm_get_system_cpu()


@cache
def _host_caches() -> tuple[int, int]:
    """(L1 data, L2) bytes per core of this machine, typical sizes where sysfs does not say."""
    sizes = {1: TYPICAL_L1_BYTES, 2: TYPICAL_L2_BYTES}
    for index in SYSFS_CACHES.glob("index*"):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if level in sizes and kind in ("Data", "Unified") and text.endswith("K"):
            sizes[level] = int(text[:-1]) * 1024
    return sizes[1], sizes[2]
