"""Default CPU schedules for kernels that have no tuning record.

Without a schedule every TIR kernel is a naive single-threaded loop nest (the text encoder ran at
0.9 GFLOP/s that way). DLight's CPU rules (GEMV, row reductions) made the tiny UNet 25 % slower
single-threaded here, so they are not used; `ParallelFallback` gives every kernel the cheapest schedule
that uses every core: enough leading spatial loops of each loop
nest to give every core several chunks run in parallel; the loop order and the innermost loop, which LLVM
vectorizes, stay as they were.
"""

from __future__ import annotations

from typing import Any

PARALLEL_CHUNKS = 64


def _fallback_rule() -> Any:
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class ParallelFallback(CPUScheduleRule):
        """Parallel leading spatial loops for any CPU kernel."""

        def apply(self, func: Any, target: Any, _: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            for info in infos:
                loops = sch.get_loops(info.block_rv)
                kinds = info.dom_kind()
                if len(loops) < 2 or len(loops) != len(kinds):
                    continue
                outer, chunks = [], 1
                for loop, kind in zip(loops[:-1], kinds[:-1], strict=True):
                    extent = sch.get(loop).extent
                    if kind != "S" or not isinstance(extent, tirx.IntImm) or chunks >= PARALLEL_CHUNKS:
                        break
                    outer.append(loop)
                    chunks *= extent.value
                if chunks > 1:
                    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            return sch

    return ParallelFallback()


def apply_default_cpu_schedules(mod: Any, target: Any) -> Any:
    """Give every still-unscheduled kernel of a CPU module a parallel default schedule."""
    from tvm.s_tir import dlight

    with target:
        return dlight.ApplyDefaultSchedule(_fallback_rule())(mod)
