"""Schedule steps every kernel rule shares: register blocks, parallel loops, and the rule base class.

A register block is a tile of results (rows x vector columns) accumulated in registers over the whole
reduction and written once, through the kernel's epilogue; its size comes from the target's CpuProfile.
Rules find their blocks by the names the graph rewrites give them (each kernel module exports those
names), never by strings copied between modules.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir import ScheduleError
from tvm.s_tir.dlight.analysis import get_sblock_info
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from .profile import CpuProfile, cpu_profile

PARALLEL_CHUNKS = 64


class KernelRule(CPUScheduleRule):
    """A dlight rule that schedules one kind of kernel for the target's CpuProfile, or declines it."""

    def schedule(self, sch: Any, profile: CpuProfile) -> bool:
        """Schedule `sch` in place; False (leaving `sch` to be discarded) when the kernel is not this kind."""
        raise NotImplementedError

    def apply(self, func: Any, target: Any, _: bool) -> Any:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        return sch if self.schedule(sch, cpu_profile(target)) else None


def largest_tile(extent: int, most: int) -> int:
    """The largest power of two up to `most` that divides `extent`."""
    tile = 1 << (max(most, 1).bit_length() - 1)
    while extent % tile:
        tile //= 2
    return tile


def largest_divisor(extent: int, most: int) -> int:
    """The largest divisor of `extent` up to `most` (for unrolled loops, which need not be powers of two)."""
    return next(t for t in range(max(most, 1), 0, -1) if extent % t == 0)


def static_extents(sch: Any, loops: list[Any]) -> list[int] | None:
    """The loops' extents, or None when any is not a constant."""
    extents = [sch.get(loop).extent for loop in loops]
    return [e.value for e in extents] if all(isinstance(e, tirx.IntImm) for e in extents) else None


def block_names(sch: Any) -> list[str]:
    """The names of the function's top-level blocks, in order."""
    return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]


def parallel_leading(sch: Any, loops: list[Any], kinds: str) -> None:
    """Fuse and parallelize the leading spatial loops until every core has several chunks."""
    outer, chunks = [], 1
    for loop, kind in zip(loops, kinds, strict=True):
        extent = sch.get(loop).extent
        if kind != "S" or not isinstance(extent, tirx.IntImm) or chunks >= PARALLEL_CHUNKS:
            break
        outer.append(loop)
        chunks *= extent.value
    if chunks > 1:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def inline_around(sch: Any, name_prefix: str, iter_kinds: str) -> tuple[Any, Any] | None:
    """Find the one block named `name_prefix`* with these iterator kinds and inline every element-wise block
    around it except its direct producers (padding) and the function's output (its epilogue).

    Returns (block, output block), or None when the function is not shaped that way."""
    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    found = [b for b in blocks if sch.get(b).name_hint.startswith(name_prefix)
             and "".join(get_sblock_info(sch, b).dom_kind()) == iter_kinds]
    outputs = sch.get_output_blocks(root)
    if len(found) != 1 or len(outputs) != 1:
        return None
    block, output = found[0], outputs[0]
    keep = {sch.get(b).name_hint for b in (block, output, *sch.get_producers(block))}
    try:
        for other in blocks:
            if sch.get(other).name_hint not in keep:
                sch.compute_inline(other)
    except ScheduleError:
        return None
    return block, output


def accumulate_in_registers(sch: Any, block: Any, output: Any, parallel: list[Any], at: Any,
                            reduction: list[Any], rows: Any, columns: Any) -> None:
    """Loop order parallel, at, reduction, rows, columns; the rows x columns block of results lives in
    registers (a local buffer, rows unrolled, columns as vectors) for the whole reduction and is written,
    through the epilogue, once per block. With no `parallel` loops, `at` must sit under one outer loop."""
    sch.reorder(*parallel, at, *reduction, rows, columns)
    accumulators = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(accumulators, at)
    written = [accumulators]
    if sch.get(output).name_hint != sch.get(block).name_hint:
        sch.reverse_compute_at(output, at)
        written.append(output)
    if parallel:
        sch.parallel(sch.fuse(*parallel) if len(parallel) > 1 else parallel[0])
    sch.unroll(rows)
    sch.vectorize(columns)
    sch.decompose_reduction(block, reduction[0])
    for result in written:
        *outer, inner = sch.get_loops(result)[2:]
        sch.vectorize(inner)
        for loop in outer:
            sch.unroll(loop)
