"""Any other kernel: its leading spatial loops in parallel (`ParallelFallback`, the last fallback rule).

Without a schedule every TIR kernel is a naive single-threaded loop nest. This rule only fuses and
parallelizes enough leading spatial loops of each loop nest to give every core several chunks; the loop
order and the innermost loop, which LLVM vectorizes for the target's vector width, stay as they are.
"""

from __future__ import annotations

from typing import Any

from tvm.s_tir.dlight.analysis import normalize_prim_func

from .blocking import KernelRule, parallel_leading
from .profile import CpuProfile


class ParallelFallback(KernelRule):
    """Parallel leading spatial loops for any CPU kernel."""

    def schedule(self, sch: Any, profile: CpuProfile) -> bool:
        infos = normalize_prim_func(sch)
        if infos is None:
            return False
        for info in infos:
            loops = sch.get_loops(info.block_rv)
            kinds = info.dom_kind()
            if len(loops) < 2 or len(loops) != len(kinds):
                continue
            parallel_leading(sch, loops[:-1], kinds[:-1])
        return True
